"""`sprm_loss` against a slow, obvious per-step reference on hand-built cases.

The reference follows the paper's SPR loss: BCE per step against the outcome, a step kept only when the head already
agrees with the outcome, kept steps weighted by the other class's share (positives times 1.5), counts smoothed by +1.
"""

from __future__ import annotations

import math

import pytest
import torch

from metastone_hf.training import grad_scaled_features, sprm_loss, sprm_metrics_from_stats


def reference_sprm_loss(
    logits: list[list[float]],
    mask: list[list[bool]],
    correct: list[bool],
    truncated: list[bool],
    agreement_filter: bool = True,
    class_balance: bool = True,
    positive_class_factor: float = 1.5,
    count_smoothing: float = 1.0,
    eps: float = 1e-5,
    extra_counts: tuple[float, float] = (0.0, 0.0),
) -> float:
    """One step at a time, in plain Python floats. ``extra_counts`` = kept (pos, neg) of other processes."""
    kept = []  # (z, y)
    for row, row_mask, y, cut in zip(logits, mask, correct, truncated):
        if cut:
            continue
        for z, is_step in zip(row, row_mask):
            if not is_step:
                continue
            agrees = (z > 0 and y) or (z < 0 and not y)
            if agreement_filter and not agrees:
                continue
            kept.append((z, y))
    pos_count = sum(1 for _, y in kept if y) + extra_counts[0] + count_smoothing
    neg_count = sum(1 for _, y in kept if not y) + extra_counts[1] + count_smoothing
    total = pos_count + neg_count
    numerator = weight_sum = 0.0
    for z, y in kept:
        if class_balance:
            w = positive_class_factor * neg_count / total if y else pos_count / total
        else:
            w = 1.0
        bce = -(y * math.log(1 / (1 + math.exp(-z))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-z))))
        numerator += bce * w
        weight_sum += w
    return numerator / (weight_sum + eps)


def run_both(logits, mask, correct, truncated, **kwargs):
    extra = kwargs.pop("extra_counts", (0.0, 0.0))
    reduce = None
    if extra != (0.0, 0.0):

        def reduce(counts: torch.Tensor) -> torch.Tensor:
            return counts + torch.tensor(extra)

    out = sprm_loss(
        torch.tensor(logits, dtype=torch.float64),
        torch.tensor(mask),
        torch.tensor(correct),
        torch.tensor(truncated),
        count_reduce=reduce,
        **kwargs,
    )
    expected = reference_sprm_loss(logits, mask, correct, truncated, extra_counts=extra, **kwargs)
    return out, expected


T, F = True, False

# 3 completions x 5 positions: mixed signs, a non-step position with a huge logit, a truncated row.
LOGITS = [[2.0, -1.0, 0.5, 30.0, -0.2], [-3.0, 1.5, -0.7, 0.0, 2.5], [1.0, 1.0, -1.0, -2.0, 4.0]]
MASK = [[T, T, T, F, T], [T, T, T, T, F], [T, F, T, T, T]]


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"agreement_filter": False},
        {"class_balance": False},
        {"agreement_filter": False, "class_balance": False},
        {"positive_class_factor": 1.0},
        {"count_smoothing": 0.0},
        {"extra_counts": (7.0, 2.0)},
    ],
    ids=["paper", "no-filter", "no-balance", "plain-bce", "factor-1", "no-smoothing", "cross-process-counts"],
)
def test_matches_reference_mixed(kwargs):
    out, expected = run_both(LOGITS, MASK, [T, F, T], [F, F, T], **kwargs)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_filter_keeps_only_agreeing_steps():
    # Correct row: steps at z=2 (agree), -1 (disagree), 0.5 (agree); z=0 never agrees.
    out, expected = run_both([[2.0, -1.0, 0.5, 0.0]], [[T, T, T, T]], [T], [F])
    assert out.stats["num_steps"].item() == 4
    assert out.stats["num_kept"].item() == 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.weights[0].tolist()[1] == 0.0 and out.weights[0].tolist()[3] == 0.0


def test_class_weights_exact_values():
    # 2 kept positives, 1 kept negative: pos_count=3, neg_count=2, total=5.
    out = sprm_loss(torch.tensor([[1.0, 2.0], [-1.0, 0.0]]), torch.tensor([[T, T], [T, F]]), torch.tensor([T, F]), None)
    w = out.weights
    assert w[0, 0].item() == pytest.approx(1.5 * 2 / 5)
    assert w[0, 1].item() == pytest.approx(1.5 * 2 / 5)
    assert w[1, 0].item() == pytest.approx(3 / 5)
    assert w[1, 1].item() == 0.0


def test_truncated_rows_are_excluded():
    logits, mask = [[2.0, 3.0], [-2.0, 50.0]], [[T, T], [T, T]]
    out_cut, expected = run_both(logits, mask, [T, F], [F, T])
    out_only, _ = run_both(logits[:1], mask[:1], [T], [F])
    assert out_cut.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out_cut.loss.item() == pytest.approx(out_only.loss.item(), rel=1e-6)
    assert out_cut.stats["num_completions"].item() == 1
    # Not excluding them changes the loss (the 50.0 logit of the wrong row disagrees; -2.0 agrees).
    out_kept = sprm_loss(torch.tensor(logits), torch.tensor(mask), torch.tensor([T, F]), torch.tensor([F, T]),
                         exclude_truncated=False)  # fmt: skip
    assert out_kept.stats["num_kept"].item() == 3


@pytest.mark.parametrize("correct", [True, False], ids=["all-correct", "all-wrong"])
def test_single_class_groups(correct):
    logits = [[1.0, -1.0, 2.0], [-0.5, 0.5, 3.0]]
    mask = [[T, T, T], [T, F, T]]
    out, expected = run_both(logits, mask, [correct, correct], [F, F])
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    key_absent = "num_kept_neg" if correct else "num_kept_pos"
    assert out.stats[key_absent].item() == 0
    assert math.isfinite(out.loss.item())
    metrics = out.metrics()
    assert math.isnan(metrics["score_incorrect" if correct else "score_correct"])


def test_no_steps_at_all_is_zero_and_differentiable():
    logits = torch.randn(2, 4, requires_grad=True)
    out = sprm_loss(logits, torch.zeros(2, 4, dtype=torch.bool), torch.tensor([T, F]), torch.tensor([F, F]))
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert logits.grad is not None and torch.all(logits.grad == 0)
    metrics = out.metrics()
    assert metrics["steps"] == 0 and math.isnan(metrics["kept_fraction"])


def test_nothing_kept_is_zero():
    # Every step disagrees with its outcome.
    out, expected = run_both([[-1.0, -2.0], [1.0, 2.0]], [[T, T], [T, T]], [T, F], [F, F])
    assert out.loss.item() == 0.0 == expected
    assert out.stats["num_kept"].item() == 0


def test_gradient_matches_reference_weights():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-1.5, 0.3, -0.2]], requires_grad=True)
    mask = torch.tensor([[T, T, T], [T, T, T]])
    out = sprm_loss(logits, mask, torch.tensor([T, F]), None)
    out.loss.backward()
    w = out.weights
    expected = w * (torch.sigmoid(logits.detach()) - torch.tensor([[1.0], [0.0]])) / (w.sum() + 1e-5)
    torch.testing.assert_close(logits.grad, expected)


def test_inf_logits_outside_mask_do_not_poison():
    logits = torch.tensor([[float("inf"), 1.0, float("-inf")]])
    out = sprm_loss(logits, torch.tensor([[F, T, F]]), torch.tensor([T]), None)
    assert math.isfinite(out.loss.item())


def test_metrics_trajectory_scores_and_kept_fraction():
    logits = torch.tensor([[2.0, 2.0, 0.0], [-2.0, 1.0, 0.0], [3.0, 0.0, 0.0]])
    mask = torch.tensor([[T, T, F], [T, T, F], [F, F, F]])  # third row: no steps
    out = sprm_loss(logits, mask, torch.tensor([T, F, T]), None)
    m = out.metrics()
    assert m["score_correct"] == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item(), rel=1e-6)
    expected_incorrect = math.exp((math.log(1 / (1 + math.exp(2))) + math.log(1 / (1 + math.exp(-1)))) / 2)
    assert m["score_incorrect"] == pytest.approx(expected_incorrect, rel=1e-6)
    assert m["kept_fraction"] == pytest.approx(3 / 4)
    assert m["kept_pos"] == 2 and m["kept_neg"] == 1
    summed = {k: v * 2 for k, v in out.stats.items()}  # as if two identical processes
    assert sprm_metrics_from_stats(summed)["kept_fraction"] == pytest.approx(3 / 4)


def test_shape_errors():
    with pytest.raises(ValueError, match="batch"):
        sprm_loss(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool), torch.tensor([T]), None)
    with pytest.raises(ValueError, match="seq_len"):
        sprm_loss(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.bool), torch.tensor([T, F]), None)


def test_grad_scaled_features():
    f = torch.randn(3, 4, requires_grad=True)
    g = grad_scaled_features(f, 1e-4)
    torch.testing.assert_close(g, f.detach())
    g.sum().backward()
    torch.testing.assert_close(f.grad, torch.full_like(f, 1e-4))
