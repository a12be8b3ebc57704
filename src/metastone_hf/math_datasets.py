"""The math benchmarks known by name, and one loader for them and for local files, used by eval and training.

``metastone eval --data NAME`` and ``metastone train --dataset_name NAME`` download a registered benchmark from the
Hugging Face Hub through ``datasets.load_dataset`` (its Hub id, configuration, split and field names are in
:data:`MATH_DATASETS`). Without network, the same benchmarks are read from local files: a folder holding the
registered file names (``--data-dir``), or any ``.jsonl`` / ``.json`` / ``.parquet`` file or dataset folder.

Every source is reduced to :class:`MathProblem` (question text, gold answer, id) by the same field mapping, so an
evaluation or a training run sees the same questions whichever way the data arrived.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROMPT_FIELDS = ("prompt", "problem", "question")
"""Fields a row's question is read from, first present wins, when no registered mapping says otherwise."""

DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")

EVAL_LOCAL_HINT = "pass a local file with --data PATH or --data-dir"
"""How ``metastone eval`` users get the data without the Hub; ``metastone train`` passes its own flag names."""


@dataclass(frozen=True)
class MathDatasetSpec:
    """Where a registered benchmark lives on the Hub and which of its fields hold the question and the answer."""

    name: str
    """Short name used on the command line, e.g. ``"math500"``."""
    hub_id: str
    """Dataset repository on the Hugging Face Hub."""
    config: str | None
    """Configuration (subset) passed to ``load_dataset``; ``None`` for the default one."""
    split: str
    """The benchmark split (what evaluation reads)."""
    train_split: str
    """The split training reads by default: a real training split where the dataset has one, else the benchmark's."""
    prompt_field: str
    """Field holding the question on the Hub. Local copies may use another name of :data:`PROMPT_FIELDS`."""
    answer_field: str
    """Field holding the gold answer (GSM8K's ``... #### N`` is reduced to ``N``)."""
    id_field: str | None
    """Field holding a stable question id, if the dataset has one."""
    local_file: str
    """File name looked up in a ``--data-dir`` folder (the name the benchmark's jsonl copy usually has)."""
    title: str
    """Display name."""


MATH_DATASETS: dict[str, MathDatasetSpec] = {
    "aime24": MathDatasetSpec(
        name="aime24",
        hub_id="HuggingFaceH4/aime_2024",
        config=None,
        split="train",
        train_split="train",
        prompt_field="problem",
        answer_field="answer",
        id_field="id",
        local_file="aime24.jsonl",
        title="AIME 2024",
    ),
    "aime25": MathDatasetSpec(
        name="aime25",
        hub_id="minyichen/AIME2025",
        config=None,
        split="test",
        train_split="test",
        prompt_field="problem",
        answer_field="answer",
        id_field="ID",
        local_file="aime25.jsonl",
        title="AIME 2025",
    ),
    "gsm8k": MathDatasetSpec(
        name="gsm8k",
        hub_id="openai/gsm8k",
        config="main",
        split="test",
        train_split="train",
        prompt_field="question",
        answer_field="answer",
        id_field=None,
        local_file="gsm8k_test.jsonl",
        title="GSM8K",
    ),
    "math500": MathDatasetSpec(
        name="math500",
        hub_id="HuggingFaceH4/MATH-500",
        config=None,
        split="test",
        train_split="test",
        prompt_field="problem",
        answer_field="answer",
        id_field="unique_id",
        local_file="math500_test.jsonl",
        title="MATH-500",
    ),
}
"""The benchmarks known by name. Their Hub ids, configurations, splits and field names match the dataset cards."""

_LOCAL_FILES = {spec.local_file for spec in MATH_DATASETS.values()}


class DatasetDownloadError(ConnectionError):
    """A registered dataset could not be downloaded from the Hub (no network, offline mode, or a Hub error)."""


@dataclass(frozen=True)
class MathProblem:
    """One question of a math dataset, as evaluation and training consume it."""

    question: str
    answer: str
    """Gold answer, a string math-verify can parse."""
    id: str


@dataclass
class MathRows:
    """The raw rows of a dataset, with where they came from and the registered mapping that applies to them."""

    rows: list[dict[str, Any]]
    origin: str
    """Human-readable source, used in error messages (a path, or ``hub id [config] split``)."""
    spec: MathDatasetSpec | None = None

    def problems(self) -> list[MathProblem]:
        """Every row mapped to a :class:`MathProblem` (raises ``ValueError`` naming the first row that cannot be)."""
        return [math_problem(row, self.spec, index, self.origin) for index, row in enumerate(self.rows, 1)]


def gold_answer(row: dict[str, Any], field: str = "answer") -> str:
    """The gold answer of a dataset row: ``row[field]``, GSM8K's ``... #### N`` reduced to ``N``."""
    if field not in row or row[field] is None:
        raise ValueError(f"Row has no `{field}` field (fields: {sorted(row)}); each row needs a prompt and an answer.")
    answer = str(row[field])
    if "####" in answer:
        answer = answer.split("####")[-1].strip().replace(",", "")
    return answer.strip()


def prompt_field_of(row: dict[str, Any], spec: MathDatasetSpec | None = None) -> str | None:
    """The field holding ``row``'s question: the registered one when present, else the first of :data:`PROMPT_FIELDS`."""
    candidates = ((spec.prompt_field,) if spec else ()) + PROMPT_FIELDS
    return next((k for k in candidates if k in row and row[k] is not None), None)


def math_problem(
    row: dict[str, Any], spec: MathDatasetSpec | None = None, index: int = 0, origin: str = "dataset"
) -> MathProblem:
    """One row as a :class:`MathProblem`, through ``spec``'s field mapping (or the generic one without a spec).

    ``index`` (1-based) is the row's id when the row carries none, and names the row in errors.
    """
    prompt_field = prompt_field_of(row, spec)
    if prompt_field is None:
        expected = ((spec.prompt_field,) if spec else ()) + PROMPT_FIELDS
        raise ValueError(
            f"Row {index} of {origin} has none of the prompt fields {tuple(dict.fromkeys(expected))} "
            f"(fields: {sorted(row)})."
        )
    answer_field = spec.answer_field if spec else "answer"
    try:
        answer = gold_answer(row, answer_field)
    except ValueError as error:
        raise ValueError(f"Row {index} of {origin}: {error}") from None
    id_fields = ((spec.id_field,) if spec and spec.id_field else ()) + ("id", "unique_id")
    row_id = next((row[k] for k in id_fields if row.get(k) is not None), index)
    return MathProblem(str(row[prompt_field]), answer, str(row_id))


# ---------------------------------------------------------------------------------------------- loading
def load_math_rows(
    source: str | Path,
    data_dir: str | Path | None = None,
    *,
    split: str | None = None,
    limit: int | None = None,
    local_hint: str = EVAL_LOCAL_HINT,
) -> MathRows:
    """The rows of a registered benchmark or of a local dataset.

    Args:
        source: a name in :data:`MATH_DATASETS` (downloaded from the Hub unless ``data_dir`` is given), or the path
            of a ``.jsonl`` / ``.json`` (a list of objects) / ``.parquet`` file, of a folder written by
            ``datasets``' ``save_to_disk``, or of a folder holding one such file (or ``<split>.<ext>``). A string is
            a name when it is registered; a ``Path`` is always a path (``./gsm8k`` also is).
        data_dir: a folder holding the registered benchmarks' files (``math500_test.jsonl``, ``gsm8k_test.jsonl``,
            ``aime24.jsonl``, ``aime25.jsonl``, or ``<name>.jsonl``); only used with a name.
        split: the split to read: of the Hub dataset (default: the registered benchmark split), of a
            ``DatasetDict`` folder (default ``test``, or its only split), or the ``<split>.<ext>`` file of a
            folder holding several.
        limit: keep only the first ``limit`` rows.
        local_hint: how to avoid the Hub, appended to the download error.

    Raises:
        DatasetDownloadError: the Hub could not be reached (offline, no network) or refused the download.
        FileNotFoundError: a local path or a registered file under ``data_dir`` does not exist.
        ValueError: an unknown name, an unsupported file, malformed rows, or a Hub dataset without the registered
            fields.
    """
    name = str(source)
    if isinstance(source, str) and name in MATH_DATASETS:
        spec = MATH_DATASETS[name]
        if data_dir is None:
            return _load_from_hub(spec, split or spec.split, limit, local_hint)
        path = _registered_file(spec, Path(data_dir))
        return MathRows(_read_file(path, limit), str(path), spec)
    path = Path(name)
    if not path.exists():
        if isinstance(source, Path) or path.suffix or len(path.parts) > 1:
            raise FileNotFoundError(f"{path} not found: give one of {sorted(MATH_DATASETS)}, or a local data file.")
        raise ValueError(
            f"Unknown dataset {name!r}: give one of {sorted(MATH_DATASETS)} (downloaded from the Hub), or the path of "
            f"a local {'/'.join(DATA_FILE_SUFFIXES)} file or dataset folder."
        )
    return MathRows(_read_path(path, split, limit), str(path))


def _registered_file(spec: MathDatasetSpec, data_dir: Path) -> Path:
    candidates = [data_dir / spec.local_file, data_dir / f"{spec.name}.jsonl"]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise FileNotFoundError(
            f"{candidates[0]} not found: the --data-dir folder must hold {spec.local_file} (or {spec.name}.jsonl); "
            f"without --data-dir, {spec.name} is downloaded from the Hub ({spec.hub_id})."
        )
    return found


def _load_from_hub(spec: MathDatasetSpec, split: str, limit: int | None, local_hint: str) -> MathRows:
    import datasets

    origin = f"{spec.hub_id}{f' [{spec.config}]' if spec.config else ''} split {split!r}"
    try:
        dataset = datasets.load_dataset(spec.hub_id, spec.config, split=split)
    except OSError as error:
        # Offline mode, no network, a missing cache and Hub HTTP errors all arrive as OSError subclasses
        # (ConnectionError, DatasetNotFoundError, HfHubHTTPError).
        raise DatasetDownloadError(
            f"could not download {spec.hub_id} from the Hub (offline?); {local_hint} ({type(error).__name__}: {error})"
        ) from error
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset[split]
    columns = set(dataset.column_names)
    missing = [f for f in (spec.prompt_field, spec.answer_field) if f not in columns]
    if missing:
        raise ValueError(
            f"{origin} has no field(s) {missing} (fields: {sorted(columns)}); the dataset on the Hub no longer "
            f"matches the registered mapping of {spec.name!r}: {local_hint}."
        )
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return MathRows(dataset.to_list(), origin, spec)


def _read_path(path: Path, split: str | None, limit: int | None) -> list[dict[str, Any]]:
    if path.is_file():
        return _read_file(path, limit)
    if any((path / marker).is_file() for marker in ("state.json", "dataset_dict.json")):
        return _read_saved_dataset(path, split, limit)
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in DATA_FILE_SUFFIXES)
    named = [p for p in files if p.stem == split]
    if named:
        return _read_file(named[0], limit)
    if len(files) == 1:
        return _read_file(files[0], limit)
    if not files:
        raise ValueError(
            f"{path} holds no {'/'.join(DATA_FILE_SUFFIXES)} file and is not a dataset saved with save_to_disk."
        )
    raise ValueError(
        f"{path} holds several data files ({', '.join(p.name for p in files)}): give one of them"
        + (f", or a registered name with --data-dir {path}." if any(p.name in _LOCAL_FILES for p in files) else ".")
    )


def _read_saved_dataset(path: Path, split: str | None, limit: int | None) -> list[dict[str, Any]]:
    import datasets

    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        splits = list(dataset)
        # The requested split, else the only one; without a request, the benchmark's usual "test".
        wanted = split or "test"
        chosen = wanted if wanted in splits else (splits[0] if len(splits) == 1 else None)
        if chosen is None:
            raise ValueError(f"{path} holds the splits {splits}, not {wanted!r}: choose one of them.")
        dataset = dataset[chosen]
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset.to_list()


def _read_file(path: Path, limit: int | None) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        rows = list(itertools.islice(_jsonl_rows(path), limit))
    elif path.suffix == ".json":
        rows = _json_rows(path)[:limit]
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()[:limit]
    else:
        raise ValueError(f"{path}: unsupported file type; give a {'/'.join(DATA_FILE_SUFFIXES)} file.")
    if not rows:
        raise ValueError(f"{path} holds no examples.")
    return rows


def _jsonl_rows(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number} is not valid JSON: {error}") from error
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_number} is not a JSON object.")
            yield row


def _json_rows(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]}-style wrappers
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise ValueError(f"{path} must hold a JSON list of objects (one per question); use .jsonl for JSON lines.")
    return data
