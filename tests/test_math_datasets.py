"""Math datasets by name (Hub, through `datasets.load_dataset`) and from local files, for eval and training.

No test reaches the network: the Hub is an in-memory stand-in for `datasets.load_dataset` serving rows shaped like
the real Hub datasets (built from the local copies), except the offline test, which makes the real call with
`HF_HUB_OFFLINE=1`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import datasets
import pytest

from metastone_hf import cli
from metastone_hf.evaluation import DATASET_FILES, load_eval_examples
from metastone_hf.math_datasets import MATH_DATASETS, DatasetDownloadError, load_math_rows

INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."


def local_rows(data_dir, name: str, count: int = 5) -> list[dict]:
    lines = (data_dir / DATASET_FILES[name]).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:count]]


def hub_rows(data_dir, name: str, count: int = 5) -> list[dict]:
    """Rows as the Hub dataset has them. MATH-500 and GSM8K: the local copies are the same files. AIME 2024: the
    MetaStone copy has `prompt` (question + instruction) and an int `answer`; HuggingFaceH4/aime_2024 has `id`,
    `problem`, `solution`, `answer` (a string), `url`, `year`."""
    rows = local_rows(data_dir, name, count)
    if name != "aime24":
        return rows
    return [
        {
            "id": 60 + i,
            "problem": row["prompt"].removesuffix(INSTRUCTION),
            "solution": "",
            "answer": str(row["answer"]),
            "url": "",
            "year": "2024",
        }
        for i, row in enumerate(rows)
    ]


@pytest.fixture
def fake_hub(monkeypatch):
    """`datasets.load_dataset` replaced by an in-memory Hub: it records each call and serves ``served[hub_id]``."""
    calls: list[dict] = []
    served: dict[str, list[dict]] = {}

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append({"path": path, "name": name, "split": split, **kwargs})
        if path not in served:
            raise ConnectionError(f"Couldn't reach '{path}' on the Hub (stand-in)")
        return datasets.Dataset.from_list(served[path])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls, served


# ---------------------------------------------------------------------------------------------- registry
def test_registry_names_the_hub_datasets_and_their_fields(data_dir):
    assert {name: (s.hub_id, s.config, s.split) for name, s in MATH_DATASETS.items()} == {
        "aime24": ("HuggingFaceH4/aime_2024", None, "train"),
        "aime25": ("minyichen/AIME2025", None, "test"),
        "gsm8k": ("openai/gsm8k", "main", "test"),
        "math500": ("HuggingFaceH4/MATH-500", None, "test"),
    }
    # GSM8K and MATH-500's local copies are the files the Hub datasets were made from: same field names
    for name in ("gsm8k", "math500"):
        spec = MATH_DATASETS[name]
        row = local_rows(data_dir, name, 1)[0]
        assert spec.prompt_field in row and spec.answer_field in row, (name, sorted(row))
    assert MATH_DATASETS["gsm8k"].train_split == "train"


@pytest.mark.parametrize(
    ("name", "expected_call"),
    [
        ("aime24", {"path": "HuggingFaceH4/aime_2024", "name": None, "split": "train"}),
        ("gsm8k", {"path": "openai/gsm8k", "name": "main", "split": "test"}),
        ("math500", {"path": "HuggingFaceH4/MATH-500", "name": None, "split": "test"}),
    ],
)
def test_named_dataset_is_downloaded_and_mapped(name, expected_call, data_dir, fake_hub):
    calls, served = fake_hub
    served[expected_call["path"]] = hub_rows(data_dir, name)
    examples = load_eval_examples(name)
    assert calls == [expected_call]
    local = load_eval_examples(name, data_dir, limit=5)
    # the same questions and gold answers whichever way the data came
    assert [e.answer for e in examples] == [e.answer for e in local]
    if name == "aime24":
        assert [e.prompt + INSTRUCTION for e in examples] == [e.prompt for e in local]
        assert [e.id for e in examples] == ["60", "61", "62", "63", "64"]
    else:
        assert examples == local
    if name == "gsm8k":  # "... #### 18" reduced to "18"
        assert served["openai/gsm8k"][0]["answer"].endswith("#### 18") and examples[0].answer == "18"


def test_split_and_limit_reach_the_hub(data_dir, fake_hub):
    calls, served = fake_hub
    served["openai/gsm8k"] = hub_rows(data_dir, "gsm8k")
    assert len(load_eval_examples("gsm8k", limit=2, split="train")) == 2
    assert calls[-1] == {"path": "openai/gsm8k", "name": "main", "split": "train"}


def test_hub_dataset_without_the_registered_fields(fake_hub):
    _, served = fake_hub
    served["HuggingFaceH4/MATH-500"] = [{"question": "1+1?", "answer": "2"}]
    with pytest.raises(ValueError, match=r"has no field\(s\) \['problem'\]"):
        load_eval_examples("math500")


def test_unreachable_hub_says_how_to_use_local_files(fake_hub):
    with pytest.raises(DatasetDownloadError) as error:
        load_eval_examples("aime24")
    assert str(error.value).startswith(
        "could not download HuggingFaceH4/aime_2024 from the Hub (offline?); pass a local file with --data PATH or "
        "--data-dir"
    )


def test_offline_hub_fails_fast_with_the_local_file_hint(tmp_path):
    """The real `datasets.load_dataset`, offline and with an empty cache: `metastone eval` stops before loading
    any model, with the message, and without waiting on the network."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_DATASETS_CACHE", "HF_HUB_CACHE"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"), OMP_NUM_THREADS="1")
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "metastone_hf.cli", "eval", "--model", str(tmp_path / "no-model"), "--data", "gsm8k"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (
        "error: could not download openai/gsm8k from the Hub (offline?); pass a local file with --data PATH or "
        "--data-dir" in proc.stderr
    )
    assert "OfflineModeIsEnabled" in proc.stderr  # refused by offline mode, not by a network timeout
    assert "Traceback" not in proc.stderr and "no-model" not in proc.stderr
    assert elapsed < 120


# ---------------------------------------------------------------------------------------------- local files
def test_local_formats_give_the_same_examples(data_dir, tmp_path):
    rows = local_rows(data_dir, "math500", 4)
    expected = load_eval_examples("math500", data_dir, limit=4)

    as_json = tmp_path / "rows.json"
    as_json.write_text(json.dumps(rows))
    as_parquet = tmp_path / "rows.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(as_parquet))
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    one_file = tmp_path / "one-file"
    one_file.mkdir()
    (one_file / "whatever.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for source in (as_json, as_parquet, saved, one_file):
        assert load_eval_examples(source) == expected, source
    assert load_eval_examples(str(as_parquet), limit=2) == expected[:2]


def test_local_splits_and_ambiguous_folders(data_dir, tmp_path):
    rows = local_rows(data_dir, "gsm8k", 6)
    saved = tmp_path / "dict"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:3]), "test": datasets.Dataset.from_list(rows[3:])}
    ).save_to_disk(str(saved))
    answers = [e.answer for e in load_eval_examples(saved)]  # default: the test split
    assert answers == [e.answer for e in load_eval_examples("gsm8k", data_dir, limit=6)][3:]
    assert len(load_eval_examples(saved, split="train")) == 3
    with pytest.raises(ValueError, match=r"holds the splits \['train', 'test'\], not 'validation'"):
        load_eval_examples(saved, split="validation")

    folder = tmp_path / "splits"
    folder.mkdir()
    for split, part in (("train", rows[:2]), ("test", rows[2:])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    assert len(load_eval_examples(folder, split="train")) == 2
    with pytest.raises(ValueError, match="several data files"):
        load_eval_examples(folder)
    with pytest.raises(ValueError, match="with --data-dir"):
        load_eval_examples(data_dir)  # the benchmark folder itself: name a dataset with --data-dir instead
    (tmp_path / "rows.csv").write_text("question,answer\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_eval_examples(tmp_path / "rows.csv")


def test_data_dir_accepts_name_jsonl(data_dir, tmp_path):
    (tmp_path / "math500.jsonl").write_text("".join(json.dumps(r) + "\n" for r in local_rows(data_dir, "math500", 3)))
    assert load_eval_examples("math500", tmp_path) == load_eval_examples("math500", data_dir, limit=3)
    # a local folder that happens to have a registered name is a path when written as one
    named = tmp_path / "gsm8k"
    named.mkdir()
    (named / "test.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    assert load_math_rows(named).rows == [{"question": "1+1?", "answer": "#### 2"}]


# ---------------------------------------------------------------------------------------------- training
def test_training_reads_the_registered_training_split(data_dir, fake_hub, tmp_path):
    from metastone_hf.training.script import run_training_cli

    calls, served = fake_hub
    served["openai/gsm8k"] = hub_rows(data_dir, "gsm8k")
    out = tmp_path / "export"
    argv = ["--dataset_name", "gsm8k", "--max_train_samples", "3", "--export_dataset_dir", str(out)]
    assert run_training_cli(argv) == 0
    assert calls == [{"path": "openai/gsm8k", "name": "main", "split": "train"}]
    exported = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert len(exported) == 3 and exported[0]["solution"] == "$18$"
    question = exported[0]["prompt"][0]["content"]
    assert question.startswith(served["openai/gsm8k"][0]["question"]) and question.endswith(INSTRUCTION.strip())

    assert run_training_cli([*argv, "--dataset_train_split", "test"]) == 0  # an explicit split wins
    assert calls[-1]["split"] == "test"


def test_training_reads_local_files_of_any_format(data_dir, tmp_path):
    from metastone_hf.training.script import load_math_dataset

    rows = local_rows(data_dir, "aime24", 3)
    parquet = tmp_path / "aime.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    dataset = load_math_dataset(parquet, "Please reason step by step, and put your final answer within \\boxed{}.")
    assert dataset["solution"] == [f"${row['answer']}$" for row in rows]
    # the instruction is already in the AIME prompts: not appended twice
    assert [p[0]["content"] for p in dataset["prompt"]] == [row["prompt"] for row in rows]


def test_train_command_reports_an_unreachable_hub(fake_hub, tmp_path, capsys):
    code = cli.main(["train", "--dataset_name", "math500", "--export_dataset_dir", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert (
        "could not download HuggingFaceH4/MATH-500 from the Hub (offline?); pass a local file with --dataset_path"
        in err
    )


def test_training_run_gets_train_and_eval_splits(data_dir, fake_hub, tmp_path, monkeypatch):
    """`--dataset_name gsm8k` reaches the trainer as its training split, and its test split when evaluating."""
    from metastone_hf.training import trainer as trainer_module
    from metastone_hf.training.script import run_training_cli

    calls, served = fake_hub
    served["openai/gsm8k"] = hub_rows(data_dir, "gsm8k")
    received = {}

    class Stop(Exception):
        pass

    def fake_trainer(**kwargs):
        received.update(kwargs)
        raise Stop  # everything up to the trainer ran: no need to train

    monkeypatch.setattr(trainer_module, "SPRMGRPOTrainer", fake_trainer)
    argv = ["--model_name_or_path", "unused", "--dataset_name", "gsm8k", "--max_train_samples", "2",
            "--output_dir", str(tmp_path / "out"), "--use_cpu", "--bf16", "false", "--report_to", "none",
            "--eval_strategy", "steps", "--eval_steps", "1"]  # fmt: skip
    with pytest.raises(Stop):
        run_training_cli(argv)
    assert [c["split"] for c in calls] == ["train", "test"]
    assert received["train_dataset"].column_names == ["prompt", "solution"] and len(received["train_dataset"]) == 2
    assert len(received["eval_dataset"]) == 5 and received["eval_dataset"][0]["solution"] == "$18$"


# Rows shaped like minyichen/AIME2025 on the Hub (its dataset card: ID, Year, Problem Number, problem, answer, Part,
# question); the problems here are stand-ins, the benchmark's own text is not shipped.
AIME25_ROWS = [
    {"ID": f"2025-I-{k}", "Year": 2025, "Problem Number": k, "problem": f"Find the {k}-th value.", "answer": str(7 * k),
     "Part": "I", "question": f"Find the {k}-th value."}
    for k in range(1, 4)
]  # fmt: skip


def test_aime25_by_name_from_the_hub_and_from_a_data_dir(fake_hub, tmp_path):
    calls, served = fake_hub
    served["minyichen/AIME2025"] = AIME25_ROWS
    examples = load_eval_examples("aime25")
    assert calls[-1] == {"path": "minyichen/AIME2025", "name": None, "split": "test"}
    assert [(e.prompt, e.answer, e.id) for e in examples] == [(r["problem"], r["answer"], r["ID"]) for r in AIME25_ROWS]
    (tmp_path / "aime25.jsonl").write_text("".join(json.dumps(r) + "\n" for r in AIME25_ROWS))
    offline = load_eval_examples("aime25", tmp_path)
    assert [(e.prompt, e.answer, e.id) for e in offline] == [(e.prompt, e.answer, e.id) for e in examples]
    assert len(calls) == 1  # the data dir never reaches the Hub
