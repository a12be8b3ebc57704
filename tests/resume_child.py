"""Child process of tests/test_training_resume.py: a short SPRMGRPOTrainer run that checkpoints every 2 steps.

Usage: python resume_child.py OUTPUT_DIR LOG.jsonl MAX_STEPS [--resume] [--step-delay SECONDS]
Appends one JSON line per optimizer step (step, loss, sprm loss) to LOG.jsonl, fsync'ed so a SIGKILL loses
nothing already written. With --resume it restarts from the last complete checkpoint and also writes
OUTPUT_DIR/resume_checks.json: what was restored, read at the first resumed step.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from safetensors.torch import load_file
from test_training_trainer import SyntheticTask
from transformers import TrainerCallback
from transformers.trainer_pt_utils import safe_globals
from transformers.trainer_utils import get_last_checkpoint


class StepLog(TrainerCallback):
    def __init__(self, path: Path, delay: float, checkpoint: str | None) -> None:
        self.path, self.delay, self.checkpoint, self.checked = path, delay, checkpoint, False

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.checkpoint is None or self.checked:
            return
        self.checked = True
        saved = load_file(os.path.join(self.checkpoint, "model.safetensors"))
        saved_optimizer = torch.load(os.path.join(self.checkpoint, "optimizer.pt"), weights_only=True)
        with safe_globals():  # transformers' own allow-list for the numpy RNG state it pickles
            saved_rng = torch.load(os.path.join(self.checkpoint, "rng_state.pth"), weights_only=True)
        live_optimizer = optimizer.state_dict()
        checks = {
            "checkpoint": os.path.basename(self.checkpoint),
            "global_step": state.global_step,
            "head_restored": all(
                torch.equal(saved[f"sprm_head.{k}"], v) for k, v in model.sprm_head.state_dict().items()
            ),
            "optimizer_restored": all(
                torch.equal(live_optimizer["state"][i][name], value)
                for i, entry in saved_optimizer["state"].items()
                for name, value in entry.items()
            ),
            "head_group_lr": next(g["lr"] for g in optimizer.param_groups if g.get("name") == "sprm_head"),
            "policy_group_lr": next(g["lr"] for g in optimizer.param_groups if g.get("name") != "sprm_head"),
            "rng_restored": torch.equal(torch.get_rng_state(), saved_rng["cpu"]),
        }
        (Path(args.output_dir) / "resume_checks.json").write_text(json.dumps(checks))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            with self.path.open("a") as f:
                f.write(
                    json.dumps({"step": state.global_step, "loss": logs["loss"], "sprm_loss": logs.get("sprm/loss")})
                    + "\n"
                )
                f.flush()
                os.fsync(f.fileno())
        time.sleep(self.delay)  # widen the window in which the parent can kill us mid-run


def main() -> None:
    output_dir, log, max_steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    resume = "--resume" in sys.argv
    delay = float(sys.argv[sys.argv.index("--step-delay") + 1]) if "--step-delay" in sys.argv else 0.0
    task = SyntheticTask()
    checkpoint = get_last_checkpoint(str(output_dir)) if resume else None
    if resume and checkpoint is None:
        raise SystemExit(f"no complete checkpoint in {output_dir}")
    trainer = task.trainer(
        output_dir, max_steps=max_steps, save_strategy="steps", save_steps=2, sprm_learning_rate=1e-2
    )
    trainer.add_callback(StepLog(log, delay, checkpoint))
    trainer.train(resume_from_checkpoint=checkpoint)


if __name__ == "__main__":
    main()
