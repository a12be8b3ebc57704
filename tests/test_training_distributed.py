"""`SPRMGRPOTrainer` under ``accelerate launch --num_processes 2`` on CPU (gloo DDP).

The test launches this very file as the worker. Each rank checks that its SPRM labels belong to its own slice
of the all-process rewards, that the class counts of the loss are summed over both processes, and writes the
head's final weights; the test then checks that both ranks hold the same trained head.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def worker(output_dir: str) -> None:
    """Runs on every rank (``accelerate launch ... this_file.py OUTPUT_DIR``)."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE))
    import transformers
    from test_training_trainer import SyntheticTask

    import metastone_hf.training.trainer as trainer_module

    transformers.logging.set_verbosity_error()
    task = SyntheticTask()
    records: dict[str, list] = {"local_counts": [], "reduced_counts": [], "label_checks": 0}
    original_loss = trainer_module.sprm_loss

    def recording_loss(*args, count_reduce=None, **kwargs):
        def reduce(counts):
            reduced = count_reduce(counts)
            records["local_counts"].append(counts.tolist())
            records["reduced_counts"].append(reduced.tolist())
            return reduced

        return original_loss(*args, count_reduce=reduce, **kwargs)

    trainer_module.sprm_loss = recording_loss

    class CheckedTrainer(trainer_module.SPRMGRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            for ids, mask, correct in zip(output["completion_ids"], output["completion_mask"], output["sprm_correct"]):
                assert bool(correct) == task.label(ids[mask.bool()].tolist()), "label from another rank's slice"
                records["label_checks"] += 1
            return output

    model = task.model(seed=0)
    initial = model.sprm_head[0].weight.detach().clone()
    trainer = CheckedTrainer(
        model=model,
        reward_funcs=task.reward,
        args=task.args(Path(output_dir) / "run", max_steps=3, per_device_train_batch_size=8, disable_tqdm=True),
        train_dataset=task.dataset(),
        processing_class=task.tok,
    )
    trainer.train()
    state = trainer.accelerator.state
    head = trainer.accelerator.unwrap_model(trainer.model).sprm_head
    result = {
        "distributed_type": str(state.distributed_type),
        "num_processes": state.num_processes,
        "head_weight": head[0].weight.detach().flatten()[:64].tolist(),
        "head_moved": float((head[0].weight.detach() - initial).abs().max()),
        "sprm_logged": [h["sprm/loss"] for h in trainer.state.log_history if "sprm/loss" in h],
        "head_grad_norms": [h["sprm/grad_norm"] for h in trainer.state.log_history if "sprm/grad_norm" in h],
        "policy_grad_norms": [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h],
        **records,
    }
    rank = state.process_index
    (Path(output_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    trainer.accelerator.wait_for_everyone()
    # Tear gloo down explicitly: left to interpreter exit, its threads can abort the process
    # ("terminate called without an active exception") after training has already succeeded.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_accelerate_launch(tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("accelerate CLI not found")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    # The shipped multi-GPU DDP config, overridden to 2 CPU processes (the trainer's `use_cpu=True` picks gloo).
    config = HERE.parent / "examples" / "accelerate" / "multi_gpu.yaml"
    command = [
        accelerate, "launch", "--config_file", str(config), "--num_processes", "2", "--mixed_precision", "no",
        "--main_process_port", str(_free_port()), str(Path(__file__).resolve()), str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in ranks:
        assert result["distributed_type"] == "DistributedType.MULTI_CPU"
        assert result["num_processes"] == 2
        assert result["label_checks"] >= 8 * 3
        assert result["head_moved"] > 0
        assert len(result["reduced_counts"]) == 3
    # Class counts are summed over both processes (each rank sees the same global counts).
    for step in range(3):
        local = [r["local_counts"][step] for r in ranks]
        summed = [local[0][i] + local[1][i] for i in range(2)]
        assert ranks[0]["reduced_counts"][step] == summed == ranks[1]["reduced_counts"][step]
    # The head is clipped on its own after DDP averaged the gradients: both ranks see the same head and policy norms.
    for key in ("head_grad_norms", "policy_grad_norms"):
        assert len(ranks[0][key]) == 3 and ranks[0][key] == pytest.approx(ranks[1][key], rel=1e-6)
    assert ranks[0]["head_grad_norms"] != pytest.approx(ranks[0]["policy_grad_norms"])
    # DDP keeps the head identical on both ranks.
    assert ranks[0]["head_weight"] == pytest.approx(ranks[1]["head_weight"], abs=1e-7)


if __name__ == "__main__":
    worker(sys.argv[1])
