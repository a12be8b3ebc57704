"""The evaluation's output folder: settings check, durable appends, torn last lines, several processes' files."""

from __future__ import annotations

import json

import pytest

from metastone_hf.eval_store import RECORDS_FILE, EvalStore, ResumeMismatchError

SETTINGS = {"model": "m", "seed": 0, "protocol": {"name": "paper", "max_new_tokens": 32768}, "searches": ["beam"]}


def record(index: int, **extra) -> dict:
    return {"index": index, "results": {}, **extra}


def test_settings_are_written_then_resumed_or_refused_with_what_differs(tmp_path):
    store = EvalStore(tmp_path / "run")
    assert store.prepare(SETTINGS) is False
    assert json.loads((tmp_path / "run" / "run.json").read_text()) == SETTINGS
    assert store.prepare(SETTINGS) is True
    changed = {**SETTINGS, "seed": 1, "protocol": {"name": "paper", "max_new_tokens": 1024}}
    with pytest.raises(ResumeMismatchError) as error:
        store.prepare(changed)
    message = str(error.value)
    assert "seed: 0 -> 1" in message and "protocol.max_new_tokens: 32768 -> 1024" in message
    assert "--overwrite" in message and "model" not in message.split("\n", 1)[1].split("Re-run")[0]
    store.append(record(0))
    assert store.prepare(changed, overwrite=True) is False
    assert store.load() == {} and json.loads((tmp_path / "run" / "run.json").read_text())["seed"] == 1


def test_records_without_settings_are_not_adopted(tmp_path):
    (tmp_path / RECORDS_FILE).write_text(json.dumps(record(0)) + "\n")
    with pytest.raises(ResumeMismatchError, match="no run.json"):
        EvalStore(tmp_path).prepare(SETTINGS)


def test_a_torn_last_line_is_ignored_and_cut_before_the_next_append(tmp_path):
    store = EvalStore(tmp_path)
    store.append(record(0, text="é"))
    store.append(record(1))
    with (tmp_path / RECORDS_FILE).open("ab") as handle:
        handle.write(b'{"index": 2, "resu')  # killed in the middle of writing question 2
    assert sorted(store.load()) == [0, 1]
    store.open_for_append()
    store.append(record(2))
    lines = (tmp_path / RECORDS_FILE).read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["index"] for line in lines] == [0, 1, 2]
    assert json.loads(lines[0])["text"] == "é"
    # A whole last line that is not valid JSON (no newline yet, or garbage) is torn too.
    with (tmp_path / RECORDS_FILE).open("a") as handle:
        handle.write('{"index": 3}')
    assert sorted(store.load()) == [0, 1, 2]


def test_a_damaged_line_in_the_middle_is_an_error_naming_it(tmp_path):
    path = tmp_path / RECORDS_FILE
    path.write_text(json.dumps(record(0)) + "\nnot json\n" + json.dumps(record(2)) + "\n")
    with pytest.raises(ValueError, match=r"records.jsonl:2 is damaged"):
        EvalStore(tmp_path).load()


def test_processes_write_their_own_files_and_the_main_one_merges_them(tmp_path):
    main, other = EvalStore(tmp_path, 0, 2), EvalStore(tmp_path, 1, 2)
    assert other.path.name == "records.rank1.jsonl"
    other.append(record(3))
    main.append(record(1))
    other.append(record(0))
    other.append(record(1, duplicate=True))  # the same question twice: the first record read wins
    merged = main.load()
    assert sorted(merged) == [0, 1, 3] and "duplicate" not in merged[1]
    main.consolidate(merged.values())
    assert [p.name for p in main.record_files()] == [RECORDS_FILE]
    lines = (tmp_path / RECORDS_FILE).read_text().splitlines()
    assert [json.loads(line)["index"] for line in lines] == [0, 1, 3]
