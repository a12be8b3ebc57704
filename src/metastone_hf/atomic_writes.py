"""Writes that a kill cannot leave half-done: a file or a folder is replaced by its complete new version, or not at all.

Every file and folder this package writes for a user (checkpoints, conversions, evaluation reports and records, plots)
goes through these helpers:

* :func:`atomic_file` writes a sibling temporary file, flushes it to disk and renames it over the target;
* :func:`replace_folder` moves a complete staging folder into place, keeping the old folder until the new one is in;
* :func:`atomic_output_dir` makes a staging folder, yields it, and replaces the target with it once the block is done.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def fsync_directory(folder: str | Path) -> None:
    """Flush a folder's entries (a rename into it) to disk, where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Yield a handle on a temporary sibling of ``path``; once the block is done it replaces ``path``.

    A kill or an error inside the block leaves ``path`` as it was (and removes the temporary file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open(mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def write_json_atomic(path: str | Path, payload: Any, default: Any = None) -> None:
    """Write ``payload`` as JSON to ``path`` so that a kill leaves either the old file or the new one.

    ``default`` is ``json.dump``'s: how to write values JSON has no type for.
    """
    with atomic_file(path) as handle:
        json.dump(payload, handle, indent=1, sort_keys=True, default=default)


def replace_folder(staging: str | Path, output_dir: str | Path) -> None:
    """Move the complete folder ``staging`` to ``output_dir``, replacing what is there.

    Replacing an existing folder takes two renames (the old folder aside, the new one in); if the second fails, the
    old folder is renamed back. A failure at any point leaves either the old folder or the new one at ``output_dir``,
    never neither, and never a half-written one.
    """
    staging, output_dir = Path(staging), Path(output_dir)
    if not output_dir.exists():
        os.replace(staging, output_dir)
    else:
        backup = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
        try:
            os.replace(output_dir, backup / "old")
        except BaseException:
            shutil.rmtree(backup, ignore_errors=True)  # still empty: output_dir was not moved
            raise
        try:
            os.replace(staging, output_dir)
        except BaseException:
            os.replace(backup / "old", output_dir)
            shutil.rmtree(backup, ignore_errors=True)
            raise
        shutil.rmtree(backup, ignore_errors=True)
    fsync_directory(output_dir.parent)


@contextlib.contextmanager
def atomic_output_dir(output_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh staging folder; on success it replaces ``output_dir`` (:func:`replace_folder`).

    Raises ``FileExistsError`` up front when ``output_dir`` exists and ``overwrite`` is false. On any error inside
    the block the staging folder is removed and ``output_dir`` is left exactly as it was.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(
            f"{output_dir} already exists; choose another folder or pass overwrite=True (--overwrite) to replace it."
        )
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"{output_dir} exists and is not a folder; refusing to replace it.")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        yield staging
        replace_folder(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


__all__ = ["atomic_file", "atomic_output_dir", "fsync_directory", "replace_folder", "write_json_atomic"]
