"""Evaluation harness: real datasets load and their own reference answers grade 100%."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from metastone_hf.evaluation import (
    EvalRecords,
    format_table,
    grade_answer,
    load_eval_examples,
    plot_accuracy_vs_n,
    reference_completion,
    save_report,
    summarize,
)


@pytest.mark.parametrize(("name", "rows"), [("aime24", 30), ("gsm8k", 1319), ("math500", 500)])
def test_reference_answers_grade_100_percent(name, rows, data_dir):
    examples = load_eval_examples(name, data_dir)
    assert len(examples) == rows
    file = {"aime24": "aime24.jsonl", "gsm8k": "gsm8k_test.jsonl", "math500": "math500_test.jsonl"}[name]
    raw = [json.loads(line) for line in (data_dir / file).read_text().splitlines() if line.strip()]
    graded = [grade_answer(reference_completion(row), ex.answer) for row, ex in zip(raw, examples)]
    assert sum(graded) == rows, [ex.answer for ex, ok in zip(examples, graded) if not ok][:10]


def test_grader_rejects_wrong_answers(data_dir):
    examples = load_eval_examples("math500", data_dir, limit=50)
    # neighbouring questions' answers are wrong answers (math-verify rightly equates "x=5" with "5": skip those)
    pairs = [(a, b) for a, b in itertools.pairwise(examples) if a.answer not in b.answer and b.answer not in a.answer]
    assert len(pairs) > 40
    assert not any(grade_answer(f"\\boxed{{{b.answer}}}", a.answer) for a, b in pairs)
    assert grade_answer("so x = \\boxed{\\frac43}", "4/3") and not grade_answer("no answer here", "4/3")


def test_bad_dataset_inputs(tmp_path):
    with pytest.raises(ValueError, match="data_dir"):
        load_eval_examples("gsm8k")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_eval_examples(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hi", "answer": 1}\n')
    with pytest.raises(ValueError, match="prompt fields"):
        load_eval_examples(bad)
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_eval_examples(bad)


def test_summary_table_plot_and_report(tmp_path):
    rng = np.random.default_rng(0)
    correct = rng.integers(0, 2, (20, 8)).astype(float)
    scores = correct * 0.5 + rng.random((20, 8)) * 0.6  # informative but noisy scores
    answers = [["right" if c else f"wrong{i % 3}" for i, c in enumerate(row)] for row in correct]
    records = EvalRecords(correct, scores, answers)
    summary = summarize(records, {"low": 2, "medium": 8})
    metrics = summary["metrics"]
    assert metrics["pass@1"]["mean"] == pytest.approx(correct.mean())
    assert metrics["bon_sprm@8 (medium)"]["mean"] >= metrics["random@8 (medium)"]["mean"]
    assert 0.5 < summary["sprm_auc"] <= 1.0
    table = format_table(summary)
    assert "| bon_sprm |" in table and "N=8 (medium)" in table and "SPRM AUC" in table
    png = plot_accuracy_vs_n(summary, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(save_report(summary, records, tmp_path / "report.json").read_text())
    assert report["summary"]["questions"] == 20 and len(report["records"]["correct"]) == 20
