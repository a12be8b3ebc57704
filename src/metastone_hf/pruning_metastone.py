"""SPRM-guided pruning of Best-of-N candidates: which running rows stop early.

Opt-in (``prune_threshold`` / ``prune_top_k`` of ``generate``): a candidate whose running trajectory score falls
below a threshold, or outside its prompt's k best, stops and leaves the batch, so the tokens it would still have
generated are never computed. A prompt always keeps a candidate that can finish.

This file is part of the remote-code set copied into saved checkpoints: it imports only ``torch`` and its sibling
rows file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .search_rows_metastone import FinishedTrajectory


@dataclass
class Pruning:
    """The pruning policy.

    Args:
        threshold: stop a candidate whose running score (geometric mean of its steps so far) is below this value.
        top_k: stop a candidate outside its prompt's ``top_k`` best running scores (finished candidates included).
        min_steps: only candidates with at least this many scored steps are judged.
    """

    threshold: float | None = None
    top_k: int | None = None
    min_steps: int = 3

    @property
    def active(self) -> bool:
        return self.threshold is not None or self.top_k is not None

    def rows_to_prune(
        self,
        prompt: torch.Tensor,
        slot: torch.Tensor,
        scores: tuple[torch.Tensor, torch.Tensor],
        running: torch.Tensor,
        finishing: torch.Tensor,
        finished: Sequence[FinishedTrajectory],
    ) -> torch.Tensor:
        """Running rows to stop: below the threshold, or outside their prompt's ``top_k`` (eligible candidates).

        Competitors of a prompt are its rows still decoding and its finished candidates (pruned ones excluded), ranked
        by running log score, earlier slot first on ties. A prompt always keeps a candidate that can finish: if all
        its running rows would stop and none has finished, its best running row is spared (one without enough
        steps yet counts as best).

        Args:
            prompt / slot: ``[R]`` each row's prompt and sampling slot.
            scores: ``[R]`` running mean log step scores and ``[R]`` their numbers of steps.
            running: ``[R]`` rows still decoding after this token; ``finishing``: rows that finish with it.
            finished: the trajectories that stopped before.
        """
        log_scores, counts = scores
        eligible = counts >= self.min_steps
        stop = torch.zeros_like(running)
        if self.threshold is not None:
            stop |= eligible & (log_scores < math.log(self.threshold))
        finished_by_prompt: dict[int, list[FinishedTrajectory]] = {}
        for f in finished:
            finished_by_prompt.setdefault(f.prompt, []).append(f)
        for b in sorted(set(prompt[running].tolist())):
            done_before = [f for f in finished_by_prompt.get(b, []) if not f.pruned]
            members = (prompt == b).nonzero().flatten().tolist()
            if self.top_k is not None:
                competitors = [(f.log_score, f.order[1], None) for f in done_before if f.num_steps >= self.min_steps]
                competitors += [
                    (float(log_scores[i]), int(slot[i]), i)
                    for i in members
                    if bool(eligible[i]) and bool(running[i] | finishing[i])
                ]
                competitors.sort(key=lambda c: (-c[0], c[1]))
                for rank, (_, _, i) in enumerate(competitors):
                    if i is not None and rank >= self.top_k:
                        stop[i] = True
            stop &= running
            can_finish = done_before or any(bool(finishing[i] | (running[i] & ~stop[i])) for i in members)
            if not can_finish:
                candidates = [i for i in members if bool(running[i])]
                preference = [
                    (float(log_scores[i]) if bool(eligible[i]) else math.inf, -int(slot[i])) for i in candidates
                ]
                stop[candidates[max(range(len(candidates)), key=preference.__getitem__)]] = False
        return stop & running


__all__ = ["Pruning"]
