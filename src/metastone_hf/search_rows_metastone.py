"""The rows of a step-level search: one tensor entry per row, with the KV cache of the rows parked at a step.

A search decodes its rows in one batch. When a row reaches a step boundary it is *parked*: taken out of the batch
with its KV cache and its step-rule state until the round's selection. Parked rows of different lengths (and of
different prompts) are *merged* right aligned, a shorter row getting masked columns on its left exactly like left
padding, and the survivors are *resumed* as the next batch with one cache built from theirs. [`SearchRows`] owns
that bookkeeping; [`StepRecords`] keeps each row's scored steps, [`FinishedTrajectory`] a row that stopped for good.

This file is part of the remote-code set copied into saved checkpoints: it imports only ``torch`` and
``transformers``.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class StepRecords:
    """The steps of one trajectory, recorded as they are sampled: score positions (int64) and SPRM logits (float32).

    Every step candidate is kept (the rules that look back only); which of them count is decided at the end by the
    step mask of the finished sequence.
    """

    __slots__ = ("logits", "positions")

    def __init__(self, positions: array | None = None, logits: array | None = None):
        self.positions = array("q") if positions is None else positions
        self.logits = array("f") if logits is None else logits

    def add(self, position: int, logit: float) -> None:
        self.positions.append(position)
        self.logits.append(logit)

    def copy(self) -> StepRecords:
        return StepRecords(array("q", self.positions), array("f", self.logits))

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def nbytes(self) -> int:
        return len(self.positions) * self.positions.itemsize + len(self.logits) * self.logits.itemsize


@dataclass
class SearchRows:
    """Rows of the search as tensors (one entry per row), plus their step records.

    ``tokens``/``mask`` are right aligned: a row's real tokens end in the last column, and a row merged with longer
    ones gets masked columns on its left (like left padding). The last token has been sampled but not fed yet.
    ``kv`` holds the KV cache of parked rows (per layer, covering every column but the last); live rows keep theirs
    in the search's ``DynamicCache``.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    prompt: torch.Tensor  # index of the prompt
    group: torch.Tensor  # subtree of the prompt (DVTS); 0 otherwise
    node: torch.Tensor  # current node in the prompt's search tree
    slot: torch.Tensor  # sampling slot in the current round, which also orders the candidates
    generated: torch.Tensor  # generated tokens so far, the unfed last one included
    offset: torch.Tensor  # masked columns on the left: a trajectory position p is buffer column p + offset
    last_logit: torch.Tensor  # logit of the last step that counted (NaN before the first)
    # The incremental step rule's state (the last token, whether a `</think>` was seen): up to date for parked rows;
    # live rows keep theirs in the search's `rule`.
    previous: torch.Tensor
    seen_end: torch.Tensor
    records: list[StepRecords]
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    # Adaptive compute only: each row's running statistic and threshold (`adaptive_metastone.SignalState`).
    signal: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @staticmethod
    def empty(prompt_ids: torch.Tensor, rule: Any) -> SearchRows:
        """No rows (before any prompt is admitted), with the dtypes and devices of the prompts and the rule's state."""
        none = torch.zeros(0, dtype=torch.long, device=prompt_ids.device)
        return SearchRows(
            tokens=prompt_ids[:0], mask=prompt_ids[:0].long(), prompt=none, group=none, node=none, slot=none,
            generated=none, offset=none, last_logit=torch.zeros(0, device=prompt_ids.device),
            previous=rule.previous[:0], seen_end=rule.seen_end[:0], records=[],
        )  # fmt: skip

    def select(self, index: torch.Tensor) -> SearchRows:
        """Rows ``index`` (repeats allowed); a repeated row's records are copied, not shared."""
        picked = {name: getattr(self, name)[index] for name in _ROW_TENSORS}
        kv = None if self.kv is None else [(k[index], v[index]) for k, v in self.kv]
        signal = None if self.signal is None else self.signal[index]
        return SearchRows(**picked, records=[self.records[i].copy() for i in index.tolist()], kv=kv, signal=signal)

    def park(self, index: torch.Tensor, cache: DynamicCache, rule: Any) -> SearchRows:
        """Rows ``index`` of the live batch, taken out with their KV cache and their step-rule state.

        Raises:
            ValueError: the cache has layers other than full attention (sliding windows cannot be re-batched).
        """
        if any(type(layer) is not DynamicLayer for layer in cache.layers):
            kinds = sorted({type(layer).__name__ for layer in cache.layers})
            raise ValueError(
                f"Step-level search re-batches KV caches, which needs full-attention cache layers; this model's cache "
                f"has {kinds} (sliding-window or other attention). Use `search='best_of_n'`."
            )
        parked = self.select(index)
        parked.previous, parked.seen_end = rule.previous[index], rule.seen_end[index]
        parked.kv = [(layer.keys[index].clone(), layer.values[index].clone()) for layer in cache.layers]
        return parked

    @staticmethod
    def merge(parts: list[SearchRows]) -> SearchRows:
        """Concatenate parked rows of different lengths, right aligned (the shorter ones get masked columns)."""
        width = max(p.tokens.shape[1] for p in parts)
        merged = {name: torch.cat([getattr(p, name) for p in parts]) for name in _ROW_TENSORS[2:]}
        merged["offset"] = torch.cat([p.offset + width - p.tokens.shape[1] for p in parts])
        merged["tokens"] = torch.cat([F.pad(p.tokens, (width - p.tokens.shape[1], 0)) for p in parts])
        merged["mask"] = torch.cat([F.pad(p.mask, (width - p.mask.shape[1], 0)) for p in parts])
        # The cache covers every column but the last; pad its sequence dimension (-2) on the left.
        kv = [
            tuple(
                torch.cat([F.pad(p.kv[layer][i], (0, 0, width - p.tokens.shape[1], 0)) for p in parts]) for i in (0, 1)
            )
            for layer in range(len(parts[0].kv))
        ]
        signal = None if any(p.signal is None for p in parts) else torch.cat([p.signal for p in parts])
        return SearchRows(**merged, records=[r for p in parts for r in p.records], kv=kv, signal=signal)

    def resume(self, config: Any, rule: Any) -> DynamicCache:
        """Make these parked rows live again: their cache becomes one ``DynamicCache``, their state the rule's."""
        cache = DynamicCache(config=config)
        for layer, (keys, values) in enumerate(self.kv):
            cache.update(keys, values, layer)
        self.kv = None
        rule.previous, rule.seen_end = self.previous, self.seen_end
        return cache


_ROW_TENSORS = (
    "tokens", "mask", "prompt", "group", "node", "slot", "generated", "offset", "last_logit",
    "previous", "seen_end",
)  # fmt: skip


@dataclass
class FinishedTrajectory:
    """A trajectory that stopped for good: EOS, a stop string or criterion, the length limit, or pruning."""

    prompt: int
    node: int
    order: tuple[int, int]  # (round, slot): candidates are returned in this order
    generated: torch.Tensor
    records: StepRecords
    log_score: float  # running log score when it stopped (THE mask applied to it); only kept when pruning
    num_steps: int
    pruned: bool = False
    statistic: float = math.nan  # adaptive compute: the signal's statistic when it stopped (see adaptive_metastone)


__all__ = ["FinishedTrajectory", "SearchRows", "StepRecords"]
