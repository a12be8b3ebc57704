"""The head as a PRM on ProcessBench: the metric against ProcessBench's reference formula, and paragraphs mapped to
the step tokens of the real tokenizer on the real rows (checked through a second code path: decoding prefixes)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from metastone_hf import cli
from metastone_hf.configuration_metastone import MetaStoneConfig
from metastone_hf.processbench import (
    best_threshold,
    first_error,
    load_processbench,
    processbench_f1,
    trace_tokens,
)
from metastone_hf.tiny import save_tiny_checkpoint


def reference_metric(predictions, labels):
    """ProcessBench's `code/run_eval_prm_*.py`, transcribed: match, split by label, mean * 100, harmonic mean."""
    res_data = [{"label": label, "prediction": p, "match": p == label} for p, label in zip(predictions, labels)]
    data1 = [e for e in res_data if e["label"] != -1]
    data2 = [e for e in res_data if e["label"] == -1]
    acc1 = np.mean([e["match"] for e in data1]) * 100
    acc2 = np.mean([e["match"] for e in data2]) * 100
    return acc1, acc2, 2 * acc1 * acc2 / (acc1 + acc2)


def test_f1_equals_processbench_reference_formula():
    rng = np.random.default_rng(0)
    for _ in range(20):
        labels = rng.integers(-1, 6, size=40).tolist()
        predictions = [label if rng.random() < 0.6 else int(rng.integers(-1, 6)) for label in labels]
        ours = processbench_f1(predictions, labels)
        acc1, acc2, f1 = reference_metric(predictions, labels)
        assert ours["error_acc"] == pytest.approx(acc1) and ours["correct_acc"] == pytest.approx(acc2)
        assert ours["f1"] == pytest.approx(f1)
    # an erroneous trace matches only at its exact index; a correct one only with -1
    assert processbench_f1([2, 3, -1, -1], [2, 2, -1, 0]) == pytest.approx(
        {"error_acc": 100 / 3, "correct_acc": 100.0, "f1": 50.0}
    )


def test_first_error_and_the_tuned_threshold():
    scores = [[0.9, 0.2, 0.8], [0.9, None, 0.95], [0.6, 0.4, 0.3]]
    assert [first_error(row, 0.5) for row in scores] == [1, -1, 1]
    assert first_error([None, float("nan"), 0.1], 0.5) == 2
    labels = [1, -1, 2]
    threshold = best_threshold(scores, labels)
    assert processbench_f1([first_error(r, threshold) for r in scores], labels)["f1"] == 100.0
    assert 0.3 < threshold <= 0.4


@pytest.fixture(scope="module")
def real_rows(data_dir):
    return load_processbench(data_dir / "processbench", limit=60)


def test_real_rows_map_paragraphs_to_the_real_tokenizers_step_tokens(real_rows, real_tokenizer):
    config = MetaStoneConfig(**MetaStoneConfig.sprm_token_ids_from_tokenizer(real_tokenizer))
    step_id = real_tokenizer.encode(".\n\n", add_special_tokens=False)
    assert list(config.step_token_ids) == step_id == [382]
    prompt = "<｜User｜>Solve it.<｜Assistant｜><think>\n"
    checked = own_total = paragraphs = 0
    for traces in real_rows.values():
        for trace in traces:
            tokens = trace_tokens(real_tokenizer, config, prompt, trace.steps)
            ids = tokens.input_ids
            # The second code path: where each step token starts, read off decoded prefixes (no offsets).
            starts, text = [], prompt
            for i, step in enumerate(trace.steps):
                text += "\n\n" if i else ""
                starts.append(len(text))
                text += step
            assert real_tokenizer.decode(ids, clean_up_tokenization_spaces=False) == text
            step_at = [t for t, token in enumerate(ids) if token == 382 and (t == 0 or ids[t - 1] != 382)]
            owners = []
            for t in step_at:
                char = len(real_tokenizer.decode(ids[:t], clean_up_tokenization_spaces=False))
                owner = max(i for i, start in enumerate(starts) if start <= char)
                assert text[char] == "." and char == starts[owner] + len(trace.steps[owner]) - 1  # its final full stop
                owners.append(owner)
            assert tokens.num_steps == len(step_at)
            for i in range(len(trace.steps)):
                later = [k for k, owner in enumerate(owners) if owner >= i]
                assert tokens.paragraph_step[i] == (later[0] if later else None)
            own_total += tokens.paragraphs_with_own_step
            paragraphs += len(trace.steps)
            checked += 1
    # 316 of these 726 paragraphs end with the official step token; the others (the last one, "\\]", ")." endings
    # tokenized as one token) share the next step's score.
    assert checked == 120 and 0 < own_total < paragraphs


def test_bad_processbench_sources_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_processbench(tmp_path / "missing")
    (tmp_path / "gsm8k.json").write_text(json.dumps([{"problem": "p", "steps": ["a."], "label": 3}]))
    with pytest.raises(ValueError, match=r"label 3 is outside -1..0"):
        load_processbench(tmp_path)
    with pytest.raises(ValueError, match="no ProcessBench split"):
        load_processbench(tmp_path, splits=["math"])


def test_eval_on_processbench_end_to_end(tmp_path, data_dir, capsys):
    checkpoint = save_tiny_checkpoint(str(tmp_path / "ckpt"))
    out = tmp_path / "pb"
    code = cli.main(["eval", "--model", checkpoint, "--data", "processbench", "--data-dir",
                     str(data_dir / "processbench"), "--limit", "12", "--output-dir", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "| gsm8k | 12 | 0.5 |" in printed and "| math | 12 | 0.5 |" in printed
    report = json.loads((out / "processbench_report.json").read_text())
    for split in ("gsm8k", "math"):
        entry = report["splits"][split]
        assert entry["traces"] == 12 and 0 <= entry["at_0.5"]["f1"] <= 100
        assert entry["tuned"]["measured_on"] == "6 traces (odd positions)"


def test_demo_traces_have_a_known_first_wrong_step_and_one_step_per_paragraph():
    from metastone_hf.demo import task

    tokenizer = task.build_tokenizer()
    config = MetaStoneConfig(**MetaStoneConfig.sprm_token_ids_from_tokenizer(tokenizer))
    for problem in task.make_split("test", 20):
        right, wrong = task.processbench_trace(problem, False), task.processbench_trace(problem, True)
        assert right["label"] == -1 and right["steps"][-1] == f"\\boxed{{{problem.answer}}}"
        hop = wrong["label"]
        assert wrong["steps"][:hop] == right["steps"][:hop] and wrong["steps"][hop] != right["steps"][hop]
        assert wrong["steps"][hop].startswith(f"{problem.trap_key}>") and "~" in wrong["steps"][hop]
        assert wrong["steps"][-1] == f"\\boxed{{{problem.wrong_answer}}}"
        tokens = trace_tokens(tokenizer, config, wrong["problem"], wrong["steps"])
        assert tokens.paragraph_step == [*range(problem.hops), None]  # each step its own; the answer unscored


def test_processbench_from_the_hub_and_from_a_saved_dataset(data_dir, tmp_path, monkeypatch):
    import datasets

    rows = json.loads((data_dir / "processbench" / "math.json").read_text())[:5]
    calls = []

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    from_hub = load_processbench("processbench", splits=["math", "omnimath"])
    assert calls == [("Qwen/ProcessBench", "math"), ("Qwen/ProcessBench", "omnimath")]
    assert [t.label for t in from_hub["math"]] == [r["label"] for r in rows]
    datasets.DatasetDict({"math": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    saved = load_processbench(tmp_path / "saved")
    assert list(saved) == ["math"] and saved["math"] == from_hub["math"]
