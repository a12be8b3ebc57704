"""GRPO + SPR loss training of a MetaStone-S1 model, in the style of TRL's ``trl/scripts/grpo.py``.

Same flags as ``trl grpo`` (script, ``SPRMGRPOConfig`` = ``GRPOConfig`` + ``--sprm_*``, ``ModelConfig``, dataset
mixture), plus:

* ``--dataset_name gsm8k|math500|aime24``: a registered math benchmark, downloaded from the Hub with ``datasets``
  (``openai/gsm8k`` config ``main``, ``HuggingFaceH4/MATH-500``, ``HuggingFaceH4/aime_2024``; see
  :data:`metastone_hf.math_datasets.MATH_DATASETS`). Its training split is read (GSM8K: ``train``; the others have
  only their benchmark split) unless ``--dataset_train_split`` names another. Any other ``--dataset_name`` is
  loaded as by ``trl grpo``;
* ``--dataset_path PATH``: a local math dataset, a ``.jsonl`` / ``.json`` / ``.parquet`` file, a folder written by
  ``save_to_disk`` or a folder holding one such file (GSM8K ``question``/``answer`` with ``#### N``, MATH-500
  ``problem``/``answer``, AIME ``prompt``/``answer``, or already ``prompt``/``solution``).

Both are turned into conversational prompts ending with the paper's instruction and a ``solution`` column for the
reward. ``--export_dataset_dir DIR`` writes that converted dataset as ``DIR/train.jsonl`` and exits, so that plain
``trl grpo --dataset_name DIR`` can train on it too.

Rewards: ``accuracy_reward`` from ``trl.rewards`` (math-verify) by default; any name of the ``trl grpo``
registry or a dotted import path.

Run it as ``metastone train ...`` or ``python examples/grpo_sprm.py ...``. CPU smoke run (2 steps, see
examples/README.md):

    python -c "from metastone_hf.tiny import save_tiny_checkpoint; save_tiny_checkpoint('tiny-metastone')"
    python examples/grpo_sprm.py --model_name_or_path tiny-metastone \
        --dataset_name gsm8k --max_train_samples 32 \
        --output_dir out/grpo-sprm-tiny --max_steps 2 --per_device_train_batch_size 4 --num_generations 4 \
        --max_completion_length 32 --use_cpu --bf16 false --gradient_checkpointing false \
        --logging_steps 1 --report_to none --save_strategy no
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl import ScriptArguments

from ..math_datasets import MATH_DATASETS, PROMPT_FIELDS, MathDatasetSpec, gold_answer, load_math_rows, prompt_field_of

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class SPRMScriptArguments(ScriptArguments):
    """Script arguments of the GRPO + SPRM script (those of ``trl grpo`` plus math datasets by name or path).

    ``dataset_name`` may also be a registered math benchmark (``gsm8k``, ``math500``, ``aime24``): it is then
    downloaded from the Hub and converted like ``dataset_path``.

    Args:
        dataset_path (`str`, *optional*):
            Local math dataset: a ``.jsonl`` / ``.json`` / ``.parquet`` file, a ``save_to_disk`` folder or a folder
            holding one such file (GSM8K, MATH-500, AIME formats or ``prompt``/``solution``). Overrides
            ``dataset_name``.
        max_train_samples (`int`, *optional*):
            Keep only the first N rows of the training split.
        instruction (`str`):
            Appended to every question (the paper's prompt suffix).
        export_dataset_dir (`str`, *optional*):
            Write the converted dataset to ``DIR/train.jsonl`` and exit (for ``trl grpo --dataset_name DIR``).
        reward_model_name_or_path (`str`, *optional*):
            A reward model, as in ``trl grpo``.
        reward_funcs (`list[str]`, *optional*):
            Reward functions: ``accuracy_reward`` (default), ``reasoning_accuracy_reward``, ``think_format_reward``,
            ``get_soft_overlong_punishment`` (DAPO's soft overlong penalty over the run's ``max_completion_length``,
            its last quarter, at most 256 tokens, penalised linearly) or a dotted import path.
    """

    dataset_path: str | None = field(
        default=None,
        metadata={"help": "Local math dataset (.jsonl/.json/.parquet file or dataset folder; GSM8K/MATH-500/AIME)."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training rows."})
    instruction: str = field(default=DEFAULT_INSTRUCTION, metadata={"help": "Appended to every question."})
    export_dataset_dir: str | None = field(
        default=None, metadata={"help": "Write the converted dataset to DIR/train.jsonl and exit."}
    )
    reward_model_name_or_path: str | None = field(default=None, metadata={"help": "Reward model id or path."})
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward functions: `accuracy_reward` (default), `reasoning_accuracy_reward`, "
            "`think_format_reward`, `get_soft_overlong_punishment`, or a dotted import path."
        },
    )


def math_row_to_grpo(row: dict[str, Any], instruction: str, spec: MathDatasetSpec | None = None) -> dict[str, Any]:
    """One GSM8K / MATH-500 / AIME row -> ``{"prompt": [user message], "solution": gold answer}``.

    ``spec`` is the registered dataset the row comes from (its field names win); rows that already have ``prompt``
    and ``solution`` are kept as they are.
    """
    if "prompt" in row and "solution" in row:
        return {"prompt": row["prompt"], "solution": str(row["solution"])}
    prompt_field = prompt_field_of(row, spec)
    if prompt_field is None:
        raise ValueError(f"No {'/'.join(PROMPT_FIELDS)} field in row with keys {sorted(row)}.")
    answer = gold_answer(row, spec.answer_field if spec else "answer")
    question = str(row[prompt_field]).strip()
    if instruction and instruction not in question:
        question = f"{question}\n{instruction}"
    return {"prompt": [{"role": "user", "content": question}], "solution": f"${answer}$"}


TRAIN_LOCAL_HINT = "pass a local file with --dataset_path PATH"


def load_math_dataset(source: str | Path, instruction: str, max_samples: int | None = None, split: str | None = None):
    """A math dataset as a ``datasets.Dataset`` with ``prompt`` (conversational) and ``solution``.

    ``source`` is a registered name (a ``str``: downloaded from the Hub, ``split`` defaulting to its training
    split) or a local file or dataset folder (a ``Path``: ``split`` defaulting to ``train``, which picks a
    ``DatasetDict``'s split or a folder's ``train.jsonl``); see :func:`metastone_hf.math_datasets.load_math_rows`.
    """
    from datasets import Dataset

    if isinstance(source, str) and source in MATH_DATASETS:
        split = split or MATH_DATASETS[source].train_split
    else:
        source, split = Path(source), split or "train"
    loaded = load_math_rows(source, split=split, limit=max_samples, local_hint=TRAIN_LOCAL_HINT)
    return Dataset.from_list([math_row_to_grpo(row, instruction, loaded.spec) for row in loaded.rows])


def _requested_split(script_args: SPRMScriptArguments, name: str) -> str | None:
    """``--dataset_<name>`` when the user changed it from TRL's default, else ``None`` (the dataset's own split)."""
    value = getattr(script_args, name)
    default = next(f.default for f in dataclasses.fields(ScriptArguments) if f.name == name)
    return None if value == default else value


def math_dataset_source(script_args: SPRMScriptArguments) -> str | Path | None:
    """What this run reads as a math dataset: ``--dataset_path`` (a ``Path``), a registered ``--dataset_name``
    (its name), or ``None`` when TRL's own dataset loading applies."""
    if script_args.dataset_path:
        return Path(script_args.dataset_path)
    if script_args.dataset_name in MATH_DATASETS:
        return script_args.dataset_name
    return None


def overlong_cache(max_completion_length: int) -> int:
    """Soft overlong penalty window: the last quarter of the completion budget, at most 256 tokens."""
    return max(1, min(256, max_completion_length // 4))


def resolve_reward_funcs(script_args: SPRMScriptArguments, max_completion_length: int) -> list[Any]:
    from trl.rewards import (
        accuracy_reward,
        get_soft_overlong_punishment,
        reasoning_accuracy_reward,
        think_format_reward,
    )

    registry = {
        "accuracy_reward": accuracy_reward,
        "reasoning_accuracy_reward": reasoning_accuracy_reward,
        "think_format_reward": think_format_reward,
        "get_soft_overlong_punishment": get_soft_overlong_punishment(
            max_completion_len=max_completion_length, soft_punish_cache=overlong_cache(max_completion_length)
        ),
    }
    reward_funcs: list[Any] = []
    if script_args.reward_model_name_or_path:
        reward_funcs.append(script_args.reward_model_name_or_path)
    for name in script_args.reward_funcs or ([] if reward_funcs else ["accuracy_reward"]):
        if name in registry:
            reward_funcs.append(registry[name])
        elif "." in name:
            module_path, func_name = name.rsplit(".", 1)
            sys.path.insert(0, os.getcwd())
            reward_funcs.append(getattr(importlib.import_module(module_path), func_name))
        else:
            raise ValueError(f"Unknown reward function {name!r}: one of {sorted(registry)} or a dotted import path.")
    return reward_funcs


def main(script_args, training_args, model_args, dataset_args) -> None:
    from datasets import load_dataset
    from trl import get_dataset, get_peft_config, get_quantization_config

    from .trainer import SPRMGRPOTrainer

    source = math_dataset_source(script_args)
    if source is not None:
        train_dataset = load_math_dataset(
            source,
            script_args.instruction,
            script_args.max_train_samples,
            _requested_split(script_args, "dataset_train_split"),
        )
        eval_dataset = None
        if isinstance(source, str) and training_args.eval_strategy != "no":
            test_split = _requested_split(script_args, "dataset_test_split") or MATH_DATASETS[source].split
            eval_dataset = load_math_dataset(source, script_args.instruction, split=test_split)
    else:
        if dataset_args.datasets:
            dataset = get_dataset(dataset_args)
        elif script_args.dataset_name:
            dataset = load_dataset(
                script_args.dataset_name, name=script_args.dataset_config, streaming=script_args.dataset_streaming
            )
        else:
            raise ValueError(
                f"Give `--dataset_name` ({', '.join(sorted(MATH_DATASETS))} or any Hub dataset), `--dataset_path PATH` "
                "or `--datasets`."
            )
        train_dataset = dataset[script_args.dataset_train_split]
        if script_args.max_train_samples is not None:
            train_dataset = train_dataset.select(range(min(script_args.max_train_samples, len(train_dataset))))
        eval_dataset = dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None

    model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    if training_args.model_init_kwargs is not None:
        model_init_kwargs.update(training_args.model_init_kwargs)
    training_args.model_init_kwargs = model_init_kwargs

    trainer = SPRMGRPOTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=resolve_reward_funcs(script_args, training_args.max_completion_length),
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),  # `sprm_head` is added to modules_to_save automatically
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.accelerator.print("Training completed.")
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model (policy + SPRM head) saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    if hasattr(trainer, "end"):
        trainer.end()


def export_dataset(script_args: SPRMScriptArguments) -> None:
    """Write the converted dataset to ``--export_dataset_dir``/train.jsonl (for plain ``trl grpo``)."""
    source = math_dataset_source(script_args)
    if source is None:
        raise ValueError(
            f"`--export_dataset_dir` needs `--dataset_path PATH` or `--dataset_name` {'|'.join(sorted(MATH_DATASETS))}."
        )
    dataset = load_math_dataset(
        source,
        script_args.instruction,
        script_args.max_train_samples,
        _requested_split(script_args, "dataset_train_split"),
    )
    os.makedirs(script_args.export_dataset_dir, exist_ok=True)
    target = os.path.join(script_args.export_dataset_dir, "train.jsonl")
    dataset.to_json(target, lines=True)
    print(f"Wrote {len(dataset)} rows to {target}.")


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    from trl import DatasetMixtureConfig, ModelConfig, TrlParser

    from .trainer import SPRMGRPOConfig

    dataclass_types = (SPRMScriptArguments, SPRMGRPOConfig, ModelConfig, DatasetMixtureConfig)
    if subparsers is not None:
        return subparsers.add_parser("grpo_sprm", help="GRPO + SPR loss", dataclass_types=dataclass_types)
    return TrlParser(dataclass_types, prog=prog)


def run_training_cli(argv: list[str] | None = None) -> int:
    """Entry point of ``metastone train`` and ``examples/grpo_sprm.py``: parse ``trl grpo``-style flags and train."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg.startswith("--export_dataset_dir") for arg in argv):
        # Dataset conversion only: parse the script arguments alone (no training config to validate).
        from transformers import HfArgumentParser

        (export_args, _) = HfArgumentParser(SPRMScriptArguments).parse_args_into_dataclasses(
            args=argv, return_remaining_strings=True
        )
        export_dataset(export_args)
        return 0
    parser = make_parser(prog="metastone train")
    # A mistyped key in a --config YAML file is refused (it would otherwise be ignored without a word).
    try:
        script_args, training_args, model_args, dataset_args = parser.parse_args_and_config(args=argv)
    except ValueError as error:
        if "Unknown arguments from config file" not in str(error):
            raise
        unknown = str(error).split(":", 1)[1].split(". Please")[0].strip()
        raise ValueError(
            f"the --config file has keys no `metastone train` argument takes: {unknown}. Check their spelling "
            "against `metastone train --help`."
        ) from None
    main(script_args, training_args, model_args, dataset_args)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_training_cli())
