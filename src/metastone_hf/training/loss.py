"""The self-supervised process reward (SPR) loss of MetaStone-S1 (arXiv 2507.01951).

Per step logit ``z`` of a completion with outcome ``y`` (1 = correct, i.e. reward > 0.5):

* ``BCE-with-logits(z, y)``;
* dynamic weight (self-supervised filter): keep the step only where the head already agrees with the
  outcome, ``(z > 0 and y = 1) or (z < 0 and y = 0)``;
* class balance over the kept steps with counts ``+1``, counts summed over all processes:
  ``w = 1.5 * pos * neg_count / total + neg * pos_count / total``;
* ``loss = sum(bce * w) / (sum(w) + 1e-5)``;
* truncated completions (no EOS) are excluded by default (the official intent; the official code in practice keeps
  them, labelled by their reward: ``exclude_truncated=False``).

Each of these is a documented argument of :func:`sprm_loss`, defaulting to the paper's value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from ..modeling_metastone import sprm_trajectory_log_scores

# Additive counters returned by `sprm_loss`; summing them over processes and calling `sprm_metrics_from_stats` gives
# the global metrics.
STAT_KEYS = (
    "num_completions",  # completions that contributed (not truncated, label known)
    "num_steps",  # scored steps of those completions
    "num_kept",  # steps kept by the agreement filter
    "num_kept_pos",  # kept steps of correct completions
    "num_kept_neg",  # kept steps of incorrect completions
    "num_steps_pos",  # all steps of correct completions
    "bce_sum",  # unweighted BCE summed over all steps (diagnostic)
    "num_correct",  # correct completions with at least one step
    "num_incorrect",  # incorrect completions with at least one step
    "score_sum_correct",  # sum of trajectory scores (geometric mean of step scores) of correct completions
    "score_sum_incorrect",
    "agree_sum",  # steps where sign(z) matches the outcome (same as num_kept when the filter is on)
)


@dataclass
class SPRLossOutput:
    """Result of :func:`sprm_loss`.

    Args:
        loss: scalar SPR loss (differentiable; exactly ``0`` but still connected to ``step_logits`` when no step
            is kept).
        stats: additive float counters (see ``STAT_KEYS``) for this batch; sum them across processes before
            turning them into metrics with :func:`sprm_metrics_from_stats`.
        weights: ``[B, T]`` per-position weights ``w`` (zero outside kept steps), detached.
        trajectory_log_scores: ``[B]`` log trajectory scores (``-inf`` for no step), detached.
    """

    loss: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: torch.Tensor | None = None
    trajectory_log_scores: torch.Tensor | None = None

    def metrics(self) -> dict[str, float]:
        """This batch's metrics (local, not reduced across processes), see :func:`sprm_metrics_from_stats`."""
        return sprm_metrics_from_stats(self.stats)


def sprm_loss(
    step_logits: torch.Tensor,
    score_mask: torch.Tensor,
    outcome_correct: torch.Tensor,
    completion_truncated: torch.Tensor | None = None,
    *,
    agreement_filter: bool = True,
    class_balance: bool = True,
    positive_class_factor: float = 1.5,
    count_smoothing: float = 1.0,
    eps: float = 1e-5,
    exclude_truncated: bool = True,
    count_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> SPRLossOutput:
    """Self-supervised process reward loss of MetaStone-S1 (paper defaults).

    Args:
        step_logits: ``[B, T]`` SPRM logits (any positions; only ``score_mask`` positions are used).
        score_mask: ``[B, T]`` bool, the positions whose logit scores a step, i.e. the output of
            ``model.sprm_score_mask(input_ids, attention_mask)`` (the one official step mask; do not rebuild it).
        outcome_correct: ``[B]`` bool (or 0/1) outcome label of each completion (correct = reward > threshold).
        completion_truncated: ``[B]`` bool, completions that hit the length limit without EOS. With
            ``exclude_truncated`` their steps are ignored (the outcome of a cut-off answer says nothing about its
            steps). ``None``: no completion is truncated.
        agreement_filter: the paper's dynamic weight: keep a step only if the head already agrees with the
            outcome (``z > 0`` for a correct, ``z < 0`` for an incorrect completion). ``False`` keeps every step.
        class_balance: weight kept positive steps by ``positive_class_factor * neg_count / total`` and kept
            negative steps by ``pos_count / total`` (paper). ``False``: every kept step has weight 1.
        positive_class_factor: extra factor on positive (correct-completion) steps in the class balance (paper: 1.5).
        count_smoothing: added once to each class count, ``pos_count = kept positives + 1`` (paper: 1), so
            an empty class gives finite weights.
        eps: added to ``sum(w)`` in the normaliser ``sum(bce * w) / (sum(w) + eps)`` (paper: 1e-5).
        exclude_truncated: drop the steps of truncated completions (the official intent). ``False`` labels them by
            their outcome like any other completion (what the official code does in practice).
        count_reduce: sums a ``[2]`` tensor of local (kept positive, kept negative) counts over processes, e.g.
            ``lambda t: accelerator.reduce(t, "sum")``; the smoothing is added once, after the sum, so the weights
            do not depend on the number of processes. ``None``: local counts (single process). In distributed
            runs every process must call it the same number of times.

    Returns:
        [`SPRLossOutput`] with the scalar ``loss``, additive ``stats``, the weights and trajectory log scores.
    """
    if step_logits.ndim != 2 or score_mask.shape != step_logits.shape:
        raise ValueError(
            f"`step_logits` and `score_mask` must both be [batch, seq_len]; got {tuple(step_logits.shape)} and "
            f"{tuple(score_mask.shape)}."
        )
    batch = step_logits.shape[0]
    device = step_logits.device
    label = torch.as_tensor(outcome_correct, device=device).reshape(-1).to(torch.bool)
    if label.shape[0] != batch:
        raise ValueError(f"`outcome_correct` has {label.shape[0]} entries for a batch of {batch}.")
    if completion_truncated is None:
        truncated = torch.zeros(batch, dtype=torch.bool, device=device)
    else:
        truncated = torch.as_tensor(completion_truncated, device=device).reshape(-1).to(torch.bool)
        if truncated.shape[0] != batch:
            raise ValueError(f"`completion_truncated` has {truncated.shape[0]} entries for a batch of {batch}.")

    logits = step_logits.float()
    used_rows = ~truncated if exclude_truncated else torch.ones_like(truncated)
    steps = score_mask.to(torch.bool) & used_rows[:, None]
    target = label[:, None].expand_as(steps)
    # Agreement with the outcome, read from the detached logit (the filter is a weight, not a gradient path).
    z = logits.detach()
    agrees = torch.where(target, z > 0, z < 0)
    kept = steps & agrees if agreement_filter else steps
    kept_pos = kept & target
    kept_neg = kept & ~target

    if class_balance:
        counts = torch.stack([kept_pos.sum(), kept_neg.sum()]).to(torch.float32)
        if count_reduce is not None:
            counts = count_reduce(counts)
        pos_count = counts[0] + count_smoothing
        neg_count = counts[1] + count_smoothing
        total = pos_count + neg_count
        pos_weight = positive_class_factor * neg_count / total
        neg_weight = pos_count / total
        weights = kept_pos.float() * pos_weight + kept_neg.float() * neg_weight
    else:
        weights = kept.float()

    bce = F.binary_cross_entropy_with_logits(logits, target.float(), reduction="none")
    # `where` (not multiplication) so that an inf/NaN logit outside the kept steps cannot poison the sum.
    weighted = torch.where(kept, bce * weights, torch.zeros_like(bce))
    loss = weighted.sum() / (weights.sum() + eps)

    with torch.no_grad():
        log_scores = sprm_trajectory_log_scores(logits.detach(), steps)
        has_steps = steps.any(dim=1)
        correct_rows = has_steps & label
        incorrect_rows = has_steps & ~label
        scores = log_scores.exp()
        zero = torch.zeros((), device=device)
        stats = {
            "num_completions": used_rows.sum().float(),
            "num_steps": steps.sum().float(),
            "num_kept": kept.sum().float(),
            "num_kept_pos": kept_pos.sum().float(),
            "num_kept_neg": kept_neg.sum().float(),
            "num_steps_pos": (steps & target).sum().float(),
            "bce_sum": torch.where(steps, bce.detach(), zero).sum(),
            "num_correct": correct_rows.sum().float(),
            "num_incorrect": incorrect_rows.sum().float(),
            "score_sum_correct": torch.where(correct_rows, scores, zero).sum(),
            "score_sum_incorrect": torch.where(incorrect_rows, scores, zero).sum(),
            "agree_sum": (steps & agrees).sum().float(),
        }
    return SPRLossOutput(loss=loss, stats=stats, weights=weights.detach(), trajectory_log_scores=log_scores)


def stack_stats(stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Stack ``stats`` into one float tensor in ``STAT_KEYS`` order (one collective call reduces them all)."""
    return torch.stack([stats[key].float().reshape(()) for key in STAT_KEYS])


def sprm_metrics_from_stats(stats: Mapping[str, torch.Tensor | float]) -> dict[str, float]:
    """Metrics from (possibly process-summed) counters; ``nan`` where a ratio has no denominator.

    Keys: ``kept_fraction`` (kept / scored steps), ``kept_pos`` / ``kept_neg`` (kept steps of correct /
    incorrect completions), ``steps`` (scored steps), ``steps_per_completion``, ``pos_step_fraction``,
    ``agreement`` (fraction of steps whose sign matches the outcome), ``bce`` (mean unweighted BCE over steps),
    ``score_correct`` / ``score_incorrect`` (mean trajectory score of correct / incorrect completions with at
    least one step) and ``score_gap`` (their difference).
    """
    s = {key: float(value) for key, value in stats.items()}

    def ratio(num: float, den: float) -> float:
        return num / den if den > 0 else math.nan

    score_correct = ratio(s["score_sum_correct"], s["num_correct"])
    score_incorrect = ratio(s["score_sum_incorrect"], s["num_incorrect"])
    return {
        "kept_fraction": ratio(s["num_kept"], s["num_steps"]),
        "kept_pos": s["num_kept_pos"],
        "kept_neg": s["num_kept_neg"],
        "steps": s["num_steps"],
        "steps_per_completion": ratio(s["num_steps"], s["num_completions"]),
        "pos_step_fraction": ratio(s["num_steps_pos"], s["num_steps"]),
        "agreement": ratio(s["agree_sum"], s["num_steps"]),
        "bce": ratio(s["bce_sum"], s["num_steps"]),
        "score_correct": score_correct,
        "score_incorrect": score_incorrect,
        "score_gap": score_correct - score_incorrect,
    }


def grad_scaled_features(features: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity in the forward pass; scales the gradient flowing back into ``features`` by ``scale``.

    ``f * scale + f.detach() * (1 - scale)`` (official). ``scale=1`` is the identity, ``scale=0`` detaches.
    """
    if scale == 1.0:
        return features
    if scale == 0.0:
        return features.detach()
    return features * scale + features.detach() * (1.0 - scale)


__all__ = [
    "STAT_KEYS",
    "SPRLossOutput",
    "grad_scaled_features",
    "sprm_loss",
    "sprm_metrics_from_stats",
    "stack_stats",
]
