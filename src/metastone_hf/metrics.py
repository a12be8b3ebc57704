"""Test-time-scaling metrics with the official MetaStone-S1 group averaging.

Each question has ``M`` sampled candidates. For a budget ``N`` the candidates are split into
``K = M // N`` consecutive groups of ``N``; a method picks one candidate per group and the question's
accuracy is the mean over its ``K`` groups. Reported numbers are means over questions, with a bootstrap
confidence interval over questions.

:func:`compute_scaling_metrics` computes them all at once; the same numbers ship as a Hugging Face ``evaluate``
metric module (``evaluate.load(evaluate_module_path())``, see :func:`load_evaluate_metric`), which is what
``metastone eval`` reports through.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .selection_metastone import SELECTION_STRATEGIES, SelectionStrategy, rankable_scores

if TYPE_CHECKING:
    import evaluate

SCALING_METHODS = ("majority", "random", "sprm_vote", "bon_sprm")
"""The Best-of-N methods reported at each budget N, in report order: majority vote, a uniformly random pick,
SPRM-weighted vote and the highest SPRM score (the paper's BoN-SPRM)."""


def _groups(num_candidates: int, n: int) -> list[slice]:
    if n < 1:
        raise ValueError(f"N must be >= 1, got {n}.")
    if num_candidates < n:
        raise ValueError(f"N={n} needs at least {n} candidates per question, got {num_candidates}.")
    return [slice(k * n, (k + 1) * n) for k in range(num_candidates // n)]


def strategy_accuracy(
    correct: np.ndarray,
    scores: np.ndarray | None,
    answers: Sequence[Sequence[Hashable | None]] | None,
    n: int,
    strategy: str | SelectionStrategy,
) -> np.ndarray:
    """Per-question accuracy of a Best-of-N selection strategy applied to each group of ``n`` candidates.

    ``strategy`` is one of ``generate``'s strategies (``"sprm"``, ``"sprm_vote"``, ``"majority"``) or a callable
    ``(scores [n], answers or None) -> index``, so evaluation picks exactly what ``generate`` would pick.
    ``answers[q][i]`` is candidate ``i``'s canonical answer (``None``: no answer).
    """
    pick = SELECTION_STRATEGIES[strategy] if isinstance(strategy, str) else strategy
    correct = np.asarray(correct, dtype=float)
    score_table = torch.zeros(correct.shape) if scores is None else torch.as_tensor(np.asarray(scores, dtype=float))
    groups = _groups(correct.shape[1], n)
    result = np.zeros(len(correct))
    for q in range(len(correct)):
        picks = [
            g.start + int(pick(score_table[q, g], None if answers is None else list(answers[q][g]))) for g in groups
        ]
        result[q] = correct[q, picks].mean()
    return result


def best_of_n_accuracy(correct: np.ndarray, scores: np.ndarray, n: int) -> np.ndarray:
    """Per-question accuracy of the paper's BoN-SPRM: the highest-scoring candidate of each group (NaN ranks last)."""
    return strategy_accuracy(correct, scores, None, n, "sprm")


def vote_accuracy(
    correct: np.ndarray,
    answers: Sequence[Sequence[Hashable | None]],
    n: int,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Per-question accuracy of majority voting, or of SPRM-weighted voting when ``weights`` (scores) are given."""
    if weights is None:
        return strategy_accuracy(correct, None, answers, n, "majority")
    return strategy_accuracy(correct, weights, answers, n, "sprm_vote")


def random_pick_accuracy(correct: np.ndarray, n: int) -> np.ndarray:
    """Per-question expected accuracy of picking a uniformly random candidate in each group of ``n``."""
    correct = np.asarray(correct, dtype=float)
    return np.mean([correct[:, g].mean(axis=1) for g in _groups(correct.shape[1], n)], axis=0)


def pass_at_1(correct: np.ndarray) -> np.ndarray:
    """Per-question mean accuracy of single samples."""
    return np.asarray(correct, dtype=float).mean(axis=1)


def bootstrap_ci(
    per_question: np.ndarray, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over questions."""
    values = np.asarray(per_question, dtype=float)
    if len(values) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    alpha = (1 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def roc_auc(positive_scores: Sequence[float], negative_scores: Sequence[float]) -> float:
    """Probability that a random positive outscores a random negative (ties count half); NaN if a class is empty."""
    pos, neg = np.asarray(positive_scores, dtype=float), np.asarray(negative_scores, dtype=float)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    pos, neg = (rankable_scores(torch.as_tensor(x)).numpy() for x in (pos, neg))
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


# ---------------------------------------------------------------------------------------------- all at once
def budget_items(budgets: Mapping[str, int] | Sequence[int] | int) -> list[tuple[str, int]]:
    """``budgets`` as ``(label, N)`` pairs sorted by N: a mapping (effort -> N) keeps its labels, a bare N is its own."""
    if isinstance(budgets, Mapping):
        items = [(str(label), int(n)) for label, n in budgets.items()]
    else:
        items = [(str(int(n)), int(n)) for n in ([budgets] if isinstance(budgets, (int, np.integer)) else budgets)]
    return sorted(items, key=lambda item: item[1])


def metric_key(method: str, n: int, label: str | None = None) -> str:
    """A metric's name in results and reports: ``method@N``, or ``method@N (label)`` for a labelled budget."""
    return f"{method}@{n}" if label is None or label == str(n) else f"{method}@{n} ({label})"


def _as_candidate_table(
    correct: Any, scores: Any, answers: Sequence[Sequence[Hashable | None]]
) -> tuple[np.ndarray, np.ndarray]:
    correct_table = np.asarray(correct, dtype=float)
    score_table = np.asarray(scores, dtype=float)
    if correct_table.ndim != 2 or correct_table.size == 0:
        raise ValueError(
            f"`correct` must be [questions, candidates] with at least one candidate, got shape {correct_table.shape}."
        )
    if score_table.shape != correct_table.shape:
        raise ValueError(f"`scores` has shape {score_table.shape}, `correct` {correct_table.shape}: they must match.")
    if len(answers) != len(correct_table) or any(len(row) != correct_table.shape[1] for row in answers):
        raise ValueError(f"`answers` must hold {correct_table.shape[1]} answers (None: none) for each question.")
    return correct_table, score_table


def per_question_metrics(
    correct: Any,
    scores: Any,
    answers: Sequence[Sequence[Hashable | None]],
    budgets: Mapping[str, int] | Sequence[int] | int = (2, 8, 32),
) -> dict[str, np.ndarray]:
    """Per-question accuracy of pass@1 and of every method of :data:`SCALING_METHODS` at every budget N.

    Keys are :func:`metric_key` names (``pass@1``, ``bon_sprm@8`` or ``bon_sprm@8 (medium)``). A budget larger than
    the candidates per question M is left out; every other N is averaged over ``K = M // N`` groups.
    """
    correct_table, score_table = _as_candidate_table(correct, scores, answers)
    results: dict[str, np.ndarray] = {"pass@1": pass_at_1(correct_table)}
    for label, n in budget_items(budgets):
        if n > correct_table.shape[1]:
            continue
        per_method = {
            "majority": vote_accuracy(correct_table, answers, n),
            "random": random_pick_accuracy(correct_table, n),
            "sprm_vote": vote_accuracy(correct_table, answers, n, weights=score_table),
            "bon_sprm": best_of_n_accuracy(correct_table, score_table, n),
        }
        for method in SCALING_METHODS:
            results[metric_key(method, n, label)] = per_method[method]
    return results


def sprm_auc(correct: Any, scores: Any) -> float:
    """AUC of the SPRM score separating correct from incorrect candidates, pooled over all questions."""
    flat_correct = np.asarray(correct, dtype=float).reshape(-1).astype(bool)
    flat_scores = np.asarray(scores, dtype=float).reshape(-1)
    return roc_auc(flat_scores[flat_correct], flat_scores[~flat_correct])


def compute_scaling_metrics(
    correct: Any,
    scores: Any,
    answers: Sequence[Sequence[Hashable | None]],
    budgets: Mapping[str, int] | Sequence[int] | int = (2, 8, 32),
    confidence: float | None = None,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Every test-time-scaling metric of a set of sampled candidates, as means over questions.

    Args:
        correct: ``[questions, M]`` 0/1 (or bool): is candidate ``i`` of question ``q`` right.
        scores: ``[questions, M]`` SPRM scores (higher is better; NaN ranks last).
        answers: ``answers[q][i]`` candidate ``i``'s canonical final answer for voting (``None``: no answer).
        budgets: the Ns to report; a mapping (effort -> N) labels the keys, e.g. ``{"medium": 8}`` ->
            ``bon_sprm@8 (medium)``.
        confidence: when given, also a percentile bootstrap interval over questions per metric, under
            ``"intervals"`` (``{key: [low, high]}``).
        resamples, seed: bootstrap resamples and random seed.

    Returns:
        ``{"pass@1": ..., "majority@N": ..., "random@N": ..., "sprm_vote@N": ..., "bon_sprm@N": ..., "sprm_auc": ...}``
        (one key per method and budget, see :func:`per_question_metrics`), plus ``"intervals"`` with a confidence.
    """
    per_question = per_question_metrics(correct, scores, answers, budgets)
    results: dict[str, Any] = {key: float(np.mean(values)) for key, values in per_question.items()}
    results["sprm_auc"] = sprm_auc(correct, scores)
    if confidence is not None:
        results["intervals"] = {
            key: list(bootstrap_ci(values, confidence, resamples, seed)) for key, values in per_question.items()
        }
    return results


def evaluate_module_path() -> Path:
    """Path of the ``evaluate`` metric module shipped in this package: ``evaluate.load(str(path))`` loads it offline.

    Its folder has the module's name, so ``evaluate.load(str(path.parent))`` works as well.
    """
    return Path(__file__).resolve().parent / "test_time_scaling" / "test_time_scaling.py"


def load_evaluate_metric(**load_kwargs: Any) -> evaluate.EvaluationModule:
    """The test-time-scaling ``evaluate`` metric: ``evaluate.load(evaluate_module_path(), **load_kwargs)``.

    ``keep_in_memory`` defaults to True: the inputs are small, and nothing is written under the ``evaluate``
    cache. ``evaluate`` still copies the module file into its modules cache (``HF_MODULES_CACHE``), as for any
    metric it loads.
    """
    import evaluate

    return evaluate.load(str(evaluate_module_path()), **{"keep_in_memory": True, **load_kwargs})
