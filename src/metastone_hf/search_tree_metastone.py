"""The engine of every search strategy: rows decoded in one batch while the SPRM head scores their steps.

[`StepSearch`] holds the rows of B prompts and the tree they grow; the strategies (``generation_metastone.py``) are
written with its pieces:

* **Prefill once.** The prompts (all but their last token) go through the model once; the last prompt token is fed
  once per prompt, and its logits give every candidate its first token.
* **Decode to a boundary.** Rows decode in one batch until their next step token (beam search, DVTS) or until they
  finish (EOS, a stop string or stopping criterion, the length limit). A row that reaches its boundary leaves the
  batch and the KV cache at once (``Cache.batch_select_indices``), so later forwards are smaller.
* **Score online.** A step's score is the SPRM logit of the features of the forward pass that sampled its step
  token: that forward captures the feature layer at the kept position (``return_sprm_logits=False``), and the head
  then runs on those features only for the rows whose sampled token is a step token. Nothing is re-run and no
  hidden state outlives the step.
* **Select and expand, per prompt and group.** The moment every row of a (prompt, group) has stopped (beam search:
  the prompt; DVTS: the subtree), its best beams survive (ranked by their running geometric-mean score, or by their
  last step's score) and join the running batch in its next decode step: no row waits for another prompt's or
  subtree's rows. Each survivor's last token is fed once and its cache repeated for its children, so nothing
  already decoded is processed again.

Rows sample through [`RowwiseSampler`] (``sampling_metastone.py``); parked rows and their caches are kept by
[`SearchRows`] (``search_rows_metastone.py``); pruning is [`Pruning`]'s; the output is assembled by
[`build_search_output`] (``search_output_metastone.py``).

This file is part of the remote-code set copied into saved checkpoints: it imports only ``torch``, ``transformers``
and its sibling sampling, scoring, selection, rows, pruning and output files.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.nn import functional as F
from transformers import DynamicCache, GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria
from transformers.utils.logging import tqdm

from .adaptive_metastone import AdaptiveConfig, PromptProgress, SignalState, percentile, token_confidence, vote_share
from .pruning_metastone import Pruning
from .sampling_metastone import RowwiseSampler
from .scoring_metastone import IncrementalStepRule, sprm_score_mask, sprm_step_token_mask
from .search_output_metastone import SearchNode, SearchOutput, build_search_output
from .search_rows_metastone import FinishedTrajectory, SearchRows, StepRecords
from .selection_metastone import AnswerExtractor, SelectionStrategy, extract_boxed_answer, rankable_scores


class StepSearch:
    """Rows decoded in one batch while the SPRM head scores their steps, and the tree they grow.

    The pieces every strategy is written with: [`expand`] (feed each row's last token once, then sample the first
    token of each of its children), [`decode`] (until every row has finished or reached its next step),
    [`search_rounds`] (the rounds of beam search and DVTS, per prompt and group: [`keep_best`] picks the survivors
    of a (prompt, group) whose rows have all stopped, and they are expanded within the running batch) and
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
        self.finished: list[FinishedTrajectory] = []
        self.parked: list[SearchRows] = []
        # Host copies of the (prompt, group) of every parked row (one list per part of `parked`) and of the rows
        # still decoding after the last step in which some row stopped: rounds end without reading the device.
        self.parked_units: list[list[tuple[int, int]]] = []
        self._live_units: set[tuple[int, int]] = set()
        # Every prompt owns N sampling slots (prompt b's are b * N + j); a (prompt, group) owns `group_slots` of them
        # (DVTS: subtree g's children always take slots g * M + j), so a row's noise never depends on other rows.
        self.slots_per_prompt = torch.full((self.batch,), num_candidates, dtype=torch.long, device=device)
        self.group_slots = num_candidates
        self.rounds: dict[tuple[int, int], int] = {}  # expansions so far of each (prompt, group)
        self._stopped_rows = False  # a row left the batch in the last step (a round may have ended)
        self.decode_steps = 0  # tokens given to every live row so far (one per decode step)
        self.alive = torch.ones(self.batch, dtype=torch.bool, device=device)
        self.tokens_generated = 0
        self.tokens_processed = 0
        self.pruning = Pruning()
        self.progress = tqdm(desc="search", unit="tok", leave=False) if progress_bar else None
        self.cache = cache if isinstance(cache, DynamicCache) and cache.get_seq_length() == 0 else None
        self.prompt_rule_state = (self.rule.previous, self.rule.seen_end)
        self.rows = SearchRows.empty(input_ids, self.rule)
        self.alive = self.alive[:0]
        self.admitted = 0  # prompts 0 .. admitted - 1 have been prefilled
        # Adaptive compute (Best-of-N only; `enable_adaptive`): off by default, and then nothing below runs.
        self.adaptive: AdaptiveConfig | None = None
        self.signal_state: SignalState | None = None

    def enable_adaptive(
        self, config: AdaptiveConfig, tokenizer: Any | None = None, answer_extractor: AnswerExtractor | None = None
    ) -> None:
        """Turn on adaptive compute ([`AdaptiveConfig`]): run with [`run_adaptive`]."""
        self.adaptive = config
        self.signal_state = SignalState(config.window_size)
        self.progress_of = [PromptProgress() for _ in range(self.batch)]
        self.roots: dict[int, SearchRows] = {}  # each running prompt's row (its prompt, prefilled), with its cache
        self.answer_tokenizer = tokenizer
        self.answer_extractor = answer_extractor or extract_boxed_answer
        self._ended: list[FinishedTrajectory] = []  # trajectories ended since the loop last looked
        self._cancel: list[int] = []  # prompts whose running candidates stop in the next step (consensus)
        self._answers: dict[int, Any] = {}

    # -------------------------------------------------------------- prompts
    def _prefill(self, prompts: torch.Tensor, cache: DynamicCache) -> SearchRows:
        """Run prompts ``prompts`` once (all but their last token) into ``cache``; score the step tokens they hold."""
        ids, mask = self.prompt_ids[prompts], self.prompt_mask[prompts]
        batch, length = ids.shape
        device = ids.device
        records = [StepRecords() for _ in range(batch)]
        last_logit = torch.full((batch,), float("nan"), device=device)
        if length > 1:
            position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
            with self.model.capture_sprm_features() as captured:
                # No mask when there is no padding, exactly as `generate` does.
                self.model.model(
                    input_ids=ids[:, :-1],
                    attention_mask=mask[:, :-1] if self.prompt_has_padding else None,
                    position_ids=position_ids[:, :-1],
                    cache=cache,
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
        previous, seen_end = self.prompt_rule_state
        return SearchRows(
            tokens=ids, mask=mask, prompt=prompts.clone(), group=zeros, node=zeros.clone(),
            slot=prompts * self.n, generated=zeros.clone(), offset=zeros.clone(),
            last_logit=last_logit, previous=previous[prompts], seen_end=seen_end[prompts],
            records=records, signal=None if self.signal_state is None else self.signal_state.fresh(batch, device),
        )  # fmt: skip

    # -------------------------------------------------------------- forward and sampling
    def _forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed every row's last token; returns the next-token logits and the head's features at that position.

        The head itself runs later, in `_sample`, on the rows whose new token is a step token only.
        """
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
            return_sprm_logits=False,
            **self.forward_kwargs,
        )
        with self.model.capture_sprm_features() as captured:
            out = self.model(**inputs, return_dict=True)
        self.tokens_processed += inputs["input_ids"].numel()
        return out.logits[:, -1].to(copy=True, dtype=torch.float32), captured[-1][:, -1].detach()

    def _sample(self, logits: torch.Tensor, features: torch.Tensor, at_steps: bool) -> None:
        """Sample one token per row, score the new steps, retire or park the rows that stop."""
        rows = self.rows
        # Every live row takes one token per step: the sampler groups rows by length once per set of rows.
        step = self.decode_steps if self.remove_stopped_rows else None
        confidence = None
        if self.adaptive is not None and self.adaptive.signal == "confidence":
            processed, untruncated = self.sampler.process(
                rows.tokens, logits, rows.prompt, rows.generated, self.alive, step, untruncated=True
            )
            confidence = token_confidence(untruncated, self.adaptive.confidence_top_k)
        else:
            processed = self.sampler.process(rows.tokens, logits, rows.prompt, rows.generated, self.alive, step)
        probs = F.softmax(processed, dim=-1)
        new_tokens = self.sampler.sample(probs, rows.slot, rows.prompt, self.slots_per_prompt, self.alive)
        if not self.remove_stopped_rows:
            new_tokens = torch.where(self.alive, new_tokens, self.pad)
        position = self.prompt_length + rows.generated - 1  # score position of the new token
        rows.tokens = torch.cat([rows.tokens, new_tokens[:, None]], dim=1)
        rows.mask = F.pad(rows.mask, (0, 1), value=1)
        rows.generated = rows.generated + self.alive
        sampled = len(rows) if self.remove_stopped_rows else int(self.alive.sum())  # every row decodes then
        self.tokens_generated += sampled
        if self.progress is not None:
            self.progress.update(sampled)
        self.decode_steps += 1
        candidate, counts = self.rule.update(new_tokens)
        candidate &= self.alive
        counts &= self.alive
        head_logits = None  # every row's head logit, when the SPRM signal needs them anyway
        if self.signal_state is not None:  # the running statistics, on the device (no host sync)
            if confidence is not None:
                values, take = confidence, self.alive
            else:
                head_logits = self.model.sprm_logits_from_features(features).float().reshape(-1)
                values, take = F.logsigmoid(head_logits), counts
            rows.signal = self.signal_state.update(rows.signal, values, take)

        def record() -> None:
            steps = candidate.nonzero().flatten()
            if head_logits is None:
                step_logits = self.model.sprm_logits_from_features(features[steps]).float()
            else:  # already computed for every row: not a second head pass over the step rows
                step_logits = head_logits[steps]
            # One host read for the rows, positions and logits (float64 holds each of them exactly).
            host = torch.stack([steps.double(), position[steps].double(), step_logits.double()]).tolist()
            for i, at, logit in zip(*host):
                rows.records[int(i)].add(int(at), logit)
            # `counts` is a subset of `candidate`: the rows that count take their new step's logit.
            kept = torch.where(counts[steps], step_logits, rows.last_logit[steps])
            rows.last_logit = rows.last_logit.index_put((steps,), kept)

        if self.pruning.active:  # pruning ranks the running scores, new steps included
            if bool(candidate.any()):
                record()
            self._settle(new_tokens, counts & at_steps)
        else:
            self._settle(new_tokens, counts & at_steps, candidate.any(), record)

    def _settle(
        self,
        new_tokens: torch.Tensor,
        at_step: torch.Tensor,
        any_step: torch.Tensor | None = None,
        record: Any = None,
    ) -> None:
        """Retire, prune or park the rows that stop; ``record`` (the new steps' scores, when ``any_step``) runs first,
        decided in the same host sync as whether any row stopped."""
        rows = self.rows
        ended = torch.zeros_like(self.alive)  # ended on its own: EOS, a stop string or criterion
        if self.eos is not None:
            ended |= torch.isin(new_tokens, self.eos)
        step = self.decode_steps if self.remove_stopped_rows else None
        ended |= self.sampler.stopped(rows.tokens, rows.prompt, rows.generated, self.alive, step)
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
                pruned = self.pruning.rows_to_prune(
                    rows.prompt, rows.slot, scores, running=self.alive & ~ended, finishing=ended, finished=self.finished
                )
        if self.signal_state is not None:
            # Adaptive early stopping: a candidate below its prompt's threshold (warm-up candidates have -inf), or a
            # running one of a prompt that reached its consensus. Decided on the device, read in the sync below.
            final = (ended | cut) & self.alive
            pruned = self.signal_state.below(rows.signal, final) & self.alive
            if self._cancel:
                cancel = torch.tensor(self._cancel, dtype=rows.prompt.dtype, device=rows.prompt.device)
                pruned |= torch.isin(rows.prompt, cancel) & self.alive & ~final
                self._cancel = []
        done = (ended | cut) & ~pruned
        parked = at_step & self.alive & ~done & ~pruned
        stopped = done | pruned | parked
        # One host decision per step: only a step in which some row stopped looks at which rows did.
        if any_step is None:
            self._stopped_rows = bool(stopped.any())
        else:
            has_steps, self._stopped_rows = torch.stack([any_step, stopped.any()]).tolist()
            if has_steps:
                record()
        if not self._stopped_rows:
            return
        # One host sync for the bookkeeping of the rows that stopped.
        columns = [done, pruned, parked, rows.generated, rows.prompt, rows.node, rows.slot, rows.group, self.alive]
        statistics = None
        if self.signal_state is None:
            host = list(zip(*torch.stack([c.long() for c in columns]).tolist()))
        else:  # the same one read, with each row's statistic and running score (float64 holds the ints exactly)
            scores = self.running_log_scores(rows)
            extra = [self.signal_state.statistic(rows.signal), scores[0], scores[1]]
            table = torch.stack([c.double() for c in columns + extra]).tolist()
            host = list(zip(*(map(int, column) for column in table[: len(columns)])))
            statistics, scores = table[len(columns)], (table[len(columns) + 1], table[len(columns) + 2])
        self._live_units = {(row[4], row[7]) for row in host if row[8] and not any(row[:3])}
        for i, (is_done, is_pruned, _, generated, prompt, node, slot, _, _) in enumerate(host):
            if is_done or is_pruned:
                statistic = math.nan if statistics is None else statistics[i]
                self._retire(i, bool(is_pruned), scores, generated, prompt, node, slot, statistic)
        parked_rows = [i for i, row in enumerate(host) if row[2]]
        if parked_rows:
            self._park(torch.tensor(parked_rows, device=stopped.device), [host[i] for i in parked_rows])
        if self.remove_stopped_rows:
            kept = [i for i, row in enumerate(host) if not any(row[:3])]
            keep = torch.tensor(kept, dtype=torch.long, device=stopped.device)
            self.cache.batch_select_indices(keep)
            self.rows = rows.select(keep)
            self.rule.select(keep)
            self.alive = self.alive[keep]
        else:
            self.alive = self.alive & ~stopped

    def _retire(
        self,
        i: int,
        pruned: bool,
        scores: tuple[torch.Tensor, torch.Tensor] | None,
        generated: int,
        prompt: int,
        node: int,
        slot: int,
        statistic: float = math.nan,
    ) -> None:
        """Move row ``i`` (``generated`` tokens, ``prompt``, ``node``, ``slot``, read on the host) to the finished
        trajectories (with its running score when pruning needs it)."""
        rows = self.rows
        self.tree[prompt][node].end = self.prompt_length + generated
        self.tree[prompt][node].status = "pruned" if pruned else "completed"
        self.finished.append(
            FinishedTrajectory(
                prompt=prompt,
                node=node,
                order=(self.tree[prompt][node].round, slot),
                generated=rows.tokens[i, rows.tokens.shape[1] - generated :].clone(),
                records=rows.records[i],
                log_score=float(scores[0][i]) if scores is not None else math.nan,
                num_steps=int(scores[1][i]) if scores is not None else 0,
                pruned=pruned,
                statistic=statistic,
            )
        )
        if self.adaptive is not None:
            self._ended.append(self.finished[-1])

    def _park(self, index: torch.Tensor, host: list[tuple[int, ...]]) -> None:
        """Take rows that reached a step out of the batch, with their cache, until the round's selection.

        ``host``: each row's ``(done, pruned, parked, generated, prompt, node, slot, group, alive)`` read on the host.
        """
        parked = self.rows.park(index, self.cache, self.rule)
        self.parked_units.append([(row[4], row[7]) for row in host])
        for (_, _, _, generated, prompt, node, _, _, _), score in zip(host, torch.sigmoid(parked.last_logit).tolist()):
            self.tree[prompt][node].end = self.prompt_length + generated
            self.tree[prompt][node].step_score = score
        self.parked.append(parked)

    # -------------------------------------------------------------- the strategies' pieces
    def expand(self, fanout: torch.Tensor, groups: torch.Tensor | None = None, at_steps: bool = False) -> None:
        """Feed each row's last token once, then give row ``i`` ``fanout[i]`` children, each with its first token.

        Args:
            fanout: ``[R]`` children per row (0 drops the row).
            groups: ``[sum(fanout)]`` the children's groups (default: their parent's).
            at_steps: children that sample a step token already stop there (beam search, DVTS).
        """
        self._grow(fanout, 0, groups, at_steps)

    def _grow(
        self,
        fanout: torch.Tensor,
        continuing: int,
        groups: torch.Tensor | None,
        at_steps: bool,
        child_slots: list[int] | None = None,
    ) -> None:
        """One decode step in which rows ``continuing:`` are expanded: row ``i`` becomes ``fanout[i]`` children.

        The first ``continuing`` rows (fanout 1) simply take their next token; the others' children start a new
        round of their (prompt, group), with new tree nodes and the group's sampling slots. Children of one
        (prompt, group) must be consecutive.
        """
        logits, features = self._forward()
        device = fanout.device
        index = torch.arange(len(self.rows), device=device).repeat_interleave(fanout)
        self.cache.batch_select_indices(index)
        self.rows = self.rows.select(index)
        self.rule.select(index)
        rows = self.rows
        if groups is not None:
            rows.group[len(rows) - len(groups) :] = groups
        self.alive = torch.ones(len(rows), dtype=torch.bool, device=device)
        new = slice(continuing, None)
        nodes, slots, taken = [], [], {}
        for prompt, group, parent, generated in zip(
            rows.prompt[new].tolist(), rows.group[new].tolist(), rows.node[new].tolist(), rows.generated[new].tolist()
        ):
            unit = (prompt, group)
            if unit not in taken:
                taken[unit] = 0
                self.rounds[unit] = self.rounds.get(unit, 0) + 1
            tree = self.tree[prompt]
            if tree[parent].status != "root":
                tree[parent].status = "expanded"
            start = self.prompt_length + generated
            tree.append(SearchNode(len(tree), parent, start, start, self.rounds[unit], group))
            nodes.append(len(tree) - 1)
            slot = group * self.group_slots + taken[unit] if child_slots is None else child_slots[len(slots)]
            if slot >= self.n:
                raise RuntimeError("Internal error: a round of the search has more than N rows.")
            slots.append(prompt * self.n + slot)
            taken[unit] += 1
        if nodes:
            rows.node[new] = torch.tensor(nodes, dtype=rows.node.dtype, device=device)
            rows.slot[new] = torch.tensor(slots, dtype=rows.slot.dtype, device=device)
        self._sample(logits[index], features[index], at_steps)

    def run(
        self,
        at_steps: bool = False,
        width: int = 0,
        budget: int = 0,
        ranking: str = "mean",
        first_groups: torch.Tensor | None = None,
        capacity: int | None = None,
    ) -> Iterator[int]:
        """Decode every prompt to its N candidates, admitting prompts as room frees; yields each prompt as it ends.

        Prompts are admitted in order, as many as ``capacity`` rows hold (N rows each; all of them when ``None``;
        see [`_admissible`]): each is prefilled and its N children join the running batch in its next decode step,
        the moment N rows are free. With ``at_steps`` (beam search, DVTS), rows stop at their next step; the moment every
        row of a (prompt, group) has stopped, its ``width`` best parked rows (by ``ranking``) survive and share
        ``budget`` children ([`split_budget`]), which join the running batch in its next decode step: no row waits
        for another prompt's or group's rows. A prompt's first children get groups ``first_groups`` (DVTS's
        subtrees). Yields the index of every prompt whose candidates are all finished, as soon as they are.
        """
        active: set[int] = set()
        survivors = None
        while True:
            admit = self._admissible(survivors, budget, capacity, len(active))
            if admit or survivors is not None:
                self.admitted += len(admit)
                active.update(admit)
                self._admit(survivors, budget, admit, first_groups, at_steps)
            elif len(self.rows) if self.remove_stopped_rows else bool(self.alive.any()):
                logits, features = self._forward()
                self._sample(logits, features, at_steps)
            else:
                break
            survivors = None
            if at_steps and self.parked and (self._stopped_rows or not len(self.rows)):
                survivors = self.keep_best(self._take_ready(), width, ranking)
            if self._stopped_rows or not len(self.rows):
                present = {prompt for prompt, _ in self._live_units} if len(self.rows) else set()
                present.update(prompt for units in self.parked_units for prompt, _ in units)
                if survivors is not None:
                    present.update(survivors.prompt.tolist())
                for prompt in sorted(active - present):
                    active.discard(prompt)
                    yield prompt

    # -------------------------------------------------------------- adaptive compute (Best-of-N)
    def run_adaptive(self, capacity: int | None = None) -> Iterator[int]:
        """Best-of-N with adaptive compute ([`AdaptiveConfig`]); yields each prompt as it ends, like [`run`].

        A prompt is admitted with its ``warmup`` candidates (slots ``0 .. warmup - 1``); when they have all ended its
        threshold is set from their statistics. Afterwards, whenever one of its candidates ends, it either stops
        (consensus reached, or N candidates admitted and ended) or its free slots take its next candidates (slot
        ``k`` for candidate ``k``) in the next decode step, at most ``parallel`` in flight. Every decision depends on
        the prompt's own candidates only, so with per-prompt seeds a prompt's candidates do not depend on the other
        prompts of the call. ``capacity`` (rows) admits prompts while ``width`` rows each fit
        ([`AdaptiveConfig.width`]): a running prompt never waits for room.
        """
        config = self.adaptive
        assert config is not None, "enable_adaptive() first"
        active: set[int] = set()
        pending: dict[int, int] = {}
        while True:
            room = self.batch if capacity is None else capacity // config.width - len(active)
            if not active:
                room = max(room, 1)  # a prompt wider than `capacity` still runs, alone
            admit = list(range(self.admitted, min(self.batch, self.admitted + max(room, 0))))
            if admit or pending:
                self.admitted += len(admit)
                active.update(admit)
                self._admit_adaptive(admit, pending)
                pending = {}
            elif len(self.rows):
                logits, features = self._forward()
                self._sample(logits, features, False)
            else:
                break
            for prompt in active:
                if self.progress_of[prompt].in_flight:
                    self.progress_of[prompt].decode_steps += 1
            if not (self._stopped_rows or not len(self.rows)):
                continue
            touched = set()
            for f in self._ended:
                progress = self.progress_of[f.prompt]
                progress.in_flight -= 1
                progress.ended.append(f)
                touched.add(f.prompt)
            self._ended = []
            for prompt in sorted(touched):
                more = self._adapt(prompt)
                if more:
                    pending[prompt] = more
            for prompt in sorted(active):
                if not self.progress_of[prompt].in_flight and prompt not in pending:
                    active.discard(prompt)
                    self.roots.pop(prompt, None)
                    for f in self.progress_of[prompt].ended:  # its answers are cached by id: drop them with it
                        self._answers.pop(id(f), None)
                    self.progress_of[prompt].ended = []
                    yield prompt

    def _adapt(self, prompt: int) -> int:
        """After some candidates of ``prompt`` ended: set its threshold once the warm-up is over, check its
        consensus; returns how many new candidates it takes in the next step."""
        config, progress = self.adaptive, self.progress_of[prompt]
        if not progress.warm:
            if progress.in_flight:
                return 0
            progress.warm = True
            if config.keep_percent < 100:  # from the warm-up candidates only: nothing else has run yet
                progress.threshold = percentile([f.statistic for f in progress.ended], 100.0 - config.keep_percent)
            if config.threshold_floor is not None:
                progress.threshold = max(progress.threshold, float(config.threshold_floor))
        if progress.stopping:
            return 0
        if config.consensus is not None and self.consensus(prompt) >= config.consensus:
            progress.stopping = True
            if progress.in_flight:
                self._cancel.append(prompt)
            return 0
        more = min((config.parallel or config.warmup) - progress.in_flight, self.n - progress.admitted)
        if more <= 0 and not progress.in_flight:
            progress.stopping = True
        return max(more, 0)

    def consensus(self, prompt: int) -> float:
        """The consensus of ``prompt`` over its candidates ended so far (see [`AdaptiveConfig`])."""
        config, progress = self.adaptive, self.progress_of[prompt]
        finished = [f for f in progress.ended if not f.pruned]
        if config.consensus_by == "score":
            return max((trajectory_score(f) for f in finished), default=0.0)
        answers = [self._answer(f) for f in finished]
        weights = [trajectory_score(f) if config.signal == "sprm" else f.statistic for f in finished]
        return vote_share(answers, weights)

    def _answer(self, f: FinishedTrajectory) -> Any:
        key = id(f)
        if key not in self._answers:
            if self.answer_tokenizer is None:
                raise ValueError("`adaptive` with `consensus_by='vote'` needs `tokenizer=` to read the answers.")
            text = self.answer_tokenizer.decode(f.generated.tolist(), skip_special_tokens=True)
            self._answers[key] = self.answer_extractor(text)
        return self._answers[key]

    def _admit_adaptive(self, prompts: list[int], pending: dict[int, int]) -> None:
        """One decode step that also starts ``pending[p]`` new candidates of running prompts (from their kept
        prompt row) and the warm-up candidates of the newly admitted ``prompts``."""
        device = self.prompt_ids.device
        config = self.model.config.get_text_config(decoder=True)
        warmup, state = self.adaptive.warmup, self.signal_state
        live = len(self.rows)
        parts, fanouts, child_slots = [], [], []
        if live:
            parts.append(self.rows.park(torch.arange(live, device=device), self.cache, self.rule))
            fanouts.append(torch.ones(live, dtype=torch.long, device=device))
        for prompt, count in sorted(pending.items()):
            progress = self.progress_of[prompt]
            root = self.roots[prompt].select(torch.zeros(1, dtype=torch.long, device=device))
            root.signal[:, state.threshold] = progress.threshold
            parts.append(root)
            fanouts.append(torch.full((1,), count, dtype=torch.long, device=device))
            child_slots += range(progress.admitted, progress.admitted + count)
            progress.admitted += count
            progress.in_flight += count
        if prompts:
            index = torch.tensor(prompts, dtype=torch.long, device=device)
            cache = DynamicCache(config=config)
            fresh = self._prefill(index, cache)
            roots = fresh.park(torch.arange(len(prompts), device=device), cache, fresh)
            for i, prompt in enumerate(prompts):
                self.roots[prompt] = roots.select(torch.tensor([i], device=device))
                self.progress_of[prompt].admitted = self.progress_of[prompt].in_flight = warmup
                child_slots += range(warmup)
            parts.append(roots)
            fanouts.append(torch.full((len(prompts),), warmup, dtype=torch.long, device=device))
        self.resume(SearchRows.merge(parts) if len(parts) > 1 else parts[0])
        self._grow(torch.cat(fanouts), live, None, False, child_slots)

    def _adaptive_summary(self, prompts: Sequence[int]) -> dict[str, list]:
        return {
            "threshold": [self.progress_of[p].threshold for p in prompts],
            "decode_steps": [self.progress_of[p].decode_steps for p in prompts],
            "weights_are_statistics": self.adaptive.signal == "confidence",
        }

    def _admissible(self, survivors: SearchRows | None, budget: int, capacity: int | None, active: int) -> list[int]:
        """The prompts to admit now: the next ones in order, while their N rows fit.

        ``capacity`` counts the rows that decode in the next step (the running rows and the survivors' children): a
        prompt is admitted once N rows are free, whichever prompts freed them. Parked rows (beam search, DVTS: rows
        waiting for the rest of their round) hold memory, not compute, so they do not count against it; memory is
        bounded instead by the prompts in flight: a prompt never holds more than N rows (decoding or parked), and
        at most ``2 * capacity // N`` prompts are in flight. So the KV cache holds at most twice ``capacity`` rows,
        and for Best-of-N (no parked rows) at most ``capacity``.
        """
        if capacity is None:
            return list(range(self.admitted, self.batch))
        decoding = len(self.rows)
        if survivors is not None:
            decoding += budget * len(set(zip(survivors.prompt.tolist(), survivors.group.tolist())))
        room = min((capacity - decoding) // self.n, (2 * capacity) // self.n - active)
        if active == 0:
            room = max(room, 1)  # a prompt of more than `capacity` rows still runs, alone
        return list(range(self.admitted, min(self.batch, self.admitted + max(room, 0))))

    def _take_ready(self) -> SearchRows | None:
        """The parked rows of every (prompt, group) that has no row decoding any more, taken out of ``parked``."""
        # Read on the host: the units still decoding (as of the last step in which a row stopped, which is the step
        # that calls this) and the parked rows' units, kept since they were parked.
        live = self._live_units if len(self.rows) else set()
        ready, waiting, waiting_units = [], [], []
        for part, units in zip(self.parked, self.parked_units, strict=True):
            is_ready = [unit not in live for unit in units]
            if all(is_ready):
                ready.append(part)
            elif not any(is_ready):
                waiting.append(part)
                waiting_units.append(units)
            else:
                device = part.prompt.device
                ready.append(part.select(torch.tensor([i for i, r in enumerate(is_ready) if r], device=device)))
                waiting.append(part.select(torch.tensor([i for i, r in enumerate(is_ready) if not r], device=device)))
                waiting_units.append([unit for unit, r in zip(units, is_ready) if not r])
        self.parked, self.parked_units = waiting, waiting_units
        return SearchRows.merge(ready) if ready else None

    def _admit(
        self,
        survivors: SearchRows | None,
        budget: int,
        prompts: list[int],
        first_groups: torch.Tensor | None,
        at_steps: bool,
    ) -> None:
        """One decode step that also expands ``survivors`` (parked rows) and the newly admitted ``prompts``.

        Running rows, survivors and the prefilled prompts are merged into one batch (right aligned, as parked rows
        are merged), the survivors get ``budget`` children per (prompt, group), each new prompt N.
        """
        device = self.prompt_ids.device
        config = self.model.config.get_text_config(decoder=True)
        live = len(self.rows)
        parts, fanouts = [], []
        if live:
            parts.append(self.rows.park(torch.arange(live, device=device), self.cache, self.rule))
            fanouts.append(torch.ones(live, dtype=torch.long, device=device))
        if survivors is not None:
            parts.append(survivors)
            fanouts.append(split_budget(survivors, budget))
        groups = None
        if prompts:
            index = torch.tensor(prompts, dtype=torch.long, device=device)
            reuse = not parts and self.cache is not None and self.admitted == len(prompts)  # `generate`'s, unused
            cache = self.cache if reuse else DynamicCache(config=config)
            fresh = self._prefill(index, cache)
            fanouts.append(torch.full((len(prompts),), self.n, dtype=torch.long, device=device))
            if first_groups is not None:
                groups = first_groups.repeat(len(prompts))
            if not parts:  # nothing else decodes: the prompts' cache is the batch's, as `generate` prepared it
                self.cache, self.rows = cache, fresh
                self.rule.previous, self.rule.seen_end = fresh.previous, fresh.seen_end
            else:
                parts.append(fresh.park(torch.arange(len(prompts), device=device), cache, fresh))
        if parts:
            self.resume(SearchRows.merge(parts) if len(parts) > 1 else parts[0])
        self._grow(torch.cat(fanouts), live, groups, at_steps)

    def output_for(
        self,
        prompt: int,
        search: str,
        selection: str | SelectionStrategy = "sprm",
        answer_extractor: AnswerExtractor | None = None,
        tokenizer: Any | None = None,
    ) -> SearchOutput:
        """The output of prompt ``prompt`` alone (a batch of one), once it has finished; its trajectories are freed."""
        mine = [dataclasses.replace(f, prompt=0) for f in self.finished if f.prompt == prompt]
        self.finished = [f for f in self.finished if f.prompt != prompt]
        tree = self.tree[prompt]
        self.tree[prompt] = []
        return build_search_output(
            self.model, mine, [tree], self.prompt_ids[prompt : prompt + 1], self.prompt_mask[prompt : prompt + 1],
            self.n, self.pad, self.max_new_tokens, search, selection, answer_extractor, tokenizer,
            sum(node.end - node.start for node in tree[1:]), 0,
            None if self.adaptive is None else self._adaptive_summary([prompt]),
        )  # fmt: skip

    def completed_per_prompt(self) -> torch.Tensor:
        counts = torch.zeros(self.batch, dtype=torch.long)
        for f in self.finished:
            counts[f.prompt] += 1
        return counts

    def keep_best(self, parked: SearchRows | None, width: int, ranking: str = "mean") -> SearchRows | None:
        """The ``width`` best parked rows of each (prompt, group); prompts that have N candidates keep none.

        ``ranking="mean"`` ranks by the running trajectory score (geometric mean of the steps so far), ``"last"`` by
        the score of the step just reached. Ties keep the earlier slot.
        """
        if parked is None:
            return None
        key = self.running_log_scores(parked)[0] if ranking == "mean" else parked.last_logit
        key = rankable_scores(key).tolist()
        # One host read of the rows' prompts, groups, slots and nodes; the ranking runs on the host.
        prompts, groups, slots, nodes = torch.stack([parked.prompt, parked.group, parked.slot, parked.node]).tolist()
        completed: dict[int, int] = {}
        for f in self.finished:
            completed[f.prompt] = completed.get(f.prompt, 0) + 1
        units: dict[tuple[int, int], list[int]] = {}
        for i, unit in enumerate(zip(prompts, groups)):
            units.setdefault(unit, []).append(i)
        keep = []
        for (prompt, _), members in sorted(units.items()):
            order = sorted(members, key=lambda i: (-key[i], slots[i]))
            chosen = [] if completed.get(prompt, 0) >= self.n else order[:width]
            keep.extend(chosen)
            for i in set(order) - set(chosen):
                self.tree[prompt][nodes[i]].status = "dropped"
        if not keep:
            return None
        return parked.select(torch.tensor(keep, dtype=torch.long, device=parked.prompt.device))

    def resume(self, survivors: SearchRows) -> None:
        """Make ``survivors`` (parked rows, possibly of different lengths) the batch, with their cache."""
        self.cache = survivors.resume(self.model.config.get_text_config(decoder=True), self.rule)
        self.rows = survivors
        self.alive = torch.ones(len(survivors), dtype=torch.bool, device=survivors.prompt.device)

    def running_log_scores(self, rows: SearchRows) -> tuple[torch.Tensor, torch.Tensor]:
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
        return build_search_output(
            self.model, self.finished, self.tree, self.prompt_ids, self.prompt_mask, self.n, self.pad,
            self.max_new_tokens, search, selection, answer_extractor, tokenizer, self.tokens_generated,
            self.tokens_processed, None if self.adaptive is None else self._adaptive_summary(range(self.batch)),
        )  # fmt: skip


def trajectory_score(f: FinishedTrajectory) -> float:
    """The running SPRM trajectory score of an ended candidate (0 without steps)."""
    return math.exp(f.log_score) if f.num_steps > 0 else 0.0


def split_budget(survivors: SearchRows, budget: int) -> torch.Tensor:
    """Children per survivor: each (prompt, group) shares ``budget`` children, the better-ranked first."""
    units: dict[tuple[int, int], list[int]] = {}
    for i, unit in enumerate(zip(*torch.stack([survivors.prompt, survivors.group]).tolist())):
        units.setdefault(unit, []).append(i)
    fanout = [0] * len(survivors)
    for members in units.values():
        base, extra = divmod(budget, len(members))
        for k, i in enumerate(members):
            fanout[i] = base + (1 if k < extra else 0)
    return torch.tensor(fanout, dtype=torch.long, device=survivors.prompt.device)


__all__ = ["StepSearch", "split_budget"]
