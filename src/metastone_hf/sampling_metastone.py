"""How the rows of a search sample their next token: as transformers' ``generate`` would sample each row.

The search's batch is not the batch transformers' processors were built for. ``generate`` builds logits processors
and stopping criteria for B prompts, each row holding its prompt (left padded to the batch's prompt width) and then
the same number of generated tokens. The search turns the B prompts into B x N rows, removes rows as they stop, and
merges rows of different lengths into one buffer (right aligned, masked columns on the left). [`RowwiseSampler`]
hands every processor and criterion the batch it expects:

* **Each row's own tokens.** Rows are grouped by their number of generated tokens; a group sees its rows' prompt
  (with that prompt's original left padding) and generated tokens, never the merge padding. Length-based processors
  (``min_new_tokens``, ``exponential_decay_length_penalty``, ``forced_eos_token_id``, ...) therefore see each row's
  own length, and the repetition penalty never sees a padding token.
* **Per-row state re-sliced to the rows.** Processors whose state is indexed by the batch row get the state of each
  row's prompt: the repetition penalty's ``prompt_ignore_length`` (the prompts' padding), the prompt index passed to
  ``prefix_allowed_tokens_fn``. Processors whose per-row state changes from call to call (SynthID watermarking) and
  classifier-free guidance (which runs a second model pass of its own) are refused with a clear error.

Sampling draws one exponential variate ``q`` per vocabulary entry and candidate slot and takes ``argmax(p / q)``,
which is exactly ``torch.multinomial``: a row's sample does not depend on which other rows are still in the batch.
The variates come from one stream for the whole call (the global RNG: the same samples as transformers'
``generate(num_return_sequences=N)`` under the same seed) or from one generator per prompt (``prompt_seeds``), in
which case a prompt's candidates do not depend on the other prompts of the call either: batching prompts returns
what one call per prompt returns.

This file is part of the remote-code set copied into saved checkpoints: it imports only ``torch`` and
``transformers``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria
from transformers.generation.logits_process import (
    ClassifierFreeGuidanceLogitsProcessor,
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    MinPLogitsWarper,
    PrefixConstrainedLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SynthIDTextWatermarkLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
    UnbatchedClassifierFreeGuidanceLogitsProcessor,
)

TRUNCATING_WARPERS = (TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper, TypicalLogitsWarper, EpsilonLogitsWarper,
                      EtaLogitsWarper)  # fmt: skip
"""Warpers that cut the vocabulary's tail (to ``-inf``): left out of the distribution token confidence reads."""

_REFUSED: dict[type, str] = {
    SynthIDTextWatermarkLogitsProcessor: "SynthID watermarking keeps per-row state across calls (`watermarking_config`)",
    UnbatchedClassifierFreeGuidanceLogitsProcessor: "classifier-free guidance runs a model pass of its own "
    "(`guidance_scale`)",
    ClassifierFreeGuidanceLogitsProcessor: "classifier-free guidance doubles the batch (`guidance_scale`)",
}


def _for_rows(processor: LogitsProcessor, prompts: torch.Tensor) -> LogitsProcessor:
    """``processor`` with its per-row state taken from each row's prompt (``prompts[i]`` for row ``i``)."""
    if isinstance(processor, RepetitionPenaltyLogitsProcessor) and isinstance(
        processor.prompt_ignore_length, torch.Tensor
    ):
        sliced = copy.copy(processor)
        sliced.prompt_ignore_length = processor.prompt_ignore_length.to(prompts.device)[prompts]
        return sliced
    if isinstance(processor, PrefixConstrainedLogitsProcessor):
        sliced = copy.copy(processor)
        allowed, prompt_of_row = processor._prefix_allowed_tokens_fn, prompts.tolist()
        sliced._prefix_allowed_tokens_fn = lambda row, tokens: allowed(prompt_of_row[row], tokens)
        sliced._num_beams = 1
        return sliced
    return processor


class RowwiseSampler:
    """transformers' logits processors, stopping criteria and sampling applied to the search's rows.

    Args:
        logits_processor: what ``generate`` built for the B prompts.
        stopping_criteria: the criteria to check after every token (the length limit and EOS, which the search
            applies per row itself, left out).
        prompt_length: the prompts' (padded) width.
        prompt_seeds: one seed per prompt for a generator of its own, or ``None`` to draw from the global RNG.
        device: where the generators live.

    Raises:
        ValueError: a processor the search cannot apply row by row, or ``prompt_seeds`` of the wrong length.
    """

    def __init__(
        self,
        logits_processor: LogitsProcessorList,
        stopping_criteria: Sequence[StoppingCriteria],
        prompt_length: int,
        num_prompts: int,
        prompt_seeds: Sequence[int] | None = None,
        device: torch.device | str = "cpu",
    ):
        for processor in logits_processor:
            for kind, why in _REFUSED.items():
                if isinstance(processor, kind):
                    raise ValueError(f"Search generation cannot apply `{type(processor).__name__}`: {why}.")
        self.processors = list(logits_processor)
        self.criteria = list(stopping_criteria)
        self.prompt_length = prompt_length
        seeds = None if prompt_seeds is None else check_prompt_seeds(list(prompt_seeds), num_prompts)
        self.generators = None if seeds is None else [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def _groups(self, generated: torch.Tensor, alive: torch.Tensor) -> list[tuple[torch.Tensor | None, int]]:
        """(rows, own width) for each group of live rows with the same number of generated tokens.

        ``None`` stands for "every row" when one group holds them all (no copy is made then).
        """
        # One host sync: the rows' lengths and liveness, grouped on the host.
        lengths, live = torch.stack([generated.long(), alive.long()]).tolist()
        groups: dict[int, list[int]] = {}
        for i, (length, is_live) in enumerate(zip(lengths, live)):
            if is_live:
                groups.setdefault(length, []).append(i)
        if len(groups) == 1 and all(live):
            return [(None, self.prompt_length + lengths[0])]
        device = generated.device
        return [
            (torch.tensor(rows, dtype=torch.long, device=device), self.prompt_length + length)
            for length, rows in sorted(groups.items())
        ]

    def _cached_groups(
        self, prompt: torch.Tensor, generated: torch.Tensor, alive: torch.Tensor, step: int | None
    ) -> list[tuple[torch.Tensor | None, int]]:
        """[`_groups`], read on the host once per set of rows: ``step`` counts the tokens every live row has been
        given so far, so while the rows stay the same tensors (no row left or joined) each group's width grows by the
        tokens given since."""
        if step is None:
            return self._groups(generated, alive)
        cached = getattr(self, "_grouped_for", None)
        if cached is not None and cached[0][0] is prompt and cached[0][1] is alive:
            return [(index, own + step - cached[1]) for index, own in cached[2]]
        groups = self._groups(generated, alive)
        self._grouped_for = ((prompt, alive), step, groups)
        return groups

    def _views(
        self,
        tokens: torch.Tensor,
        prompt: torch.Tensor,
        generated: torch.Tensor,
        alive: torch.Tensor,
        step: int | None = None,
    ):
        width = tokens.shape[1]
        for index, own in self._cached_groups(prompt, generated, alive, step):
            rows = tokens if index is None else tokens[index]
            yield index, rows[:, width - own :], prompt if index is None else prompt[index]

    def process(
        self,
        tokens: torch.Tensor,
        logits: torch.Tensor,
        prompt: torch.Tensor,
        generated: torch.Tensor,
        alive: torch.Tensor,
        step: int | None = None,
        untruncated: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The processed next-token logits of the live rows (a dead row's are returned as they came).

        Args:
            tokens: ``[R, W]`` the rows' buffer, right aligned.
            logits: ``[R, V]`` float32 next-token logits.
            prompt: ``[R]`` each row's prompt index.
            generated: ``[R]`` tokens generated by each row (its buffer holds ``prompt_length + generated`` of its own).
            alive: ``[R]`` rows still decoding.
            step: the tokens given to every live row so far, when the caller keeps count (rows that are the same
                tensors as at the last call, one token longer per step, are then grouped without a host sync).
            untruncated: also return the logits as they were before the first truncating warper
                ([`TRUNCATING_WARPERS`]: top-k, top-p, min-p, ...), every other processor applied (adaptive compute's
                token confidence reads them); returns ``(processed, untruncated)``.
        """
        if not self.processors:
            return (logits, logits) if untruncated else logits
        out, before = logits, logits
        for index, view, prompts in self._views(tokens, prompt, generated, alive, step):
            scores = logits if index is None else logits[index]
            kept = None
            for processor in self.processors:
                if kept is None and isinstance(processor, TRUNCATING_WARPERS):
                    kept = scores
                scores = _for_rows(processor, prompts)(view, scores)
            kept = scores if kept is None else kept
            if index is None:
                return (scores, kept) if untruncated else scores
            if out is logits:
                out = logits.clone()
                if untruncated:  # a second [R, V] copy only when the caller reads it
                    before = logits.clone()
            out[index] = scores
            if untruncated:
                before[index] = kept
        return (out, before) if untruncated else out

    def stopped(
        self,
        tokens: torch.Tensor,
        prompt: torch.Tensor,
        generated: torch.Tensor,
        alive: torch.Tensor,
        step: int | None = None,
    ) -> torch.Tensor:
        """``[R]`` rows that a stopping criterion stops, each criterion seeing the rows' own tokens."""
        stop = torch.zeros_like(alive)
        if not self.criteria:
            return stop
        for index, view, _ in self._views(tokens, prompt, generated, alive, step):
            verdict = torch.zeros(view.shape[0], dtype=torch.bool, device=stop.device)
            for criterion in self.criteria:
                verdict |= torch.as_tensor(criterion(view, None), device=stop.device).to(torch.bool).expand_as(verdict)
            if index is None:
                return verdict & alive
            stop[index] = verdict
        return stop & alive

    def sample(
        self,
        probs: torch.Tensor,
        slot: torch.Tensor,
        prompt: torch.Tensor,
        slots_per_prompt: torch.Tensor,
        alive: torch.Tensor,
    ) -> torch.Tensor:
        """One token per row: ``argmax(probs / q)``, ``q ~ Exp(1)`` drawn for every slot of the round.

        Args:
            probs: ``[R, V]`` the rows' sampling distributions.
            slot: ``[R]`` each row's slot in the round (slots of one prompt are consecutive).
            prompt: ``[R]`` each row's prompt.
            slots_per_prompt: ``[B]`` the number of slots of each prompt this round (prompt 0's come first).
            alive: ``[R]`` rows still decoding; a prompt's generator draws only while it has one.
        """
        vocab = probs.shape[-1]
        draws = self._draws(slot, prompt, slots_per_prompt, alive)
        if self.generators is None:
            q = torch.empty((draws, vocab), dtype=probs.dtype, device=probs.device)
            return (probs / q.exponential_(1)[slot]).argmax(dim=-1)
        q = torch.ones_like(probs)
        for b, members, slots, count in draws:
            drawn = torch.empty((count, vocab), dtype=probs.dtype, device=probs.device)
            drawn.exponential_(1, generator=self.generators[b])
            q[members] = drawn[slots]
        return (probs / q).argmax(dim=-1)

    def _draws(self, slot: torch.Tensor, prompt: torch.Tensor, slots_per_prompt: torch.Tensor, alive: torch.Tensor):
        """What each step draws: the slot count (one stream), or (prompt, its rows, their slots, its slot count) for
        every prompt with a live row. Read on the host once per set of rows (the same tensors), not every step."""
        key = (slot, prompt, slots_per_prompt, alive)
        cached = getattr(self, "_drawn_for", None)
        if cached is not None and all(a is b for a, b in zip(cached[0], key)):
            return cached[1]
        counts = getattr(self, "_slot_counts", None)
        if counts is None or counts[0] is not slots_per_prompt:
            counts = self._slot_counts = (slots_per_prompt, slots_per_prompt.tolist())
        per_prompt = counts[1]
        if self.generators is None:
            draws = sum(per_prompt)
        else:
            # One host sync: each row's prompt, slot and liveness; the rows of each prompt gathered on the host.
            prompts, slots, live = torch.stack([prompt.long(), slot.long(), alive.long()]).tolist()
            base = [0] * len(per_prompt)
            for b in range(1, len(per_prompt)):
                base[b] = base[b - 1] + per_prompt[b - 1]
            members: dict[int, tuple[list[int], list[int]]] = {}
            for i, (b, s) in enumerate(zip(prompts, slots)):
                members.setdefault(b, ([], []))
                members[b][0].append(i)
                members[b][1].append(s - base[b])
            device = prompt.device
            draws = [
                (b, torch.tensor(rows, device=device), torch.tensor(own, device=device), per_prompt[b])
                for b, (rows, own) in sorted(members.items())
                if any(live[i] for i in rows)
            ]
        self._drawn_for = (key, draws)
        return draws


def check_prompt_seeds(seed: Any, num_prompts: int) -> list[int] | None:
    """A list of ``num_prompts`` int seeds from ``seed`` when it is a sequence; ``None`` for an int or ``None``."""
    if seed is None or (isinstance(seed, int) and not isinstance(seed, bool)):
        return None
    if isinstance(seed, torch.Tensor):
        seed = seed.tolist()
    if not isinstance(seed, Sequence) or isinstance(seed, str):
        raise ValueError(f"`seed` must be an int, a list of one int per prompt, or None; got {type(seed).__name__}.")
    seeds = list(seed)
    if len(seeds) != num_prompts or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(
            f"`seed` as a list needs one int per prompt ({num_prompts} prompts), got {seed!r}. Pass an int to seed "
            "the whole call instead."
        )
    return seeds


__all__ = ["RowwiseSampler", "check_prompt_seeds"]
