"""Test-time-scaling metrics with the official MetaStone-S1 group averaging.

Each question has ``M`` sampled candidates. For a budget ``N`` the candidates are split into
``K = M // N`` consecutive groups of ``N``; a method picks one candidate per group and the question's
accuracy is the mean over its ``K`` groups. Reported numbers are means over questions, with a bootstrap
confidence interval over questions.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
import torch

from .generation_metastone import SELECTION_STRATEGIES, SelectionStrategy


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
    pos, neg = np.nan_to_num(pos, nan=-np.inf), np.nan_to_num(neg, nan=-np.inf)
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))
