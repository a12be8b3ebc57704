"""The SPRM head as a process reward model on ProcessBench: find the first wrong paragraph of a reasoning trace.

ProcessBench (``Qwen/ProcessBench``) gives reasoning traces as lists of paragraphs, with the index of the first
wrong paragraph as its label (``-1`` when every paragraph is right). The head never sees paragraphs, only steps,
so each trace is written the way the model would have written it and its steps are mapped back:

1. **The trace as a trajectory.** The problem goes through the evaluation's prompt (by default the paper's
   instruction, the chat template, ``<think>\\n``); the paragraphs follow, joined with ``"\\n\\n"``, as the
   reasoning inside the think span. No ``</think>`` follows, so every step of the trace is inside the span.
2. **Steps to paragraphs.** :func:`~metastone_hf.scoring_metastone.sprm_step_token_mask` finds the step tokens;
   each belongs to the paragraph its first character is in (a step token ``.\\n\\n`` starts with the paragraph's
   final full stop).
3. **Paragraphs without a step token** (ending in ``$$``, ``:`` or a digit, so no ``.\\n\\n`` follows them; and
   always the last paragraph, which no separator follows) are not scored on their own: the model would have
   written them as the start of the next step, so each takes the score of the next step token after it. A
   paragraph after the last step token has no score, and is never predicted.
4. **Prediction.** The first paragraph whose score is below the threshold, ``-1`` when none is.

The metric is ProcessBench's own (its reference evaluation, ``code/run_eval_prm_*.py``): per split, the accuracy
on the erroneous traces (``label != -1``, a prediction matches only the exact index), the accuracy on the correct
ones (a match is ``-1``), and their harmonic mean ``F1``, in percent. It is reported at threshold 0.5 and at the
threshold that maximises F1 on one half of the split (even positions), measured on the other half (odd positions).
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

PROCESSBENCH_HUB_ID = "Qwen/ProcessBench"
PROCESSBENCH_SPLITS = ("gsm8k", "math", "olympiadbench", "omnimath")
PARAGRAPH_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class ProcessBenchTrace:
    """One ProcessBench row: a problem, its solution paragraphs and the index of the first wrong one (-1: none)."""

    id: str
    problem: str
    steps: list[str]
    label: int


def _trace(row: dict[str, Any], origin: str, number: int) -> ProcessBenchTrace:
    missing = [k for k in ("problem", "steps", "label") if k not in row]
    if missing:
        raise ValueError(f"Row {number} of {origin} has no {missing} (fields: {sorted(row)}): not a ProcessBench row.")
    steps = [str(s) for s in row["steps"]]
    label = int(row["label"])
    if not -1 <= label < len(steps):
        raise ValueError(f"Row {number} of {origin}: label {label} is outside -1..{len(steps) - 1}.")
    return ProcessBenchTrace(str(row.get("id", number)), str(row["problem"]), steps, label)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON list of ProcessBench rows.")
    return data


def load_processbench(
    source: str | Path = "processbench", splits: Sequence[str] | None = None, limit: int | None = None
) -> dict[str, list[ProcessBenchTrace]]:
    """ProcessBench traces by split.

    Args:
        source: ``"processbench"`` (downloaded from the Hub, ``Qwen/ProcessBench``), a folder holding
            ``<split>.json`` / ``<split>.jsonl`` files, one such file (its name is the split), or a ``DatasetDict``
            folder written by ``save_to_disk``.
        splits: the splits to read (default: every one found, or all four from the Hub).
        limit: the first ``limit`` traces of each split.

    Raises:
        DatasetDownloadError: the Hub could not be reached; give a local folder.
        FileNotFoundError / ValueError: a missing path, a requested split without a file, or malformed rows.
    """
    from .math_datasets import DatasetDownloadError

    rows: dict[str, list[dict[str, Any]]] = {}
    origins: dict[str, str] = {}
    if str(source) == "processbench" and not Path(str(source)).exists():
        import datasets

        for split in splits or PROCESSBENCH_SPLITS:
            try:
                rows[split] = datasets.load_dataset(PROCESSBENCH_HUB_ID, split=split).to_list()
            except OSError as error:
                raise DatasetDownloadError(
                    f"could not download {PROCESSBENCH_HUB_ID} from the Hub (offline?); pass a local folder of "
                    f"<split>.json files with --data PATH ({type(error).__name__}: {error})"
                ) from error
            origins[split] = f"{PROCESSBENCH_HUB_ID} split {split!r}"
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: give 'processbench' (the Hub) or a folder of <split>.json.")
        found: dict[str, Any]  # split -> its file, or its saved Dataset
        if (path / "dataset_dict.json").is_file():  # written by `datasets`' save_to_disk
            import datasets

            found = dict(datasets.load_from_disk(str(path)).items())
        else:
            files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl"))
            found = {p.stem: p for p in files}
        wanted = list(splits or found)
        absent = [s for s in wanted if s not in found]
        if absent or not wanted:
            raise ValueError(f"{path} has no ProcessBench split {absent or ''} (found: {sorted(found)}).")
        for split in wanted:
            source_of_split = found[split]
            if isinstance(source_of_split, Path):
                rows[split], origins[split] = _read_rows(source_of_split), str(source_of_split)
            else:
                rows[split], origins[split] = source_of_split.to_list(), f"{path} split {split!r}"
    return {
        split: [_trace(row, origins[split], number) for number, row in enumerate(rows[split][:limit], 1)]
        for split in rows
    }


# ---------------------------------------------------------------------------------------------- steps to paragraphs
@dataclass
class TraceTokens:
    """A trace as the model's input: token ids, and for every paragraph the step token that scores it."""

    input_ids: list[int]
    paragraph_step: list[int | None]
    """For paragraph ``i``, the index (among the trace's scored steps) of the step that scores it; ``None`` after the
    last step token."""
    paragraphs_with_own_step: int
    """Paragraphs that end with a step token of their own."""
    num_steps: int
    """Step tokens in the whole input (what ``score_trajectories`` scores)."""


def trace_tokens(tokenizer: Any, model_config: Any, prompt: str, steps: Sequence[str]) -> TraceTokens:
    """Tokenize ``prompt`` + the paragraphs joined by ``"\\n\\n"`` and map each paragraph to the step scoring it."""
    from .scoring_metastone import sprm_step_token_mask

    starts, text = [], prompt
    for i, step in enumerate(steps):
        if i:
            text += PARAGRAPH_SEPARATOR
        starts.append(len(text))
        text += step
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor([encoded["input_ids"]])
    step_mask = sprm_step_token_mask(
        ids, list(model_config.step_token_ids), model_config.think_start_token_id, model_config.think_end_token_id
    )
    step_tokens = step_mask[0].nonzero().flatten().tolist()
    # The paragraph each step token starts in (-1: the prompt), in order; paragraph i is scored by the first step
    # token at or after it.
    owner = [bisect.bisect_right(starts, encoded["offset_mapping"][t][0]) - 1 for t in step_tokens]
    first_at_or_after = (bisect.bisect_left(owner, i) for i in range(len(steps)))
    paragraph_step = [k if k < len(owner) else None for k in first_at_or_after]
    own = len({o for o in owner if o >= 0})
    return TraceTokens(encoded["input_ids"], paragraph_step, own, len(step_tokens))


def first_error(paragraph_scores: Sequence[float | None], threshold: float) -> int:
    """The first paragraph whose score is below ``threshold``; ``-1`` when none is (unscored ones are skipped)."""
    for i, score in enumerate(paragraph_scores):
        if score is not None and not math.isnan(score) and score < threshold:
            return i
    return -1


def processbench_f1(predictions: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """ProcessBench's metric: accuracy (%) on erroneous traces, on correct ones, and their harmonic mean ``f1``."""
    match = np.asarray(predictions) == np.asarray(labels)
    erroneous = np.asarray(labels) != -1
    error_acc = float(match[erroneous].mean() * 100) if erroneous.any() else float("nan")
    correct_acc = float(match[~erroneous].mean() * 100) if (~erroneous).any() else float("nan")
    total = error_acc + correct_acc
    f1 = 2 * error_acc * correct_acc / total if total > 0 else 0.0
    return {"error_acc": error_acc, "correct_acc": correct_acc, "f1": f1}


def best_threshold(scores: Sequence[Sequence[float | None]], labels: Sequence[int]) -> float:
    """The threshold with the highest F1 on these traces (candidates: midpoints between observed scores)."""
    values = sorted({s for row in scores for s in row if s is not None and not math.isnan(s)})
    # Every distinct prediction set: nothing below (the lowest score), between each pair, everything below.
    candidates = [
        0.5,
        *values[:1],
        *((a + b) / 2 for a, b in itertools.pairwise(values)),
        *(v + 1e-9 for v in values[-1:]),
    ]
    best, best_f1 = 0.5, -1.0
    for threshold in candidates:
        f1 = processbench_f1([first_error(row, threshold) for row in scores], labels)["f1"]
        if f1 > best_f1:
            best, best_f1 = threshold, f1
    return best


def score_traces(
    model: Any,
    tokenizer: Any,
    traces: Sequence[ProcessBenchTrace],
    prompt_builder: Callable[[str], str],
    batch_size: int = 8,
    progress_bar: bool = True,
) -> tuple[list[list[float | None]], dict[str, int]]:
    """Every paragraph's score (``None``: unscored) per trace, and counts of paragraphs and of their own steps."""
    from tqdm.auto import tqdm

    tokenized = [trace_tokens(tokenizer, model.config, prompt_builder(t.problem), t.steps) for t in traces]
    scores: list[list[float | None]] = []
    for start in tqdm(range(0, len(tokenized), batch_size), desc="processbench", disable=not progress_bar):
        batch = tokenized[start : start + batch_size]
        padded = tokenizer.pad({"input_ids": [t.input_ids for t in batch]}, padding_side="left", return_tensors="pt")
        result = model.score_trajectories(padded["input_ids"], padded["attention_mask"])
        for row, t in enumerate(batch):
            steps = result.step_scores[row].tolist()
            if len(steps) != t.num_steps:
                raise RuntimeError(f"Internal error: {len(steps)} scored steps for {t.num_steps} step tokens.")
            scores.append([None if k is None else float(steps[k]) for k in t.paragraph_step])
    counts = {
        "paragraphs": sum(len(t.paragraph_step) for t in tokenized),
        "paragraphs_with_own_step": sum(t.paragraphs_with_own_step for t in tokenized),
        "unscored_paragraphs": sum(k is None for t in tokenized for k in t.paragraph_step),
    }
    return scores, counts


def evaluate_processbench(
    model: Any,
    tokenizer: Any,
    traces_by_split: dict[str, Sequence[ProcessBenchTrace]],
    prompt_builder: Callable[[str], str],
    batch_size: int = 8,
    threshold: float = 0.5,
    progress_bar: bool = True,
) -> dict[str, Any]:
    """ProcessBench's metric per split at ``threshold`` and at the best threshold of a held-out half."""
    splits = {}
    for split, traces in traces_by_split.items():
        scores, counts = score_traces(model, tokenizer, traces, prompt_builder, batch_size, progress_bar)
        labels = [t.label for t in traces]
        fixed = processbench_f1([first_error(row, threshold) for row in scores], labels)
        calibration, held_out = slice(0, None, 2), slice(1, None, 2)
        tuned = best_threshold(scores[calibration], labels[calibration])
        splits[split] = {
            "traces": len(traces),
            "erroneous": sum(label != -1 for label in labels),
            f"at_{threshold}": {"threshold": threshold, **fixed},
            "tuned": {
                "threshold": tuned,
                "chosen_on": f"{len(labels[calibration])} traces (even positions)",
                "measured_on": f"{len(labels[held_out])} traces (odd positions)",
                **processbench_f1([first_error(row, tuned) for row in scores[held_out]], labels[held_out]),
            },
            **counts,
        }
    return {"benchmark": "processbench", "splits": splits}


def format_processbench(summary: dict[str, Any]) -> str:
    """Markdown table: per split, error / correct accuracy and F1 at the fixed and at the tuned threshold."""
    lines = [
        "| split | traces | threshold | error acc | correct acc | F1 | tuned threshold | error acc | correct acc | F1 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for split, entry in summary["splits"].items():
        fixed = next(v for k, v in entry.items() if k.startswith("at_"))
        tuned = entry["tuned"]
        lines.append(
            f"| {split} | {entry['traces']} | {fixed['threshold']:g} | {fixed['error_acc']:.1f} | "
            f"{fixed['correct_acc']:.1f} | {fixed['f1']:.1f} | {tuned['threshold']:.4g} | {tuned['error_acc']:.1f} | "
            f"{tuned['correct_acc']:.1f} | {tuned['f1']:.1f} |"
        )
    lines.append("")
    lines.append(
        "tuned: threshold with the best F1 on the even-position traces of the split, measured on the odd ones. "
        + "; ".join(
            f"{split}: {e['paragraphs_with_own_step']} of {e['paragraphs']} paragraphs end with a step token, "
            f"{e['unscored_paragraphs']} unscored"
            for split, e in summary["splits"].items()
        )
    )
    return "\n".join(lines)


__all__ = [
    "PROCESSBENCH_HUB_ID",
    "PROCESSBENCH_SPLITS",
    "ProcessBenchTrace",
    "TraceTokens",
    "best_threshold",
    "evaluate_processbench",
    "first_error",
    "format_processbench",
    "load_processbench",
    "processbench_f1",
    "score_traces",
    "trace_tokens",
]
