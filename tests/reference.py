"""Slow, obvious re-implementations of the official MetaStone-S1 semantics, for tests only.

Written from the specification, one Python loop per rule, independent of the vectorised code under test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def reference_step_token_positions(
    ids: Sequence[int], step_ids: Sequence[int], think_start: int | None, think_end: int | None
) -> list[int]:
    """Positions of kept step tokens in one unpadded sequence."""
    ids = list(ids)
    n = len(ids)
    start = -1
    if think_start is not None and think_start in ids:
        start = ids.index(think_start)
    end = n
    if think_end is not None and think_end in ids:
        end = n - 1 - ids[::-1].index(think_end)
    kept = []
    for t in range(n):
        if ids[t] not in step_ids:
            continue  # rule 1
        if t == 0:
            continue  # nothing before it to read a score from
        if ids[t - 1] in step_ids:
            continue  # rule 2: only the first of a run
        if think_start is not None and ids[t - 1] == think_start:
            continue  # rule 3
        if not (start < t < end):
            continue  # rule 4
        kept.append(t)
    return kept


def reference_score_positions(ids, step_ids, think_start, think_end) -> list[int]:
    """Rule 5: a step's score is read one position before its step token."""
    return [t - 1 for t in reference_step_token_positions(ids, step_ids, think_start, think_end)]


def reference_trajectory_score(step_logits: Sequence[float]) -> float:
    """Geometric mean of sigmoid(step logit), the literal product form (fine for short float64 lists)."""
    if len(step_logits) == 0:
        return 0.0
    product = 1.0
    for z in step_logits:
        product *= 1.0 / (1.0 + math.exp(-float(z)))
    return product ** (1.0 / len(step_logits))


def reference_official_scores(qwen_model, head: torch.nn.Module, ids: Sequence[int], step_ids, think_start, think_end):
    """Score one trajectory like the official server: a full forward keeping *all* hidden states, then
    ``hidden_states[-2]`` at the score positions through the head."""
    with torch.no_grad():
        out = qwen_model(torch.tensor([list(ids)]), output_hidden_states=True)
        features = out.hidden_states[-2][0]
        positions = reference_score_positions(ids, step_ids, think_start, think_end)
        logits = [head(features[p]).reshape(()).item() for p in positions]
    return reference_trajectory_score(logits), logits


def reference_majority(answers: Sequence) -> int:
    """Self-consistency: the first candidate of the most frequent answer (ties: the answer seen first); candidates
    without an answer (``None``) do not vote; 0 when none has one."""
    seen: list = []
    for answer in answers:
        if answer is not None and answer not in seen:
            seen.append(answer)
    if not seen:
        return 0
    best = seen[0]
    for answer in seen[1:]:
        if list(answers).count(answer) > list(answers).count(best):
            best = answer
    return list(answers).index(best)


def reference_sprm_vote(scores: Sequence[float], answers: Sequence) -> int:
    """SPRM-weighted vote: the answer with the largest sum of its candidates' scores (NaN weighs 0; ties: the answer
    whose best candidate scores higher, then the one seen first) returns its best-scored candidate (the first on
    ties); with no answer at all, the best-scored candidate (NaN ranks last)."""
    scores = [float("-inf") if math.isnan(float(s)) else float(s) for s in scores]

    def best_of(indices: list[int]) -> int:
        best = indices[0]
        for j in indices[1:]:
            if scores[j] > scores[best]:
                best = j
        return best

    seen: list = []
    for answer in answers:
        if answer is not None and answer not in seen:
            seen.append(answer)
    if not seen:
        return best_of(list(range(len(scores))))
    weight = {a: sum(max(scores[j], 0.0) for j in range(len(scores)) if answers[j] == a) for a in seen}
    top = {a: best_of([j for j in range(len(scores)) if answers[j] == a]) for a in seen}
    winner = seen[0]
    for answer in seen[1:]:
        if (weight[answer], scores[top[answer]]) > (weight[winner], scores[top[winner]]):
            winner = answer
    return top[winner]
