"""Evaluation harness: real datasets load and their own reference answers grade 100%."""

from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pytest

from metastone_hf.eval_runner import run_best_of_n_eval
from metastone_hf.evaluation import (
    EVAL_PROTOCOLS,
    PROMPT_TEMPLATES,
    EvalExample,
    EvalProtocol,
    EvalRecords,
    format_table,
    grade_answer,
    load_eval_examples,
    plot_accuracy_vs_n,
    save_report,
    summarize,
)
from metastone_hf.math_datasets import gold_answer
from metastone_hf.tiny import tiny_metastone_for_tokenizer, tiny_tokenizer


def reference_completion(row: dict) -> str:
    """A completion built from a dataset row's own reference solution, ending in its boxed gold answer."""
    solution = str(row.get("solution", row.get("answer", "")))
    solution = re.sub(r"####.*$", "", solution, flags=re.S)
    if "\\boxed" in solution:
        return solution
    return f"{solution}\nThe answer is \\boxed{{{gold_answer(row)}}}."


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
    with pytest.raises(ValueError, match="Unknown dataset 'gsm9k'"):
        load_eval_examples("gsm9k")
    with pytest.raises(FileNotFoundError, match=r"gsm8k_test\.jsonl not found.*downloaded from the Hub"):
        load_eval_examples("gsm8k", tmp_path)  # --data-dir without the file
    with pytest.raises(FileNotFoundError, match="not found"):
        load_eval_examples(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hi", "answer": 1}\n')
    with pytest.raises(ValueError, match="prompt fields"):
        load_eval_examples(bad)
    bad.write_text('{"question": "hi"}\n')
    with pytest.raises(ValueError, match="no `answer` field"):
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
    # records that do not say how they were sampled are reported as such, never as the paper's protocol
    assert report["summary"]["protocol"] is None and "sampling protocol: not recorded" in table


def test_summary_records_the_given_protocol(tmp_path):
    records = EvalRecords(np.ones((3, 8)), np.ones((3, 8)), [["1"] * 8] * 3)
    summary = summarize(records, {"low": 2, "medium": 8}, protocol=EVAL_PROTOCOLS["quick"])
    assert summary["protocol"]["name"] == "quick" and summary["protocol"]["samples_per_question"] == 8
    assert summary["protocol"]["max_new_tokens"] == 1024 and summary["protocol"]["repetition_penalty"] == 1.05
    assert (
        "sampling protocol: quick; temperature=0.6, top_p=0.95, top_k=off, repetition_penalty=1.05, "
        "max_new_tokens=1024" in format_table(summary)
    )
    report = json.loads(save_report(summary, records, tmp_path / "report.json").read_text())
    assert report["summary"]["protocol"] == summary["protocol"]


# ---------------------------------------------------------------------------------------------- protocols
def test_registered_protocols():
    paper, quick = EVAL_PROTOCOLS["paper"], EVAL_PROTOCOLS["quick"]
    settings = (paper.temperature, paper.top_p, paper.top_k, paper.repetition_penalty, paper.max_new_tokens)
    assert settings == (0.6, 0.95, 0, 1.05, 32768)
    assert paper.samples_per_question is None  # the largest N of the model's presets
    # quick samples like the paper, only with a shorter budget, and says it is not the paper's protocol
    assert (quick.temperature, quick.top_p, quick.top_k, quick.repetition_penalty) == (0.6, 0.95, 0, 1.05)
    assert quick.max_new_tokens == 1024 and "NOT the paper" in quick.description
    with pytest.raises(ValueError, match="temperature"):
        EvalProtocol("bad", temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, max_new_tokens=8)


# Budget each real generate call actually gets: the recorded arguments are the ones asked for, but a tiny random
# model need not decode 32768 tokens for the test to see them.
DECODED_TOKENS = 3


@pytest.fixture
def recorded_generate(monkeypatch):
    """A tiny model whose ``generate`` records its keyword arguments, then runs for real on a short budget."""
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    model = tiny_metastone_for_tokenizer(tokenizer).eval()
    calls: list[dict] = []
    real_generate = model.generate

    def generate(**kwargs):
        calls.append(dict(kwargs))
        return real_generate(**{**kwargs, "max_new_tokens": min(kwargs["max_new_tokens"], DECODED_TOKENS)})

    monkeypatch.setattr(model, "generate", generate)
    return model, tokenizer, calls


EXAMPLES = [EvalExample("what is one plus one", "2"), EvalExample("what is two plus two", "4")]


def never_right(completion: str, gold: str) -> bool:
    """A free grader: these tests check sampling arguments, not grading."""
    return False


def sampling(call: dict) -> tuple:
    keys = ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens", "num_candidates")
    return tuple(call[k] for k in keys)


def test_default_eval_samples_with_the_paper_protocol(recorded_generate):
    model, tokenizer, calls = recorded_generate
    assert max(model.config.reasoning_effort_presets.values()) == 32
    records = run_best_of_n_eval(model, tokenizer, EXAMPLES, grader=never_right, progress_bar=False)
    # One continuous stream over both questions, one question (32 rows) in flight at a time.
    assert len(calls) == 1 and all(call["do_sample"] for call in calls)
    assert calls[0]["max_active_rows"] == 32 and calls[0]["stream"]
    assert {sampling(call) for call in calls} == {(0.6, 0.95, 0, 1.05, 32768, 32)}
    assert records.correct.shape == (2, 32)
    assert records.protocol == {
        "name": "paper",
        "temperature": 0.6,
        "top_p": 0.95,
        "top_k": 0,
        "repetition_penalty": 1.05,
        "max_new_tokens": 32768,
        "samples_per_question": 32,
        "description": EVAL_PROTOCOLS["paper"].description,
        "overridden": [],
        "seed": 0,
        "prompt_template": PROMPT_TEMPLATES["paper"],
        "generate_kwargs": {},
    }
    assert summarize(records)["protocol"] == records.protocol


def test_quick_protocol_overrides_and_custom_protocols(recorded_generate):
    model, tokenizer, calls = recorded_generate
    records = run_best_of_n_eval(
        model, tokenizer, EXAMPLES[:1], protocol="quick", grader=never_right, progress_bar=False
    )
    assert sampling(calls[-1]) == (0.6, 0.95, 0, 1.05, 1024, 32)
    assert records.protocol["name"] == "quick" and records.protocol["overridden"] == []

    records = run_best_of_n_eval(
        model,
        tokenizer,
        EXAMPLES[:1],
        num_samples=4,
        temperature=0.9,
        repetition_penalty=1.05,  # the protocol's own value: not an override
        max_new_tokens=7,
        grader=never_right,
        progress_bar=False,
    )
    assert sampling(calls[-1]) == (0.9, 0.95, 0, 1.05, 7, 4)
    assert records.correct.shape == (1, 4)
    assert records.protocol["name"] == "paper"
    assert records.protocol["overridden"] == ["max_new_tokens", "samples_per_question", "temperature"]

    custom = EvalProtocol("mine", 1.0, 1.0, top_k=0, repetition_penalty=1.0, max_new_tokens=5, samples_per_question=2)
    records = run_best_of_n_eval(
        model, tokenizer, EXAMPLES[:1], protocol=custom, grader=never_right, progress_bar=False
    )
    assert sampling(calls[-1]) == (1.0, 1.0, 0, 1.0, 5, 2)
    assert records.protocol["name"] == "mine" and records.protocol["samples_per_question"] == 2

    # any other generate argument changes the numbers too: it is passed on and recorded
    records = run_best_of_n_eval(
        model, tokenizer, EXAMPLES[:1], num_samples=2, min_p=0.05, grader=never_right, progress_bar=False
    )
    assert calls[-1]["min_p"] == 0.05 and records.protocol["generate_kwargs"] == {"min_p": 0.05}
    assert "also min_p=0.05" in format_table(summarize(records, {"low": 2}))

    with pytest.raises(ValueError, match=r"'paper', 'quick'"):
        run_best_of_n_eval(model, tokenizer, EXAMPLES, protocol="papr", progress_bar=False)
