"""Adaptive test-time compute for Best-of-N: the step score decides when a candidate, and a question, has had enough.

Modelled on DeepConf's online mode (Fu et al. 2025, "Deep Think with Confidence"), with the SPRM head's step scores
as the signal (or, as the baseline, DeepConf's own token confidence):

* **Warm-up.** Per prompt, the first ``warmup`` candidates run to their end. Their statistics (below) set the
  prompt's stopping threshold: the ``100 - keep_percent`` percentile (linear interpolation, as ``numpy.percentile``),
  so ``keep_percent=90`` keeps about 90% of the warm-up candidates above it (DeepConf-high) and ``keep_percent=10``
  about 10% (DeepConf-low).
* **Early stopping.** Every later candidate stops the moment its statistic falls below the threshold; it is
  returned flagged ``pruned`` (never chosen while a candidate of the prompt finished), its tokens counted.
* **Adaptive number of candidates.** Candidates are admitted in waves up to N: after the warm-up, up to
  ``parallel`` candidates of a prompt are in flight, and a candidate that finishes or stops frees its slot for the
  prompt's next one. After the warm-up and after every later candidate that ends, the prompt stops (its
  running candidates stopped too) once its consensus reaches ``consensus``.

The statistic of a candidate, for both signals, is its **lowest sliding-window mean**: the values ``v_1, v_2, ...``
arrive one by one; while fewer than ``window`` values exist the statistic is their mean (and no stop is decided);
afterwards it is the lowest mean of ``window`` consecutive values so far. It only decreases as the candidate goes on,
so a candidate stopped when it crossed the threshold would have ended below it anyway (DeepConf's "lowest group
confidence"). The values are:

* ``signal="sprm"``: the SPRM log step score ``log sigmoid(z)`` of every step that counts when it is sampled (the
  incremental step rule: a later ``</think>`` does not revise it), read from the forward that sampled the step. A
  candidate without steps has statistic ``-inf``. With ``window=1`` the statistic is the candidate's worst step.
* ``signal="confidence"`` (DeepConf): the token confidence ``C_t = -(1/k) sum_{j<=k} log p_t(j)`` of every sampled
  token, where ``p_t(1) >= p_t(2) >= ...`` are the ``confidence_top_k`` largest probabilities of the processed
  next-token distribution (temperature, repetition penalty and the other logits processors applied, the truncating
  warpers top-k, top-p, min-p, typical, epsilon and eta left out: they would put ``-inf`` on the tail that the
  confidence measures). Higher is more confident; DeepConf's window is 2048 tokens, ``k`` = 20.

Consensus (``consensus_by``):

* ``"vote"``: the weighted vote share of the leading answer, ``max_a W(a) / sum_a W(a)``, over the prompt's voters:
  every warm-up candidate and every later candidate that finished without being stopped, with an answer (DeepConf's
  Algorithm 2: the warm-up traces, then each trace that passes the threshold). Weights: the SPRM trajectory score
  (geometric mean of the step scores) for ``"sprm"``, the statistic (lowest window confidence) for
  ``"confidence"``. Needs ``tokenizer=``.
* ``"score"`` (``"sprm"`` only): the best SPRM trajectory score among the finished candidates.

The final pick is the ``selection`` over the finished, not stopped candidates. With ``"confidence"`` the
candidates are ranked (``"sprm"``) or weighed (``"sprm_vote"``: DeepConf's confidence-weighted vote) by their
statistic instead of the SPRM score, and warm-up candidates below the threshold are left out of it, as DeepConf's
online script does; so no verifier is used anywhere.

This file is part of the remote-code set copied into saved checkpoints: it imports only ``torch``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

SIGNALS = ("sprm", "confidence")
CONSENSUS_BY = ("vote", "score")


@dataclass(frozen=True)
class AdaptiveConfig:
    """Online early stopping and an adaptive number of candidates for Best-of-N (``generate(..., adaptive=...)``).

    Args:
        signal: ``"sprm"`` (the head's step scores) or ``"confidence"`` (DeepConf's token confidence, no verifier).
        warmup: candidates per prompt that run to their end and set the threshold (DeepConf: 16). At most N.
        keep_percent: the threshold is the ``100 - keep_percent`` percentile of the warm-up statistics (90: stop
            about the worst 10%, DeepConf-high; 10: keep about the best 10%, DeepConf-low). ``100`` sets no threshold
            (nothing is stopped early: only the consensus adapts).
        window: values per sliding window: steps for ``"sprm"`` (default 1: the worst step), tokens for
            ``"confidence"`` (DeepConf: 2048; default 64, the demo's trajectories are short).
        consensus: stop a prompt once its consensus reaches this value (DeepConf: 0.95); ``None``: never (all N
            candidates are admitted; only early stopping saves tokens).
        consensus_by: ``"vote"`` (signal-weighted vote share; needs ``tokenizer=``) or ``"score"`` (``"sprm"`` only:
            the best finished trajectory score).
        confidence_top_k: k of the token confidence (DeepConf: 20).
        parallel: candidates of a prompt in flight after the warm-up (default: ``warmup``); a finished or stopped
            candidate's slot takes the prompt's next one in the next decode step. With ``max_active_rows``, a prompt
            reserves ``max(warmup, parallel)`` rows.
        threshold_floor: a lower bound on the threshold of the candidates after the warm-up, in the statistic's
            units (``"sprm"``: a log step score, e.g. ``math.log(0.99)``; ``"confidence"``: a token confidence):
            their threshold is ``max(warm-up percentile, threshold_floor)``, so a candidate stops at a step the head
            scores below the floor even when every warm-up candidate went wrong and set a low percentile. ``None``
            (default): the percentile alone, as DeepConf. Calibrate it on held-out questions (e.g. a low percentile
            of the statistic of right candidates); with ``keep_percent=100`` it is the threshold.
    """

    signal: str = "sprm"
    warmup: int = 4
    keep_percent: float = 90.0
    window: int | None = None
    consensus: float | None = 0.95
    consensus_by: str = "vote"
    confidence_top_k: int = 20
    parallel: int | None = None
    threshold_floor: float | None = None

    @property
    def window_size(self) -> int:
        return self.window if self.window is not None else (1 if self.signal == "sprm" else 64)

    @property
    def width(self) -> int:
        """Rows a prompt holds at most: the warm-up, then ``parallel``."""
        return max(self.warmup, self.parallel or self.warmup)

    def checked(self, num_candidates: int) -> AdaptiveConfig:
        """This config validated against N.

        Raises:
            ValueError: a field out of range.
        """
        if self.signal not in SIGNALS:
            raise ValueError(f"`adaptive.signal` must be one of {list(SIGNALS)}, got {self.signal!r}.")
        for name in ("warmup", "confidence_top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`adaptive.{name}` must be an int >= 1, got {value!r}.")
        for name in ("window", "parallel"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"`adaptive.{name}` must be an int >= 1 or None, got {value!r}.")
        if self.warmup > num_candidates:
            raise ValueError(f"`adaptive.warmup`={self.warmup} exceeds N={num_candidates}.")
        if not 0.0 < float(self.keep_percent) <= 100.0:
            raise ValueError(f"`adaptive.keep_percent` must be in (0, 100], got {self.keep_percent!r}.")
        if self.threshold_floor is not None and (
            isinstance(self.threshold_floor, bool)
            or not isinstance(self.threshold_floor, (int, float))
            or not math.isfinite(self.threshold_floor)
        ):
            raise ValueError(
                f"`adaptive.threshold_floor` must be a finite number or None, got {self.threshold_floor!r}."
            )
        if self.consensus is not None and not 0.0 < float(self.consensus) <= 1.0:
            raise ValueError(f"`adaptive.consensus` must be in (0, 1] or None, got {self.consensus!r}.")
        if self.consensus_by not in CONSENSUS_BY:
            raise ValueError(f"`adaptive.consensus_by` must be one of {list(CONSENSUS_BY)}, got {self.consensus_by!r}.")
        if self.consensus_by == "score" and self.signal != "sprm":
            raise ValueError("`adaptive.consensus_by='score'` needs `signal='sprm'` (a trajectory score in (0, 1)).")
        return self

    @classmethod
    def from_value(cls, value: AdaptiveConfig | dict | str | None) -> AdaptiveConfig | None:
        """``None``, an ``AdaptiveConfig``, a dict of its fields, or a signal name (``"sprm"``/``"confidence"``)."""
        if value is None or isinstance(value, AdaptiveConfig):
            return value
        if isinstance(value, str):
            return cls(signal=value)
        if isinstance(value, dict):
            return cls(**value)
        raise ValueError(f"`adaptive` must be None, an AdaptiveConfig, a dict or a signal name; got {value!r}.")


# ------------------------------------------------------------------------------------------------ statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values`` with linear interpolation (``numpy.percentile``'s default);
    ``-inf`` values are allowed (a neighbour at ``-inf`` gives ``-inf``)."""
    ordered = sorted(values)
    if not ordered:
        return -math.inf
    position = q / 100.0 * (len(ordered) - 1)
    lo, hi = math.floor(position), math.ceil(position)
    if lo == hi or ordered[lo] == ordered[hi] or math.isinf(ordered[lo]):
        return ordered[lo]
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (position - lo)


def lowest_window_mean(values: Sequence[float], window: int) -> float:
    """The statistic of a candidate from all its values: the mean of them all when fewer than ``window``, else the
    lowest mean of ``window`` consecutive values; ``-inf`` without values. (A plain reference; the search keeps the
    same statistic incrementally on the device.)"""
    if not values:
        return -math.inf
    if len(values) < window:
        return sum(values) / len(values)
    return min(sum(values[i : i + window]) / window for i in range(len(values) - window + 1))


def token_confidence(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """DeepConf's token confidence of each row: ``-mean`` of the ``top_k`` largest log-probabilities of
    ``softmax(logits)``. ``logits``: ``[R, V]`` (the processed, untruncated logits)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -log_probs.topk(min(top_k, log_probs.shape[-1]), dim=-1).values.mean(dim=-1)


def vote_share(answers: Sequence[Hashable | None], weights: Sequence[float]) -> float:
    """``max_a W(a) / sum_a W(a)``, ``W(a)`` the summed weights of the voters with answer ``a`` (``None`` answers
    and non-positive or NaN weights do not vote); 0 without votes."""
    totals: dict[Hashable, float] = {}
    for answer, weight in zip(answers, weights):
        if answer is None or not weight > 0.0:
            continue
        totals[answer] = totals.get(answer, 0.0) + float(weight)
    total = sum(totals.values())
    return max(totals.values()) / total if total > 0 else 0.0


class SignalState:
    """Per-row running statistic on the device, one ``[R, window + 4]`` float tensor per set of rows.

    Columns: the ``window`` last values (a ring), then the number of values, their sum, the lowest full-window mean
    (``+inf`` before the first full window) and the row's threshold (``-inf``: never stopped).
    """

    def __init__(self, window: int):
        self.window = window
        self.count, self.sum, self.low, self.threshold = window, window + 1, window + 2, window + 3

    def fresh(self, rows: int, device: torch.device) -> torch.Tensor:
        state = torch.zeros(rows, self.window + 4, device=device)
        state[:, self.low] = math.inf
        state[:, self.threshold] = -math.inf
        return state

    def update(self, state: torch.Tensor, values: torch.Tensor, take: torch.Tensor) -> torch.Tensor:
        """``state`` with ``values[i]`` appended to the rows where ``take[i]`` (no host sync)."""
        values = torch.where(take, values.float(), 0.0)
        count = state[:, self.count]
        ring = state[:, : self.window]
        slot = torch.remainder(count, self.window).long()
        # (not `one_hot`, which checks its input's range on the host)
        one_hot = (slot[:, None] == torch.arange(self.window, device=slot.device)) & take[:, None]
        ring = torch.where(one_hot, values[:, None], ring)
        count = count + take.float()
        full = take & (count >= self.window)
        low = torch.where(full, torch.minimum(state[:, self.low], ring.sum(dim=1) / self.window), state[:, self.low])
        return torch.cat(
            [ring, count[:, None], (state[:, self.sum] + values)[:, None], low[:, None], state[:, self.threshold :]],
            dim=1,
        )

    def statistic(self, state: torch.Tensor) -> torch.Tensor:
        """``[R]`` the lowest full-window mean, or the mean of the values while fewer than ``window`` (``-inf``
        without values)."""
        count = state[:, self.count]
        mean = torch.where(count > 0, state[:, self.sum] / count.clamp(min=1), -math.inf)
        return torch.where(count >= self.window, state[:, self.low], mean)

    def below(self, state: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        """``[R]`` rows whose statistic is below their threshold: running rows once a full window exists, rows that
        end (``final``) on their final statistic."""
        running = (state[:, self.count] >= self.window) & (state[:, self.low] < state[:, self.threshold])
        return torch.where(final, self.statistic(state) < state[:, self.threshold], running)


@dataclass
class PromptProgress:
    """The adaptive bookkeeping of one prompt, on the host."""

    admitted: int = 0  # candidates admitted so far (candidate k samples in slot k)
    in_flight: int = 0
    threshold: float = -math.inf
    warm: bool = False  # the warm-up candidates have all ended
    stopping: bool = False  # consensus reached (or N admitted): no more candidates
    cancelled: bool = False
    decode_steps: int = 0
    ended: list = field(default_factory=list)  # FinishedTrajectory, in the order they ended


__all__ = [
    "CONSENSUS_BY",
    "SIGNALS",
    "AdaptiveConfig",
    "PromptProgress",
    "SignalState",
    "lowest_window_mean",
    "percentile",
    "token_confidence",
    "vote_share",
]
