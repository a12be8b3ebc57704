"""The test-time-scaling `evaluate` module: loads offline, computes the numbers of `metastone_hf.metrics`,
ships in the wheel, and is what `summarize` (so `metastone eval`) reports through."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from reference import reference_majority, reference_sprm_vote

from metastone_hf import evaluation
from metastone_hf.evaluation import EvalRecords, summarize
from metastone_hf.metrics import evaluate_module_path

REPO = Path(__file__).resolve().parents[1]

# Two questions, M = 4 candidates. Candidates with the same answer are equally right.
CORRECT = [[1, 0, 0, 1], [0, 1, 0, 0]]
SCORES = [[0.2, 0.9, 0.8, 0.1], [0.3, 0.6, 0.5, 0.4]]
ANSWERS = [["5", "7", "7", "5"], ["2", "3", "2", None]]
BUDGETS = {"low": 2, "medium": 4}

# Worked out by hand (groups of N=2: candidates (0,1) and (2,3); N=4: one group):
EXPECTED = {
    "pass@1": (2 / 4 + 1 / 4) / 2,
    # BoN: q0 picks 1 (0.9, wrong) and 2 (0.8, wrong); q1 picks 1 (0.6, right) and 2 (0.5, wrong)
    "bon_sprm@2 (low)": (0 + 0.5) / 2,
    # majority: ties go to the answer seen first: q0 "5" (right), "7" (wrong); q1 "2", "2" (wrong)
    "majority@2 (low)": (0.5 + 0) / 2,
    # weighted vote: q0 "7" (0.9 > 0.2), "7" (0.8 > 0.1); q1 "3" (0.6 > 0.3), "2" (None does not vote)
    "sprm_vote@2 (low)": (0 + 0.5) / 2,
    "random@2 (low)": ((0.5 + 0.5) / 2 + (0.5 + 0) / 2) / 2,
    "bon_sprm@4 (medium)": (0 + 1) / 2,
    "majority@4 (medium)": (1 + 0) / 2,  # q0: "5" and "7" tie at 2 votes, "5" seen first; q1: "2" has 2 votes
    "sprm_vote@4 (medium)": (0 + 0) / 2,  # q0: "7" 1.7 vs "5" 0.3; q1: "2" 0.8 vs "3" 0.6
    "random@4 (medium)": (2 / 4 + 1 / 4) / 2,
    # right scores 0.2, 0.1, 0.6 vs wrong 0.9, 0.8, 0.3, 0.5, 0.4: only 0.6 beats three of them -> 3 / 15
    "sprm_auc": 3 / 15,
}


@pytest.fixture(scope="module")
def metric():
    import evaluate

    return evaluate.load(str(evaluate_module_path()), keep_in_memory=True)


def test_module_computes_the_hand_worked_values(metric):
    results = metric.compute(correct=CORRECT, scores=SCORES, answers=ANSWERS, budgets=BUDGETS)
    assert list(results) == [
        "pass@1",
        *(f"{m}@2 (low)" for m in ("majority", "random", "sprm_vote", "bon_sprm")),
        *(f"{m}@4 (medium)" for m in ("majority", "random", "sprm_vote", "bon_sprm")),
        "sprm_auc",
    ]
    assert results == pytest.approx(EXPECTED)
    # plain Ns label themselves, an N above M is left out, booleans count as 0/1
    plain = metric.compute(correct=np.array(CORRECT, bool).tolist(), scores=SCORES, answers=ANSWERS, budgets=[4, 8])
    assert plain == pytest.approx({"pass@1": 0.375, "majority@4": 0.5, "random@4": 0.375, "sprm_vote@4": 0.0,
                                   "bon_sprm@4": 0.5, "sprm_auc": 0.2})  # fmt: skip


def slow_reference_metrics(correct, scores, answers, budgets: dict[str, int]) -> dict[str, float]:
    """Every metric written out with loops: K = M // N groups of N consecutive candidates per question, each group's
    pick graded, averaged over groups then questions (the official averaging)."""
    questions, m = len(correct), len(correct[0])

    def best(indices):  # highest score, NaN last, ties: the first
        key = [float("-inf") if math.isnan(scores[q_][i]) else scores[q_][i] for i in indices]
        return indices[key.index(max(key))]

    out = {"pass@1": sum(sum(row) / m for row in correct) / questions}
    for label, n in sorted(budgets.items(), key=lambda item: item[1]):
        picks = {"majority": [], "random": [], "sprm_vote": [], "bon_sprm": []}
        for q_ in range(questions):
            groups = [list(range(k * n, (k + 1) * n)) for k in range(m // n)]
            acc = {name: 0.0 for name in picks}
            for g in groups:
                group_answers = [answers[q_][i] for i in g]
                group_scores = [scores[q_][i] for i in g]
                acc["majority"] += correct[q_][g[reference_majority(group_answers)]]
                acc["random"] += sum(correct[q_][i] for i in g) / n
                acc["sprm_vote"] += correct[q_][g[reference_sprm_vote(group_scores, group_answers)]]
                acc["bon_sprm"] += correct[q_][best(g)]
            for name in picks:
                picks[name].append(acc[name] / len(groups))
        for name, values in picks.items():
            out[f"{name}@{n} ({label})"] = sum(values) / questions
    right = [s_ for q_ in range(questions) for i, s_ in enumerate(scores[q_]) if correct[q_][i]]
    wrong = [s_ for q_ in range(questions) for i, s_ in enumerate(scores[q_]) if not correct[q_][i]]
    rank = (
        [float("-inf") if math.isnan(x) else x for x in right],
        [float("-inf") if math.isnan(x) else x for x in wrong],
    )
    pairs = [(a, b) for a in rank[0] for b in rank[1]]
    out["sprm_auc"] = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)
    return out


def test_module_matches_a_slow_reference_with_intervals(metric):
    rng = np.random.default_rng(3)
    correct = rng.integers(0, 2, (25, 8)).astype(float)
    scores = correct * 0.4 + rng.random((25, 8))
    scores[0, 3] = np.nan  # ranks last, must survive the Arrow round trip
    answers = [[None if (q + i) % 5 == 0 else ("right" if c else f"wrong{i % 3}") for i, c in enumerate(row)]
               for q, row in enumerate(correct)]  # fmt: skip
    answers[0] = [None] * 8  # a first question without any answer (evaluate is strict about the first row)
    expected = slow_reference_metrics(correct.tolist(), scores.tolist(), answers, {"low": 2, "medium": 8})
    results = metric.compute(
        correct=correct.tolist(), scores=scores.tolist(), answers=answers, budgets={"low": 2, "medium": 8},
        confidence=0.9,
    )  # fmt: skip
    intervals = results.pop("intervals")
    assert results == pytest.approx(expected)
    assert set(intervals) == set(expected) - {"sprm_auc"}
    for key, (low, high) in intervals.items():
        assert low <= results[key] <= high, key
    low, high = intervals["bon_sprm@8 (medium)"]
    assert low < results["bon_sprm@8 (medium)"] < high


def test_summarize_reports_through_the_module(monkeypatch):
    """`summarize` takes its numbers from the evaluate module (a spy sees the call) and keeps its report format."""
    real = evaluation._scaling_metric()
    assert real.name == "test_time_scaling"
    calls = []

    class Spy:
        def compute(self, **kwargs):
            calls.append(kwargs)
            return real.compute(**kwargs)

    monkeypatch.setattr(evaluation, "_scaling_metric", Spy)
    records = EvalRecords(np.array(CORRECT, float), np.array(SCORES), ANSWERS)
    summary = summarize(records, BUDGETS, confidence=0.8)
    assert len(calls) == 1 and calls[0]["budgets"] == BUDGETS and calls[0]["confidence"] == 0.8
    assert {k: v["mean"] for k, v in summary["metrics"].items()} == pytest.approx(
        {k: v for k, v in EXPECTED.items() if k != "sprm_auc"}
    )
    assert summary["sprm_auc"] == pytest.approx(0.2)
    assert set(summary["metrics"]["pass@1"]) == {"mean", "ci_low", "ci_high"}
    assert summary["budgets"] == {"low": 2, "medium": 4} and summary["questions"] == 2


def _offline_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_MODULES_CACHE=str(tmp_path / "modules"),  # a fresh cache: nothing loaded before can help
        HF_HOME=str(tmp_path / "hf-home"),
        HTTPS_PROXY="http://127.0.0.1:9",  # and any attempt at the network would fail
        HTTP_PROXY="http://127.0.0.1:9",
        OMP_NUM_THREADS="1",
        **extra,
    )
    return env


LOAD_BOTH_WAYS = """
import json, evaluate
from metastone_hf.metrics import evaluate_module_path
path = evaluate_module_path()
out = {{}}
for source in (path, path.parent):
    metric = evaluate.load(str(source))
    out[str(source)] = metric.compute(correct={c}, scores={s}, answers={a}, budgets={b})
out["module_file"] = str(path)
print(json.dumps(out))
"""


def test_evaluate_load_works_offline_from_file_and_folder(tmp_path):
    script = LOAD_BOTH_WAYS.format(c=CORRECT, s=SCORES, a=ANSWERS, b=BUDGETS)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_offline_env(tmp_path),
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    module_file = Path(out.pop("module_file"))
    assert module_file == evaluate_module_path() and len(out) == 2
    for results in out.values():
        assert results == pytest.approx(EXPECTED)
    assert list((tmp_path / "modules").rglob("test_time_scaling.py"))  # evaluate's own copy, in the fresh cache


@pytest.mark.slow
def test_module_ships_in_the_wheel_and_loads_from_the_install(tmp_path):
    """Build the wheel from a copy of the project, install it elsewhere, and load the module from there."""
    pytest.importorskip("setuptools")
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, project / name)
    shutil.copytree(REPO / "src" / "metastone_hf", project / "src" / "metastone_hf",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", "dist", "."]
    proc = subprocess.run(build, cwd=project, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel = next((project / "dist").glob("*.whl"))
    target = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)]
    proc = subprocess.run(install, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    script = LOAD_BOTH_WAYS.format(c=CORRECT, s=SCORES, a=ANSWERS, b=BUDGETS)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          env=_offline_env(tmp_path, PYTHONPATH=str(target)), timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(out.pop("module_file")).is_relative_to(target)  # the installed copy, not the source tree
    for results in out.values():
        assert results == pytest.approx(EXPECTED)
