"""Test-time-scaling metrics on hand-built candidates (official K-groups-of-N averaging)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from metastone_hf.metrics import (
    best_of_n_accuracy,
    bootstrap_ci,
    pass_at_1,
    random_pick_accuracy,
    roc_auc,
    vote_accuracy,
)

CORRECT = np.array([[1, 0, 0, 1, 0, 0, 0, 0], [0, 0, 1, 0, 1, 1, 0, 0]])
SCORES = np.array([[0.9, 0.8, 0.1, 0.2, 0.3, 0.7, 0.1, 0.0], [0.5, 0.6, 0.4, 0.1, 0.2, 0.9, 0.3, 0.3]])


def test_best_of_n_groups():
    # N=2: groups (0,1)(2,3)(4,5)(6,7); picks q0: 0,3,5,6 -> 1,1,0,0 ; q1: 1,2,5,6 -> 0,1,1,0
    np.testing.assert_allclose(best_of_n_accuracy(CORRECT, SCORES, 2), [0.5, 0.5])
    # N=4: q0 groups pick 0 (correct) and 5 (wrong); q1 pick 1 (wrong) and 5 (correct)
    np.testing.assert_allclose(best_of_n_accuracy(CORRECT, SCORES, 4), [0.5, 0.5])
    np.testing.assert_allclose(best_of_n_accuracy(CORRECT, SCORES, 8), [1.0, 1.0])
    np.testing.assert_allclose(best_of_n_accuracy(CORRECT, SCORES, 1), pass_at_1(CORRECT))
    # leftover candidates beyond K*N are ignored (8 // 3 = 2 groups)
    np.testing.assert_allclose(best_of_n_accuracy(CORRECT, SCORES, 3), [0.5, 0.5])


def test_nan_scores_rank_last():
    scores = np.array([[np.nan, 0.1]])
    np.testing.assert_allclose(best_of_n_accuracy(np.array([[0, 1]]), scores, 2), [1.0])


def test_majority_and_weighted_vote():
    answers = [["7", "3", "3", None]]
    correct = np.array([[1, 0, 0, 0]])
    np.testing.assert_allclose(vote_accuracy(correct, answers, 4), [0.0])  # "3" has two votes
    weights = np.array([[0.9, 0.3, 0.2, 0.99]])
    np.testing.assert_allclose(vote_accuracy(correct, answers, 4, weights), [1.0])  # 0.9 > 0.5
    # ties go to the answer seen first; without any answer majority picks the first candidate, sprm_vote the best
    np.testing.assert_allclose(vote_accuracy(np.array([[0, 1, 0, 0]]), [["3", "7", None, None]], 2), [0.0])
    np.testing.assert_allclose(vote_accuracy(np.array([[0, 1]]), [[None, None]], 2), [0.0])
    np.testing.assert_allclose(vote_accuracy(np.array([[0, 1]]), [[None, None]], 2, np.array([[0.1, 0.2]])), [1.0])


def test_random_pick_is_the_group_mean():
    np.testing.assert_allclose(random_pick_accuracy(CORRECT, 4), [0.25, 0.375])
    np.testing.assert_allclose(random_pick_accuracy(CORRECT, 8), pass_at_1(CORRECT))


def test_group_size_errors():
    with pytest.raises(ValueError, match="at least 16"):
        best_of_n_accuracy(CORRECT, SCORES, 16)
    with pytest.raises(ValueError, match=">= 1"):
        random_pick_accuracy(CORRECT, 0)


def test_auc_against_pair_counting():
    pos, neg = [0.9, 0.4, 0.4, 0.7], [0.4, 0.1, 0.8]
    pairs = list(itertools.product(pos, neg))
    expected = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert roc_auc(pos, neg) == pytest.approx(expected)
    assert roc_auc([1.0], [0.0]) == 1.0 and np.isnan(roc_auc([], [0.1]))


def test_bootstrap_ci_brackets_the_mean():
    values = np.random.default_rng(0).integers(0, 2, 200).astype(float)
    low, high = bootstrap_ci(values)
    assert low < values.mean() < high and high - low < 0.2
