"""Best-of-N evaluation over a dataset: sample once, grade with math-verify, report every test-time metric.

For each question ``M = max(N)`` candidates are sampled in one Best-of-N call; the metrics for every smaller
``N`` reuse them with the official K-groups-of-N averaging (see :mod:`metastone_hf.metrics`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import best_of_n_accuracy, bootstrap_ci, pass_at_1, random_pick_accuracy, roc_auc, vote_accuracy

DATASET_FILES = {"aime24": "aime24.jsonl", "gsm8k": "gsm8k_test.jsonl", "math500": "math500_test.jsonl"}
PROMPT_FIELDS = ("prompt", "problem", "question")


@dataclass
class EvalExample:
    """One question: the prompt text and its gold answer (a string math-verify can parse)."""

    prompt: str
    answer: str
    id: str = ""


# ---------------------------------------------------------------------------------------------- data
def gold_answer(row: dict[str, Any]) -> str:
    """The gold answer of a dataset row: ``answer`` (GSM8K's ``... #### N`` reduced to ``N``)."""
    if "answer" not in row:
        raise ValueError(f"Row has no `answer` field (fields: {sorted(row)}); each row needs a prompt and an answer.")
    answer = str(row["answer"])
    if "####" in answer:
        answer = answer.split("####")[-1].strip().replace(",", "")
    return answer.strip()


def load_eval_examples(
    name_or_path: str | Path, data_dir: str | Path | None = None, limit: int | None = None
) -> list[EvalExample]:
    """Load ``aime24`` / ``gsm8k`` / ``math500`` (from ``data_dir``) or any jsonl file with a prompt and an answer.

    The prompt is read from the first of ``prompt``, ``problem``, ``question``; the answer from ``answer``.
    """
    name = str(name_or_path)
    if name in DATASET_FILES:
        if data_dir is None:
            raise ValueError(
                f"Dataset {name!r} is read from a local folder: pass data_dir (--data-dir) holding {DATASET_FILES[name]}."
            )
        path = Path(data_dir) / DATASET_FILES[name]
    else:
        path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: give one of {sorted(DATASET_FILES)} with --data-dir, or a .jsonl file."
        )
    examples = []
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number} is not valid JSON: {error}") from error
            prompt_field = next((k for k in PROMPT_FIELDS if k in row), None)
            if prompt_field is None:
                raise ValueError(f"{path}:{line_number} has none of the prompt fields {PROMPT_FIELDS}.")
            examples.append(
                EvalExample(
                    str(row[prompt_field]), gold_answer(row), str(row.get("id", row.get("unique_id", line_number)))
                )
            )
            if limit is not None and len(examples) >= limit:
                break
    if not examples:
        raise ValueError(f"{path} holds no examples.")
    return examples


def reference_completion(row: dict[str, Any]) -> str:
    """A completion built from a dataset row's own reference (for checking the grader): solution + boxed answer."""
    solution = str(row.get("solution", row.get("answer", "")))
    solution = re.sub(r"####.*$", "", solution, flags=re.S)
    if "\\boxed" in solution:
        return solution
    return f"{solution}\nThe answer is \\boxed{{{gold_answer(row)}}}."


# ---------------------------------------------------------------------------------------------- grading
def _math_verify() -> Any:
    try:
        import math_verify
    except ImportError as error:  # pragma: no cover - a declared dependency
        raise ImportError("Grading needs math-verify: `pip install 'math-verify[antlr4_13_2]'`.") from error
    return math_verify


def grade_answer(completion: str, gold: str) -> bool:
    """Is the completion's final answer (its last ``\\boxed{}``, else its last expression) equal to ``gold``?

    Both sides go through math-verify's parser with the same settings, so ``\\frac43`` equals ``4/3``.
    """
    mv = _math_verify()
    already_delimited = "\\boxed" in gold or re.search(r"(?<!\\)\$", gold) is not None
    gold_text = gold if already_delimited else f"\\boxed{{{gold}}}"
    gold_parsed = mv.parse(gold_text)
    if not gold_parsed:
        return completion.strip() == gold.strip()
    return bool(mv.verify(gold_parsed, mv.parse(completion)))


# ---------------------------------------------------------------------------------------------- running
@dataclass
class EvalRecords:
    """Raw per-candidate results: ``correct``/``scores`` are ``[questions, M]``; ``answers`` is a nested list."""

    correct: np.ndarray
    scores: np.ndarray
    answers: list[list[str | None]]
    completions: list[list[str]] = field(default_factory=list)


def run_best_of_n_eval(
    model: Any,
    tokenizer: Any,
    examples: Sequence[EvalExample],
    num_samples: int = 32,
    *,
    prompt_builder: Callable[[str], str] | None = None,
    answer_extractor: Callable[[str], str | None] | None = None,
    grader: Callable[[str, str], bool] = grade_answer,
    batch_size: int = 1,
    max_new_tokens: int = 512,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    progress_bar: bool = True,
    keep_completions: bool = False,
    **generate_kwargs: Any,
) -> EvalRecords:
    """Sample ``num_samples`` candidates per question with Best-of-N generate, score, extract and grade them.

    Args:
        prompt_builder: question text -> model input text (e.g. a chat template). Default: the tokenizer's chat
            template when it has one, followed by ``<think>\\n`` when the model has a think token; else the text.
        answer_extractor: completion -> canonical answer for voting; default: the Best-of-N default (``\\boxed``
            via math-verify).
        batch_size: questions per generate call (each has ``num_samples`` candidates).
        generate_kwargs: any other ``generate`` argument (``top_k``, ``repetition_penalty``, ...).
    """
    from tqdm.auto import tqdm

    from .generation_metastone import extract_boxed_answer

    extractor = answer_extractor or extract_boxed_answer
    build = prompt_builder or default_prompt_builder(tokenizer, model)
    correct, scores, answers, completions = [], [], [], []
    bar = tqdm(total=len(examples), desc="eval", unit="question", disable=not progress_bar)
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        inputs = tokenizer(
            [build(e.prompt) for e in batch], return_tensors="pt", padding=True, add_special_tokens=False
        )
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        out = model.generate(
            **inputs,
            num_candidates=num_samples,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            seed=seed + start,
            progress_bar=False,
            **generate_kwargs,
        )
        prompt_length = inputs["input_ids"].shape[1]
        for b, example in enumerate(batch):
            texts = tokenizer.batch_decode(out.candidates[b, :, prompt_length:], skip_special_tokens=True)
            correct.append([grader(t, example.answer) for t in texts])
            scores.append(out.log_scores[b].double().exp().cpu().tolist())  # float64: no ties at 1.0
            answers.append([extractor(t) for t in texts])
            if keep_completions:
                completions.append(texts)
        bar.update(len(batch))
    bar.close()
    return EvalRecords(np.array(correct, dtype=float), np.array(scores, dtype=float), answers, completions)


def default_prompt_builder(tokenizer: Any, model: Any) -> Callable[[str], str]:
    """Chat template (when the tokenizer has one) + ``<think>\\n`` (when the model has a think token)."""
    think_id = getattr(model.config, "think_start_token_id", None)
    think = tokenizer.convert_ids_to_tokens(think_id) if think_id is not None else None

    def build(question: str) -> str:
        text = question
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            )
        if think and not text.rstrip().endswith(think):
            text = f"{text}{think}\n"
        return text

    return build


def summarize(
    records: EvalRecords, budgets: dict[str, int] | Sequence[int] = (2, 8, 32), confidence: float = 0.95
) -> dict[str, Any]:
    """Every metric per budget with a bootstrap interval, plus the SPRM AUC (correct vs incorrect candidates)."""
    if isinstance(budgets, dict):
        labelled = sorted(budgets.items(), key=lambda kv: kv[1])
    else:
        labelled = [(str(n), n) for n in sorted(budgets)]
    correct, scores = records.correct, records.scores

    def entry(per_question: np.ndarray) -> dict[str, float]:
        low, high = bootstrap_ci(per_question, confidence)
        return {"mean": float(np.mean(per_question)), "ci_low": low, "ci_high": high}

    table: dict[str, Any] = {"pass@1": entry(pass_at_1(correct))}
    for label, n in labelled:
        if n > correct.shape[1]:
            continue
        suffix = f"@{n}" if label == str(n) else f"@{n} ({label})"
        table[f"majority{suffix}"] = entry(vote_accuracy(correct, records.answers, n))
        table[f"random{suffix}"] = entry(random_pick_accuracy(correct, n))
        table[f"sprm_vote{suffix}"] = entry(vote_accuracy(correct, records.answers, n, weights=scores))
        table[f"bon_sprm{suffix}"] = entry(best_of_n_accuracy(correct, scores, n))
    flat_correct, flat_scores = correct.reshape(-1).astype(bool), scores.reshape(-1)
    auc = roc_auc(flat_scores[flat_correct], flat_scores[~flat_correct])
    return {
        "questions": int(correct.shape[0]),
        "samples_per_question": int(correct.shape[1]),
        "confidence": confidence,
        "metrics": table,
        "sprm_auc": auc,
        "budgets": dict(labelled),
    }


def format_table(summary: dict[str, Any]) -> str:
    """Markdown table: one row per method, one column per budget N."""
    budgets = list(summary["budgets"].items())
    header = (
        "| method | " + " | ".join(f"N={n} ({label})" if label != str(n) else f"N={n}" for label, n in budgets) + " |"
    )
    lines = [header, "|---" * (len(budgets) + 1) + "|"]
    metrics = summary["metrics"]
    p1 = metrics["pass@1"]
    lines.append("| pass@1 | " + " | ".join(_cell(p1) for _ in budgets) + " |")
    for method in ("random", "majority", "sprm_vote", "bon_sprm"):
        cells = []
        for label, n in budgets:
            key = f"{method}@{n}" if label == str(n) else f"{method}@{n} ({label})"
            cells.append(_cell(metrics[key]) if key in metrics else "-")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    auc = summary["sprm_auc"]
    lines.append("")
    lines.append(
        f"{summary['questions']} questions x {summary['samples_per_question']} samples; "
        f"{int(summary['confidence'] * 100)}% bootstrap intervals; SPRM AUC (correct vs incorrect) = "
        + ("n/a" if math.isnan(auc) else f"{auc:.3f}")
    )
    return "\n".join(lines)


def _cell(entry: dict[str, float]) -> str:
    return f"{100 * entry['mean']:.1f} [{100 * entry['ci_low']:.1f}, {100 * entry['ci_high']:.1f}]"


def plot_accuracy_vs_n(summary: dict[str, Any], path: str | Path, title: str = "Accuracy vs N") -> Path:
    """PNG plot of pass@1, random, majority, SPRM-weighted vote and BoN-SPRM against N (log2 axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = list(summary["budgets"].items())
    ns = [n for _, n in budgets]
    metrics = summary["metrics"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.axhline(100 * metrics["pass@1"]["mean"], color="gray", linestyle="--", label="pass@1")
    for method, style in (("random", ":"), ("majority", "-"), ("sprm_vote", "-."), ("bon_sprm", "-")):
        keys = [f"{method}@{n}" if label == str(n) else f"{method}@{n} ({label})" for label, n in budgets]
        points = [(n, metrics[k]) for n, k in zip(ns, keys) if k in metrics]
        if not points:
            continue
        xs = [n for n, _ in points]
        ys = [100 * m["mean"] for _, m in points]
        low = [100 * m["ci_low"] for _, m in points]
        high = [100 * m["ci_high"] for _, m in points]
        ax.plot(xs, ys, style, marker="o", label={"bon_sprm": "BoN-SPRM"}.get(method, method))
        ax.fill_between(xs, low, high, alpha=0.12)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("N (candidates per question)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def save_report(summary: dict[str, Any], records: EvalRecords, path: str | Path) -> Path:
    """Write the summary and the raw per-candidate records as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "summary": summary,
        "records": {
            "correct": records.correct.tolist(),
            "scores": [[None if not math.isfinite(s) else s for s in row] for row in records.scores.tolist()],
            "answers": records.answers,
        },
    }
    path.write_text(json.dumps(payload, indent=1, default=_json_default))
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
