"""Test-time-scaling metrics with the official MetaStone-S1 group averaging.

Each question has ``M`` sampled candidates. For a budget ``N`` the candidates are split into
``K = M // N`` consecutive groups of ``N``; a method picks one candidate per group and the question's
accuracy is the mean over its ``K`` groups. Reported numbers are means over questions, with a bootstrap
confidence interval over questions.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence

import numpy as np


def _groups(num_candidates: int, n: int) -> list[slice]:
    if n < 1:
        raise ValueError(f"N must be >= 1, got {n}.")
    if num_candidates < n:
        raise ValueError(f"N={n} needs at least {n} candidates per question, got {num_candidates}.")
    return [slice(k * n, (k + 1) * n) for k in range(num_candidates // n)]


def best_of_n_accuracy(correct: np.ndarray, scores: np.ndarray, n: int) -> np.ndarray:
    """Per-question accuracy of picking the highest-scoring candidate in each group of ``n``.

    NaN scores rank below every real score; ties go to the earliest candidate (``argmax``).
    """
    correct, scores = np.asarray(correct, dtype=float), np.asarray(scores, dtype=float)
    safe = np.where(np.isnan(scores), -np.inf, scores)
    per_group = [
        correct[np.arange(len(correct)), g.start + safe[:, g].argmax(axis=1)] for g in _groups(correct.shape[1], n)
    ]
    return np.mean(per_group, axis=0)


def vote_accuracy(
    correct: np.ndarray,
    answers: Sequence[Sequence[Hashable | None]],
    n: int,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Per-question accuracy of (weighted) voting over extracted answers in each group of ``n``.

    ``answers[q][i]`` is the canonical answer of candidate ``i`` (``None`` = no answer, casts no vote).
    With ``weights`` (e.g. SPRM scores) each vote counts its weight; plain majority otherwise. Ties go to the
    answer that appears first in the group. A group with no answer at all scores 0.
    """
    correct = np.asarray(correct, dtype=float)
    result = np.zeros(len(correct))
    groups = _groups(correct.shape[1], n)
    for q in range(len(correct)):
        accuracies = []
        for g in groups:
            totals: dict[Hashable, float] = defaultdict(float)
            first: dict[Hashable, int] = {}
            for i in range(g.start, g.stop):
                answer = answers[q][i]
                if answer is None:
                    continue
                weight = 1.0 if weights is None else float(np.nan_to_num(weights[q][i], nan=0.0))
                totals[answer] += weight
                first.setdefault(answer, i)
            if not totals:
                accuracies.append(0.0)
                continue
            winner = max(totals, key=lambda a: (totals[a], -first[a]))
            accuracies.append(correct[q, first[winner]])
        result[q] = np.mean(accuracies)
    return result


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
    pos, neg = np.nan_to_num(pos, nan=-np.inf), np.nan_to_num(neg, nan=-np.inf)
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))
