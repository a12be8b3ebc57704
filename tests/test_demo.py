"""`metastone demo`: the synthetic task's invariants and a shortened run of the whole pipeline (CI budget)."""

from __future__ import annotations

import json
import random

import pytest
from transformers import AutoModel

from metastone_hf.cli import main
from metastone_hf.demo import task


def test_tokenizer_round_trip_and_single_step_token():
    tok = task.build_tokenizer()
    assert len(tok.encode(task.STEP_TEXT, add_special_tokens=False)) == 1
    assert tok.padding_side == "left"
    problem = task.make_problem(3)
    text = problem.prompt + task.teacher_completion(problem, random.Random(0))
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.unk_token_id not in tok.encode(text, add_special_tokens=False)


def test_teacher_errors_concentrate_on_one_wrong_answer():
    rng = random.Random(0)
    problems = task.make_split("train", 200)
    wrong, on_the_trap_answer = 0, 0
    for p in problems:
        for _ in range(20):
            answer = task.extract_answer(task.teacher_completion(p, rng))
            if answer != p.answer:
                wrong += 1
                on_the_trap_answer += answer == p.wrong_answer
        assert task.reward(task.teacher_completion(p, rng, rates=(0.0, 0.0)), p.answer) == 1.0  # perfect teacher
    # wrong trajectories end on the problem's one wrong answer (rarely another: the detour can meet the trap again)
    assert wrong > 500 and on_the_trap_answer / wrong > 0.9
    after = [p for p in problems if p.stale_after]
    assert 0.3 < len(after) / len(problems) < 0.7
    assert task.teacher_error_rate(after[0]) > 0.5  # majority vote is wrong on these problems


def test_splits_are_disjoint_and_reward_is_exact():
    train = {p.uid for p in task.make_split("train", 500)}
    test = {p.uid for p in task.make_split("test", 500)}
    assert not train & test
    assert task.reward("<think>a>a:b(new).\n\n</think>\\boxed{b}", "b") == 1.0
    assert task.reward("<think>a>a:b(new).\n\n</think>\\boxed{c}", "b") == 0.0
    assert task.reward("\\boxed{b} without think end", "b") == 0.0


@pytest.mark.slow
def test_shortened_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output-dir", str(out), "--no-progress", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "| bon_sprm |" in printed and "Targets:" in printed and "wall time" in printed
    assert {"checkpoint", "results.md", "accuracy_vs_n.png", "demo_report.json", "demo_run.json"} <= {
        p.name for p in out.iterdir()
    }
    model = AutoModel.from_pretrained(out / "checkpoint", trust_remote_code=True)
    assert hasattr(model, "score_trajectories")
    card = (out / "checkpoint" / "README.md").read_text()
    assert "bon_sprm@8 (medium)" in card and "stale-fact" in card
    run = json.loads((out / "demo_run.json").read_text())
    assert run["config"]["sft_steps"] == 30 and set(run["timings_s"]) >= {"sft", "grpo+spr", "eval", "total"}
    # the output folder is never silently overwritten
    assert main(["demo", "--quick", "--output-dir", str(out), "--no-progress"]) == 2
