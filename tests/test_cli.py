"""The `metastone` command end to end on a tiny checkpoint (generate, score, eval, convert errors, push)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from metastone_hf import cli
from metastone_hf.tiny import save_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return save_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny-metastone"))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "metastone_hf.cli", *args], capture_output=True, text=True, timeout=600
    )


def test_help_everywhere():
    for command in ([], ["demo"], ["generate"], ["score"], ["convert"], ["eval"], ["train"], ["push"]):
        proc = run_cli(*command, "--help")
        assert proc.returncode == 0, proc.stderr
        assert "usage: metastone" in proc.stdout


def test_generate_prints_best_answer_and_scores(checkpoint, capsys):
    """The CLI's candidates, scores and pick against an independent path: transformers' plain sampling of the same
    model (`num_return_sequences`, same seed) scored offline by `score_trajectories`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from metastone_hf.evaluation import build_prompt_builder

    code = cli.main(["generate", "--model", checkpoint, "--prompt", "what is one plus one", "--num-candidates", "4",
                     "--max-new-tokens", "24", "--seed", "1", "--json", "--no-progress", "--all-candidates"])  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result) == 1 and len(result[0]["scores"]) == 4 and len(result[0]["candidates"]) == 4

    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, padding_side="left")
    prompt = tokenizer(build_prompt_builder(tokenizer, model, "plain")("what is one plus one"), return_tensors="pt",
                       add_special_tokens=False)  # fmt: skip
    paper = {"temperature": 0.6, "top_p": 0.95, "top_k": 0, "repetition_penalty": 1.05}
    torch.manual_seed(1)
    plain = model.generate(**prompt, do_sample=True, num_return_sequences=4, max_new_tokens=24,
                           pad_token_id=tokenizer.pad_token_id, **paper)  # fmt: skip
    width = prompt["input_ids"].shape[1]
    assert tokenizer.batch_decode(plain[:, width:], skip_special_tokens=True) == result[0]["candidates"]
    eos = (plain[:, width:] == tokenizer.eos_token_id).long()
    after_eos = eos.cumsum(1) - eos > 0  # padding after a candidate's EOS
    mask = torch.cat([torch.ones(4, width, dtype=torch.long), (~after_eos).long()], 1)
    offline = model.score_trajectories(plain, mask)
    assert len(set(result[0]["scores"])) > 1  # the pick is not decided by a tie
    assert result[0]["scores"] == pytest.approx(offline.scores.tolist(), abs=1e-5)
    assert result[0]["chosen_index"] == int(offline.log_scores.double().argmax())
    assert result[0]["answer"] == result[0]["candidates"][int(offline.log_scores.double().argmax())]


def test_score_text_and_jsonl(checkpoint, tmp_path, capsys):
    text = "Question: go <think>\nA.\n\nB.\n\nA.\n\n</think>done"
    assert cli.main(["score", "--model", checkpoint, "--text", text, "--json"]) == 0
    single = json.loads(capsys.readouterr().out)
    assert single[0]["num_steps"] == 3 and 0 < single[0]["score"] < 1
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        json.dumps({"prompt": "Question: go <think>\n", "completion": "A.\n\nB.\n\nA.\n\n</think>done"}) + "\n"
    )
    assert cli.main(["score", "--model", checkpoint, "--input", str(rows), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["score"] == pytest.approx(single[0]["score"], rel=1e-5)
    rows.write_text('{"question": "x"}\n')
    assert cli.main(["score", "--model", checkpoint, "--input", str(rows)]) == 2
    assert "needs `text`" in capsys.readouterr().err


def test_eval_on_real_data_end_to_end(checkpoint, tmp_path, data_dir, capsys):
    out = tmp_path / "eval"
    code = cli.main(["eval", "--model", checkpoint, "--data", "gsm8k", "--data-dir", str(data_dir), "--limit", "2",
                     "--efforts", "low", "--max-new-tokens", "8", "--output-dir", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "| bon_sprm |" in printed and "N=2 (low)" in printed
    report = json.loads((out / "eval_report.json").read_text())
    assert report["summary"]["questions"] == 2 and report["summary"]["samples_per_question"] == 2
    assert (out / "accuracy_vs_n.png").read_bytes()[:4] == b"\x89PNG"
    # the paper's sampling by default; the shorter budget and fewer samples are recorded as overrides
    protocol = report["summary"]["protocol"]
    sampled = (protocol["name"], protocol["temperature"], protocol["top_p"], protocol["repetition_penalty"])
    assert sampled == ("paper", 0.6, 0.95, 1.05)
    assert protocol["max_new_tokens"] == 8 and protocol["overridden"] == ["max_new_tokens", "samples_per_question"]
    assert "sampling protocol: paper (overridden: max_new_tokens, samples_per_question)" in printed


def test_eval_and_generate_parser_defaults():
    parser = cli.build_parser()
    args = parser.parse_args(["eval", "--model", "m", "--data", "d.jsonl"])
    assert args.protocol == "paper" and args.samples_per_question is None
    # None: the protocol's value (paper: T=0.6, top_p=0.95, repetition_penalty=1.05, 32768 tokens)
    assert (args.temperature, args.top_p, args.top_k, args.repetition_penalty, args.max_new_tokens) == (None,) * 5
    args = parser.parse_args(["eval", "--model", "m", "--data", "d.jsonl", "--protocol", "quick", "--top-p", "0.9",
                              "--samples-per-question", "64"])  # fmt: skip
    assert (args.protocol, args.top_p, args.samples_per_question) == ("quick", 0.9, 64)
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--model", "m", "--data", "d.jsonl", "--protocol", "fast"])
    args = parser.parse_args(["generate", "--model", "m", "--prompt", "x"])
    assert (args.temperature, args.top_p, args.top_k, args.repetition_penalty) == (0.6, 0.95, 0, 1.05)
    assert args.max_new_tokens == cli.GENERATE_MAX_NEW_TOKENS == 4096


@pytest.fixture
def two_questions(tmp_path) -> str:
    path = tmp_path / "two.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in (("one plus one", "2"),
                                                                                        ("two plus two", "4"))))  # fmt: skip
    return str(path)


def test_eval_quick_protocol_with_64_samples(checkpoint, two_questions, tmp_path, capsys):
    out = tmp_path / "eval"
    code = cli.main(["eval", "--model", checkpoint, "--data", two_questions, "--protocol", "quick", "--limit", "2",
                     "--samples-per-question", "64", "--max-new-tokens", "3", "--output-dir", str(out),
                     "--no-progress"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "sampling protocol: quick" in printed and "not the paper's sampling protocol" in printed
    report = json.loads((out / "eval_report.json").read_text())
    summary, records = report["summary"], report["records"]
    protocol = summary["protocol"]
    sampled = (protocol["name"], protocol["temperature"], protocol["top_p"], protocol["repetition_penalty"])
    assert sampled == ("quick", 0.6, 0.95, 1.05)
    assert protocol["max_new_tokens"] == 3 and protocol["samples_per_question"] == 64
    # 64 candidates per question: K = 2 groups at N = 32 (high), 8 at N = 8, 32 at N = 2
    assert summary["samples_per_question"] == 64 and summary["budgets"] == {"low": 2, "medium": 8, "high": 32}
    assert [len(row) for row in records["correct"]] == [64, 64] and [len(row) for row in records["scores"]] == [64, 64]
    correct = np.array(records["correct"])
    scores = np.array([[-np.inf if s is None else s for s in row] for row in records["scores"]])
    two_groups = np.mean(
        [correct[:, g][np.arange(2), scores[:, g].argmax(1)] for g in (slice(0, 32), slice(32, 64))], 0
    )
    assert summary["metrics"]["bon_sprm@32 (high)"]["mean"] == pytest.approx(two_groups.mean())


def test_eval_batches_questions_under_the_paper_protocol(checkpoint, tmp_path, capsys):
    """Several questions per generate call under the paper's repetition penalty; the records do not depend on it."""
    data = tmp_path / "five.jsonl"
    questions = ["one plus one", "two plus two", "three plus one", "five minus two", "two times three"]
    data.write_text("".join(json.dumps({"question": q, "answer": "2"}) + "\n" for q in questions))
    records = {}
    for batch_size in (4, 1):
        out = tmp_path / f"eval-{batch_size}"
        code = cli.main(["eval", "--model", checkpoint, "--data", str(data), "--protocol", "paper",
                         "--batch-size", str(batch_size), "--max-new-tokens", "24", "--output-dir", str(out),
                         "--no-progress"])  # fmt: skip
        assert code == 0
        assert "repetition_penalty=1.05" in capsys.readouterr().out
        records[batch_size] = json.loads((out / "eval_report.json").read_text())["records"]
    assert len(records[4]["scores"]) == 5
    assert sum(score != 0 for row in records[4]["scores"] for score in row) >= 10  # candidates with scored steps
    assert records[4] == records[1]


def test_eval_refuses_samples_that_do_not_split_into_groups(checkpoint, two_questions, capsys):
    base = ["eval", "--model", checkpoint, "--data", two_questions, "--limit", "1", "--max-new-tokens", "2",
            "--no-progress"]  # fmt: skip
    assert cli.main([*base, "--samples-per-question", "16"]) == 2
    assert "below the largest requested N (32)" in capsys.readouterr().err
    assert cli.main([*base, "--samples-per-question", "48"]) == 2
    assert "not a multiple of N = [32]" in capsys.readouterr().err


def test_clear_errors(checkpoint, two_questions, tmp_path, monkeypatch, capsys):
    assert cli.main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "not found" in capsys.readouterr().err

    def unreachable(path, *args, **kwargs):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub")

    monkeypatch.setattr("datasets.load_dataset", unreachable)
    assert cli.main(["eval", "--model", checkpoint, "--data", "gsm8k"]) == 2
    assert capsys.readouterr().err.startswith(
        "error: could not download openai/gsm8k from the Hub (offline?); pass a local file with --data PATH or "
        "--data-dir"
    )
    assert cli.main(["eval", "--model", checkpoint, "--data", "gsm9k"]) == 2
    assert "Unknown dataset 'gsm9k'" in capsys.readouterr().err
    assert cli.main(["eval", "--model", checkpoint, "--data", two_questions, "--efforts", "extreme"]) == 2
    assert "unknown effort(s) ['extreme']" in capsys.readouterr().err
    assert cli.main(["convert", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_eval_downloads_a_named_dataset(checkpoint, data_dir, tmp_path, monkeypatch, capsys):
    """`--data math500` without --data-dir goes through `datasets.load_dataset` (a stand-in serving the local rows)."""
    import datasets

    calls = []
    rows = [json.loads(line) for line in (data_dir / "math500_test.jsonl").read_text().splitlines()[:3]]

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    out = tmp_path / "eval"
    code = cli.main(["eval", "--model", checkpoint, "--data", "math500", "--limit", "2", "--efforts", "low",
                     "--max-new-tokens", "3", "--output-dir", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    assert calls == [("HuggingFaceH4/MATH-500", None, "test")]
    assert "| bon_sprm |" in capsys.readouterr().out
    assert json.loads((out / "eval_report.json").read_text())["summary"]["questions"] == 2


def test_push_renders_card_with_metrics(checkpoint, tmp_path, monkeypatch, capsys):
    uploaded = {}
    monkeypatch.setattr("huggingface_hub.HfApi.create_repo", lambda self, repo_id, **kw: None)

    def upload_folder(self, *, repo_id, folder_path, commit_message, **kwargs):
        uploaded["card"] = (Path(folder_path) / "README.md").read_text()
        return "ok"

    monkeypatch.setattr("huggingface_hub.HfApi.upload_folder", upload_folder)
    report = tmp_path / "eval_report.json"
    report.write_text(json.dumps({"summary": {"metrics": {"bon_sprm@2 (low)": {"mean": 0.5}}, "sprm_auc": 0.75}}))
    assert cli.main(["push", "--model", checkpoint, "--repo-id", "me/tiny", "--metrics", str(report)]) == 0
    assert "| bon_sprm@2 (low) | 0.5 |" in uploaded["card"] and "| SPRM AUC | 0.75 |" in uploaded["card"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "--num-candidates", "0"], "argument --num-candidates: 0 is outside (0, inf)"),
        (["generate", "--top-p", "1.5"], "argument --top-p: 1.5 is outside (0.0, 1.0]"),
        (["generate", "--temperature", "0"], "argument --temperature: 0.0 is outside (0.0, inf)"),
        (["generate", "--top-k", "-1"], "argument --top-k: -1 is outside [0, inf)"),
        (["generate", "--max-new-tokens", "ten"], "argument --max-new-tokens: 'ten' is not an int"),
        (["generate", "--beam-width", "0"], "argument --beam-width: 0 is outside (0, inf)"),
        (["score", "--text", "x", "--batch-size", "0"], "argument --batch-size: 0 is outside (0, inf)"),
        (["eval", "--data", "gsm8k", "--limit", "0"], "argument --limit: 0 is outside (0, inf)"),
        (["eval", "--data", "gsm8k", "--samples-per-question", "-4"], "argument --samples-per-question: -4 is outside"),
        (["eval", "--data", "gsm8k", "--threads", "0"], "argument --threads: 0 is outside (0, inf)"),
    ],
)
def test_bad_numbers_are_refused_by_the_parser(argv, message, capsys):
    command, rest = argv[0], argv[1:]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--model", "unused", *(["--prompt", "x"] if command == "generate" else []), *rest])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_inputs_are_checked_before_the_model_loads(tmp_path, monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(cli, "_load_model_and_tokenizer", no_model)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "a"}\n{not json\n')
    for argv, message in (
        (["generate", "--prompt-file", str(tmp_path / "missing.txt")], "missing.txt not found"),
        (["generate", "--prompt-file", str(empty)], "is empty"),
        (["generate", "--prompt", "   "], "--prompt is empty"),
        (["score", "--input", str(bad_json)], "bad.jsonl:2 is not valid JSON"),
        (["score", "--text", ""], "--text is empty"),
    ):
        assert cli.main([argv[0], "--model", "unused", *argv[1:]]) == 2
        assert message in capsys.readouterr().err


def test_generate_with_step_level_search(checkpoint, capsys):
    for search in ("beam", "dvts"):
        code = cli.main(["generate", "--model", checkpoint, "--prompt", "what is one plus one", "--num-candidates",
                         "4", "--search", search, "--beam-width", "2", "--max-new-tokens", "12", "--json",
                         "--no-progress"])  # fmt: skip
        assert code == 0
        result = json.loads(capsys.readouterr().out)
        assert len(result[0]["scores"]) == 4


def test_generate_shows_its_progress_bar_unless_told_not_to(checkpoint, capsys):
    # `generate`'s own default is no bar; the command turns it on explicitly.
    argv = ["generate", "--model", checkpoint, "--prompt", "one plus one", "--num-candidates", "2", "--max-new-tokens",
            "4", "--json"]  # fmt: skip
    assert cli.main(argv) == 0
    assert "search" in capsys.readouterr().err
    assert cli.main([*argv, "--no-progress"]) == 0
    assert "search" not in capsys.readouterr().err


def test_input_errors_are_one_line_and_bugs_keep_their_traceback(checkpoint, tmp_path, monkeypatch, capsys):
    missing = str(tmp_path / "missing.jsonl")
    assert cli.main(["eval", "--model", checkpoint, "--data", missing]) == 2  # a user's mistake: one clean line
    assert capsys.readouterr().err.startswith("error: ")
    with pytest.raises(FileNotFoundError):  # --debug shows every traceback
        cli.main(["--debug", "eval", "--model", checkpoint, "--data", missing])
    prompt_file = tmp_path / "empty.txt"
    prompt_file.write_text("\n")
    assert cli.main(["generate", "--model", checkpoint, "--prompt-file", str(prompt_file)]) == 2
    with pytest.raises(cli.CLIError):
        cli.main(["--debug", "generate", "--model", checkpoint, "--prompt-file", str(prompt_file)])

    import transformers

    def broken(*args, **kwargs):  # a ValueError raised inside a library is a bug, not an input to fix
        raise ValueError("shape mismatch deep inside")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", broken)
    with pytest.raises(ValueError, match="deep inside"):
        cli.main(["score", "--model", checkpoint, "--text", "a.\n\nb"])


SEARCH_COMBINATIONS = [
    ["best_of_n"], ["beam"], ["dvts"], ["beam", "dvts"], ["best_of_n", "beam"], ["best_of_n", "dvts"],
    ["best_of_n", "beam", "dvts"],
]  # fmt: skip


@pytest.mark.parametrize("searches", SEARCH_COMBINATIONS, ids="+".join)
def test_eval_reports_every_combination_of_searches(checkpoint, two_questions, tmp_path, monkeypatch, searches, capsys):
    """Report, table, JSON, both plots and the model card, whichever strategies ran (searches alone have no pass@1)."""
    out = tmp_path / "eval"
    code = cli.main(["eval", "--model", checkpoint, "--data", two_questions, "--protocol", "quick", "--efforts", "low",
                     "--search", *searches, "--max-new-tokens", "6", "--output-dir", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "eval_report.json").read_text())
    metrics = report["summary"]["metrics"]
    expected = {f"{method}@2 (low)" for method in searches if method != "best_of_n"}
    if "best_of_n" in searches:
        expected |= {"pass@1", "bon_sprm@2 (low)", "majority@2 (low)"}
        assert len(report["records"]["correct"]) == 2
    else:
        assert "pass@1" not in metrics and "records" not in report
    assert expected <= set(metrics), sorted(metrics)
    for key in expected:
        row = "pass@1" if key == "pass@1" else key.split("@")[0]
        assert f"| {row} |" in printed, (row, printed)
    assert set(report.get("searches", {})) == {f"{m}@2" for m in searches if m != "best_of_n"}
    for plot in ("accuracy_vs_n.png", "accuracy_vs_tokens.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    cards = {}
    monkeypatch.setattr("huggingface_hub.HfApi.create_repo", lambda self, repo_id, **kw: None)
    monkeypatch.setattr(
        "huggingface_hub.HfApi.upload_folder",
        lambda self, *, folder_path, **kw: cards.setdefault("card", (Path(folder_path) / "README.md").read_text()),
    )
    assert (
        cli.main(["push", "--model", checkpoint, "--repo-id", "me/tiny", "--metrics", str(out / "eval_report.json")])
        == 0
    )
    for key in expected:
        assert f"| {key} |" in cards["card"], (key, cards["card"])


def test_eval_says_when_accelerate_launched_one_process_of_several(checkpoint, two_questions, tmp_path):
    """`accelerate launch --cpu --num_processes 2` (what many type on a CPU box) starts one process: it is said."""
    import os
    import shutil

    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    assert accelerate is not None, "accelerate CLI not found"
    out = tmp_path / "eval"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_PORT", "MASTER_ADDR")}
    proc = subprocess.run(
        [accelerate, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "-m", "metastone_hf.cli", "eval", "--model", checkpoint, "--data", two_questions,
         "--protocol", "quick", "--efforts", "low", "--max-new-tokens", "4", "--output-dir", str(out),
         "--no-progress"],
        capture_output=True, text=True, timeout=600, env={**env, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stderr.find("warning: `accelerate launch` was asked for several processes but started this one alone")
    assert said >= 0, proc.stderr[-3000:]
    assert "accelerate launch --multi_gpu --num_processes N" in proc.stderr
    # the command's first line: before the model loads and the prompt template is named
    assert said < proc.stderr.index("prompt template:"), proc.stderr[-3000:]
    assert (out / "eval_report.json").exists()


def test_eval_without_a_launcher_says_nothing_about_processes(checkpoint, two_questions, tmp_path, monkeypatch, capsys):
    for name in ("ACCELERATE_MIXED_PRECISION", "MASTER_PORT", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    code = cli.main(["eval", "--model", checkpoint, "--data", two_questions, "--protocol", "quick", "--efforts", "low",
                     "--max-new-tokens", "4", "--output-dir", str(tmp_path / "eval"), "--no-progress"])  # fmt: skip
    assert code == 0
    assert "accelerate launch" not in capsys.readouterr().err


@pytest.fixture(scope="module")
def templated_checkpoint(tmp_path_factory) -> str:
    """A tiny checkpoint that records how it reads a question (as the demo's checkpoints do)."""
    from metastone_hf import MetaStoneForCausalLMWithSPRM

    path = save_tiny_checkpoint(str(tmp_path_factory.mktemp("templated") / "tiny"))
    model = MetaStoneForCausalLMWithSPRM.from_pretrained(path)
    model.config.prompt_template = "Question {question} Answer <think>"
    model.save_pretrained(path)
    return path


def test_commands_use_the_prompt_template_the_checkpoint_records(templated_checkpoint, two_questions, tmp_path, capsys):
    question = "one plus one"
    built = "Question one plus one Answer <think>"
    common = ["--model", templated_checkpoint, "--num-candidates", "2", "--max-new-tokens", "8", "--seed", "3",
              "--json", "--no-progress"]  # fmt: skip
    assert cli.main(["generate", "--prompt", question, *common]) == 0
    out = capsys.readouterr()
    assert "prompt template: 'Question {question} Answer <think>', recorded in the checkpoint" in out.err
    by_template = json.loads(out.out)[0]
    # The reference: the same input given as is.
    assert cli.main(["generate", "--raw-prompt", "--prompt", built, *common]) == 0
    as_given = json.loads(capsys.readouterr().out)[0]
    assert (by_template["answer"], by_template["scores"]) == (as_given["answer"], as_given["scores"])
    # Told otherwise, the command uses the chat template and says so.
    assert cli.main(["generate", "--prompt", question, "--prompt-template", "plain", *common]) == 0
    assert "prompt template: '{question}' as the user message" in capsys.readouterr().err

    rows = tmp_path / "rows.jsonl"
    completion = "<think>one.\n\nplus one.\n\n</think>\\boxed{2}"
    rows.write_text(json.dumps({"question": question, "completion": completion}) + "\n"
                    + json.dumps({"text": built + completion}) + "\n")  # fmt: skip
    assert cli.main(["score", "--model", templated_checkpoint, "--input", str(rows), "--json"]) == 0
    out = capsys.readouterr()
    assert "recorded in the checkpoint" in out.err
    from_question, from_text = json.loads(out.out)
    assert from_question == from_text and from_question["num_steps"] == 2

    out_dir = tmp_path / "eval"
    assert cli.main(["eval", "--model", templated_checkpoint, "--data", two_questions, "--protocol", "quick",
                     "--efforts", "low", "--max-new-tokens", "4", "--output-dir", str(out_dir), "--no-progress"]) == 0  # fmt: skip
    assert "recorded in the checkpoint" in capsys.readouterr().err
    report = json.loads((out_dir / "eval_report.json").read_text())
    assert report["summary"]["protocol"]["prompt_template"] == "Question {question} Answer <think>"


def test_eval_stall_timeout_reaches_the_runner(checkpoint, two_questions, tmp_path, monkeypatch):
    from metastone_hf import eval_runner

    seen = []

    class Stop(Exception):
        pass

    def fake_run_evaluation(*args, **kwargs):
        seen.append(kwargs.get("stall_seconds", eval_runner.STALL_SECONDS))
        raise Stop  # before any sampling

    monkeypatch.setattr(eval_runner, "run_evaluation", fake_run_evaluation)
    common = ["eval", "--model", checkpoint, "--data", two_questions, "--protocol", "quick", "--efforts", "low",
              "--max-new-tokens", "4", "--output-dir", str(tmp_path / "eval"), "--no-progress"]  # fmt: skip
    for extra in ([], ["--stall-timeout", "90"]):
        with pytest.raises(Stop):
            cli.main([*common, *extra])
    assert seen == [3600.0, 90.0] and eval_runner.STALL_SECONDS == 3600.0  # the default --help names


def test_eval_adaptive_rows_reach_table_report_plots_and_card(checkpoint, two_questions, tmp_path, monkeypatch, capsys):
    """`--adaptive`: a row per setting with tokens, decode steps and candidates per question; records that do not
    depend on the batch size."""
    settings = ["sprm:warmup=2,consensus=none,keep_percent=50", "confidence:warmup=2,window=2,consensus=0.6"]
    reports = []
    for batch_size in ("1", "2"):
        out = tmp_path / f"eval{batch_size}"
        code = cli.main(["eval", "--model", checkpoint, "--data", two_questions, "--protocol", "quick", "--efforts",
                         "low", "--samples-per-question", "4", "--max-new-tokens", "6", "--batch-size", batch_size,
                         "--adaptive", *settings, "--output-dir", str(out), "--no-progress"])  # fmt: skip
        assert code == 0
        printed = capsys.readouterr().out
        reports.append(json.loads((out / "eval_report.json").read_text()))
        metrics = reports[-1]["summary"]["metrics"]
        for setting in settings:
            entry = metrics[f"adaptive:{setting}"]
            assert {"tokens_per_question", "decode_steps_per_question", "candidates_per_question"} <= set(entry)
            assert 2 <= entry["candidates_per_question"] <= 4 and entry["n"] == 4
            assert f"| {setting} | 4 |" in printed
        for plot in ("accuracy_vs_n.png", "accuracy_vs_tokens.png"):
            assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
        for record in records:
            for setting in settings:
                run = record["results"][f"adaptive:{setting}"]
                assert run["candidates_used"] == sum(run["used"]) and run["decode_steps"] > 0
                assert not run["stopped"][run["chosen"]] and run["used"][run["chosen"]]
        reports[-1]["records_raw"] = [
            {k: v for k, v in r["results"].items() if k.startswith("adaptive:")} for r in records
        ]
    strip = lambda runs: [{k: {f: v for f, v in run.items() if f != "scores"} for k, run in r.items()} for r in runs]  # noqa: E731
    assert strip(reports[0]["records_raw"]) == strip(reports[1]["records_raw"])

    cards = {}
    monkeypatch.setattr("huggingface_hub.HfApi.create_repo", lambda self, repo_id, **kw: None)
    monkeypatch.setattr(
        "huggingface_hub.HfApi.upload_folder",
        lambda self, *, folder_path, **kw: cards.setdefault("card", (Path(folder_path) / "README.md").read_text()),
    )
    report = tmp_path / "eval1" / "eval_report.json"
    assert cli.main(["push", "--model", checkpoint, "--repo-id", "me/tiny", "--metrics", str(report)]) == 0
    assert f"| adaptive:{settings[0]} |" in cards["card"], cards["card"]


def test_eval_refuses_a_bad_adaptive_setting(checkpoint, two_questions, tmp_path, capsys):
    code = cli.main(["eval", "--model", checkpoint, "--data", two_questions, "--protocol", "quick",
                     "--samples-per-question", "4", "--adaptive", "sprm:warmpu=2", "--output-dir", str(tmp_path / "e"),
                     "--no-progress"])  # fmt: skip
    assert code == 2 and "warmpu" in capsys.readouterr().err
