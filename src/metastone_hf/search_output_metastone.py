"""What a search returns: the search tree, and the candidates assembled, scored and selected into a [`SearchOutput`].

[`build_search_output`] takes the first N trajectories each prompt finished, pads them into ``[B, N, T]``, applies
THE step mask ([`sprm_step_token_mask`]) to the finished sequences to decide which recorded steps count, checks that
every counted step has its online logit, and lets the selection rule pick one candidate per prompt.

This file is part of the remote-code set copied into saved checkpoints: it imports only ``torch``, ``transformers``
and its sibling scoring, selection and rows files.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.utils import ModelOutput

from .scoring_metastone import build_sprm_scores
from .search_rows_metastone import FinishedTrajectory, StepRecords
from .selection_metastone import (
    AnswerExtractor,
    SelectionStrategy,
    decode_answers,
    extract_boxed_answer,
    resolve_selection,
)


@dataclass
class SearchNode:
    """One segment of the search tree: the tokens a row decoded between two selections.

    Positions are in trajectory coordinates (the prompt's columns, then the generated tokens), ``end`` excluded.
    A candidate's trajectory is its leaf node's segment after all its ancestors' segments.

    Args:
        id: index of the node in its prompt's ``search_tree``.
        parent: the parent node's id (``None`` for the prompt's root).
        start / end: the segment's positions.
        round: the expansion that created it (1 for the prompt's children; 0 for the root).
        group: its subtree (DVTS; 0 otherwise).
        step_score: ``sigmoid`` of the step the segment ends with, when it ends at a step boundary.
        status: ``"root"``, ``"expanded"`` (selected, has children), ``"dropped"`` (not selected), ``"completed"``
            (a returned candidate), ``"pruned"`` (stopped by pruning, returned), or ``"surplus"`` (finished after
            the prompt already had its N candidates).
    """

    id: int
    parent: int | None
    start: int
    end: int
    round: int = 0
    group: int = 0
    step_score: float | None = None
    status: str = "open"


@dataclass
class SearchOutput(ModelOutput):
    """Result of a search ``generate``: the chosen trajectory per prompt plus every candidate and its SPRM score.

    ``B`` prompts, ``N`` candidates each, ``T`` = prompt length + the longest generated length (rows that stopped
    early are padded with ``pad_token_id``).

    Args:
        sequences: ``[B, T]`` the chosen candidate of each prompt (prompt included, like ``generate``).
        candidates: ``[B, N, T]`` all candidates (Best-of-N: in sampling order; beam search and DVTS: in the
            order they finished).
        candidate_attention_mask: ``[B, N, T]`` 1 for real tokens: the prompt's mask, then the generated tokens up
            to and including the token that stopped the candidate; 0 for the padding that follows.
        scores: ``[B, N]`` trajectory scores, the geometric mean of the step scores (0 for a candidate without steps).
        log_scores: ``[B, N]`` their logs, ``mean(logsigmoid(step logits))`` (``-inf`` without steps).
        step_scores: ``step_scores[b][j]`` the 1-D tensor of ``sigmoid`` step scores of candidate ``j`` of prompt ``b``.
        step_positions: same layout, the positions whose logit scored each step (one before each step token).
        num_steps: ``[B, N]`` number of scored steps.
        chosen_index: ``[B]`` index in ``0..N-1`` of the chosen candidate: a pruned one only when pruning stopped every
            candidate of the prompt (then the selection runs over all of them).
        answers: ``answers[b][j]`` the extracted answer (``None`` when none was found), when the selection strategy
            used answers; ``None`` otherwise.
        num_generated_tokens: ``[B, N]`` real generated tokens per candidate (EOS included, padding excluded).
        pruned: ``[B, N]`` candidates stopped early: by SPRM-guided pruning, or by adaptive compute (below the
            threshold, or still running when the prompt reached its consensus; unused candidates are ``True`` too).
            All ``False`` when both are off.
        tokens_saved: for each pruned candidate, ``max_new_tokens`` minus the tokens it had generated when pruned:
            the decode slots it gave up, up to the length limit (an upper bound: it might have stopped earlier).
            Pruned rows leave the batch, so these tokens are never computed.
        scoring_state_bytes: bytes of the step records kept for scoring: an int64 position and a float32 logit per
            step of every returned candidate; no hidden state is kept.
        search: the strategy: ``"best_of_n"``, ``"beam"`` or ``"dvts"``.
        search_tree: ``search_tree[b]`` the [`SearchNode`]s of prompt ``b`` (node 0 is the prompt).
        candidate_nodes: ``[B, N]`` the leaf node of each candidate in ``search_tree``.
        tokens_generated: tokens sampled in all, every branch included (dropped ones too).
        tokens_processed: token positions the backbone processed: the prompts once, then each sampled token at most
            once.
        used: ``[B, N]`` adaptive compute only (``None`` otherwise): the candidates that were sampled; a prompt that
            reached its consensus early leaves the rest unused (empty, score 0, never chosen).
            ``used.sum(1)`` is the candidates each prompt used, ``num_generated_tokens.sum(1)`` its generated tokens
            (stopped candidates included).
        adaptive_statistic: ``[B, N]`` adaptive compute only: each candidate's statistic of the signal when it ended
            (lowest sliding-window mean; NaN for unused candidates). ``pruned`` flags the candidates stopped early.
        adaptive_threshold: ``[B]`` adaptive compute only: each prompt's stopping threshold, from its warm-up
            candidates (``-inf``: none).
        prompt_decode_steps: ``[B]`` adaptive compute only: decode steps in which the prompt had a candidate decoding.
    """

    sequences: torch.LongTensor | None = None
    candidates: torch.LongTensor | None = None
    candidate_attention_mask: torch.LongTensor | None = None
    scores: torch.FloatTensor | None = None
    log_scores: torch.FloatTensor | None = None
    step_scores: list[list[torch.Tensor]] | None = None
    step_positions: list[list[torch.Tensor]] | None = None
    num_steps: torch.LongTensor | None = None
    chosen_index: torch.LongTensor | None = None
    answers: list[list[Hashable | None]] | None = None
    num_generated_tokens: torch.LongTensor | None = None
    pruned: torch.BoolTensor | None = None
    tokens_saved: int | None = None
    scoring_state_bytes: int | None = None
    search: str | None = None
    search_tree: list[list[SearchNode]] | None = None
    candidate_nodes: torch.LongTensor | None = None
    tokens_generated: int | None = None
    tokens_processed: int | None = None
    used: torch.BoolTensor | None = None
    adaptive_statistic: torch.FloatTensor | None = None
    adaptive_threshold: torch.FloatTensor | None = None
    prompt_decode_steps: torch.LongTensor | None = None


def build_search_output(
    model: Any,
    finished: Sequence[FinishedTrajectory],
    tree: list[list[SearchNode]],
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    num_candidates: int,
    pad_token_id: int,
    max_new_tokens: int,
    search: str,
    selection: str | SelectionStrategy = "sprm",
    answer_extractor: AnswerExtractor | None = None,
    tokenizer: Any | None = None,
    tokens_generated: int = 0,
    tokens_processed: int = 0,
    adaptive: dict[str, Any] | None = None,
) -> SearchOutput:
    """The first N finished trajectories of each prompt, scored with THE step mask, and the selected one.

    Args:
        model: the model whose ``sprm_score_mask`` decides which recorded steps count.
        finished: every trajectory that stopped, in any order (each prompt's are ordered by ``(round, slot)``); the
            ones after a prompt's first N are marked ``"surplus"`` in ``tree``.
        prompt_ids / prompt_mask: ``[B, P]`` the prompts, as given to ``generate``.
        selection / answer_extractor / tokenizer: the selection rule; voting decodes the completions with
            ``tokenizer`` and reads their answers with ``answer_extractor``.
        tokens_generated / tokens_processed: the search's token accounting, returned as is.
        adaptive: adaptive compute's per-prompt ``threshold`` and ``decode_steps`` lists (and whether the candidates'
            statistics replace the SPRM scores in the selection: the confidence signal); a prompt may then have fewer
            than N candidates, the missing ones returned empty and unused.
    """
    strategy, needs_answers = resolve_selection(selection)
    if callable(selection) and tokenizer is not None:
        needs_answers = True
    n, batch, prompt_length = num_candidates, prompt_ids.shape[0], prompt_ids.shape[1]
    per_prompt: list[list[FinishedTrajectory]] = [[] for _ in range(batch)]
    for f in sorted(finished, key=lambda f: f.order):
        per_prompt[f.prompt].append(f)
    for prompt, trajectories in enumerate(per_prompt):
        if adaptive is not None and 0 < len(trajectories) < n:  # unused candidates: empty, never chosen
            empty = prompt_ids.new_zeros(0)
            records = trajectories[0].records  # the prompt's own steps are recorded with every candidate
            kept = [i for i, position in enumerate(records.positions) if position < prompt_length]
            prompt_records = StepRecords(
                array("q", [records.positions[i] for i in kept]), array("f", [records.logits[i] for i in kept])
            )
            trajectories += [
                FinishedTrajectory(prompt, -1, (-1, -1), empty, prompt_records.copy(), math.nan, 0, True)
                for _ in range(n - len(trajectories))
            ]
        if len(trajectories) < n:
            raise RuntimeError(f"Internal error: prompt {prompt} finished {len(trajectories)} of {n} candidates.")
        for f in trajectories[n:]:
            tree[prompt][f.node].status = "surplus"
    chosen_trajectories = [f for trajectories in per_prompt for f in trajectories[:n]]
    device = prompt_ids.device
    total_length = prompt_length + max(len(f.generated) for f in chosen_trajectories)
    rows = len(chosen_trajectories)
    sequences = torch.full((rows, total_length), pad_token_id, dtype=prompt_ids.dtype, device=device)
    mask = torch.zeros((rows, total_length), dtype=torch.long, device=device)
    sequences[:, :prompt_length] = prompt_ids.repeat_interleave(n, dim=0)
    mask[:, :prompt_length] = prompt_mask.repeat_interleave(n, dim=0)
    step_logits = torch.zeros((rows, total_length), device=device)
    recorded = torch.zeros((rows, total_length), dtype=torch.bool, device=device)
    for i, f in enumerate(chosen_trajectories):
        sequences[i, prompt_length : prompt_length + len(f.generated)] = f.generated
        mask[i, prompt_length : prompt_length + len(f.generated)] = 1
        for position, logit in zip(f.records.positions, f.records.logits):
            step_logits[i, position] = logit
            recorded[i, position] = True
    score_mask = model.sprm_score_mask(sequences, mask)
    if bool((score_mask & ~recorded).any()):
        raise RuntimeError("Internal error: a scored step has no online SPRM logit.")
    result = build_sprm_scores(step_logits, score_mask)  # warns about non-finite rows

    # Strategies rank float64 scores: float32 `exp` rounds scores within ~6e-8 of 1 to exactly 1.0 (ties).
    ranking_scores = result.log_scores.double().exp().view(batch, n)
    answers: list[list[Hashable | None]] | None = None
    if needs_answers:
        flat = decode_answers(tokenizer, sequences, mask, prompt_length, answer_extractor or extract_boxed_answer)
        answers = [flat[b * n : (b + 1) * n] for b in range(batch)]
    pruned = torch.tensor([f.pruned for f in chosen_trajectories], device=device)
    used = [f.node >= 0 for f in chosen_trajectories]
    statistic = torch.tensor([f.statistic for f in chosen_trajectories], dtype=torch.float64, device=device)
    if adaptive is not None and adaptive.get("weights_are_statistics"):
        ranking_scores = statistic.view(batch, n).nan_to_num(nan=-math.inf)  # the confidence signal: no verifier
    chosen = []
    for b in range(batch):
        # Pruned candidates never finished: returned, but neither win nor vote, unless all of them were pruned.
        mine = [j for j in range(n) if used[b * n + j]]
        finished_here = [j for j in mine if not bool(pruned[b * n + j])] or mine
        if adaptive is not None and adaptive.get("weights_are_statistics"):  # DeepConf: warm-up below the bar out
            bar = adaptive["threshold"][b]
            finished_here = [j for j in finished_here if float(statistic[b * n + j]) >= bar] or finished_here
        pick = int(
            strategy(
                ranking_scores[b, finished_here],
                None if answers is None else [answers[b][j] for j in finished_here],
            )
        )
        if not 0 <= pick < len(finished_here):
            raise ValueError(f"The selection strategy returned index {pick}, outside 0..{len(finished_here) - 1}.")
        chosen.append(finished_here[pick])
    chosen_index = torch.tensor(chosen, dtype=torch.long, device=device)
    candidates = sequences.view(batch, n, total_length)
    generated = torch.tensor([len(f.generated) for f in chosen_trajectories], device=device)

    def per_prompt_lists(items: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        return [items[b * n : (b + 1) * n] for b in range(batch)]

    return SearchOutput(
        sequences=candidates[torch.arange(batch, device=device), chosen_index],
        candidates=candidates,
        candidate_attention_mask=mask.view(batch, n, total_length),
        scores=result.scores.view(batch, n),
        log_scores=result.log_scores.view(batch, n),
        step_scores=per_prompt_lists(result.step_scores),
        step_positions=per_prompt_lists(result.step_positions),
        num_steps=result.num_steps.view(batch, n),
        chosen_index=chosen_index,
        answers=answers,
        num_generated_tokens=generated.view(batch, n),
        pruned=pruned.view(batch, n),
        tokens_saved=int(((max_new_tokens - generated) * pruned).sum()),
        scoring_state_bytes=sum(f.records.nbytes for f in chosen_trajectories),
        search=search,
        search_tree=tree,
        candidate_nodes=torch.tensor([f.node for f in chosen_trajectories], device=device).view(batch, n),
        tokens_generated=tokens_generated,
        tokens_processed=tokens_processed,
        **(
            {}
            if adaptive is None
            else {
                "used": torch.tensor(used, device=device).view(batch, n),
                "adaptive_statistic": statistic.float().view(batch, n),
                "adaptive_threshold": torch.tensor(adaptive["threshold"], device=device),
                "prompt_decode_steps": torch.tensor(adaptive["decode_steps"], device=device),
            }
        ),
    )


__all__ = ["SearchNode", "SearchOutput", "build_search_output"]
