"""The output folder of an evaluation: its settings and one JSON line per finished question, safe to kill.

An evaluation at the paper's scale runs for days, so nothing finished may be lost to a crash or a preemption:

* ``run.json`` holds every setting that changes the numbers (model, data, protocol, N, seed, search strategies,
  prompt template). A re-run in the same folder resumes only when its settings are the same; otherwise it is refused
  with the settings that differ named (``overwrite=True`` starts afresh).
* ``records.jsonl`` gets one line per finished question, written with one ``write`` and flushed + fsynced before the
  next question starts. Under several processes, process ``r > 0`` appends to ``records.rank{r}.jsonl`` instead (no
  two processes ever write one file); the main process merges them into ``records.jsonl`` at the end.
* A last line cut by a kill (no newline, or not valid JSON) is ignored when reading and cut off before the next
  append, so its question is simply done again. A damaged line anywhere else is an error naming the file and line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .atomic_writes import atomic_file, write_json_atomic

RECORDS_FILE = "records.jsonl"
SETTINGS_FILE = "run.json"


class ResumeMismatchError(ValueError):
    """The output folder holds a run with other settings; the message names every setting that differs."""


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out = []
        for key in sorted(set(old) | set(new)):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new:
                out.append(f"{name}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}")
            else:
                out.extend(_differences(old[key], new[key], name))
        return out
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


class EvalStore:
    """The records of one evaluation in ``folder``, as seen by process ``rank`` of ``world_size``.

    Args:
        folder: the output folder (created when missing).
        rank / world_size: this process and the number of processes (1 process: ``0`` / ``1``).
    """

    def __init__(self, folder: str | Path, rank: int = 0, world_size: int = 1):
        self.folder = Path(folder)
        self.rank, self.world_size = rank, world_size
        self.path = self.records_path(rank)

    # ------------------------------------------------------------------ settings
    def prepare(self, settings: dict[str, Any], overwrite: bool = False) -> bool:
        """Check or write the run's settings (main process only). Returns ``True`` when resuming a run.

        Raises:
            ResumeMismatchError: the folder holds a run with other settings and ``overwrite`` is off.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        settings = json.loads(json.dumps(settings))  # the form it has once read back (tuples become lists)
        settings_path = self.folder / SETTINGS_FILE
        if overwrite:
            for path in self.record_files():
                path.unlink()
            settings_path.unlink(missing_ok=True)
        elif settings_path.exists():
            saved = json.loads(settings_path.read_text(encoding="utf-8"))
            differences = _differences(saved, settings)
            if differences:
                raise ResumeMismatchError(
                    f"{self.folder} holds an evaluation with other settings, so it cannot be resumed:\n  "
                    + "\n  ".join(differences)
                    + "\nRe-run with the same settings to resume it, choose another --output-dir, or pass "
                    "--overwrite to discard its records and start afresh."
                )
            return True
        elif self.record_files():
            raise ResumeMismatchError(
                f"{self.folder} holds records but no {SETTINGS_FILE}: they cannot be matched to these settings. "
                "Choose another --output-dir, or pass --overwrite to discard them."
            )
        write_json_atomic(settings_path, settings)
        return False

    # ------------------------------------------------------------------ records
    def record_files(self) -> list[Path]:
        if not self.folder.exists():
            return []
        return sorted(p for p in self.folder.glob("records*.jsonl") if p.is_file())

    @staticmethod
    def _read(path: Path) -> tuple[list[dict[str, Any]], int]:
        """(records, bytes of the file that hold whole records)."""
        data = path.read_bytes()
        records, good = [], 0
        lines = data.split(b"\n")
        for number, line in enumerate(lines, 1):
            last = number == len(lines)
            if last and not line:  # the file ends with a newline: nothing after it
                break
            try:
                if last:
                    raise ValueError("no newline: cut by a kill while it was written")
                record = json.loads(line)
                if not isinstance(record, dict) or "index" not in record:
                    raise ValueError("not a question record")
            except ValueError as error:
                if last:  # torn by a kill: that question is done again
                    break
                raise ValueError(
                    f"{path}:{number} is damaged ({error}); remove that line to redo its question."
                ) from None
            records.append(record)
            good += len(line) + 1
        return records, good

    def load(self) -> dict[int, dict[str, Any]]:
        """Every finished question's record by question index, from every process's file (first one wins)."""
        records: dict[int, dict[str, Any]] = {}
        for path in self.record_files():
            for record in self._read(path)[0]:
                records.setdefault(int(record["index"]), record)
        return records

    def open_for_append(self) -> None:
        """Cut a torn last line off this process's file, so that the next record starts on a line of its own."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            good = self._read(self.path)[1]
            if good != self.path.stat().st_size:
                with self.path.open("r+b") as handle:
                    handle.truncate(good)
                    os.fsync(handle.fileno())

    def append(self, record: dict[str, Any]) -> None:
        """Append one question's record durably: one write, flushed and fsynced before returning."""
        line = (json.dumps(record, ensure_ascii=False, allow_nan=True) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(line)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)

    def consolidate(self, records: Iterable[dict[str, Any]]) -> Path:
        """Main process, once every process is done: ``records.jsonl`` holds every record in question order."""
        main = self.folder / RECORDS_FILE
        with atomic_file(main) as handle:
            for record in sorted(records, key=lambda r: int(r["index"])):
                handle.write(json.dumps(record, ensure_ascii=False, allow_nan=True) + "\n")
        for path in self.record_files():
            if path != main:
                path.unlink()
        return main

    def records_path(self, rank: int) -> Path:
        """The file process ``rank`` appends its records to."""
        return self.folder / (RECORDS_FILE if rank == 0 else f"records.rank{rank}.jsonl")

    def marker(self, run_id: str, rank: int) -> Path:
        return self.folder / f".done.{run_id}.rank{rank}"

    def clear_markers(self) -> None:
        for path in self.folder.glob(".done.*"):
            path.unlink(missing_ok=True)


__all__ = ["RECORDS_FILE", "SETTINGS_FILE", "EvalStore", "ResumeMismatchError"]
