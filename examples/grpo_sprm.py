"""GRPO + SPR loss training of a MetaStone-S1 model, in the style of TRL's ``trl/scripts/grpo.py``.

The script lives in the package (``metastone_hf.training.script``) so that ``metastone train`` runs the very
same code; every flag of ``trl grpo`` works, plus the ``--sprm_*`` ones and ``--dataset_path FILE.jsonl``.
See examples/README.md for CPU, multi-GPU and DeepSpeed launch commands, e.g. (2 steps on CPU):

    python -c "from metastone_hf.tiny import save_tiny_checkpoint; save_tiny_checkpoint('tiny-metastone')"
    python examples/grpo_sprm.py --model_name_or_path tiny-metastone \
        --dataset_path ../shared/data/gsm8k_test.jsonl --max_train_samples 32 \
        --output_dir out/grpo-sprm-tiny --max_steps 2 --per_device_train_batch_size 4 --num_generations 4 \
        --max_completion_length 32 --use_cpu --bf16 false --gradient_checkpointing false \
        --logging_steps 1 --report_to none --save_strategy no
"""

from metastone_hf.training.script import run_training_cli

if __name__ == "__main__":
    raise SystemExit(run_training_cli())
