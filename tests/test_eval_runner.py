"""`metastone eval` at scale: killed and resumed, over two processes, every search strategy, the paper's prompt.

References: an uninterrupted one-process run of the same command (for the killed one and the two-process one), the
official prompt text, math-verify's parse of the gold answers, and the search tree's own token counts.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metastone_hf import cli
from metastone_hf.eval_runner import EvalPlan, default_batch_size
from metastone_hf.evaluation import (
    EVAL_PROTOCOLS,
    PAPER_INSTRUCTION,
    build_prompt_builder,
    grade_answer,
    parse_gold,
    summarize_records,
)
from metastone_hf.tiny import save_tiny_checkpoint, tiny_metastone

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["one plus one", "two plus two", "three plus one", "five minus two", "two times three", "six minus one"]
# Per-run bookkeeping that legitimately differs between runs of the same evaluation.
RUN_FIELDS = ("seconds", "decode", "peak_memory_bytes", "rank", "world_size", "run_id")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return save_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny-metastone"))


@pytest.fixture(scope="module")
def questions(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "questions.jsonl"
    path.write_text(
        "".join(json.dumps({"question": q, "answer": "2", "id": f"q{i}"}) + "\n" for i, q in enumerate(QUESTIONS))
    )
    return str(path)


def eval_args(checkpoint: str, data: str, out: Path, *extra: str) -> list[str]:
    return ["eval", "--model", checkpoint, "--data", data, "--protocol", "paper", "--max-new-tokens", "20",
            "--efforts", "low", "medium", "--batch-size", "1", "--output-dir", str(out), "--no-progress", *extra]  # fmt: skip


def records_of(folder: Path) -> list[dict]:
    lines = (folder / "records.jsonl").read_text(encoding="utf-8").splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in RUN_FIELDS} for line in lines]


def comparable(summary: dict) -> str:
    """The summary without its per-process throughput, NaN written the same way on both sides."""
    kept = {k: v for k, v in summary.items() if k != "throughput"}
    return json.dumps(kept, sort_keys=True, default=str).replace("NaN", "nan")


def subprocess_env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


@pytest.fixture(scope="module")
def uninterrupted(checkpoint, questions, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "eval"
    assert cli.main(eval_args(checkpoint, questions, out, "--search", "best_of_n", "beam")) == 0
    return out


def test_the_report_holds_every_strategy_with_its_tokens(uninterrupted, capsys):
    report = json.loads((uninterrupted / "eval_report.json").read_text())
    summary = report["summary"]
    metrics = summary["metrics"]
    for key in ("bon_sprm@2 (low)", "bon_sprm@8 (medium)", "beam@2 (low)", "beam@8 (medium)"):
        assert 0 <= metrics[key]["mean"] <= 1 and metrics[key]["tokens_per_question"] > 0
    records = records_of(uninterrupted)
    assert [r["index"] for r in records] == list(range(len(QUESTIONS)))
    for r in records:
        assert set(r["results"]) == {"best_of_n", "beam@2", "beam@8"} and len(r["results"]["best_of_n"]["scores"]) == 8
        beam = r["results"]["beam@8"]
        assert len(beam["completions"]) == 8 and beam["tokens_generated"] >= sum(beam["tokens"])
    mean_beam = sum(r["results"]["beam@8"]["tokens_generated"] for r in records) / len(records)
    assert metrics["beam@8 (medium)"]["tokens_per_question"] == pytest.approx(mean_beam)
    assert len(report["searches"]["beam@8"]) == len(QUESTIONS)
    assert summary["protocol"]["prompt_template"] == "{question}\n" + PAPER_INSTRUCTION
    assert summary["unparsable_golds"]["count"] == 0
    assert (uninterrupted / "accuracy_vs_tokens.png").stat().st_size > 0
    from metastone_hf.hub import eval_results_from_report

    names = {r.metric_name: r for r in eval_results_from_report(report, "gsm8k")}
    assert names["beam@8 (medium)"].metric_args["tokens_per_question"] == pytest.approx(mean_beam, abs=0.05)


def test_a_killed_eval_resumes_to_the_uninterrupted_report(checkpoint, questions, uninterrupted, tmp_path):
    out = tmp_path / "eval"
    command = [sys.executable, "-m", "metastone_hf.cli", *eval_args(checkpoint, questions, out, "--search", "best_of_n", "beam")]  # fmt: skip
    proc = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    records = out / "records.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if records.exists() and records.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = records.read_bytes().count(b"\n")
    assert 2 <= done < len(QUESTIONS)
    with records.open("ab") as handle:  # and a kill in the middle of a write
        handle.write(b'{"index": 5, "id": "q5", "results": {"best_of_n": {"scor')
    resumed = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming the evaluation" in resumed.stderr
    got = records_of(out)
    assert [r["index"] for r in got] == list(range(len(QUESTIONS)))  # none missing, none twice
    assert got == records_of(uninterrupted)
    first = json.loads((uninterrupted / "eval_report.json").read_text())["summary"]
    second = json.loads((out / "eval_report.json").read_text())["summary"]
    assert comparable(first) == comparable(second)
    assert {row["run_id"] for row in second["throughput"]} and len(second["throughput"]) == 2  # two runs wrote


def test_a_resume_with_other_settings_is_refused(checkpoint, questions, uninterrupted, tmp_path, capsys):
    out = tmp_path / "eval"
    shutil.copytree(uninterrupted, out)
    assert cli.main(eval_args(checkpoint, questions, out, "--search", "best_of_n", "--seed", "3")) == 2
    error = capsys.readouterr().err
    assert "seed: 0 -> 3" in error and "searches: ['best_of_n', 'beam'] -> ['best_of_n']" in error
    assert "--overwrite" in error
    assert records_of(out) == records_of(uninterrupted)  # nothing lost
    same_but_bf16 = eval_args(checkpoint, questions, out, "--search", "best_of_n", "beam", "--dtype", "bfloat16")
    assert cli.main(same_but_bf16) == 2
    assert "dtype: 'torch.float32' -> 'torch.bfloat16'" in capsys.readouterr().err
    assert cli.main(eval_args(checkpoint, questions, out, "--search", "best_of_n", "--seed", "3", "--overwrite")) == 0
    assert all(set(r["results"]) == {"best_of_n"} for r in records_of(out))


def test_a_run_written_when_beam_width_counted_the_beams_kept_is_not_resumed(
    checkpoint, questions, uninterrupted, tmp_path, capsys
):
    # A run written before `beam_width` meant the children per kept beam has no `beam_width_meaning` in run.json;
    # its beam search records were made with another tree, so resuming it would mix two searches.
    saved = json.loads((uninterrupted / "run.json").read_text())
    assert saved["beam_width_meaning"] == "children_per_beam"
    out = tmp_path / "eval"
    shutil.copytree(uninterrupted, out)
    del saved["beam_width_meaning"]
    (out / "run.json").write_text(json.dumps(saved))
    assert cli.main(eval_args(checkpoint, questions, out, "--search", "best_of_n", "beam")) == 2
    error = capsys.readouterr().err
    assert "cannot be resumed" in error and "beam_width_meaning: '<absent>' -> 'children_per_beam'" in error
    assert records_of(out) == records_of(uninterrupted)  # nothing lost
    # A Best-of-N run has no beam width: nothing to record, so its run.json reads as before.
    best_of_n_only = tmp_path / "bon"
    assert cli.main(eval_args(checkpoint, questions, best_of_n_only, "--limit", "1")) == 0
    assert "beam_width_meaning" not in json.loads((best_of_n_only / "run.json").read_text())


@pytest.mark.slow
def test_two_processes_give_the_one_process_report(checkpoint, questions, uninterrupted, tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("accelerate CLI not found")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "eval"
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", str(port),
               "-m", "metastone_hf.cli", *eval_args(checkpoint, questions, out, "--search", "best_of_n", "beam")]  # fmt: skip
    proc = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    raw = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert {r["rank"] for r in raw} == {0, 1} and {r["world_size"] for r in raw} == {2}
    assert records_of(out) == records_of(uninterrupted)
    first = json.loads((uninterrupted / "eval_report.json").read_text())["summary"]
    second = json.loads((out / "eval_report.json").read_text())["summary"]
    assert comparable(first) == comparable(second)
    assert [row["rank"] for row in second["throughput"]] == [0, 1]
    assert not list(out.glob("records.rank*")) and not list(out.glob(".done.*"))


def test_two_independent_processes_are_refused(checkpoint, questions, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # launched as two processes that accelerate did not connect
    assert cli.main(eval_args(checkpoint, questions, tmp_path / "eval")) == 2
    assert "would write the same records" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- prompt and grading


def test_the_paper_prompt_with_the_real_chat_template(real_tokenizer):
    model = tiny_metastone()
    model.config.think_start_token_id = real_tokenizer.convert_tokens_to_ids("<think>")
    build = build_prompt_builder(real_tokenizer, model)
    gsm = build("Tom has 3 apples and buys 2 more. How many does he have?")
    aime = build("Find $m+n$.\n" + PAPER_INSTRUCTION)  # the official AIME file already ends with it
    for prompt, question in ((gsm, "Tom has 3 apples and buys 2 more. How many does he have?"), (aime, "Find $m+n$.")):
        assert prompt.count(PAPER_INSTRUCTION) == 1 and prompt.count("<think>") == 1
        user = prompt.split("<｜User｜>")[1].split("<｜Assistant｜>")[0]
        assert user == question + "\n" + PAPER_INSTRUCTION
        assert prompt.endswith("<｜Assistant｜><think>\n")
    plain = build_prompt_builder(real_tokenizer, model, "plain")("What is 2+2?")
    assert PAPER_INSTRUCTION not in plain and "<｜User｜>What is 2+2?<｜Assistant｜>" in plain
    custom = build_prompt_builder(real_tokenizer, model, "Q: {question}\nA in \\boxed{{}}.")("x")
    assert "<｜User｜>Q: x\nA in \\boxed{{}}.<｜Assistant｜>" in custom
    with pytest.raises(ValueError, match=r"\{question\}"):
        build_prompt_builder(real_tokenizer, model, "pape")


def test_unparsable_golds_are_counted_and_never_compared_as_text(checkpoint, tmp_path, capsys):
    assert parse_gold("---") is None and parse_gold("") is None and parse_gold("\\frac43") is not None
    assert not grade_answer("so the answer is \\boxed{---}", "---")  # raw-text equality is not a match
    data = tmp_path / "golds.jsonl"
    data.write_text(json.dumps({"question": "a", "answer": "---", "id": "bad"}) + "\n"
                    + json.dumps({"question": "b", "answer": "4", "id": "good"}) + "\n")  # fmt: skip
    out = tmp_path / "eval"
    assert cli.main(eval_args(checkpoint, str(data), out)) == 0
    assert "1 gold answer(s) math-verify cannot parse, graded wrong (ids: bad)" in capsys.readouterr().out
    records = records_of(out)
    assert [r["gold_parsed"] for r in records] == [False, True]
    assert not any(records[0]["results"]["best_of_n"]["correct"])
    summary = json.loads((out / "eval_report.json").read_text())["summary"]
    assert summary["unparsable_golds"] == {"count": 1, "ids": ["bad"]}


# ---------------------------------------------------------------------------------------------- pieces


def test_search_tokens_per_prompt_add_up_to_the_tokens_generated():
    from metastone_hf.eval_runner import _tokens_per_prompt

    model = tiny_metastone(seed=3)
    ids = torch.tensor([[0, 1, 6, 9, 10], [1, 2, 6, 11, 12]])
    for search in ("best_of_n", "beam", "dvts"):
        out = model.generate(
            ids, num_candidates=4, search=search, seed=[1, 2], max_new_tokens=12, pad_token_id=0, eos_token_id=8,
            sequence_bias={(5,): 2.0, (8,): 0.5}, progress_bar=False,
            **({} if search == "best_of_n" else {"beam_width": 2}),
        )  # fmt: skip
        spent = _tokens_per_prompt(out)
        assert sum(spent) == out.tokens_generated
        if search == "best_of_n":
            assert spent == out.num_generated_tokens.sum(dim=1).tolist()


def test_plan_runs_and_defaults():
    paper = EVAL_PROTOCOLS["paper"]
    plan = EvalPlan(paper, 32, {"low": 2, "medium": 8, "high": 32}, ("best_of_n", "beam", "dvts"), beam_width=2)
    assert [key for key, _, _ in plan.runs()] == [
        "best_of_n",
        "beam@2",
        "beam@8",
        "beam@32",
        "dvts@2",
        "dvts@8",
        "dvts@32",
    ]
    with pytest.raises(ValueError, match="does not divide"):
        EvalPlan(paper, 8, {"low": 2, "medium": 8}, ("beam",), beam_width=4)
    with pytest.raises(ValueError, match="Unknown search"):
        EvalPlan(paper, 8, {"low": 2}, ("greedy",))
    assert default_batch_size(32) == 1 and default_batch_size(8) == 4 and default_batch_size(2) == 16


def test_summary_of_search_records_without_best_of_n():
    records = [
        {"index": i, "id": str(i), "gold_parsed": True, "seconds": 1.0, "peak_memory_bytes": 10, "rank": 0,
         "run_id": "r", "results": {"dvts@2": {"correct": [i % 2 == 0, True], "chosen": 0, "tokens_generated": 10 + i}}}
        for i in range(4)
    ]  # fmt: skip
    summary = summarize_records(records, {"low": 2})
    entry = summary["metrics"]["dvts@2 (low)"]
    assert entry["mean"] == 0.5 and entry["tokens_per_question"] == 11.5 and math.isnan(summary["sprm_auc"])
    assert summary["throughput"][0]["tokens_per_second"] == pytest.approx(46 / 4)


class _MainOfTwo:
    """accelerate's state as the main process of 2 sees it; the other process is played by the test."""

    process_index, num_processes, is_main_process = 0, 2, True

    def wait_for_everyone(self) -> None:
        pass

    def split_between_processes(self, items):
        import contextlib

        return contextlib.nullcontext(list(items)[::2])


def _wait_as_main(tmp_path, monkeypatch, **kwargs):
    from metastone_hf import eval_runner

    monkeypatch.setattr(eval_runner, "question_records", lambda *args, **kw: iter(()))
    plan = EvalPlan(EVAL_PROTOCOLS["quick"], 2, {"low": 2}, ("best_of_n",), None, 0)
    return eval_runner.run_evaluation(
        None, None, [], plan, tmp_path / "eval", settings={"s": 1}, prompt_builder=str, state=_MainOfTwo(),
        poll_seconds=0.05, **kwargs,
    )  # fmt: skip


def test_the_main_process_names_a_process_that_stopped_without_finishing(tmp_path, monkeypatch):
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"Process 1 of 2 has written no record for 1 s and has not finished"):
        _wait_as_main(tmp_path, monkeypatch, stall_seconds=1.0)
    assert 1.0 <= time.monotonic() - start < 30


def test_the_main_process_waits_for_a_slow_process_that_keeps_writing(tmp_path, monkeypatch):
    import threading

    folder = tmp_path / "eval"

    def slow_rank():  # appends a record every 0.3 s for 2 s (longer than the stall limit), then finishes
        while not list(folder.glob(".done.*.rank0")):
            time.sleep(0.02)
        run_id = next(folder.glob(".done.*.rank0")).name.split(".")[2]
        for index in range(7):
            with open(folder / "records.rank1.jsonl", "a") as handle:
                handle.write(json.dumps({"index": 100 + index}) + "\n")
            time.sleep(0.3)
        (folder / f".done.{run_id}.rank1").write_text("done\n")

    worker = threading.Thread(target=slow_rank)
    worker.start()
    start = time.monotonic()
    try:
        assert _wait_as_main(tmp_path, monkeypatch, stall_seconds=1.0) == []  # no question was asked of it
    finally:
        worker.join()
    assert time.monotonic() - start >= 2.0


def test_the_report_counts_decode_steps_a_hook_on_the_backbone_sees(checkpoint, questions, capsys):
    """Per-record decode counts add up to the backbone forwards that decode one token per row, counted here with a
    hook of the test's own, and the report's throughput line shows them with the occupancy."""
    import dataclasses

    from transformers import AutoTokenizer

    from metastone_hf import MetaStoneForCausalLMWithSPRM
    from metastone_hf.eval_runner import question_records
    from metastone_hf.evaluation import build_prompt_builder, format_table, load_eval_examples, summarize_records

    model = MetaStoneForCausalLMWithSPRM.from_pretrained(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    examples = load_eval_examples(questions)
    protocol = dataclasses.replace(EVAL_PROTOCOLS["paper"], max_new_tokens=16)
    plan = EvalPlan(protocol, 4, {"low": 2, "medium": 4}, ("best_of_n", "beam"), beam_width=2)
    seen = {"steps": 0, "rows": 0}

    def hook(module, args, kwargs, output):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] == 1:
            seen["steps"] += 1
            seen["rows"] += ids.shape[0]

    handle = model.model.register_forward_hook(hook, with_kwargs=True)
    try:
        records = list(question_records(model, tokenizer, examples, range(len(examples)), plan,
                                        prompt_builder=build_prompt_builder(tokenizer, model), batch_size=2,
                                        progress_bar=False))  # fmt: skip
    finally:
        handle.remove()
    assert sum(r["decode"]["steps"] for r in records) == pytest.approx(seen["steps"])
    assert sum(r["decode"]["rows"] for r in records) == pytest.approx(seen["rows"])
    for r in records:
        r.update(run_id="x", rank=0)
    (row,) = summarize_records(records, plan.budgets)["throughput"]
    assert row["decode_steps"] == seen["steps"] and row["rows_decoded"] == seen["rows"]
    assert 0 < row["occupancy"] <= 1.5  # beam search may briefly decode above capacity (parked survivors rejoin)
    table = format_table(summarize_records(records, plan.budgets))
    assert f"{seen['steps']} decode steps, {seen['rows']} rows, occupancy {row['occupancy']:.2f}" in table
