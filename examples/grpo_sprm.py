"""GRPO + SPR loss training of a MetaStone-S1 model, in the style of TRL's ``trl/scripts/grpo.py``.

The script lives in the package (``metastone_hf.training.script``) so that ``metastone train`` runs the very
same code: every flag of ``trl grpo``, plus the ``--sprm_*`` fields and ``--dataset_path FILE.jsonl``.
examples/README.md has the CPU smoke run (2 steps), multi-GPU, DeepSpeed and multi-node launch commands.
"""

from metastone_hf.training.script import run_training_cli

if __name__ == "__main__":
    raise SystemExit(run_training_cli())
