"""Best-of-N generation for MetaStone-S1: sample N trajectories per prompt, score them online with the SPRM head,
pick one.

Entry point: ``model.generate(input_ids, num_candidates=N)`` or ``model.generate(..., reasoning_effort="medium")``
(see [`best_of_n_generate`]). Called without those arguments, ``generate`` is transformers' own.

How it works, and why:

* **Prefill once.** The prompt batch (all but its last token) goes through the model once; the resulting
  ``DynamicCache`` is expanded N times with ``batch_repeat_interleave``, then transformers' ``generate`` runs on the
  expanded prompts with that cache, so it only processes the last prompt token per candidate before sampling.
  Sampling itself is transformers' ``_sample`` (logits processors, stopping criteria, generation config untouched),
  so for the same seed the candidates equal ``generate(num_return_sequences=N)``, which prefills N times.
* **Online scoring.** A step's score is the SPRM logit at the position just before its step token, i.e. the logit
  of the forward pass that sampled the step token. ``forward`` already computes the head on the kept position
  (``logits_to_keep=1``); a forward hook keeps that ``[B*N]`` logit until the token is sampled, and a
  ``StoppingCriteria`` (called right after each sampled token) stores it only when the token is a step token,
  with its position. Extra memory is O(steps); no hidden state is kept and ``output_hidden_states`` is never used.
  Prompt step tokens are scored from the prefill pass. At the end, THE step mask
  (``MetaStoneForCausalLMWithSPRM.sprm_score_mask``) is applied to the final sequences, because its rules (runs,
  the ``<think>`` ... last ``</think>`` span) depend on the whole sequence. Hence the scores equal
  ``model.score_trajectories(candidates, candidate_attention_mask)`` up to float noise.
* **Scores of special cases.** No ``</think>``: the span runs to the end (the mask's rule). Candidates stopped by
  EOS, by ``max_length`` or by pruning are scored on what they generated. A candidate without any scored step gets
  score 0 (log score ``-inf``), so it ranks below every candidate that has a step.

This file is part of the remote-code set copied into saved checkpoints: it imports only ``torch``, ``transformers``
and its sibling files; math-verify (for the default answer extractor) is imported lazily.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import re
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F
from transformers import DynamicCache, GenerationMixin, StoppingCriteria, StoppingCriteriaList, StopStringCriteria
from transformers.utils import ModelOutput
from transformers.utils.logging import tqdm

from .modeling_metastone import _eval_mode, build_sprm_scores, check_token_batch

# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


@dataclass
class BestOfNOutput(ModelOutput):
    """Result of Best-of-N ``generate``: the chosen trajectory per prompt plus every candidate and its SPRM score.

    ``B`` prompts, ``N`` candidates each, ``T`` = prompt length + generated length (shared by all rows; rows that
    stopped early are padded with ``pad_token_id``).

    Args:
        sequences: ``[B, T]`` the chosen candidate of each prompt (prompt included, like ``generate``).
        candidates: ``[B, N, T]`` all candidates, in sampling order (row ``b * N + j`` of the sampling batch).
        candidate_attention_mask: ``[B, N, T]`` 1 for real tokens: the prompt's mask, then the generated tokens up
            to and including the token that stopped the candidate (EOS, a stop string, the caller's stopping
            criterion, pruning); 0 for what follows (padding).
        scores: ``[B, N]`` trajectory scores, the geometric mean of the step scores (0 for a candidate without steps).
        log_scores: ``[B, N]`` their logs, ``mean(logsigmoid(step logits))`` (``-inf`` without steps).
        step_scores: ``step_scores[b][j]`` the 1-D tensor of ``sigmoid`` step scores of candidate ``j`` of prompt ``b``.
        step_positions: same layout, the positions whose logit scored each step (one before each step token).
        num_steps: ``[B, N]`` number of scored steps.
        chosen_index: ``[B]`` index in ``0..N-1`` of the chosen candidate.
        answers: ``answers[b][j]`` the extracted answer (``None`` when none was found), when the selection strategy
            used answers; ``None`` otherwise.
        num_generated_tokens: ``[B, N]`` real generated tokens per candidate (EOS included, padding excluded).
        pruned: ``[B, N]`` candidates stopped by SPRM-guided pruning (all ``False`` when pruning is off).
        tokens_saved: decode slots that pruned candidates left empty in this batch: for each pruned candidate, the
            final length ``T`` minus its length when pruned. Sampling stays one batched pass, so compute is saved
            only once every candidate has stopped; the count is what a per-row scheduler would save.
        scoring_state_bytes: bytes held by the online scorer at the end of decoding (the sparse step records), the
            extra memory of online scoring apart from one ``[B*N]`` logit buffer.
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


def _rankable(scores: torch.Tensor) -> torch.Tensor:
    """NaN scores (non-finite features, see ``score_trajectories``) rank last."""
    scores = scores.detach().double()  # float64: scores just below 1.0 must not tie
    return scores.masked_fill(scores.isnan(), float("-inf"))


def select_sprm(scores: torch.Tensor, answers: Sequence[Hashable | None] | None = None) -> int:
    """The paper's rule: the candidate with the highest SPRM trajectory score (first one on ties; NaN ranks last)."""
    return int(torch.argmax(_rankable(scores)))


def select_sprm_vote(scores: torch.Tensor, answers: Sequence[Hashable | None] | None) -> int:
    """SPRM-weighted vote: each answer collects the sum of its candidates' scores; the best-scored candidate of the
    heaviest answer wins (ties: the answer whose best candidate scores higher, then the first seen). Candidates
    without an answer do not vote, a NaN score weighs 0; if no candidate has an answer, falls back to
    [`select_sprm`]."""
    if answers is None:
        raise ValueError("`select_sprm_vote` needs the candidates' answers.")
    scores = _rankable(scores)
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
# Online scorer: a forward hook plus a stopping criterion
# --------------------------------------------------------------------------------------------------


class _OnlineSPRMScorer(StoppingCriteria):
    """Records step logits while transformers' ``_sample`` decodes, tracks which rows stopped, optionally prunes.

    ``_sample`` calls its stopping criteria right after appending each sampled token, and before the next forward,
    so at that moment ``self.pending`` (set by a forward hook on the model) is the logit of the very forward pass
    that sampled the new token: the logit that scores it if it is a step token. This criterion runs after the
    others (EOS, stop strings, the caller's, wrapped by [`_RecordStops`]), so it knows which rows stop at this token.
    """

    def __init__(
        self,
        model: Any,
        num_candidates: int,
        prompt_length: int,
        prompt_attention_mask: torch.Tensor,
        eos_token_ids: torch.Tensor | None,
        prune_threshold: float | None,
        prune_top_k: int | None,
        prune_min_steps: int,
        progress: Any | None,
    ):
        self.model = model
        self.n = num_candidates
        self.prompt_length = prompt_length
        self.prompt_attention_mask = prompt_attention_mask
        device = prompt_attention_mask.device
        self.step_ids = torch.tensor(model.config.step_token_ids, device=device)
        think = [model.config.think_start_token_id, model.config.think_end_token_id]
        changing = [*model.config.step_token_ids, *(t for t in think if t is not None)]
        self.mask_changing_ids = torch.tensor(changing, device=device)
        self.think_start_token_id = model.config.think_start_token_id
        self.eos_token_ids = eos_token_ids
        rows = prompt_attention_mask.shape[0]
        self.pending: torch.Tensor | None = None
        # Sparse records (row, position, logit): one entry per step token, never one per token.
        self.rows: list[torch.Tensor] = []
        self.positions: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []
        self.finished = torch.zeros(rows, dtype=torch.bool, device=device)
        self.finished_length = torch.zeros(rows, dtype=torch.long, device=device)  # length when the row stopped
        self.stop_requests = torch.zeros(rows, dtype=torch.bool, device=device)  # filled by `_RecordStops`
        self.pruned = torch.zeros(rows, dtype=torch.bool, device=device)
        self.prune_threshold = prune_threshold
        self.prune_top_k = prune_top_k
        self.prune_min_steps = prune_min_steps
        self.pruning = prune_threshold is not None or prune_top_k is not None
        if self.pruning:
            # `_sample` pads finished rows only when some criterion has `eos_token_id`; pruned rows must be padded.
            self.eos_token_id = eos_token_ids
        self.progress = progress

    # -------------------------------------------------------------- recording
    def hook(self, _module: Any, _inputs: Any, output: Any) -> None:
        logits = getattr(output, "sprm_logits", None)
        if logits is None:
            raise RuntimeError("Best-of-N needs `sprm_logits` from forward; do not pass `return_sprm_logits=False`.")
        self.pending = logits[:, -1].detach().float()

    def add(self, rows: torch.Tensor, positions: torch.Tensor, logits: torch.Tensor) -> None:
        if rows.numel():
            self.rows.append(rows)
            self.positions.append(positions)
            self.logits.append(logits.float())

    def records(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All records as three 1-D tensors (row, position, logit)."""
        device = self.finished.device
        if not self.rows:
            empty = torch.zeros(0, dtype=torch.long, device=device)
            return empty, empty, torch.zeros(0, device=device)
        if len(self.rows) > 1:  # consolidate, so repeated calls (pruning) do not re-concatenate everything
            self.rows, self.positions = [torch.cat(self.rows)], [torch.cat(self.positions)]
            self.logits = [torch.cat(self.logits)]
        return self.rows[0], self.positions[0], self.logits[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.rows, *self.positions, *self.logits))

    # -------------------------------------------------------------- per sampled token
    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None = None, **kwargs: Any
    ) -> torch.BoolTensor:
        # Called once per decoded token: most tokens are neither steps nor stops, so those cases cost one or two
        # comparisons (`any()` is free on CPU and one sync on GPU; this criterion already syncs to return).
        length = input_ids.shape[1]
        new_tokens = input_ids[:, -1]
        is_step = torch.isin(new_tokens, self.step_ids)
        if bool(is_step.any()):
            # The mask's local rules are final already: a step token right after a step token or after `<think>`
            # never counts, so it is not recorded. The span rules depend on later tokens and wait for the end.
            previous = input_ids[:, -2]
            keep = is_step & ~self.finished & ~torch.isin(previous, self.step_ids)  # finished rows get padding
            if self.think_start_token_id is not None:
                keep &= previous != self.think_start_token_id
            rows = keep.nonzero().flatten()
            if rows.numel():
                if self.pending is None:
                    raise RuntimeError("No SPRM logit was captured for the last forward pass.")
                self.add(rows, torch.full_like(rows, length - 2), self.pending[rows])
        stopping = self.stop_requests
        if self.eos_token_ids is not None:
            stopping = stopping | torch.isin(new_tokens, self.eos_token_ids)
        if self.pruning and bool(torch.isin(new_tokens, self.mask_changing_ids).any()):
            alive = ~self.finished
            prune = self._rows_to_prune(
                input_ids, running=alive & ~stopping, completed=self.finished | (stopping & alive)
            )
            self.pruned |= prune
            stopping = stopping | prune
        stopping = stopping & ~self.finished
        if bool(stopping.any()):
            self.finished_length[stopping] = length
            self.finished |= stopping
        self.stop_requests = torch.zeros_like(self.stop_requests)
        if self.progress is not None:
            self.progress.update(1)
            if self.pruning:
                self.progress.set_postfix(pruned=int(self.pruned.sum()), refresh=False)
        return self.pruned.clone()

    # -------------------------------------------------------------- pruning
    def running_log_scores(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean log score, number of scored steps) per row, with THE step mask applied to the sequence so far."""
        generated = input_ids.shape[1] - self.prompt_length
        mask = F.pad(self.prompt_attention_mask, (0, generated), value=1)
        score_mask = self.model.sprm_score_mask(input_ids, mask)
        rows, positions, logits = self.records()
        kept = score_mask[rows, positions]
        num_rows = input_ids.shape[0]
        sums = torch.zeros(num_rows, device=input_ids.device).index_add_(0, rows, F.logsigmoid(logits) * kept)
        counts = torch.zeros(num_rows, device=input_ids.device).index_add_(0, rows, kept.float())
        return sums / counts.clamp(min=1), counts

    def _rows_to_prune(self, input_ids: torch.Tensor, running: torch.Tensor, completed: torch.Tensor) -> torch.Tensor:
        log_scores, counts = self.running_log_scores(input_ids)
        eligible = counts >= self.prune_min_steps
        stop = torch.zeros_like(running)
        if self.prune_threshold is not None:
            stop |= eligible & (log_scores < math.log(self.prune_threshold))
        if self.prune_top_k is not None:
            # Rank the prompt's competitors (running or completed, not pruned, enough steps); stop those below top k.
            ranked = torch.where(eligible & ~self.pruned, log_scores, float("-inf")).view(-1, self.n)
            order = ranked.argsort(dim=1, descending=True, stable=True)
            arange = torch.arange(self.n, device=order.device).expand_as(order)
            rank = torch.empty_like(order).scatter_(1, order, arange)
            stop |= eligible & (rank.view(-1) >= self.prune_top_k)
        stop &= running
        # Never leave a prompt without a candidate that can finish: unless one has completed (not pruned), keep
        # its best running candidate (one without enough steps yet counts as best).
        survivors = ((running & ~stop) | (completed & ~self.pruned)).view(-1, self.n).any(dim=1)
        if not bool(survivors.all()):
            preference = torch.where(running, torch.where(eligible, log_scores, float("inf")), float("-inf"))
            prompts = torch.arange(survivors.numel(), device=stop.device)
            best = preference.view(-1, self.n).argmax(dim=1) + prompts * self.n
            stop[best[~survivors]] = False
        return stop


class _RecordStops(StoppingCriteria):
    """Wraps a criterion that may stop single rows (the caller's, stop strings) so the scorer knows which rows
    stopped and at which token; the wrapped result is returned unchanged."""

    def __init__(self, criterion: StoppingCriteria, scorer: _OnlineSPRMScorer):
        self.criterion = criterion
        self.scorer = scorer

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None = None, **kwargs: Any) -> Any:
        done = self.criterion(input_ids, scores, **kwargs)
        stopped = torch.as_tensor(done, device=input_ids.device).to(torch.bool).expand(input_ids.shape[0])
        self.scorer.stop_requests |= stopped
        return done


# --------------------------------------------------------------------------------------------------
# Best-of-N generate
# --------------------------------------------------------------------------------------------------

_GENERATE_SIGNATURE = inspect.signature(GenerationMixin.generate)
_UNSUPPORTED = {
    "assistant_model": "assisted decoding",
    "streamer": "streaming (N candidates per prompt)",
    "custom_generate": "a custom decoding method",
    "negative_prompt_ids": "classifier-free guidance",
    "negative_prompt_attention_mask": "classifier-free guidance",
    "inputs_embeds": "`inputs_embeds` (pass `input_ids`)",
    "cache": "a user cache (the prompt cache is built here)",
    "past_key_values": "a user cache (the prompt cache is built here)",
}


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed the global RNG that ``_sample`` draws from, restoring the caller's RNG state afterwards."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _decode_answers(
    tokenizer: Any, candidates: torch.Tensor, mask: torch.Tensor, prompt_length: int, extractor: AnswerExtractor
) -> list[Hashable | None]:
    answers = []
    for row, row_mask in zip(candidates, mask):
        completion = row[prompt_length:][row_mask[prompt_length:].bool()]
        answers.append(extractor(tokenizer.decode(completion.tolist(), skip_special_tokens=True)))
    return answers


@torch.no_grad()
def best_of_n_generate(
    model: Any,
    *args: Any,
    reasoning_effort: str | None = None,
    num_candidates: int | None = None,
    selection: str | SelectionStrategy = "sprm",
    answer_extractor: AnswerExtractor | None = None,
    prune_threshold: float | None = None,
    prune_top_k: int | None = None,
    prune_min_steps: int = 3,
    progress_bar: bool = True,
    seed: int | None = None,
    **kwargs: Any,
) -> BestOfNOutput:
    r"""Sample N trajectories per prompt in one batched pass, score them online with the SPRM head, pick one each.

    Usually reached through ``model.generate(...)`` with ``num_candidates`` or ``reasoning_effort``. All other
    arguments are those of transformers' ``generate`` (positional ones included): ``attention_mask`` (left
    padding for several prompts), a ``generation_config``, sampling arguments (``temperature``, ``top_p``, ...),
    ``max_new_tokens``, ``logits_processor``, ``stopping_criteria``, ``tokenizer``. Sampling is forced on
    (``do_sample=True``) unless explicitly turned off, which is an error. The model runs in eval mode (no dropout)
    and is restored to its mode afterwards.

    Args:
        model: a ``MetaStoneForCausalLMWithSPRM``.
        reasoning_effort: ``"low"``, ``"medium"`` or ``"high"`` (N = 2, 8, 32 by default), read from
            ``model.config.reasoning_effort_presets``. Exclusive with ``num_candidates``.
        num_candidates: N, the number of candidates per prompt (>= 1).
        selection: ``"sprm"`` (argmax score, the paper), ``"sprm_vote"`` (answers weighted by SPRM score),
            ``"majority"`` (plain vote), or a callable ``(scores [N], answers or None) -> index``. Voting needs
            ``tokenizer=`` to decode the completions; a callable receives answers when a tokenizer is given.
        answer_extractor: decoded completion -> hashable answer or ``None``; default [`extract_boxed_answer`]
            (last ``\boxed{}``, normalised with math-verify).
        prune_threshold: opt-in SPRM-guided pruning: stop a candidate once its running trajectory score
            (geometric mean of its scored steps so far) is below this value in (0, 1).
        prune_top_k: opt-in pruning: stop a candidate once it is outside the prompt's k best running scores.
            Pruning applies once a candidate has ``prune_min_steps`` scored steps, is checked whenever a step or
            think token is sampled, and never stops a prompt's last candidate that could still finish.
        prune_min_steps: scored steps a candidate needs before it can be pruned or ranked (default 3).
        progress_bar: show a tqdm bar over decoding steps (respects ``transformers`` progress-bar settings).
        seed: seed the sampling RNG for this call only (the caller's RNG state is restored); with a seed the result
            is reproducible.

    Returns:
        [`BestOfNOutput`].
    """
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError("Best-of-N generation supports decoder-only models only.")
    n = resolve_num_candidates(model.config.reasoning_effort_presets, reasoning_effort, num_candidates)
    strategy, needs_answers = _resolve_selection(selection)
    if prune_threshold is not None and not 0.0 < float(prune_threshold) < 1.0:
        raise ValueError(f"`prune_threshold` is a trajectory score in (0, 1), got {prune_threshold!r}.")
    if prune_top_k is not None and (not isinstance(prune_top_k, int) or prune_top_k < 1):
        raise ValueError(f"`prune_top_k` must be an int >= 1, got {prune_top_k!r}.")
    if not isinstance(prune_min_steps, int) or prune_min_steps < 1:
        raise ValueError(f"`prune_min_steps` must be an int >= 1, got {prune_min_steps!r}.")

    arguments = _GENERATE_SIGNATURE.bind(model, *args, **kwargs).arguments
    arguments.pop("self", None)
    extra = arguments.pop("kwargs", {})
    for name, what in _UNSUPPORTED.items():
        if arguments.get(name) is not None or extra.get(name) is not None:
            raise ValueError(f"Best-of-N generation does not support {what} (`{name}`).")
    input_ids = arguments.pop("inputs", None)
    if input_ids is None:
        input_ids = extra.pop("input_ids", None)
    if input_ids is None:
        raise ValueError("Best-of-N generation needs the prompt token ids (`input_ids`).")
    if isinstance(input_ids, torch.Tensor) and input_ids.shape[-1:] == (0,):
        raise ValueError("Best-of-N generation needs a non-empty prompt.")
    given_mask = extra.get("attention_mask")
    input_ids, _ = check_token_batch(input_ids, given_mask, model.config.get_text_config().vocab_size)
    if given_mask is not None:
        extra["attention_mask"] = given_mask.reshape(input_ids.shape)
    input_ids = input_ids.to(model.device)
    batch_size, prompt_length = input_ids.shape

    user_config = arguments.pop("generation_config", None)
    explicit_greedy = extra.get("do_sample") is False or (user_config is not None and user_config.do_sample is False)
    if explicit_greedy:
        raise ValueError("Best-of-N samples its candidates: `do_sample=False` would give N identical candidates.")
    # Resolved exactly as `generate` will resolve it, to read and validate; `generate` itself gets the caller's
    # arguments (so its warnings and defaults are those of a plain call) with sampling on and one sequence per row.
    generation_config, _ = model._prepare_generation_config(user_config, **extra)
    if (generation_config.num_beams or 1) > 1:
        raise ValueError("Best-of-N generation samples; it cannot be combined with beam search (`num_beams` > 1).")
    if (generation_config.num_return_sequences or 1) > 1:
        raise ValueError("Use `num_candidates`/`reasoning_effort` instead of `num_return_sequences` with Best-of-N.")
    if generation_config.return_dict_in_generate or any(
        getattr(generation_config, f, False)
        for f in ("output_scores", "output_logits", "output_hidden_states", "output_attentions")
    ):
        raise ValueError(
            "Best-of-N returns a `BestOfNOutput`; `return_dict_in_generate`/`output_*` are not supported (all hidden "
            "states in particular are never kept: scoring is online)."
        )
    extra.pop("num_return_sequences", None)
    # Stop strings are handled here (wrapped like the caller's criteria), so generate must not build them again.
    stop_strings = generation_config.stop_strings
    extra.pop("stop_strings", None)
    if user_config is not None:
        user_config = copy.deepcopy(user_config)
        user_config.do_sample, user_config.num_return_sequences, user_config.stop_strings = True, 1, None
    else:
        extra["do_sample"] = True
        if stop_strings:  # may come from the model's own generation config
            extra["stop_strings"] = None

    eos = generation_config.eos_token_id
    eos_ids = None if eos is None else torch.tensor(eos, device=input_ids.device).reshape(-1)
    pad_id = generation_config.pad_token_id
    if pad_id is None and eos_ids is not None:
        pad_id = int(eos_ids[0])
    if (prune_threshold is not None or prune_top_k is not None) and pad_id is None:
        raise ValueError("SPRM-guided pruning needs `pad_token_id` (or `eos_token_id`) to pad stopped candidates.")

    attention_mask = extra.pop("attention_mask", None)
    if attention_mask is None:
        # transformers' own inference: padding is detectable only when the pad id is set and differs from EOS.
        if pad_id is not None and (eos_ids is None or pad_id not in eos_ids.tolist()) and (input_ids == pad_id).any():
            attention_mask = (input_ids != pad_id).long()
        else:
            attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(input_ids.device).reshape(input_ids.shape)
    tokenizer = extra.get("tokenizer")
    if stop_strings and tokenizer is None:
        raise ValueError("`stop_strings` needs `tokenizer=` (as in transformers' generate).")
    if needs_answers and tokenizer is None:
        raise ValueError(f"`selection`={selection!r} votes on answers: pass `tokenizer=` to decode the candidates.")
    if callable(selection) and tokenizer is not None:
        needs_answers = True
    extractor = answer_extractor or extract_boxed_answer

    rows = batch_size * n
    with _eval_mode(model), _seeded(seed, model.device):
        # ---------------- prefill the prompt once (all tokens but the last), and score prompt step tokens
        use_cache = generation_config.use_cache is not False
        prefill_once = use_cache and generation_config.cache_implementation in (None, "dynamic") and prompt_length > 1
        has_mask = not bool(attention_mask.all())
        position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        # Candidates for prompt steps: positions whose next prompt token is a (real) step token.
        step_ids = torch.tensor(model.config.step_token_ids, device=input_ids.device)
        prompt_step_next = torch.isin(input_ids[:, 1:], step_ids) & attention_mask[:, 1:].bool()
        cache = None
        prompt_records: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        if prefill_once or bool(prompt_step_next.any()):
            cache = DynamicCache(config=model.config.get_text_config(decoder=True)) if prefill_once else None
            with model.capture_sprm_features() as captured:
                # No mask when there is no padding, exactly as `generate` does, so the cache is bit-identical.
                model.model(
                    input_ids=input_ids[:, :-1],
                    attention_mask=attention_mask[:, :-1] if has_mask else None,
                    position_ids=position_ids[:, :-1],
                    cache=cache,
                    use_cache=prefill_once,
                )
            prompt_rows, prompt_positions = prompt_step_next.nonzero(as_tuple=True)
            prompt_logits = model.sprm_logits_from_features(captured[-1][prompt_rows, prompt_positions]).float()
            del captured
            # Every candidate of prompt b (rows b*N .. b*N+N-1) shares the prompt's step logits.
            offsets = torch.arange(n, device=input_ids.device)
            prompt_records = (
                (prompt_rows[:, None] * n + offsets).flatten(),
                prompt_positions.repeat_interleave(n),
                prompt_logits.repeat_interleave(n),
            )
        if prefill_once:
            cache.batch_repeat_interleave(n)

        # ---------------- sample with transformers' own loop, scoring online
        max_length = generation_config.max_length
        if generation_config.max_new_tokens is not None:
            max_length = prompt_length + generation_config.max_new_tokens
        progress = None
        if progress_bar:
            progress = tqdm(total=max(max_length - prompt_length, 0), desc=f"Best-of-{n}", unit="tok", leave=False)
        scorer = _OnlineSPRMScorer(
            model,
            n,
            prompt_length,
            attention_mask.repeat_interleave(n, dim=0),
            eos_ids,
            prune_threshold,
            prune_top_k,
            prune_min_steps,
            progress,
        )
        if prompt_records is not None:
            scorer.add(*prompt_records)
        # The caller's criteria and stop strings may stop single rows: wrap them so the scorer knows which rows
        # stopped where; the scorer runs last (custom criteria follow generate's defaults, in order).
        stopping_criteria = StoppingCriteriaList(
            _RecordStops(criterion, scorer) for criterion in arguments.pop("stopping_criteria", None) or []
        )
        if stop_strings:
            stopping_criteria.append(_RecordStops(StopStringCriteria(tokenizer, stop_strings), scorer))
        stopping_criteria.append(scorer)
        if cache is not None:
            extra["cache"] = cache
        extra["return_sprm_logits"] = True  # plain decoding skips the head; the online scorer reads it
        handle = model.register_forward_hook(scorer.hook)
        try:
            sequences = GenerationMixin.generate(
                model,
                input_ids.repeat_interleave(n, dim=0),
                generation_config=user_config,
                stopping_criteria=stopping_criteria,
                attention_mask=attention_mask.repeat_interleave(n, dim=0),
                **arguments,
                **extra,
            )
        finally:
            handle.remove()
            if progress is not None:
                progress.close()
        del cache

    # ---------------- THE step mask on the final sequences decides which recorded logits count
    total_length = sequences.shape[1]
    # A row is real up to and including the token that stopped it (EOS, stop string, pruning, ...).
    positions = torch.arange(prompt_length, total_length, device=sequences.device)
    real = ~(scorer.finished[:, None] & (positions[None, :] >= scorer.finished_length[:, None]))
    candidate_mask = torch.cat([attention_mask.repeat_interleave(n, dim=0).bool(), real], dim=1).long()
    if pad_id is not None:
        # `_sample` keeps sampling rows that a criterion stopped when no EOS is configured; pad them as documented.
        sequences = sequences.masked_fill(F.pad(~real, (prompt_length, 0), value=False), pad_id)

    scoring_state_bytes = scorer.nbytes
    record_rows, record_positions, record_logits = scorer.records()
    step_logits = torch.zeros(rows, total_length, device=sequences.device)
    recorded = torch.zeros(rows, total_length, dtype=torch.bool, device=sequences.device)
    inside = record_positions < total_length
    step_logits[record_rows[inside], record_positions[inside]] = record_logits[inside]
    recorded[record_rows[inside], record_positions[inside]] = True
    score_mask = model.sprm_score_mask(sequences, candidate_mask)
    if bool((score_mask & ~recorded).any()):
        raise RuntimeError("Internal error: a scored step has no online SPRM logit.")
    result = build_sprm_scores(step_logits, score_mask)  # warns about non-finite rows (of the B*N batch)

    # ---------------- selection
    scores = result.scores.view(batch_size, n)
    # Strategies rank float64 scores: float32 `exp` rounds scores within ~6e-8 of 1 to exactly 1.0 (ties).
    ranking_scores = result.log_scores.double().exp().view(batch_size, n)
    answers: list[list[Hashable | None]] | None = None
    if needs_answers:
        flat = _decode_answers(tokenizer, sequences, candidate_mask, prompt_length, extractor)
        answers = [flat[b * n : (b + 1) * n] for b in range(batch_size)]
    chosen = []
    for b in range(batch_size):
        index = int(strategy(ranking_scores[b], None if answers is None else answers[b]))
        if not 0 <= index < n:
            raise ValueError(f"The selection strategy returned index {index}, outside 0..{n - 1}.")
        chosen.append(index)
    chosen_index = torch.tensor(chosen, dtype=torch.long, device=sequences.device)
    candidates = sequences.view(batch_size, n, total_length)

    def per_prompt(items: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        return [items[b * n : (b + 1) * n] for b in range(batch_size)]

    pruned_gap = (total_length - scorer.finished_length).masked_fill(~scorer.pruned, 0)
    return BestOfNOutput(
        sequences=candidates[torch.arange(batch_size, device=sequences.device), chosen_index],
        candidates=candidates,
        candidate_attention_mask=candidate_mask.view(batch_size, n, total_length),
        scores=scores,
        log_scores=result.log_scores.view(batch_size, n),
        step_scores=per_prompt(result.step_scores),
        step_positions=per_prompt(result.step_positions),
        num_steps=result.num_steps.view(batch_size, n),
        chosen_index=chosen_index,
        answers=answers,
        num_generated_tokens=real.sum(dim=1).view(batch_size, n),
        pruned=scorer.pruned.view(batch_size, n),
        tokens_saved=int(pruned_gap.sum()),
        scoring_state_bytes=scoring_state_bytes,
    )


__all__ = [
    "BestOfNOutput",
    "SELECTION_STRATEGIES",
    "best_of_n_generate",
    "extract_boxed_answer",
    "last_boxed_content",
    "resolve_num_candidates",
    "select_majority",
    "select_sprm",
    "select_sprm_vote",
]
