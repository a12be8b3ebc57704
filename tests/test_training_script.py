"""`metastone train`'s argument handling: YAML config keys checked, rewards sized from the run's own settings."""

from __future__ import annotations

import json

import pytest

from metastone_hf import cli


class Stop(Exception):
    """Raised by the stand-in trainer: everything up to the trainer ran."""


@pytest.fixture
def received(monkeypatch):
    from metastone_hf.training import trainer as trainer_module

    got: dict = {}

    def fake_trainer(**kwargs):
        got.update(kwargs)
        raise Stop

    monkeypatch.setattr(trainer_module, "SPRMGRPOTrainer", fake_trainer)
    return got


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": str(i)}) + "\n" for i in range(4)))
    return path


def base_args(tmp_path, data) -> list[str]:
    return ["--model_name_or_path", "unused", "--dataset_path", str(data), "--output_dir", str(tmp_path / "out"),
            "--use_cpu", "--bf16", "false", "--report_to", "none"]  # fmt: skip


def test_a_mistyped_yaml_key_is_refused(tmp_path, data, received, capsys):
    from metastone_hf.training.script import run_training_cli

    good = tmp_path / "good.yaml"
    good.write_text("learning_rate: 2.0e-6\nsprm_learning_rate: 1.0e-5\n")
    with pytest.raises(Stop):
        run_training_cli([*base_args(tmp_path, data), "--config", str(good)])
    assert received["args"].learning_rate == 2e-6 and received["args"].sprm_learning_rate == 1e-5
    typo = tmp_path / "typo.yaml"
    typo.write_text("learning_rate: 2.0e-6\nsprm_learnig_rate: 1.0e-5\n")
    assert cli.main(["train", *base_args(tmp_path, data), "--config", str(typo)]) == 2
    assert "sprm_learnig_rate" in capsys.readouterr().err


@pytest.mark.parametrize(("budget", "window"), [(2048, 256), (64, 16)])
def test_the_overlong_penalty_follows_max_completion_length(tmp_path, data, received, budget, window):
    from metastone_hf.training.script import run_training_cli

    argv = [*base_args(tmp_path, data), "--max_completion_length", str(budget),
            "--reward_funcs", "accuracy_reward", "get_soft_overlong_punishment"]  # fmt: skip
    with pytest.raises(Stop):
        run_training_cli(argv)
    penalty = received["reward_funcs"][1]
    # DAPO's soft penalty: 0 up to budget - window, then linear down to -1 at the budget, -1 beyond.
    lengths = [budget - window, budget - window // 2, budget, budget + 1]
    assert penalty(completion_ids=[[1] * n for n in lengths]) == pytest.approx([0.0, -0.5, -1.0, -1.0])
