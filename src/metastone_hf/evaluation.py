"""Best-of-N evaluation over a dataset: sample once, grade with math-verify, report every test-time metric.

For each question ``M`` candidates (by default ``M = max(N)``) are sampled in one Best-of-N call; the metrics
for every ``N`` reuse them with the official K-groups-of-N averaging, ``K = M // N`` (see
:mod:`metastone_hf.metrics`). Sampling follows an :class:`EvalProtocol`, by default the paper's (``"paper"``),
and the protocol actually used is recorded in the summary and the report.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from .math_datasets import MATH_DATASETS, load_math_rows
from .metrics import budget_items, load_evaluate_metric, metric_key

DATASET_FILES = {name: spec.local_file for name, spec in MATH_DATASETS.items()}
"""File name of each registered benchmark in a ``--data-dir`` folder."""


@dataclass(frozen=True)
class EvalProtocol:
    """How candidates are sampled for an evaluation: every ``generate`` setting that changes the numbers.

    Registered protocols live in :data:`EVAL_PROTOCOLS`; :func:`~metastone_hf.eval_runner.run_best_of_n_eval` takes one by name or as an
    instance, and any of its sampling arguments overrides the protocol's value.
    """

    name: str
    """Label recorded in the report (a registered name, or your own for a custom protocol)."""
    temperature: float
    """Softmax temperature of the sampler."""
    top_p: float
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches ``top_p`` (1.0 keeps all)."""
    top_k: int
    """Keep only the ``top_k`` most likely tokens; 0 turns the cut off. ``generate`` would otherwise apply
    transformers' default of 50, which the official (vLLM) sampler does not have."""
    repetition_penalty: float
    """Divides the logits of tokens already in the prompt or the completion (1.0 = no penalty)."""
    max_new_tokens: int
    """Generation budget per candidate; longer reasoning is cut off and usually graded wrong."""
    samples_per_question: int | None = None
    """``M`` candidates per question; ``None`` = the largest N of the model's reasoning-effort presets (32 for
    low/medium/high = 2/8/32), i.e. one group at the largest N and ``M // N`` groups at each smaller N."""
    description: str = ""
    """One line saying where the settings come from and what the protocol is for."""

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"EvalProtocol {self.name!r}: temperature must be > 0 (Best-of-N samples).")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"EvalProtocol {self.name!r}: top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise ValueError(f"EvalProtocol {self.name!r}: top_k must be >= 0 (0 = off), got {self.top_k}.")
        if not self.repetition_penalty > 0:
            raise ValueError(f"EvalProtocol {self.name!r}: repetition_penalty must be > 0.")
        if self.max_new_tokens < 1:
            raise ValueError(f"EvalProtocol {self.name!r}: max_new_tokens must be >= 1.")
        if self.samples_per_question is not None and self.samples_per_question < 1:
            raise ValueError(f"EvalProtocol {self.name!r}: samples_per_question must be >= 1 or None.")


def _settings_text(values: dict[str, Any]) -> str:
    top_k = values.get("top_k")
    return (
        f"temperature={values.get('temperature')}, top_p={values.get('top_p')}, "
        f"top_k={'off' if top_k == 0 else top_k}, repetition_penalty={values.get('repetition_penalty')}, "
        f"max_new_tokens={values.get('max_new_tokens')}"
    )


_PAPER_PROTOCOL = EvalProtocol(
    name="paper",
    temperature=0.6,
    top_p=0.95,
    top_k=0,
    repetition_penalty=1.05,
    max_new_tokens=32768,
    samples_per_question=None,
    description="The official MetaStone-S1 evaluation: sampling settings of the official test scripts, "
    "32k-token budget, as many candidates as the largest N.",
)
EVAL_PROTOCOLS: dict[str, EvalProtocol] = {
    "paper": _PAPER_PROTOCOL,
    "quick": replace(
        _PAPER_PROTOCOL,
        name="quick",
        max_new_tokens=1024,
        description="NOT the paper's protocol: the paper's sampling with a 1024-token budget, for smoke runs; "
        "long reasoning is truncated, so accuracies are lower than the paper's.",
    ),
}
"""Registered evaluation protocols; ``paper`` is the default everywhere."""


def resolve_protocol(protocol: str | EvalProtocol, **overrides: Any) -> tuple[EvalProtocol, list[str]]:
    """The protocol named (or given), with every non-``None`` override applied.

    Returns the resolved protocol and the names of the fields whose value an override changed.
    """
    if isinstance(protocol, str):
        if protocol not in EVAL_PROTOCOLS:
            raise ValueError(f"Unknown evaluation protocol {protocol!r}; valid: {sorted(EVAL_PROTOCOLS)}.")
        protocol = EVAL_PROTOCOLS[protocol]
    elif not isinstance(protocol, EvalProtocol):
        raise TypeError(f"`protocol` must be a name in {sorted(EVAL_PROTOCOLS)} or an EvalProtocol, got {protocol!r}.")
    known = {f.name for f in fields(EvalProtocol)}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"Unknown protocol field(s) {sorted(unknown)}.")
    changed = {k: v for k, v in overrides.items() if v is not None and getattr(protocol, k) != v}
    return (replace(protocol, **changed) if changed else protocol), sorted(changed)


@dataclass
class EvalExample:
    """One question: the prompt text and its gold answer (a string math-verify can parse)."""

    prompt: str
    answer: str
    id: str = ""


# ---------------------------------------------------------------------------------------------- data
def load_eval_examples(
    name_or_path: str | Path,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    *,
    split: str | None = None,
) -> list[EvalExample]:
    """The questions of a registered benchmark (``aime24`` / ``aime25`` / ``gsm8k`` / ``math500``) or of a local dataset.

    A registered name is downloaded from the Hub with ``datasets`` (see
    :data:`~metastone_hf.math_datasets.MATH_DATASETS` for its id, split and fields), or read from ``data_dir`` when
    given (a folder holding ``aime24.jsonl``, ``aime25.jsonl``, ``gsm8k_test.jsonl``, ``math500_test.jsonl``).
    Anything else is a local ``.jsonl`` / ``.json`` / ``.parquet`` file or dataset folder: the prompt is read from
    the first of ``prompt``, ``problem``, ``question``, the answer from ``answer``. ``split`` overrides the registered split (or
    picks one of a local ``DatasetDict``). See :func:`~metastone_hf.math_datasets.load_math_rows` for the errors.
    """
    loaded = load_math_rows(name_or_path, data_dir, split=split, limit=limit)
    examples = [EvalExample(p.question, p.answer, p.id) for p in loaded.problems()]
    if not examples:
        raise ValueError(f"{loaded.origin} holds no examples.")
    return examples


# ---------------------------------------------------------------------------------------------- grading
def _math_verify() -> Any:
    try:
        import math_verify
    except ImportError as error:  # pragma: no cover - a declared dependency
        raise ImportError("Grading needs math-verify: `pip install 'math-verify[antlr4_13_2]'`.") from error
    return math_verify


@functools.lru_cache(maxsize=4096)
def parse_gold(gold: str) -> Any | None:
    """math-verify's parse of a gold answer (wrapped in ``\\boxed{}`` unless already delimited), or ``None``.

    ``None`` when math-verify finds no expression in it: an empty parse, or only its fallback of the raw text (which
    would make grading a string comparison).
    """
    mv = _math_verify()
    already_delimited = "\\boxed" in gold or re.search(r"(?<!\\)\$", gold) is not None
    parsed = mv.parse(gold if already_delimited else f"\\boxed{{{gold}}}")
    return parsed if any(not isinstance(item, str) for item in parsed) else None


def grade_answer(completion: str, gold: str) -> bool:
    """Is the completion's final answer (its last ``\\boxed{}``, else its last expression) equal to ``gold``?

    Both sides go through math-verify's parser with the same settings, so ``\\frac43`` equals ``4/3``. A gold answer
    math-verify cannot parse grades every completion wrong (it is never compared as raw text); evaluations record
    such questions (``gold_parsed: false``) and count them in the summary.
    """
    gold_parsed = parse_gold(gold)
    if gold_parsed is None:
        return False
    mv = _math_verify()
    return bool(mv.verify(gold_parsed, mv.parse(completion)))


# ---------------------------------------------------------------------------------------------- running
@dataclass
class EvalRecords:
    """Raw per-candidate results: ``correct``/``scores`` are ``[questions, M]``; ``answers`` is a nested list.

    ``protocol`` records how the candidates were sampled (see :func:`protocol_record`); :func:`summarize` copies
    it into the summary.
    """

    correct: np.ndarray
    scores: np.ndarray
    answers: list[list[str | None]]
    completions: list[list[str]] = field(default_factory=list)
    protocol: dict[str, Any] | None = None


def protocol_record(
    protocol: EvalProtocol,
    samples_per_question: int,
    overridden: Sequence[str] = (),
    seed: int | None = None,
    generate_kwargs: dict[str, Any] | None = None,
    prompt_template: str | None = None,
) -> dict[str, Any]:
    """The JSON-ready record of a run's sampling: every resolved setting, plus what was overridden.

    ``overridden`` lists the settings changed from the named protocol: a run reproduces the ``paper`` protocol
    exactly when its name is ``"paper"``, ``overridden`` is empty, no other ``generate_kwargs`` were passed and the
    prompt template is :data:`PROMPT_TEMPLATES` ``["paper"]`` (recorded as its text; ``None`` when not known).
    Values that are not JSON scalars (logits processors, ...) are recorded by their ``repr``.
    """
    record = asdict(protocol)
    record["samples_per_question"] = int(samples_per_question)
    record["overridden"] = list(overridden)
    record["seed"] = seed
    record["prompt_template"] = None if prompt_template is None else resolve_prompt_template(prompt_template)
    record["generate_kwargs"] = {
        k: v if isinstance(v, (bool, int, float, str, type(None))) else repr(v)
        for k, v in (generate_kwargs or {}).items()
    }
    return record


PAPER_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
"""The instruction the evaluated models (DeepSeek-R1-Distill, MetaStone-S1) were trained to see after a math question."""

PROMPT_TEMPLATES: dict[str, str] = {
    "paper": "{question}\n" + PAPER_INSTRUCTION,
    "plain": "{question}",
}
"""User-message templates by name. ``paper`` (the default) is the official evaluation's: the question, a newline, then
:data:`PAPER_INSTRUCTION` (not added again when the question already ends with it, as the official AIME file's
prompts do); ``plain`` sends the question as it is."""


def resolve_prompt_template(template: str) -> str:
    """The template text of a name in :data:`PROMPT_TEMPLATES`, or ``template`` itself when it holds ``{question}``."""
    if template in PROMPT_TEMPLATES:
        return PROMPT_TEMPLATES[template]
    if "{question}" not in template:
        raise ValueError(
            f"Unknown prompt template {template!r}: give one of {sorted(PROMPT_TEMPLATES)} or a text holding "
            "`{question}` (e.g. '{question}\\nAnswer in \\\\boxed{{}}.')."
        )
    return template


def build_prompt_builder(tokenizer: Any, model: Any, template: str = "paper") -> Callable[[str], str]:
    """Question text -> model input: ``template`` as the user message, inside the chat template, then ``<think>\\n``.

    The chat template is applied when the tokenizer has one; ``<think>\\n`` follows when the model has a think token
    and the chat template did not already end with it.
    """
    text_template = resolve_prompt_template(template)
    think_id = getattr(model.config, "think_start_token_id", None)
    think = tokenizer.convert_ids_to_tokens(think_id) if think_id is not None else None

    def build(question: str) -> str:
        if text_template == PROMPT_TEMPLATES["paper"] and question.rstrip().endswith(PAPER_INSTRUCTION):
            text = question
        else:
            text = text_template.replace("{question}", question)
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        if think and not text.rstrip().endswith(think):
            text = f"{text}{think}\n"
        return text

    return build


def resolve_model_prompt(
    tokenizer: Any, model: Any, template: str | None, default: str = "paper"
) -> tuple[Callable[[str], str], str, str]:
    """The prompt builder a command uses, the template text it applies, and a line saying which it is.

    ``template=None`` uses the template the checkpoint records (``config.prompt_template``: the whole model input,
    e.g. the CPU demo's ``"{question}<think>"``) when it records one, else ``default``. A named or ``{question}``
    template is a user message, put inside the tokenizer's chat template and followed by ``<think>``
    (:func:`build_prompt_builder`).
    """
    recorded = getattr(model.config, "prompt_template", None)
    if template is None and recorded:
        return (
            (lambda question: recorded.replace("{question}", question)),
            recorded,
            (f"prompt template: {recorded!r}, recorded in the checkpoint (--prompt-template overrides it)"),
        )
    name = default if template is None else template
    text = resolve_prompt_template(name)
    wrapper = "the tokenizer's chat template" if getattr(tokenizer, "chat_template", None) else "no chat template"
    return (
        build_prompt_builder(tokenizer, model, name),
        text,
        (f"prompt template: {text!r} as the user message, in {wrapper}, then <think>"),
    )


@functools.cache
def _scaling_metric() -> Any:
    """The test-time-scaling ``evaluate`` module, loaded once per process (loading imports and hashes its file)."""
    return load_evaluate_metric()


def summarize(
    records: EvalRecords,
    budgets: dict[str, int] | Sequence[int] = (2, 8, 32),
    confidence: float = 0.95,
    protocol: EvalProtocol | dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every metric per budget with a bootstrap interval, plus the SPRM AUC (correct vs incorrect candidates).

    The values are computed by the package's ``evaluate`` metric module (see
    :func:`~metastone_hf.metrics.evaluate_module_path`); a budget above the records' candidates per question is
    left out of ``metrics`` (its table cells read ``-``).

    The summary's ``protocol`` says how the candidates were sampled: ``protocol`` when given, else the records'
    own (set by :func:`~metastone_hf.eval_runner.run_best_of_n_eval`); ``None`` when neither is known.
    """
    if isinstance(protocol, EvalProtocol):
        protocol = protocol_record(protocol, records.correct.shape[1])
    protocol = protocol if protocol is not None else records.protocol
    labelled = budget_items(budgets)
    correct = records.correct
    # Through the shipped `evaluate` module: a report and `evaluate.load(evaluate_module_path())` give the same
    # numbers by construction. Answers are compared as strings there (Arrow columns need one type).
    results = _scaling_metric().compute(
        correct=np.asarray(correct, dtype=float).tolist(),
        scores=np.asarray(records.scores, dtype=float).tolist(),
        answers=[[None if a is None else str(a) for a in row] for row in records.answers],
        budgets=dict(labelled),
        confidence=confidence,
    )
    table = {
        key: {"mean": results[key], "ci_low": low, "ci_high": high} for key, (low, high) in results["intervals"].items()
    }
    auc = results["sprm_auc"]
    return {
        "questions": int(correct.shape[0]),
        "samples_per_question": int(correct.shape[1]),
        "confidence": confidence,
        "metrics": table,
        "sprm_auc": auc,
        "budgets": dict(labelled),
        "protocol": protocol,
    }


def records_to_eval_records(records: Sequence[Mapping[str, Any]], protocol: dict | None = None) -> EvalRecords:
    """The Best-of-N part of question records (see :func:`~metastone_hf.eval_runner.question_records`)."""
    runs = [r["results"]["best_of_n"] for r in records]
    return EvalRecords(
        np.array([run["correct"] for run in runs], dtype=float),
        np.array([run["scores"] for run in runs], dtype=float),
        [run["answers"] for run in runs],
        [run["completions"] for run in runs],
        protocol=protocol,
    )


def chosen_correct(run: Mapping[str, Any]) -> bool:
    """Whether the candidate a run of a question record chose (``run["chosen"]``) is correct."""
    return bool(run["correct"][run["chosen"]])


def throughput(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per process of each run that wrote records: questions, seconds, tokens generated, tokens/s, peak memory, and
    the decode steps (backbone forwards that decode a token per row), the rows they decoded and the mean occupancy
    (rows per decode step / the capacity in rows), for records that count them."""
    groups: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for record in records:
        groups.setdefault((str(record.get("run_id")), int(record.get("rank", 0))), []).append(record)
    rows = []
    for (run_id, rank), members in sorted(groups.items()):
        seconds = float(sum(r["seconds"] for r in members))
        tokens = int(sum(run["tokens_generated"] for r in members for run in r["results"].values()))
        counted = [r["decode"] for r in members if r.get("decode")]
        steps = sum(d["steps"] for d in counted)
        decoded = sum(d["rows"] for d in counted)
        slots = sum(d["steps"] * d["capacity"] for d in counted)
        rows.append(
            {
                "decode_steps": round(steps) if counted else None,
                "rows_decoded": round(decoded) if counted else None,
                "occupancy": decoded / slots if slots else None,
                "run_id": run_id,
                "rank": rank,
                "questions": len(members),
                "seconds": seconds,
                "tokens_generated": tokens,
                "tokens_per_second": tokens / seconds if seconds > 0 else float("nan"),
                "peak_memory_bytes": max(int(r["peak_memory_bytes"]) for r in members),
            }
        )
    return rows


SEARCH_METHODS = ("beam", "dvts")
"""Step-level search strategies reported beside Best-of-N (one search per question and N)."""

ADAPTIVE_PREFIX = "adaptive:"
"""Run and metric keys of adaptive-compute settings (``metastone eval --adaptive``): ``"adaptive:<name>"``."""


def run_accuracy(runs: Sequence[Mapping[str, Any]], confidence: float = 0.95) -> dict[str, float]:
    """Accuracy of one strategy's runs (one per question: the answer it chose) with its bootstrap interval, and the
    tokens it generated per question."""
    from .metrics import bootstrap_ci

    right = np.array([float(chosen_correct(run)) for run in runs])
    low, high = bootstrap_ci(right, confidence)
    return {
        "mean": float(right.mean()),
        "ci_low": low,
        "ci_high": high,
        "tokens_per_question": float(np.mean([run["tokens_generated"] for run in runs])),
    }


def summarize_records(
    records: Sequence[Mapping[str, Any]],
    budgets: dict[str, int] | Sequence[int],
    protocol: dict[str, Any] | None = None,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """The summary of an evaluation's question records: :func:`summarize` for Best-of-N, plus the searches.

    Each metric at a budget N carries ``tokens_per_question``, the tokens generated per question to get it (Best-of-N
    methods: N times the mean candidate length; beam search and DVTS: every branch they sampled), so strategies can
    be compared at equal budget. Also: ``unparsable_golds`` (questions whose gold answer math-verify cannot parse,
    graded wrong) and ``throughput`` (per process: seconds, tokens/s, peak memory).
    """
    from .metrics import SCALING_METHODS, budget_items, metric_key

    labelled = budget_items(budgets)
    if records and "best_of_n" in records[0]["results"]:
        summary = summarize(records_to_eval_records(records, protocol), dict(labelled), confidence)
        per_candidate = float(np.mean([np.mean(r["results"]["best_of_n"]["tokens"]) for r in records]))
        n_of = {metric_key(m, n, label): n for m in SCALING_METHODS for label, n in labelled}
        for key, entry in summary["metrics"].items():
            entry["tokens_per_question"] = per_candidate * n_of.get(key, 1)
        # All M candidates decode side by side: a question's decode steps at N = M are its longest candidate's.
        longest = float(np.mean([max(r["results"]["best_of_n"]["tokens"]) for r in records]))
        for label, n in labelled:
            if n == summary["samples_per_question"] and metric_key("bon_sprm", n, label) in summary["metrics"]:
                summary["metrics"][metric_key("bon_sprm", n, label)]["decode_steps_per_question"] = longest
    else:
        summary = {
            "questions": len(records),
            "samples_per_question": 0,
            "confidence": confidence,
            "metrics": {},
            "sprm_auc": float("nan"),
            "budgets": dict(labelled),
            "protocol": protocol,
        }
    for search in SEARCH_METHODS:
        for label, n in labelled:
            runs = [r["results"].get(f"{search}@{n}") for r in records]
            if not records or any(run is None for run in runs):
                continue
            summary["metrics"][metric_key(search, n, label)] = run_accuracy(runs, confidence)
    for key in dict.fromkeys(k for r in records[:1] for k in r["results"] if k.startswith(ADAPTIVE_PREFIX)):
        runs = [r["results"].get(key) for r in records]
        if any(run is None for run in runs):
            continue
        summary["metrics"][key] = {
            **run_accuracy(runs, confidence),
            "n": int(runs[0]["n"]),
            "adaptive": runs[0].get("adaptive"),
            "decode_steps_per_question": float(np.mean([run["decode_steps"] for run in runs])),
            "candidates_per_question": float(np.mean([run["candidates_used"] for run in runs])),
            "stopped_per_question": float(np.mean([sum(run["stopped"]) for run in runs])),
        }
    unparsable = [str(r["id"]) for r in records if not r.get("gold_parsed", True)]
    summary["unparsable_golds"] = {"count": len(unparsable), "ids": unparsable}
    summary["throughput"] = throughput(records)
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """Markdown table: one row per method, one column per budget N."""
    budgets = list(summary["budgets"].items())
    header = (
        "| method | " + " | ".join(f"N={n} ({label})" if label != str(n) else f"N={n}" for label, n in budgets) + " |"
    )
    lines = [header, "|---" * (len(budgets) + 1) + "|"]
    metrics = summary["metrics"]
    if "pass@1" in metrics:
        lines.append("| pass@1 | " + " | ".join(_cell(metrics["pass@1"]) for _ in budgets) + " |")
    methods = [m for m in ("random", "majority", "sprm_vote", "bon_sprm", *SEARCH_METHODS)
               if any(metric_key(m, n, label) in metrics for label, n in budgets)]  # fmt: skip
    for method in methods:
        cells = []
        for label, n in budgets:
            key = metric_key(method, n, label)
            cells.append(_cell(metrics[key]) if key in metrics else "-")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    costed = [m for m in methods if m in ("bon_sprm", *SEARCH_METHODS)]
    if any("tokens_per_question" in metrics.get(metric_key(m, n, label), {}) for m in costed for label, n in budgets):
        lines += ["", "| tokens generated per question | " + " | ".join(f"N={n}" for _, n in budgets) + " |"]
        lines.append("|---" * (len(budgets) + 1) + "|")
        for method in costed:
            cells = []
            for label, n in budgets:
                entry = metrics.get(metric_key(method, n, label), {})
                cells.append(f"{entry['tokens_per_question']:.0f}" if "tokens_per_question" in entry else "-")
            name = "best_of_n (every N-candidate method)" if method == "bon_sprm" else method
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    adaptive = [key for key in metrics if key.startswith(ADAPTIVE_PREFIX)]
    if adaptive:
        lines += [
            "",
            "| adaptive compute (at most N candidates) | N | accuracy | tokens / question | decode steps / question "
            "| candidates / question | stopped / question |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, n in budgets:
            entry = metrics.get(metric_key("bon_sprm", n, label), {})
            if "decode_steps_per_question" in entry:  # the reference: Best-of-N with all M candidates
                lines.append(
                    f"| best_of_n (reference) | {n} | {_cell(entry)} | {entry['tokens_per_question']:.0f} | "
                    f"{entry['decode_steps_per_question']:.1f} | {n} | 0 |"
                )
        for key in adaptive:
            entry = metrics[key]
            lines.append(
                f"| {key[len(ADAPTIVE_PREFIX) :]} | {entry['n']} | {_cell(entry)} | {entry['tokens_per_question']:.0f} | "
                f"{entry['decode_steps_per_question']:.1f} | {entry['candidates_per_question']:.1f} | "
                f"{entry['stopped_per_question']:.1f} |"
            )
    auc = summary["sprm_auc"]
    lines.append("")
    lines.append(
        f"{summary['questions']} questions x {summary['samples_per_question']} samples; "
        f"{int(summary['confidence'] * 100)}% bootstrap intervals; SPRM AUC (correct vs incorrect) = "
        + ("n/a" if math.isnan(auc) else f"{auc:.3f}")
    )
    lines.append(protocol_line(summary.get("protocol")))
    for row in summary.get("throughput") or []:
        lines.append(
            f"process {row['rank']} (run {row['run_id']}): {row['questions']} questions in {row['seconds']:.1f} s, "
            f"{row['tokens_generated']} tokens, {row['tokens_per_second']:.1f} tokens/s, "
            f"peak memory {row['peak_memory_bytes'] / 2**20:.0f} MiB"
            + (
                f"; {row['decode_steps']} decode steps, {row['rows_decoded']} rows, occupancy {row['occupancy']:.2f}"
                if row.get("occupancy") is not None
                else ""
            )
        )
    unparsable = (summary.get("unparsable_golds") or {}).get("count", 0)
    if unparsable:
        ids = ", ".join(summary["unparsable_golds"]["ids"][:10])
        lines.append(f"WARNING: {unparsable} gold answer(s) math-verify cannot parse, graded wrong (ids: {ids}).")
    return "\n".join(lines)


def protocol_line(protocol: dict[str, Any] | None) -> str:
    """One line naming the sampling protocol and its settings (what a reader needs to compare numbers)."""
    if protocol is None:
        return "sampling protocol: not recorded"
    overridden = protocol.get("overridden") or []
    name = str(protocol.get("name"))
    if overridden:
        name += f" (overridden: {', '.join(overridden)})"
    seed = "" if protocol.get("seed") is None else f", seed {protocol['seed']}"
    extra = protocol.get("generate_kwargs") or {}
    also = "; also " + ", ".join(f"{k}={v}" for k, v in extra.items()) if extra else ""
    return f"sampling protocol: {name}; {_settings_text(protocol)}{seed}{also}"


def _cell(entry: dict[str, float]) -> str:
    return f"{100 * entry['mean']:.1f} [{100 * entry['ci_low']:.1f}, {100 * entry['ci_high']:.1f}]"


def plot_accuracy_vs_n(summary: dict[str, Any], path: str | Path, title: str = "Accuracy vs N") -> Path:
    """PNG plot against N (log2 axis) of every method the summary has: pass@1, random, majority, SPRM-weighted vote,
    BoN-SPRM (with Best-of-N) and beam search / DVTS (with those searches)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = list(summary["budgets"].items())
    ns = [n for _, n in budgets]
    metrics = summary["metrics"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    if "pass@1" in metrics:  # Best-of-N's samples give it; an evaluation of searches alone has none
        ax.axhline(100 * metrics["pass@1"]["mean"], color="gray", linestyle="--", label="pass@1")
    styles = (
        ("random", ":"),
        ("majority", "-"),
        ("sprm_vote", "-."),
        ("bon_sprm", "-"),
        ("beam", "--"),
        ("dvts", "--"),
    )
    for method, style in styles:
        keys = [metric_key(method, n, label) for label, n in budgets]
        points = [(n, metrics[k]) for n, k in zip(ns, keys) if k in metrics]
        if not points:
            continue
        xs = [n for n, _ in points]
        ys = [100 * m["mean"] for _, m in points]
        low = [100 * m["ci_low"] for _, m in points]
        high = [100 * m["ci_high"] for _, m in points]
        label = {"bon_sprm": "BoN-SPRM", "beam": "beam search", "dvts": "DVTS"}.get(method, method)
        ax.plot(xs, ys, style, marker="o", label=label)
        ax.fill_between(xs, low, high, alpha=0.12)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    return _save_plot(fig, ax, "N (candidates per question)", title, path)


def plot_accuracy_vs_tokens(
    curves: Mapping[str, Sequence[Mapping[str, float]]],
    path: str | Path,
    title: str = "Accuracy vs generated tokens",
    xlabel: str = "tokens generated per question, all candidates (log scale)",
) -> Path:
    """PNG plot of accuracy against the tokens generated per question (log2 axis), the paper's scaling-law view.

    ``curves`` maps a method's label to its points, each a mapping with ``tokens`` (generated per question, all
    candidates and branches), ``mean`` (accuracy, a fraction), optionally ``ci_low`` / ``ci_high`` (a shaded
    interval) and ``n`` (written next to the point). A curve with one point is drawn as a marker.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Curves may coincide (strategies that generate the same tokens and pick the same answers): distinct markers,
    # sizes and line styles keep each visible, and each N is labelled once.
    styles = [("o", "-"), ("s", "-"), ("^", "-"), ("v", "--"), ("D", ":"), ("P", "-."), ("X", "--")]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    labelled: set[float] = set()
    for index, (label, points) in enumerate(curves.items()):
        points = sorted(points, key=lambda point: point["tokens"])
        if not points:
            continue
        marker, linestyle = styles[index % len(styles)]
        xs = [point["tokens"] for point in points]
        ys = [100 * point["mean"] for point in points]
        (line,) = ax.plot(xs, ys, marker=marker, linestyle=linestyle, markersize=max(3, 8 - index), label=label)
        if all("ci_low" in point and "ci_high" in point for point in points) and len(points) > 1:
            low = [100 * point["ci_low"] for point in points]
            high = [100 * point["ci_high"] for point in points]
            ax.fill_between(xs, low, high, alpha=0.08, color=line.get_color())
        for x, y, point in zip(xs, ys, points):
            if "n" in point and point["n"] not in labelled:
                labelled.add(point["n"])
                ax.annotate(f"N={int(point['n'])}", (x, y), textcoords="offset points", xytext=(4, -12), fontsize=7)
    ax.set_xscale("log", base=2)
    return _save_plot(fig, ax, xlabel, title, path)


def _save_plot(fig: Any, ax: Any, xlabel: str, title: str, path: str | Path) -> Path:
    """Label an accuracy plot, write it as a PNG and close it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    from .atomic_writes import atomic_file

    path = Path(path)
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def tokens_curves(summary: Mapping[str, Any]) -> dict[str, list[dict[str, float]]]:
    """Accuracy-vs-tokens points of a summary's costed methods, for :func:`plot_accuracy_vs_tokens`."""
    from .metrics import budget_items, metric_key

    labels = {"bon_sprm": "BoN-SPRM", "majority": "majority", "beam": "beam search", "dvts": "DVTS"}
    curves: dict[str, list[dict[str, float]]] = {}
    for method, label in labels.items():
        points = []
        for budget, n in budget_items(summary["budgets"]):
            entry = summary["metrics"].get(metric_key(method, n, budget))
            if entry is not None and "tokens_per_question" in entry:
                points.append({"tokens": entry["tokens_per_question"], "n": n, **entry})
        if points:
            curves[label] = points
    for key, entry in summary["metrics"].items():  # each adaptive setting: one point
        if key.startswith(ADAPTIVE_PREFIX) and "tokens_per_question" in entry:
            curves[f"adaptive {key[len(ADAPTIVE_PREFIX) :]}"] = [{**entry, "tokens": entry["tokens_per_question"]}]
    return curves


def save_report(summary: dict[str, Any], records: EvalRecords | Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write the summary and the per-question results as JSON (atomically: a kill leaves the old file or the new).

    ``records`` are :class:`EvalRecords` or an evaluation's question records; from the latter the report keeps the
    Best-of-N candidates' ``correct`` / ``scores`` / ``answers`` and, under ``searches``, whether each search's
    chosen candidate was correct per question (``records.jsonl`` has everything else).
    """
    from .atomic_writes import write_json_atomic

    searches: dict[str, list[bool]] = {}
    if not isinstance(records, EvalRecords):
        questions = list(records)
        for key in questions[0]["results"] if questions else []:
            if key != "best_of_n":
                searches[key] = [chosen_correct(q["results"][key]) for q in questions]
        has_best_of_n = bool(questions) and "best_of_n" in questions[0]["results"]
        records = records_to_eval_records(questions) if has_best_of_n else None
    payload: dict[str, Any] = {"summary": summary}
    if records is not None:
        payload["records"] = {
            "correct": records.correct.tolist(),
            "scores": [[None if not math.isfinite(s) else s for s in row] for row in records.scores.tolist()],
            "answers": records.answers,
        }
    if searches:
        payload["searches"] = searches
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, payload, default=_json_default)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
