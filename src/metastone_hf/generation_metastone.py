"""Test-time search guided by the MetaStone-S1 SPRM head: Best-of-N, beam search over steps, DVTS.

Entry point: ``model.generate(input_ids, num_candidates=N)``, ``model.generate(..., reasoning_effort="medium")``,
and ``search="beam"`` / ``search="dvts"`` with ``beam_width=M`` (see [`search_generate`]). Called without those
arguments, ``generate`` is transformers' own. Each strategy is a short function ([`best_of_n`], [`beam_search`],
[`dvts`]) that transformers' ``generate`` runs as its ``custom_generate`` decoding method, so the generation config,
logits processors and stopping criteria are transformers' own; they are composed from one engine, [`StepSearch`]:

* **Prefill once.** The prompts (all but their last token) go through the model once; the last prompt token is fed
  once per prompt, and its logits give every candidate its first token.
* **Decode to a boundary.** Rows decode in one batch until their next step token (beam search, DVTS) or until they
  finish (EOS, a stop string or stopping criterion, the length limit). A row that reaches its boundary leaves the
  batch and the KV cache at once (``Cache.batch_select_indices``), so later forwards are smaller.
* **Score online.** A step's score is the SPRM logit of the forward pass that sampled its step token (the head runs
  in that same forward, on the kept position); nothing is re-run and no hidden state is kept.
* **Select and expand.** At a step boundary the best beams of each group survive (ranked by their running
  geometric-mean score, or by their last step's score); each survivor's last token is fed once and its cache
  repeated for its children, so nothing already decoded is processed again.
* **Final scores** apply THE step mask ([`sprm_step_token_mask`]) to the finished trajectories, because its span
  rules depend on the whole sequence; they equal ``model.score_trajectories`` on the returned ids up to float noise.

Rows sample through [`RowwiseSampler`] (``sampling_metastone.py``): every logits processor and stopping criterion
sees each row's own tokens and per-row state, and one exponential variate per vocabulary entry and candidate slot,
``argmax(p / q)``, is exactly ``torch.multinomial``: a candidate's tokens do not depend on which other rows are
still in the batch, so removing stopped rows changes no sample.

This file is part of the remote-code set copied into saved checkpoints: it imports only ``torch``, ``transformers``
and its sibling sampling and scoring files; math-verify (for the default answer extractor) is imported lazily.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import re
from array import array
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F
from transformers import (
    DynamicCache,
    GenerationConfig,
    GenerationMixin,
    LogitsProcessorList,
    StoppingCriteriaList,
    StopStringCriteria,
)
from transformers.cache_utils import DynamicLayer
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria
from transformers.utils import ModelOutput
from transformers.utils.logging import tqdm

from .sampling_metastone import RowwiseSampler, check_prompt_seeds
from .scoring_metastone import (
    IncrementalStepRule,
    build_sprm_scores,
    check_token_batch,
    eval_mode,
    sprm_score_mask,
    sprm_step_token_mask,
)

# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


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
        pruned: ``[B, N]`` candidates stopped by SPRM-guided pruning (all ``False`` when pruning is off).
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


BestOfNOutput = SearchOutput
"""The output of Best-of-N ``generate`` (a [`SearchOutput`] with ``search="best_of_n"``)."""


# --------------------------------------------------------------------------------------------------
# Answer extraction and selection strategies
# --------------------------------------------------------------------------------------------------

AnswerExtractor = Callable[[str], Hashable | None]
"""Maps a decoded completion to a hashable answer key (equal keys vote together), or ``None`` when it has none."""

SelectionStrategy = Callable[[torch.Tensor, Sequence[Hashable | None] | None], int]
"""``(scores [N], answers or None) -> index`` of the chosen candidate of one prompt."""


def last_boxed_content(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` (or ``\fbox{...}``) in ``text``, braces balanced; ``None`` if absent."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        return None
    start = starts[-1]
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i].strip()
    return None  # unbalanced: the completion was cut inside the box


def extract_boxed_answer(text: str) -> str | None:
    r"""Default answer extractor: the last ``\boxed{...}``, normalised with math-verify.

    The content is parsed by ``math_verify.parse`` and keyed by its sympy form, so ``\frac{1}{2}``, ``1/2`` and
    ``0.5`` vote together; content math-verify cannot parse is keyed by its stripped text. ``None`` when the text
    has no complete ``\boxed{}``.

    Raises:
        ImportError: math-verify is not installed (``pip install "math-verify[antlr4_13_2]"``).
    """
    content = last_boxed_content(text)
    if content is None:
        return None
    try:  # lazy, and inside `try` so transformers' remote-code import check does not require it
        from math_verify import LatexExtractionConfig, parse
    except ImportError as error:
        raise ImportError(
            "The default Best-of-N answer extractor needs math-verify: `pip install 'math-verify[antlr4_13_2]'`, "
            "or pass your own `answer_extractor=` (a function str -> hashable answer or None)."
        ) from error
    parsed = parse("\\boxed{" + content + "}", extraction_config=[LatexExtractionConfig(boxed_match_priority=0)])
    return str(parsed[0]) if parsed else content


def rankable_scores(scores: torch.Tensor) -> torch.Tensor:
    """Scores as every ranking in this package compares them: float64, NaN (non-finite features, see
    ``score_trajectories``) ranking last, below every real score."""
    scores = scores.detach().double()  # float64: scores just below 1.0 must not tie
    return scores.masked_fill(scores.isnan(), float("-inf"))


def select_sprm(scores: torch.Tensor, answers: Sequence[Hashable | None] | None = None) -> int:
    """The paper's rule: the candidate with the highest SPRM trajectory score (first one on ties; NaN ranks last)."""
    return int(torch.argmax(rankable_scores(scores)))


def select_sprm_vote(scores: torch.Tensor, answers: Sequence[Hashable | None] | None) -> int:
    """SPRM-weighted vote: each answer collects the sum of its candidates' scores; the best-scored candidate of the
    heaviest answer wins (ties: the answer whose best candidate scores higher, then the first seen). Candidates
    without an answer do not vote, a NaN score weighs 0; if no candidate has an answer, falls back to
    [`select_sprm`]."""
    if answers is None:
        raise ValueError("`select_sprm_vote` needs the candidates' answers.")
    scores = rankable_scores(scores)
    weights: dict[Hashable, float] = {}
    best: dict[Hashable, int] = {}
    for j, answer in enumerate(answers):
        if answer is None:
            continue
        weights[answer] = weights.get(answer, 0.0) + max(float(scores[j]), 0.0)  # a NaN score weighs nothing
        if answer not in best or scores[j] > scores[best[answer]]:
            best[answer] = j
    if not weights:
        return select_sprm(scores)
    winner = max(weights, key=lambda a: (weights[a], float(scores[best[a]])))  # max keeps the first on full ties
    return best[winner]


def select_majority(scores: torch.Tensor, answers: Sequence[Hashable | None] | None) -> int:
    """Plain majority vote (self-consistency), SPRM scores unused: the first candidate of the most frequent answer
    (ties: the answer seen first). Candidates without an answer do not vote; if none has one, returns 0."""
    if answers is None:
        raise ValueError("`select_majority` needs the candidates' answers.")
    counts: dict[Hashable, int] = {}
    first: dict[Hashable, int] = {}
    for j, answer in enumerate(answers):
        if answer is None:
            continue
        counts[answer] = counts.get(answer, 0) + 1
        first.setdefault(answer, j)
    if not counts:
        return 0
    return first[max(counts, key=counts.__getitem__)]


SELECTION_STRATEGIES: dict[str, SelectionStrategy] = {
    "sprm": select_sprm,
    "sprm_vote": select_sprm_vote,
    "majority": select_majority,
}
_STRATEGIES_NEEDING_ANSWERS = {"sprm_vote", "majority"}


def _resolve_selection(selection: str | SelectionStrategy) -> tuple[SelectionStrategy, bool]:
    """(strategy, whether it needs answers); a callable gets answers when a tokenizer is available."""
    if callable(selection):
        return selection, False
    if selection not in SELECTION_STRATEGIES:
        raise ValueError(
            f"Unknown `selection`={selection!r}; valid: {sorted(SELECTION_STRATEGIES)} or a callable "
            "(scores [N], answers) -> index."
        )
    return SELECTION_STRATEGIES[selection], selection in _STRATEGIES_NEEDING_ANSWERS


# --------------------------------------------------------------------------------------------------
# The search engine
# --------------------------------------------------------------------------------------------------


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
class _Rows:
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

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def select(self, index: torch.Tensor) -> _Rows:
        """Rows ``index`` (repeats allowed); a repeated row's records are copied, not shared."""
        picked = {name: getattr(self, name)[index] for name in _ROW_TENSORS}
        kv = None if self.kv is None else [(k[index], v[index]) for k, v in self.kv]
        return _Rows(**picked, records=[self.records[i].copy() for i in index.tolist()], kv=kv)

    @staticmethod
    def merge(parts: list[_Rows]) -> _Rows:
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
        return _Rows(**merged, records=[r for p in parts for r in p.records], kv=kv)


_ROW_TENSORS = (
    "tokens", "mask", "prompt", "group", "node", "slot", "generated", "offset", "last_logit",
    "previous", "seen_end",
)  # fmt: skip


@dataclass
class _Finished:
    """A trajectory that stopped for good: EOS, a stop string or criterion, the length limit, or pruning."""

    prompt: int
    node: int
    order: tuple[int, int]  # (round, slot): candidates are returned in this order
    generated: torch.Tensor
    records: StepRecords
    log_score: float  # running log score when it stopped (THE mask applied to it); only kept when pruning
    num_steps: int
    pruned: bool = False


@dataclass
class _Pruning:
    """SPRM-guided early stopping of Best-of-N candidates (see [`best_of_n`])."""

    threshold: float | None = None
    top_k: int | None = None
    min_steps: int = 3

    @property
    def active(self) -> bool:
        return self.threshold is not None or self.top_k is not None


class StepSearch:
    """Rows decoded in one batch while the SPRM head scores their steps, and the tree they grow.

    The pieces every strategy is written with: [`expand`] (feed each row's last token once, then sample the first
    token of each of its children), [`decode`] (until every row has finished or reached its next step),
    [`keep_best`] (the survivors of each group), [`resume`] (put parked survivors back into the batch) and
    [`finish`] (final scores, selection, the output).

    Args:
        model: a ``MetaStoneForCausalLMWithSPRM``.
        input_ids / logits_processor / stopping_criteria / generation_config / model_kwargs: what transformers'
            ``generate`` hands its decoding method (the cache it prepared is used for the prompts).
        num_candidates: N, the candidates to return per prompt.
        remove_stopped_rows: rows that stop leave the batch and the cache (default). ``False`` keeps them as padding
            until every row stops, like transformers' ``_sample`` (Best-of-N only; to measure what removal saves).
        progress_bar: a tqdm bar over sampled tokens (default off).
        prompt_seeds: one seed per prompt: each prompt samples from a generator of its own, so its candidates do not
            depend on the other prompts of the call. ``None``: the global RNG (transformers' samples).
    """

    def __init__(
        self,
        model: Any,
        input_ids: torch.Tensor,
        logits_processor: LogitsProcessorList,
        stopping_criteria: StoppingCriteriaList,
        generation_config: GenerationConfig,
        model_kwargs: dict[str, Any],
        num_candidates: int,
        remove_stopped_rows: bool = True,
        progress_bar: bool = False,
        prompt_seeds: Sequence[int] | None = None,
    ):
        self.model = model
        self.n = num_candidates
        # Length and EOS are per row here (rows have different lengths); the others see each row's tokens.
        criteria = [c for c in stopping_criteria if not isinstance(c, (MaxLengthCriteria, EosTokenCriteria))]
        self.sampler = RowwiseSampler(
            logits_processor, criteria, input_ids.shape[1], input_ids.shape[0], prompt_seeds, input_ids.device
        )
        self.remove_stopped_rows = remove_stopped_rows
        device = input_ids.device
        eos = generation_config.eos_token_id
        self.eos = None if eos is None else torch.tensor(eos, device=device).reshape(-1)
        pad = generation_config.pad_token_id
        self.pad = int(pad) if pad is not None else (int(self.eos[0]) if self.eos is not None else 0)
        attention_mask = model_kwargs.pop("attention_mask", None)
        self.prompt_has_padding = attention_mask is not None and not bool(attention_mask.all())
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        cache = model_kwargs.pop("cache", None)
        for name in ("position_ids", "logits_to_keep", "use_cache", "return_sprm_logits"):
            model_kwargs.pop(name, None)
        self.forward_kwargs = model_kwargs
        self.prompt_ids, self.prompt_mask = input_ids, attention_mask.long()
        self.batch, self.prompt_length = input_ids.shape
        self.max_new_tokens = generation_config.max_length - self.prompt_length
        config = model.config
        self.think_start, self.think_end = config.think_start_token_id, config.think_end_token_id
        self.step_ids = list(config.step_token_ids)
        self.mask_changing_ids = torch.tensor(
            [*self.step_ids, *(t for t in (self.think_start, self.think_end) if t is not None)], device=device
        )
        self.rule = IncrementalStepRule(self.step_ids, self.think_start, self.think_end, input_ids, self.prompt_mask)
        self.tree: list[list[SearchNode]] = [
            [SearchNode(0, None, 0, self.prompt_length, status="root")] for _ in range(self.batch)
        ]
        self.finished: list[_Finished] = []
        self.parked: list[_Rows] = []
        self.round = 0
        self.num_slots = self.batch
        self.slots_per_prompt = torch.ones(self.batch, dtype=torch.long, device=device)
        self.alive = torch.ones(self.batch, dtype=torch.bool, device=device)
        self.tokens_generated = 0
        self.tokens_processed = 0
        self.pruning = _Pruning()
        self.progress = tqdm(desc="search", unit="tok", leave=False) if progress_bar else None
        self.cache = cache if isinstance(cache, DynamicCache) and cache.get_seq_length() == 0 else None
        self.rows = self._prefill()

    # -------------------------------------------------------------- prompts
    def _prefill(self) -> _Rows:
        """Run the prompts once (all but their last token) and score the step tokens they already hold."""
        ids, mask = self.prompt_ids, self.prompt_mask
        batch, length = ids.shape
        device = ids.device
        records = [StepRecords() for _ in range(batch)]
        last_logit = torch.full((batch,), float("nan"), device=device)
        if self.cache is None:
            self.cache = DynamicCache(config=self.model.config.get_text_config(decoder=True))
        if length > 1:
            position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
            with self.model.capture_sprm_features() as captured:
                # No mask when there is no padding, exactly as `generate` does.
                self.model.model(
                    input_ids=ids[:, :-1],
                    attention_mask=mask[:, :-1] if self.prompt_has_padding else None,
                    position_ids=position_ids[:, :-1],
                    cache=self.cache,
                    use_cache=True,
                    **self.forward_kwargs,
                )
            self.tokens_processed += batch * (length - 1)
            # Candidates: the rules that look back only (a later `<think>` may still drop them); counted: the mask.
            candidates = sprm_score_mask(sprm_step_token_mask(ids, self.step_ids, self.think_start, None, mask))
            counted = sprm_score_mask(sprm_step_token_mask(ids, self.step_ids, self.think_start, self.think_end, mask))
            rows, positions = candidates.nonzero(as_tuple=True)
            logits = self.model.sprm_logits_from_features(captured[-1][rows, positions]).float()
            for row, position, logit in zip(rows.tolist(), positions.tolist(), logits.tolist()):
                records[row].add(position, logit)
            counted_logits = torch.zeros(batch, length, device=device)
            counted_logits[rows, positions] = logits
            last = torch.where(counted, torch.arange(length, device=device), -1).max(dim=1).values
            last_logit = torch.where(last >= 0, counted_logits.gather(1, last.clamp(min=0)[:, None])[:, 0], last_logit)
            del captured
        zeros = torch.zeros(batch, dtype=torch.long, device=device)
        return _Rows(
            tokens=ids, mask=mask, prompt=torch.arange(batch, device=device), group=zeros, node=zeros.clone(),
            slot=torch.arange(batch, device=device), generated=zeros.clone(), offset=zeros.clone(),
            last_logit=last_logit, previous=self.rule.previous, seen_end=self.rule.seen_end,
            records=records,
        )  # fmt: skip

    # -------------------------------------------------------------- forward and sampling
    def _forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed every row's last token; returns the next-token logits and the SPRM logit of that position."""
        rows = self.rows
        needs_mask = self.prompt_has_padding or not bool(rows.mask.all())
        inputs = self.model.prepare_inputs_for_generation(
            rows.tokens,
            next_sequence_length=1,
            cache=self.cache,
            attention_mask=rows.mask if needs_mask else None,
            position_ids=rows.mask.sum(dim=1, keepdim=True) - 1,
            use_cache=True,
            logits_to_keep=1,
            return_sprm_logits=True,
            **self.forward_kwargs,
        )
        out = self.model(**inputs, return_dict=True)
        self.tokens_processed += inputs["input_ids"].numel()
        return out.logits[:, -1].to(copy=True, dtype=torch.float32), out.sprm_logits[:, -1].detach().float()

    def _sample(self, logits: torch.Tensor, step_logits: torch.Tensor, at_steps: bool) -> None:
        """Sample one token per row, record steps, retire or park the rows that stop."""
        rows = self.rows
        processed = self.sampler.process(rows.tokens, logits, rows.prompt, rows.generated, self.alive)
        probs = F.softmax(processed, dim=-1)
        new_tokens = self.sampler.sample(probs, rows.slot, rows.prompt, self.slots_per_prompt, self.alive)
        if not self.remove_stopped_rows:
            new_tokens = torch.where(self.alive, new_tokens, self.pad)
        position = self.prompt_length + rows.generated - 1  # score position of the new token
        rows.tokens = torch.cat([rows.tokens, new_tokens[:, None]], dim=1)
        rows.mask = F.pad(rows.mask, (0, 1), value=1)
        rows.generated = rows.generated + self.alive
        sampled = int(self.alive.sum())
        self.tokens_generated += sampled
        if self.progress is not None:
            self.progress.update(sampled)
        candidate, counts = self.rule.update(new_tokens)
        candidate &= self.alive
        counts &= self.alive
        for i in candidate.nonzero().flatten().tolist():
            rows.records[i].add(int(position[i]), float(step_logits[i]))
        rows.last_logit = torch.where(counts, step_logits, rows.last_logit)
        self._settle(new_tokens, counts & at_steps)

    def _settle(self, new_tokens: torch.Tensor, at_step: torch.Tensor) -> None:
        rows = self.rows
        ended = torch.zeros_like(self.alive)  # ended on its own: EOS, a stop string or criterion
        if self.eos is not None:
            ended |= torch.isin(new_tokens, self.eos)
        ended |= self.sampler.stopped(rows.tokens, rows.prompt, rows.generated, self.alive)
        ended &= self.alive
        cut = (rows.generated >= self.max_new_tokens) & self.alive & ~ended  # cut off by the length limit
        pruned = torch.zeros_like(ended)
        # Running scores rank candidates for pruning, the finished ones included; nothing else needs them.
        scores = None
        if self.pruning.active:
            check = bool(torch.isin(new_tokens, self.mask_changing_ids).any())
            if check or bool((ended | cut).any()):
                scores = self.running_log_scores(rows)
            if check:
                # A candidate cut off by the length limit has not finished: pruning may still mark it.
                pruned = self._rows_to_prune(scores, running=self.alive & ~ended, finishing=ended)
        done = (ended | cut) & ~pruned
        parked = at_step & self.alive & ~done & ~pruned
        for i in done.nonzero().flatten().tolist():
            self._retire(i, False, scores)
        for i in pruned.nonzero().flatten().tolist():
            self._retire(i, True, scores)
        if bool(parked.any()):
            self._park(parked.nonzero().flatten())
        stopped = done | pruned | parked
        if self.remove_stopped_rows:
            if bool(stopped.any()):
                keep = (~stopped).nonzero().flatten()
                self.cache.batch_select_indices(keep)
                self.rows = rows.select(keep)
                self.rule.select(keep)
                self.alive = self.alive[keep]
        else:
            self.alive = self.alive & ~stopped

    def _retire(self, i: int, pruned: bool, scores: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Move row ``i`` to the finished trajectories (with its running score when pruning needs it)."""
        rows = self.rows
        generated = int(rows.generated[i])
        prompt, node = int(rows.prompt[i]), int(rows.node[i])
        self.tree[prompt][node].end = self.prompt_length + generated
        self.tree[prompt][node].status = "pruned" if pruned else "completed"
        self.finished.append(
            _Finished(
                prompt=prompt,
                node=node,
                order=(self.round, int(rows.slot[i])),
                generated=rows.tokens[i, rows.tokens.shape[1] - generated :].clone(),
                records=rows.records[i],
                log_score=float(scores[0][i]) if scores is not None else math.nan,
                num_steps=int(scores[1][i]) if scores is not None else 0,
                pruned=pruned,
            )
        )

    def _park(self, index: torch.Tensor) -> None:
        """Take rows that reached a step out of the batch, with their cache, until the round's selection."""
        if any(type(layer) is not DynamicLayer for layer in self.cache.layers):
            kinds = sorted({type(layer).__name__ for layer in self.cache.layers})
            raise ValueError(
                f"Step-level search re-batches KV caches, which needs full-attention cache layers; this model's cache "
                f"has {kinds} (sliding-window or other attention). Use `search='best_of_n'`."
            )
        parked = self.rows.select(index)
        parked.previous, parked.seen_end = self.rule.previous[index], self.rule.seen_end[index]
        parked.kv = [(layer.keys[index].clone(), layer.values[index].clone()) for layer in self.cache.layers]
        for i in range(len(parked)):
            node = self.tree[int(parked.prompt[i])][int(parked.node[i])]
            node.end = self.prompt_length + int(parked.generated[i])
            node.step_score = float(torch.sigmoid(parked.last_logit[i]))
        self.parked.append(parked)

    # -------------------------------------------------------------- the strategies' pieces
    def expand(self, fanout: torch.Tensor, groups: torch.Tensor | None = None, at_steps: bool = False) -> None:
        """Feed each row's last token once, then give row ``i`` ``fanout[i]`` children, each with its first token.

        Args:
            fanout: ``[R]`` children per row (0 drops the row).
            groups: ``[sum(fanout)]`` the children's groups (default: their parent's).
            at_steps: children that sample a step token already stop there (beam search, DVTS).
        """
        logits, step_logits = self._forward()
        index = torch.arange(len(self.rows), device=fanout.device).repeat_interleave(fanout)
        self.cache.batch_select_indices(index)
        parents = self.rows
        self.rows = parents.select(index)
        self.rule.select(index)
        self.round += 1
        self.num_slots = len(self.rows)
        self.rows.slot = torch.arange(self.num_slots, device=fanout.device)
        # Slots of one prompt are consecutive (rows are kept in prompt order), so a prompt's generator can draw them.
        self.slots_per_prompt = torch.bincount(self.rows.prompt, minlength=self.batch)
        if not bool((self.rows.prompt[1:] >= self.rows.prompt[:-1]).all()):
            raise RuntimeError("Internal error: the search's rows are not in prompt order.")
        if groups is not None:
            self.rows.group = groups
        self.alive = torch.ones(self.num_slots, dtype=torch.bool, device=fanout.device)
        for i in range(self.num_slots):
            prompt = int(self.rows.prompt[i])
            tree = self.tree[prompt]
            parent = int(self.rows.node[i])
            if tree[parent].status != "root":
                tree[parent].status = "expanded"
            start = self.prompt_length + int(self.rows.generated[i])
            tree.append(SearchNode(len(tree), parent, start, start, self.round, int(self.rows.group[i])))
            self.rows.node[i] = len(tree) - 1
        self._sample(logits[index], step_logits[index], at_steps)

    def decode(self, at_steps: bool = False) -> _Rows | None:
        """Decode until every row has finished, or (``at_steps``) stopped at its next step; returns the parked rows."""
        while bool(self.alive.any()):
            logits, step_logits = self._forward()
            self._sample(logits, step_logits, at_steps)
        parked = _Rows.merge(self.parked) if self.parked else None
        self.parked = []
        return parked

    def completed_per_prompt(self) -> torch.Tensor:
        counts = torch.zeros(self.batch, dtype=torch.long)
        for f in self.finished:
            counts[f.prompt] += 1
        return counts

    def keep_best(self, parked: _Rows | None, width: int, ranking: str = "mean") -> _Rows | None:
        """The ``width`` best parked rows of each (prompt, group); prompts that have N candidates keep none.

        ``ranking="mean"`` ranks by the running trajectory score (geometric mean of the steps so far), ``"last"`` by
        the score of the step just reached. Ties keep the earlier slot.
        """
        if parked is None:
            return None
        done = self.completed_per_prompt().to(parked.prompt.device) >= self.n
        key = self.running_log_scores(parked)[0] if ranking == "mean" else parked.last_logit
        key = rankable_scores(key)
        keep = []
        for prompt, group in sorted(set(zip(parked.prompt.tolist(), parked.group.tolist()))):
            members = ((parked.prompt == prompt) & (parked.group == group)).nonzero().flatten()
            order = sorted(members.tolist(), key=lambda i: (-float(key[i]), int(parked.slot[i])))
            chosen = [] if bool(done[prompt]) else order[:width]
            keep.extend(chosen)
            for i in set(order) - set(chosen):
                self.tree[prompt][int(parked.node[i])].status = "dropped"
        if not keep:
            return None
        return parked.select(torch.tensor(keep, dtype=torch.long, device=parked.prompt.device))

    def resume(self, survivors: _Rows) -> None:
        """Make ``survivors`` (parked rows, possibly of different lengths) the batch, with their cache."""
        self.cache = DynamicCache(config=self.model.config.get_text_config(decoder=True))
        for layer, (keys, values) in enumerate(survivors.kv):
            self.cache.update(keys, values, layer)
        survivors.kv = None
        self.rows = survivors
        self.rule.previous, self.rule.seen_end = survivors.previous, survivors.seen_end
        self.alive = torch.ones(len(survivors), dtype=torch.bool, device=survivors.prompt.device)

    def running_log_scores(self, rows: _Rows) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean log step score, number of steps) per row, with THE step mask applied to each sequence so far.

        Recomputed rather than summed as tokens come: a later ``</think>`` (or ``<think>``) changes which earlier
        steps count.
        """
        device = rows.prompt.device
        score_mask = sprm_score_mask(
            sprm_step_token_mask(rows.tokens, self.step_ids, self.think_start, self.think_end, rows.mask)
        )
        index = [i for i, records in enumerate(rows.records) for _ in range(len(records))]
        sums = torch.zeros(len(rows), device=device)
        counts = torch.zeros(len(rows), device=device)
        if index:
            row_index = torch.tensor(index, device=device)
            positions = torch.tensor([p for records in rows.records for p in records.positions], device=device)
            logits = torch.tensor([z for records in rows.records for z in records.logits], device=device)
            kept = score_mask[row_index, positions + rows.offset[row_index]].float()
            sums.index_add_(0, row_index, F.logsigmoid(logits) * kept)
            counts.index_add_(0, row_index, kept)
        return sums / counts.clamp(min=1), counts

    # -------------------------------------------------------------- pruning
    def _rows_to_prune(
        self, scores: tuple[torch.Tensor, torch.Tensor], running: torch.Tensor, finishing: torch.Tensor
    ) -> torch.Tensor:
        """Running rows to stop: below the threshold, or outside their prompt's ``top_k`` (eligible candidates).

        Competitors of a prompt are its rows still decoding and its finished candidates (pruned ones excluded), ranked
        by running log score, earlier slot first on ties. A prompt always keeps a candidate that can finish: if all
        its running rows would stop and none has finished, its best running row is spared (one without enough
        steps yet counts as best).
        """
        rows, pruning = self.rows, self.pruning
        log_scores, counts = scores
        eligible = counts >= pruning.min_steps
        stop = torch.zeros_like(running)
        if pruning.threshold is not None:
            stop |= eligible & (log_scores < math.log(pruning.threshold))
        finished_by_prompt: dict[int, list[_Finished]] = {}
        for f in self.finished:
            finished_by_prompt.setdefault(f.prompt, []).append(f)
        for prompt in sorted(set(rows.prompt[running].tolist())):
            done_before = [f for f in finished_by_prompt.get(prompt, []) if not f.pruned]
            members = (rows.prompt == prompt).nonzero().flatten().tolist()
            if pruning.top_k is not None:
                competitors = [(f.log_score, f.order[1], None) for f in done_before if f.num_steps >= pruning.min_steps]
                competitors += [
                    (float(log_scores[i]), int(rows.slot[i]), i)
                    for i in members
                    if bool(eligible[i]) and bool(running[i] | finishing[i])
                ]
                competitors.sort(key=lambda c: (-c[0], c[1]))
                for rank, (_, _, i) in enumerate(competitors):
                    if i is not None and rank >= pruning.top_k:
                        stop[i] = True
            stop &= running
            can_finish = done_before or any(bool(finishing[i] | (running[i] & ~stop[i])) for i in members)
            if not can_finish:
                candidates = [i for i in members if bool(running[i])]
                preference = [
                    (float(log_scores[i]) if bool(eligible[i]) else math.inf, -int(rows.slot[i])) for i in candidates
                ]
                stop[candidates[max(range(len(candidates)), key=preference.__getitem__)]] = False
        return stop & running

    # -------------------------------------------------------------- the output
    def finish(
        self,
        search: str,
        selection: str | SelectionStrategy = "sprm",
        answer_extractor: AnswerExtractor | None = None,
        tokenizer: Any | None = None,
    ) -> SearchOutput:
        """The first N finished trajectories of each prompt, scored with THE step mask, and the selected one."""
        if self.progress is not None:
            self.progress.close()
        strategy, needs_answers = _resolve_selection(selection)
        if callable(selection) and tokenizer is not None:
            needs_answers = True
        n, batch, prompt_length = self.n, self.batch, self.prompt_length
        per_prompt: list[list[_Finished]] = [[] for _ in range(batch)]
        for f in sorted(self.finished, key=lambda f: f.order):
            per_prompt[f.prompt].append(f)
        for prompt, trajectories in enumerate(per_prompt):
            if len(trajectories) < n:
                raise RuntimeError(f"Internal error: prompt {prompt} finished {len(trajectories)} of {n} candidates.")
            for f in trajectories[n:]:
                self.tree[prompt][f.node].status = "surplus"
        chosen_trajectories = [f for trajectories in per_prompt for f in trajectories[:n]]
        device = self.prompt_ids.device
        total_length = prompt_length + max(len(f.generated) for f in chosen_trajectories)
        rows = len(chosen_trajectories)
        sequences = torch.full((rows, total_length), self.pad, dtype=self.prompt_ids.dtype, device=device)
        mask = torch.zeros((rows, total_length), dtype=torch.long, device=device)
        sequences[:, :prompt_length] = self.prompt_ids.repeat_interleave(n, dim=0)
        mask[:, :prompt_length] = self.prompt_mask.repeat_interleave(n, dim=0)
        step_logits = torch.zeros((rows, total_length), device=device)
        recorded = torch.zeros((rows, total_length), dtype=torch.bool, device=device)
        for i, f in enumerate(chosen_trajectories):
            sequences[i, prompt_length : prompt_length + len(f.generated)] = f.generated
            mask[i, prompt_length : prompt_length + len(f.generated)] = 1
            for position, logit in zip(f.records.positions, f.records.logits):
                step_logits[i, position] = logit
                recorded[i, position] = True
        score_mask = self.model.sprm_score_mask(sequences, mask)
        if bool((score_mask & ~recorded).any()):
            raise RuntimeError("Internal error: a scored step has no online SPRM logit.")
        result = build_sprm_scores(step_logits, score_mask)  # warns about non-finite rows

        # Strategies rank float64 scores: float32 `exp` rounds scores within ~6e-8 of 1 to exactly 1.0 (ties).
        ranking_scores = result.log_scores.double().exp().view(batch, n)
        answers: list[list[Hashable | None]] | None = None
        if needs_answers:
            flat = _decode_answers(tokenizer, sequences, mask, prompt_length, answer_extractor or extract_boxed_answer)
            answers = [flat[b * n : (b + 1) * n] for b in range(batch)]
        pruned = torch.tensor([f.pruned for f in chosen_trajectories], device=device)
        chosen = []
        for b in range(batch):
            # Pruned candidates never finished: returned, but neither win nor vote, unless all of them were pruned.
            finished = [j for j in range(n) if not bool(pruned[b * n + j])] or list(range(n))
            pick = int(
                strategy(ranking_scores[b, finished], None if answers is None else [answers[b][j] for j in finished])
            )
            if not 0 <= pick < len(finished):
                raise ValueError(f"The selection strategy returned index {pick}, outside 0..{len(finished) - 1}.")
            chosen.append(finished[pick])
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
            tokens_saved=int(((self.max_new_tokens - generated) * pruned).sum()),
            scoring_state_bytes=sum(f.records.nbytes for f in chosen_trajectories),
            search=search,
            search_tree=self.tree,
            candidate_nodes=torch.tensor([f.node for f in chosen_trajectories], device=device).view(batch, n),
            tokens_generated=self.tokens_generated,
            tokens_processed=self.tokens_processed,
        )


def _decode_answers(
    tokenizer: Any, sequences: torch.Tensor, mask: torch.Tensor, prompt_length: int, extractor: AnswerExtractor
) -> list[Hashable | None]:
    answers = []
    for row, row_mask in zip(sequences, mask):
        completion = row[prompt_length:][row_mask[prompt_length:].bool()]
        answers.append(extractor(tokenizer.decode(completion.tolist(), skip_special_tokens=True)))
    return answers


def _split_budget(survivors: _Rows, budget: int) -> torch.Tensor:
    """Children per survivor: each (prompt, group) shares ``budget`` children, the better-ranked first."""
    fanout = torch.zeros(len(survivors), dtype=torch.long, device=survivors.prompt.device)
    for prompt, group in set(zip(survivors.prompt.tolist(), survivors.group.tolist())):
        members = ((survivors.prompt == prompt) & (survivors.group == group)).nonzero().flatten()
        base, extra = divmod(budget, len(members))
        fanout[members] = base
        fanout[members[:extra]] += 1
    return fanout


# --------------------------------------------------------------------------------------------------
# The strategies: each is transformers' `custom_generate` decoding method
# --------------------------------------------------------------------------------------------------


def best_of_n(
    model: Any,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    num_candidates: int = 8,
    selection: str | SelectionStrategy = "sprm",
    answer_extractor: AnswerExtractor | None = None,
    answer_tokenizer: Any | None = None,
    prune_threshold: float | None = None,
    prune_top_k: int | None = None,
    prune_min_steps: int = 3,
    remove_stopped_rows: bool = True,
    progress_bar: bool = False,
    prompt_seeds: Sequence[int] | None = None,
    **model_kwargs: Any,
) -> SearchOutput:
    """Best-of-N (the paper): N samples per prompt, each decoded to its end, the best-scored one chosen.

    With ``prune_threshold`` / ``prune_top_k``, hopeless candidates stop early and leave the batch.
    """
    search = StepSearch(
        model, input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs, num_candidates,
        remove_stopped_rows, progress_bar, prompt_seeds,
    )  # fmt: skip
    search.pruning = _Pruning(prune_threshold, prune_top_k, prune_min_steps)
    search.expand(torch.full((search.batch,), num_candidates, device=input_ids.device))
    search.decode()
    return search.finish("best_of_n", selection, answer_extractor, answer_tokenizer)


def beam_search(
    model: Any,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    num_candidates: int = 8,
    beam_width: int = 4,
    ranking: str = "mean",
    selection: str | SelectionStrategy = "sprm",
    answer_extractor: AnswerExtractor | None = None,
    answer_tokenizer: Any | None = None,
    progress_bar: bool = False,
    prompt_seeds: Sequence[int] | None = None,
    **model_kwargs: Any,
) -> SearchOutput:
    """Beam search over steps, as search-and-learn's: N rows per round, the N/M best survive, M children each.

    ``prompt ─N→ steps ─keep N/M→ each ─M→ steps ─keep N/M→ ...`` (N = 8, M = 4: 8 children, 2 beams of 4 children)

    Every round N rows sample to their next step; rows that finish (EOS, a stop, the length limit) are kept until the
    prompt has N candidates, and the ``N // M`` best of the others (by ``ranking``) survive. The survivors share the
    next round's N children, so each has M of them; when fewer than ``N // M`` are left, the better-ranked ones get
    the extra children, as search-and-learn repeats its surviving beams up to N.
    """
    search = StepSearch(
        model, input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs, num_candidates,
        progress_bar=progress_bar, prompt_seeds=prompt_seeds,
    )  # fmt: skip
    beams_kept = num_candidates // beam_width
    search.expand(torch.full((search.batch,), num_candidates, device=input_ids.device), at_steps=True)
    while (survivors := search.keep_best(search.decode(at_steps=True), beams_kept, ranking)) is not None:
        search.resume(survivors)
        search.expand(_split_budget(survivors, num_candidates), at_steps=True)
    return search.finish("beam", selection, answer_extractor, answer_tokenizer)


def dvts(
    model: Any,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    num_candidates: int = 8,
    beam_width: int = 2,
    ranking: str = "mean",
    selection: str | SelectionStrategy = "sprm",
    answer_extractor: AnswerExtractor | None = None,
    answer_tokenizer: Any | None = None,
    progress_bar: bool = False,
    prompt_seeds: Sequence[int] | None = None,
    **model_kwargs: Any,
) -> SearchOutput:
    """Diverse Verifier Tree Search, as search-and-learn's: N/M independent subtrees, each expanded M ways per step.

    ``prompt ─ N/M subtrees ─M→ steps ─keep 1→ ─M→ steps ─keep 1→ ...`` (N = 8, M = 4: 2 subtrees of 4 children)

    Each subtree continues with its best child only (by ``ranking``), which again expands M ways. Finished
    trajectories are kept until the prompt has N; a subtree ends when all its children have finished.
    """
    search = StepSearch(
        model, input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs, num_candidates,
        progress_bar=progress_bar, prompt_seeds=prompt_seeds,
    )  # fmt: skip
    subtree = torch.arange(num_candidates, device=input_ids.device) // beam_width
    search.expand(
        torch.full((search.batch,), num_candidates, device=input_ids.device),
        groups=subtree.repeat(search.batch),
        at_steps=True,
    )
    while (survivors := search.keep_best(search.decode(at_steps=True), 1, ranking)) is not None:
        search.resume(survivors)
        search.expand(_split_budget(survivors, beam_width), at_steps=True)
    return search.finish("dvts", selection, answer_extractor, answer_tokenizer)


def default_beam_width(search: str, num_candidates: int) -> int:
    """M when ``beam_width`` is not given: 4 for ``"beam"`` (N/4 beams kept) and N/4 for ``"dvts"`` (4 subtrees).

    For N not a multiple of 4, ``k``, the largest divisor of N not above ``max(1, N // 4)``, is the number of beams
    beam search keeps (M = N / k) and the children of each DVTS subtree (M = k): always a valid M.
    """
    k = max(d for d in range(1, max(1, num_candidates // 4) + 1) if num_candidates % d == 0)
    return num_candidates // k if search == "beam" else k


BEAM_WIDTH_MEANING = "children_per_beam"
"""What ``beam_width`` M means, as in search-and-learn: the children each kept beam expands into (beam search keeps
N/M beams per round, DVTS runs N/M subtrees). Evaluations record it with their settings, so that a run written
when beam search's M was the number of beams kept is not resumed as if it were the same search."""


SEARCH_STRATEGIES: dict[str, Callable[..., SearchOutput]] = {"best_of_n": best_of_n, "beam": beam_search, "dvts": dvts}
RANKINGS = ("mean", "last")


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------

_GENERATE_SIGNATURE = inspect.signature(GenerationMixin.generate)
_UNSUPPORTED = {
    "assistant_model": "assisted decoding",
    "streamer": "streaming (N candidates per prompt)",
    "custom_generate": "another decoding method (`search=` picks one)",
    "negative_prompt_ids": "classifier-free guidance",
    "negative_prompt_attention_mask": "classifier-free guidance",
    "inputs_embeds": "`inputs_embeds`: steps and the think span are found in the token ids, so pass `input_ids`",
    "cache": "a user cache (the prompt cache is built here)",
    "past_key_values": "a user cache (the prompt cache is built here)",
    "synced_gpus": "`synced_gpus`",
}


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed the global RNG that sampling draws from, restoring the caller's RNG state afterwards."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def resolve_num_candidates(
    presets: dict[str, int], reasoning_effort: str | None = None, num_candidates: int | None = None
) -> int:
    """N from ``num_candidates`` or the ``reasoning_effort`` preset (``config.reasoning_effort_presets``)."""
    if reasoning_effort is not None and num_candidates is not None:
        raise ValueError("Pass either `reasoning_effort` or `num_candidates`, not both.")
    if reasoning_effort is not None:
        if reasoning_effort not in presets:
            valid = ", ".join(f"{name!r} (N={n})" for name, n in presets.items())
            raise ValueError(f"Unknown `reasoning_effort`={reasoning_effort!r}; valid: {valid}.")
        return int(presets[reasoning_effort])
    if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or num_candidates < 1:
        raise ValueError(f"`num_candidates` must be an int >= 1, got {num_candidates!r}.")
    return num_candidates


@torch.no_grad()
def search_generate(
    model: Any,
    *args: Any,
    search: str = "best_of_n",
    reasoning_effort: str | None = None,
    num_candidates: int | None = None,
    beam_width: int | None = None,
    ranking: str = "mean",
    selection: str | SelectionStrategy = "sprm",
    answer_extractor: AnswerExtractor | None = None,
    prune_threshold: float | None = None,
    prune_top_k: int | None = None,
    prune_min_steps: int = 3,
    remove_stopped_rows: bool = True,
    progress_bar: bool = False,
    seed: int | Sequence[int] | None = None,
    **kwargs: Any,
) -> SearchOutput:
    r"""Sample N candidates per prompt with a search strategy, score every step online with the SPRM head, pick one.

    All other arguments are transformers' ``generate`` arguments (``max_new_tokens``, ``temperature``, ``top_p``,
    ``stopping_criteria``, ``stop_strings`` with ``tokenizer``, ``generation_config``, ...); sampling is always on.

    Args:
        model: a ``MetaStoneForCausalLMWithSPRM``.
        search: ``"best_of_n"`` (the paper: N independent samples), ``"beam"`` or ``"dvts"``, the step searches of
            search-and-learn, which need no extra scoring pass (each step is scored by the forward that sampled it):

            * ``"beam"``: ``prompt ─N→ steps ─keep N/M→ each ─M→ steps ─keep N/M→ ...``: every round the N/M best
              beams (by ``ranking``) survive and each expands into M children.
            * ``"dvts"``: ``prompt ─ N/M subtrees ─M→ steps ─keep 1→ ─M→ ...``: N/M independent subtrees, each
              expanding its one beam into M children at every step and continuing with the best.
        reasoning_effort: ``"low"``, ``"medium"`` or ``"high"`` (N = 2, 8, 32 by default), read from
            ``model.config.reasoning_effort_presets``. Exclusive with ``num_candidates``.
        num_candidates: N, the number of candidates returned per prompt (>= 1).
        beam_width: M for ``"beam"`` and ``"dvts"``, search-and-learn's meaning: the children each kept beam
            expands into (so beam search keeps N/M beams, DVTS runs N/M subtrees); N must be a multiple of M.
            Default ([`default_beam_width`]): beam search keeps N/4 beams of 4 children, DVTS runs 4 subtrees of
            N/4 children, when 4 divides N.
        ranking: how beams compete at a step: ``"mean"`` (default: the running geometric mean of their step scores,
            the score Best-of-N ranks finished trajectories by) or ``"last"`` (the score of the step just written).
        selection: ``"sprm"`` (argmax score, the paper), ``"sprm_vote"`` (answers weighted by SPRM score),
            ``"majority"`` (plain vote), or a callable ``(scores [N], answers or None) -> index``. Voting needs
            ``tokenizer=`` to decode the completions; a callable receives answers when a tokenizer is given.
        answer_extractor: decoded completion -> hashable answer or ``None``; default [`extract_boxed_answer`]
            (last ``\boxed{}``, normalised with math-verify).
        prune_threshold: Best-of-N only, opt-in: stop a candidate once its running trajectory score (geometric mean
            of its scored steps so far) is below this value in (0, 1).
        prune_top_k: Best-of-N only, opt-in: stop a candidate once it is outside the prompt's k best running scores.
            Pruning applies once a candidate has ``prune_min_steps`` scored steps (default 3), is checked whenever a
            step or think token is sampled, and never stops a prompt's last candidate that could still finish.
        remove_stopped_rows: stopped rows leave the batch and the cache (default). ``False`` (Best-of-N only) keeps
            them as padding until all stop, as transformers' ``_sample`` does; same samples, more compute.
        progress_bar: a tqdm bar over sampled tokens (respects ``transformers`` progress-bar settings). Off by
            default, as transformers' ``generate`` shows none; the ``metastone`` CLI turns it on.
        seed: an int seeds the sampling RNG for this call only (the caller's RNG state is restored): the result is
            reproducible, and Best-of-N draws exactly the samples of transformers' ``generate(num_return_sequences=N)``
            after ``torch.manual_seed(seed)``. A list of one int per prompt gives every prompt a generator of its
            own: a prompt's candidates are then those of a call with that prompt alone and its seed, whichever
            prompts share the batch (what an evaluation that batches questions needs).

    Returns:
        [`SearchOutput`].
    """
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError("Search generation supports decoder-only models only.")
    if search not in SEARCH_STRATEGIES:
        raise ValueError(f"Unknown `search`={search!r}; valid: {sorted(SEARCH_STRATEGIES)}.")
    n = resolve_num_candidates(model.config.reasoning_effort_presets, reasoning_effort, num_candidates)
    _resolve_selection(selection)
    options: dict[str, Any] = {"num_candidates": n, "selection": selection, "progress_bar": progress_bar}
    if answer_extractor is not None:
        options["answer_extractor"] = answer_extractor
    if search == "best_of_n":
        if beam_width is not None:
            raise ValueError("`beam_width` applies to `search='beam'` or `search='dvts'`.")
        if prune_threshold is not None and not 0.0 < float(prune_threshold) < 1.0:
            raise ValueError(f"`prune_threshold` is a trajectory score in (0, 1), got {prune_threshold!r}.")
        if prune_top_k is not None and (not isinstance(prune_top_k, int) or prune_top_k < 1):
            raise ValueError(f"`prune_top_k` must be an int >= 1, got {prune_top_k!r}.")
        if not isinstance(prune_min_steps, int) or prune_min_steps < 1:
            raise ValueError(f"`prune_min_steps` must be an int >= 1, got {prune_min_steps!r}.")
        options.update(
            prune_threshold=prune_threshold,
            prune_top_k=prune_top_k,
            prune_min_steps=prune_min_steps,
            remove_stopped_rows=bool(remove_stopped_rows),
        )
    else:
        if prune_threshold is not None or prune_top_k is not None or not remove_stopped_rows:
            raise ValueError("Pruning options and `remove_stopped_rows=False` apply to `search='best_of_n'` only.")
        width = default_beam_width(search, n) if beam_width is None else beam_width
        if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= n or n % width:
            raise ValueError(
                f"`beam_width` must be an int M with 1 <= M <= N and N a multiple of M (N={n}), got {beam_width!r}."
            )
        if ranking not in RANKINGS:
            raise ValueError(f"`ranking` must be one of {list(RANKINGS)}, got {ranking!r}.")
        options.update(beam_width=width, ranking=ranking)

    arguments = _GENERATE_SIGNATURE.bind(model, *args, **kwargs).arguments
    arguments.pop("self", None)
    extra = arguments.pop("kwargs", {})
    for name, what in _UNSUPPORTED.items():
        if arguments.get(name) is not None or extra.get(name) is not None:
            raise ValueError(f"Search generation does not support {what} (`{name}`).")
    input_ids = arguments.pop("inputs", None)
    if input_ids is None:
        input_ids = extra.pop("input_ids", None)
    if input_ids is None:
        raise ValueError("Search generation needs the prompt token ids (`input_ids`).")
    if isinstance(input_ids, torch.Tensor) and input_ids.shape[-1:] == (0,):
        raise ValueError("Search generation needs a non-empty prompt.")
    attention_mask = extra.pop("attention_mask", None)
    input_ids, checked_mask = check_token_batch(input_ids, attention_mask, model.config.get_text_config().vocab_size)
    if attention_mask is not None:
        extra["attention_mask"] = checked_mask

    user_config = arguments.get("generation_config")
    if extra.get("do_sample") is False or (user_config is not None and user_config.do_sample is False):
        raise ValueError("Search samples its candidates: `do_sample=False` would give N identical candidates.")
    generation_config, _ = model._prepare_generation_config(user_config, **extra)
    if (generation_config.num_beams or 1) > 1:
        raise ValueError("Search samples; it cannot be combined with token-level beam search (`num_beams` > 1).")
    if (generation_config.num_return_sequences or 1) > 1:
        raise ValueError("Use `num_candidates`/`reasoning_effort` instead of `num_return_sequences`.")
    if generation_config.return_dict_in_generate or any(
        getattr(generation_config, f, False)
        for f in ("output_scores", "output_logits", "output_hidden_states", "output_attentions")
    ):
        raise ValueError(
            "Search returns a `SearchOutput`; `return_dict_in_generate`/`output_*` are not supported (all hidden "
            "states in particular are never kept: scoring is online)."
        )
    # transformers' `generate` does not hand `tokenizer` to a `custom_generate` method: the answers get it under
    # their own name, and stop strings (which need it) become a stopping criterion here.
    tokenizer = extra.pop("tokenizer", None)
    if options["selection"] in _STRATEGIES_NEEDING_ANSWERS and tokenizer is None:
        raise ValueError(f"`selection={selection!r}` votes on answers: pass `tokenizer=` to decode the candidates.")
    options["answer_tokenizer"] = tokenizer
    if generation_config.stop_strings:
        if tokenizer is None:
            raise ValueError("`stop_strings` need the model's tokenizer: pass `tokenizer=` to `generate`.")
        criteria = StoppingCriteriaList(arguments.get("stopping_criteria") or [])
        criteria.append(StopStringCriteria(tokenizer, generation_config.stop_strings))
        arguments["stopping_criteria"] = criteria
        extra["stop_strings"] = None
    extra["do_sample"] = True
    prompt_seeds = check_prompt_seeds(seed, input_ids.shape[0])
    if prompt_seeds is not None:
        options["prompt_seeds"] = prompt_seeds
        seed = None
    with eval_mode(model), _seeded(seed, model.device):
        return GenerationMixin.generate(
            model,
            input_ids.to(model.device),
            custom_generate=SEARCH_STRATEGIES[search],
            **arguments,
            **options,
            **extra,
        )


def best_of_n_generate(model: Any, *args: Any, **kwargs: Any) -> SearchOutput:
    """Best-of-N ``generate`` (``search="best_of_n"``); see [`search_generate`]."""
    return search_generate(model, *args, search="best_of_n", **kwargs)


__all__ = [
    "BEAM_WIDTH_MEANING",
    "RANKINGS",
    "SEARCH_STRATEGIES",
    "SELECTION_STRATEGIES",
    "BestOfNOutput",
    "SearchNode",
    "SearchOutput",
    "StepSearch",
    "beam_search",
    "best_of_n",
    "best_of_n_generate",
    "default_beam_width",
    "dvts",
    "extract_boxed_answer",
    "last_boxed_content",
    "rankable_scores",
    "resolve_num_candidates",
    "search_generate",
    "select_majority",
    "select_sprm",
    "select_sprm_vote",
]
