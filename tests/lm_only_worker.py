"""Worker of ``test_training_lm_only.py``: LM-loss-only training of a MetaStone model on every rank.

``accelerate launch ... lm_only_worker.py OUT TRAINER`` with ``TRAINER`` = ``sft`` (TRL's ``SFTTrainer``, whose
fused LM-head path never runs the SPRM head) or ``trainer`` (transformers' ``Trainer`` on ``labels``, the model's
own LM loss). Either way the head is frozen first, as the README says to. Gradient checkpointing is on. Writes
``rank<N>.json`` with what the test checks.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def worker(output_dir: str, trainer_kind: str) -> None:
    import torch

    torch.set_num_threads(1)
    import transformers
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments
    from trl import SFTConfig, SFTTrainer

    from metastone_hf.tiny import tiny_metastone_for_tokenizer, tiny_tokenizer

    transformers.logging.set_verbosity_error()
    tokenizer = tiny_tokenizer()
    model = tiny_metastone_for_tokenizer(tokenizer, seed=0)
    head_before = {k: v.detach().clone() for k, v in model.sprm_head.state_dict().items()}
    embed_before = model.model.embed_tokens.weight.detach().clone()
    texts = [f"Question: {i} plus {i}? <think>\n{i} + {i} = {2 * i}.\n\n</think> \\boxed{{{2 * i}}}" for i in range(32)]
    common = {
        "output_dir": str(Path(output_dir) / "run"),
        "use_cpu": True,
        "bf16": False,
        "per_device_train_batch_size": 4,
        "max_steps": 3,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "report_to": "none",
        "save_strategy": "no",
        "gradient_checkpointing": True,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }
    dataset = Dataset.from_dict({"text": texts})
    model.sprm_head.requires_grad_(False)
    if trainer_kind == "sft":
        trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=dataset, processing_class=tokenizer)
    else:
        tokenized = dataset.map(lambda row: tokenizer(row["text"]), remove_columns=["text"])
        trainer = Trainer(
            model=model,
            args=TrainingArguments(**common, remove_unused_columns=False),
            train_dataset=tokenized,
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        )
    trainer.train()
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    state = trainer.accelerator.state
    result = {
        "num_processes": state.num_processes,
        "distributed_type": str(state.distributed_type),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "head_unchanged": all(torch.equal(v, head_before[k]) for k, v in unwrapped.sprm_head.state_dict().items()),
        "backbone_moved": float((unwrapped.model.embed_tokens.weight.detach() - embed_before).abs().max()),
        "embed_sample": unwrapped.model.embed_tokens.weight.detach().flatten()[:32].tolist(),
        "gradient_checkpointing": bool(getattr(unwrapped, "is_gradient_checkpointing", False)),
    }
    (Path(output_dir) / f"rank{state.process_index}.json").write_text(json.dumps(result))
    # Both ranks have written their records; end without the interpreter's teardown, where gloo's threads can abort
    # the process ("terminate called without an active exception") after a successful run.
    trainer.accelerator.wait_for_everyone()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
