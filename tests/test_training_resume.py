"""Interrupted training loses nothing: SIGKILL mid-run, resume from the last checkpoint, same loss curve."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
MAX_STEPS = 8


def child(output_dir: Path, log: Path, *extra: str) -> list[str]:
    return [sys.executable, str(HERE / "resume_child.py"), str(output_dir), str(log), str(MAX_STEPS), *extra]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def read_log(path: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {row["step"]: row for row in rows}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[int, dict]:
    folder = tmp_path_factory.mktemp("uninterrupted")
    proc = subprocess.run(
        child(folder / "run", folder / "log.jsonl"), env=env(), cwd=HERE, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = read_log(folder / "log.jsonl")
    assert sorted(log) == list(range(1, MAX_STEPS + 1))
    return log


@pytest.mark.slow
@pytest.mark.parametrize("attempt", [1, 2, 3])
def test_sigkill_then_resume_matches_uninterrupted_run(uninterrupted, tmp_path, attempt):
    run, log = tmp_path / "run", tmp_path / "log.jsonl"
    kill_after = 4 + attempt  # kill at a different point each time (steps 5, 6, 7)
    proc = subprocess.Popen(
        child(run, log, "--step-delay", "0.3"), env=env(), cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if log.exists() and max(read_log(log), default=0) >= kill_after:
                break
            if proc.poll() is not None:
                pytest.fail(f"child ended before it was killed: {proc.stderr.read().decode()[-3000:]}")
            time.sleep(0.05)
        else:
            pytest.fail("child made no progress")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(read_log(log))
    assert killed_at < MAX_STEPS  # really interrupted mid-run
    complete = sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint-"))
    for name in complete:  # every visible checkpoint is complete: staging folders are hidden
        assert {"model.safetensors", "optimizer.pt", "trainer_state.json", "rng_state.pth"} <= set(
            os.listdir(run / name)
        )

    resumed_log = tmp_path / "resumed.jsonl"
    result = subprocess.run(
        child(run, resumed_log, "--resume"), env=env(), cwd=HERE, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    checks = json.loads((run / "resume_checks.json").read_text())
    resumed_from = int(checks["checkpoint"].split("-")[1])
    assert resumed_from == int(complete[-1].split("-")[1]) and resumed_from >= 2
    assert checks["global_step"] == resumed_from
    assert checks["head_restored"] and checks["optimizer_restored"] and checks["rng_restored"]
    # The policy decays linearly; the head's constant schedule survives the resume.
    assert checks["policy_group_lr"] == pytest.approx(1e-6 * (1 - resumed_from / MAX_STEPS), rel=1e-6)
    assert checks["head_group_lr"] == pytest.approx(1e-2, rel=1e-6)

    resumed = read_log(resumed_log)
    assert sorted(resumed) == list(range(resumed_from + 1, MAX_STEPS + 1))
    for step, row in resumed.items():
        assert row["loss"] == pytest.approx(uninterrupted[step]["loss"], rel=1e-5, abs=1e-7), step
        assert row["sprm_loss"] == pytest.approx(uninterrupted[step]["sprm_loss"], rel=1e-5, abs=1e-7), step


def test_a_save_that_fails_midway_leaves_no_checkpoint(tmp_path, monkeypatch):
    from test_training_trainer import SyntheticTask
    from transformers.trainer_utils import get_last_checkpoint

    trainer = SyntheticTask().trainer(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    original = type(trainer)._save_rng_state
    calls = {"n": 0}

    def fail_on_second_save(self, output_dir):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full while saving")
        return original(self, output_dir)

    monkeypatch.setattr(type(trainer), "_save_rng_state", fail_on_second_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    # the model and optimizer of step 4 were written, but only into the hidden staging folder
    assert sorted(p.name for p in tmp_path.iterdir() if "checkpoint" in p.name) == [
        "_partial-checkpoint-4",
        "checkpoint-2",
    ]
    assert get_last_checkpoint(str(tmp_path)).endswith("checkpoint-2")
