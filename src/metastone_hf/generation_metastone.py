"""Test-time search guided by the MetaStone-S1 SPRM head: Best-of-N, beam search over steps, DVTS.

Entry point: ``model.generate(input_ids, num_candidates=N)``, ``model.generate(..., reasoning_effort="medium")``,
and ``search="beam"`` / ``search="dvts"`` with ``beam_width=M`` (see [`search_generate`]; every knob is a field of
[`SearchConfig`]). Called without those arguments, ``generate`` is transformers' own. Each strategy is a short
function ([`best_of_n`], [`beam_search`], [`dvts`]) that transformers' ``generate`` runs as its ``custom_generate``
decoding method, so the generation config, logits processors and stopping criteria are transformers' own:

* Best-of-N (the paper): ``prompt ─N→ candidates``, each decoded to its end, the best-scored one returned.
* Beam search (search-and-learn's): ``prompt ─N→ steps ─keep N/M→ each ─M→ steps ─keep N/M→ ...``.
* DVTS (search-and-learn's): ``prompt ─ N/M subtrees ─M→ steps ─keep 1→ ─M→ ...``.

They are written with the pieces of one engine, [`StepSearch`] (``search_tree_metastone.py``): prefill once,
decode every row to its next step (or its end) in one batch while the SPRM head scores each step in the forward
that sampled it, keep the best rows, expand them; final scores apply THE step mask ([`sprm_step_token_mask`]) to
the finished trajectories and equal ``model.score_trajectories`` on the returned ids up to float noise.

Rows sample through [`RowwiseSampler`] (``sampling_metastone.py``): every logits processor and stopping criterion
sees each row's own tokens and per-row state, and one exponential variate per vocabulary entry and candidate slot,
``argmax(p / q)``, is exactly ``torch.multinomial``: a candidate's tokens do not depend on which other rows are
still in the batch, so removing stopped rows changes no sample.

This file is part of the remote-code set copied into saved checkpoints: it imports only ``torch``, ``transformers``
and its sibling files (search tree, selection, sampling, scoring).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    GenerationMixin,
    LogitsProcessorList,
    StoppingCriteriaList,
    StopStringCriteria,
)

from .adaptive_metastone import AdaptiveConfig
from .pruning_metastone import Pruning
from .sampling_metastone import check_prompt_seeds
from .scoring_metastone import check_token_batch, eval_mode, execution_device
from .search_output_metastone import SearchOutput
from .search_tree_metastone import StepSearch
from .selection_metastone import AnswerExtractor, SelectionStrategy, resolve_selection

SEARCHES = ("best_of_n", "beam", "dvts")
RANKINGS = ("mean", "last")

BEAM_WIDTH_MEANING = "children_per_beam"
"""What ``beam_width`` M means, as in search-and-learn: the children each kept beam expands into (beam search keeps
N/M beams per round, DVTS runs N/M subtrees). Evaluations record it with their settings, so that a run written
when beam search's M was the number of beams kept is not resumed as if it were the same search."""


def default_beam_width(search: str, num_candidates: int) -> int:
    """M when ``beam_width`` is not given: 4 for ``"beam"`` (N/4 beams kept) and N/4 for ``"dvts"`` (4 subtrees).

    For N not a multiple of 4, ``k``, the largest divisor of N not above ``max(1, N // 4)``, is the number of beams
    beam search keeps (M = N / k) and the children of each DVTS subtree (M = k): always a valid M.
    """
    k = max(d for d in range(1, max(1, num_candidates // 4) + 1) if num_candidates % d == 0)
    return num_candidates // k if search == "beam" else k


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


# --------------------------------------------------------------------------------------------------
# The settings
# --------------------------------------------------------------------------------------------------


@dataclass
class SearchConfig:
    r"""Every setting of a search ``generate``; ``model.generate`` takes each as a keyword of the same name.

    Args:
        search: ``"best_of_n"`` (the paper: N independent samples), ``"beam"`` or ``"dvts"``, the step searches of
            search-and-learn, which need no extra scoring pass (each step is scored by the forward that sampled it):

            * ``"beam"``: ``prompt ─N→ steps ─keep N/M→ each ─M→ steps ─keep N/M→ ...``: every round the N/M best
              beams (by ``ranking``) survive and each expands into M children.
            * ``"dvts"``: ``prompt ─ N/M subtrees ─M→ steps ─keep 1→ ─M→ ...``: N/M independent subtrees, each
              expanding its one beam into M children at every step and continuing with the best.
        num_candidates: N, the number of candidates returned per prompt (>= 1).
        reasoning_effort: ``"low"``, ``"medium"`` or ``"high"`` (N = 2, 8, 32 by default), read from
            ``model.config.reasoning_effort_presets``. Exclusive with ``num_candidates``; ``"medium"`` when neither
            is given.
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
        prune_min_steps: pruning applies once a candidate has this many scored steps (default 3); it is checked
            whenever a step or think token is sampled, and never stops a prompt's last candidate that could finish.
        remove_stopped_rows: stopped rows leave the batch and the cache (default). ``False`` (Best-of-N only) keeps
            them as padding until all stop, as transformers' ``_sample`` does; same samples, more compute.
        progress_bar: a tqdm bar over sampled tokens (respects ``transformers`` progress-bar settings). Off by
            default, as transformers' ``generate`` shows none; the ``metastone`` CLI turns it on.
        seed: an int seeds the sampling RNG for this call only (the caller's RNG state is restored): the result is
            reproducible, and Best-of-N draws exactly the samples of transformers' ``generate(num_return_sequences=N)``
            after ``torch.manual_seed(seed)``. A list of one int per prompt gives every prompt a generator of its
            own: a prompt's candidates are then those of a call with that prompt alone and its seed, whichever
            prompts share the batch (what an evaluation that batches questions needs).
        max_active_rows: continuous batching: at most this many rows (N per prompt) in flight. Prompts are admitted
            in order as room frees: the moment a prompt's candidates have all finished, the next prompt is
            prefilled and its rows join the running decode. ``None`` (default): every prompt at once. Parked rows
            (beam search, DVTS) count against it, so the KV cache holds at most this many rows.
        stream: return an iterator of ``(prompt index, SearchOutput of that prompt alone)``, yielded as each prompt
            finishes (in any order), instead of one output for the batch. With per-prompt seeds, each is exactly
            what a call with that prompt alone returns (up to its left padding).
        adaptive: Best-of-N only, opt-in (default ``None``: plain Best-of-N, sample for sample): adaptive test-time
            compute, DeepConf's online mode with the SPRM step scores (or token confidence) as the signal. An
            [`AdaptiveConfig`], a dict of its fields, or a signal name (``"sprm"``, ``"confidence"``). Per prompt the
            first ``warmup`` candidates run to their end and set a threshold (the ``100 - keep_percent`` percentile
            of their statistic, the lowest sliding-window mean of the signal: of the SPRM log step scores, default
            window 1 step, i.e. the worst step; or of DeepConf's token confidence); later candidates stop the moment
            their statistic falls below it (returned flagged ``pruned``, never chosen while one finished), and the
            prompt stops admitting candidates once its consensus (signal-weighted vote share, or the best trajectory
            score) reaches ``consensus``. N (``num_candidates``) is the most candidates a prompt may use; the output
            reports ``used``, ``adaptive_statistic``, ``adaptive_threshold`` and ``prompt_decode_steps``. With the
            confidence signal the selection ranks (``"sprm"``) or weighs (``"sprm_vote"``) candidates by their
            confidence statistic instead of the SPRM score: no verifier anywhere, as DeepConf. Samples differ from
            plain Best-of-N's (candidates start in waves); with per-prompt seeds they do not depend on the other
            prompts of the call. See ``docs/generation-and-search.md`` ("Adaptive compute").
    """

    search: str = "best_of_n"
    num_candidates: int | None = None
    reasoning_effort: str | None = None
    beam_width: int | None = None
    ranking: str = "mean"
    selection: str | SelectionStrategy = "sprm"
    answer_extractor: AnswerExtractor | None = None
    prune_threshold: float | None = None
    prune_top_k: int | None = None
    prune_min_steps: int = 3
    remove_stopped_rows: bool = True
    progress_bar: bool = False
    seed: int | Sequence[int] | None = None
    max_active_rows: int | None = None
    stream: bool = False
    adaptive: AdaptiveConfig | dict | str | None = None

    def resolved(self, presets: dict[str, int]) -> SearchConfig:
        """This config checked, with N (``num_candidates``) and M (``beam_width``) filled in.

        Raises:
            ValueError: a setting out of range or not valid for the strategy, naming it and its valid values.
        """
        if self.search not in SEARCHES:
            raise ValueError(f"Unknown `search`={self.search!r}; valid: {sorted(SEARCHES)}.")
        effort = self.reasoning_effort
        if effort is None and self.num_candidates is None:
            effort = "medium"
        n = resolve_num_candidates(presets, effort, self.num_candidates)
        resolve_selection(self.selection)
        rows = self.max_active_rows
        if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
            raise ValueError(f"`max_active_rows` must be an int >= 1 or None, got {rows!r}.")
        if rows is not None and not self.remove_stopped_rows:
            raise ValueError("`max_active_rows` admits prompts into freed rows: it needs `remove_stopped_rows=True`.")
        width = self.beam_width
        if self.search == "best_of_n":
            if width is not None:
                raise ValueError("`beam_width` applies to `search='beam'` or `search='dvts'`.")
            if self.prune_threshold is not None and not 0.0 < float(self.prune_threshold) < 1.0:
                raise ValueError(f"`prune_threshold` is a trajectory score in (0, 1), got {self.prune_threshold!r}.")
            if self.prune_top_k is not None and (not isinstance(self.prune_top_k, int) or self.prune_top_k < 1):
                raise ValueError(f"`prune_top_k` must be an int >= 1, got {self.prune_top_k!r}.")
            if not isinstance(self.prune_min_steps, int) or self.prune_min_steps < 1:
                raise ValueError(f"`prune_min_steps` must be an int >= 1, got {self.prune_min_steps!r}.")
            adaptive = AdaptiveConfig.from_value(self.adaptive)
            if adaptive is not None:
                adaptive.checked(n)
                if self.prune_threshold is not None or self.prune_top_k is not None or not self.remove_stopped_rows:
                    raise ValueError("`adaptive` cannot be combined with pruning or `remove_stopped_rows=False`.")
        else:
            if self.adaptive is not None:
                raise ValueError("`adaptive` applies to `search='best_of_n'` only.")
            if self.prune_threshold is not None or self.prune_top_k is not None or not self.remove_stopped_rows:
                raise ValueError("Pruning options and `remove_stopped_rows=False` apply to `search='best_of_n'` only.")
            width = default_beam_width(self.search, n) if width is None else width
            if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= n or n % width:
                raise ValueError(
                    f"`beam_width` must be an int M with 1 <= M <= N and N a multiple of M (N={n}), "
                    f"got {self.beam_width!r}."
                )
            if self.ranking not in RANKINGS:
                raise ValueError(f"`ranking` must be one of {list(RANKINGS)}, got {self.ranking!r}.")
        return dataclasses.replace(
            self,
            num_candidates=n,
            reasoning_effort=None,
            beam_width=width,
            remove_stopped_rows=bool(self.remove_stopped_rows),
            adaptive=AdaptiveConfig.from_value(self.adaptive),
        )


def _config_for(model: Any, search_config: SearchConfig | None, search: str) -> SearchConfig:
    """The resolved settings a strategy runs with (its defaults when called without any)."""
    config = search_config or SearchConfig(search=search)
    if config.search != search:
        raise ValueError(f"`search_config.search` is {config.search!r}, but this strategy is {search!r}.")
    return config.resolved(model.config.reasoning_effort_presets)


def _engine(
    model: Any,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    model_kwargs: dict[str, Any],
    config: SearchConfig,
) -> StepSearch:
    return StepSearch(
        model, input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs,
        config.num_candidates, config.remove_stopped_rows, config.progress_bar,
        check_prompt_seeds(config.seed, input_ids.shape[0]),
    )  # fmt: skip


def _outputs(
    search: StepSearch, finished: Iterator[int], name: str, config: SearchConfig, tokenizer: Any | None
) -> SearchOutput | Iterator[tuple[int, SearchOutput]]:
    """The search's output once every prompt has finished; with ``config.stream``, an iterator over the prompts
    instead, yielding ``(prompt index, that prompt's SearchOutput)`` as each one finishes."""
    if config.stream:
        return (
            (prompt, search.output_for(prompt, name, config.selection, config.answer_extractor, tokenizer))
            for prompt in finished
        )
    for _ in finished:
        pass
    return search.finish(name, config.selection, config.answer_extractor, tokenizer)


# --------------------------------------------------------------------------------------------------
# The strategies: each is transformers' `custom_generate` decoding method
# --------------------------------------------------------------------------------------------------


def best_of_n(
    model: Any,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    search_config: SearchConfig | None = None,
    answer_tokenizer: Any | None = None,
    **model_kwargs: Any,
) -> SearchOutput:
    """Best-of-N (the paper): N samples per prompt, each decoded to its end, the best-scored one chosen.

    ``prompt ─N→ candidates`` (N = 8: 8 independent samples). With ``prune_threshold`` / ``prune_top_k``,
    hopeless candidates stop early and leave the batch.
    """
    config = _config_for(model, search_config, "best_of_n")
    search = _engine(model, input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs, config)
    search.pruning = Pruning(config.prune_threshold, config.prune_top_k, config.prune_min_steps)
    if config.adaptive is not None:  # opt-in; plain Best-of-N below is untouched
        search.enable_adaptive(config.adaptive, answer_tokenizer, config.answer_extractor)
        return _outputs(search, search.run_adaptive(config.max_active_rows), "best_of_n", config, answer_tokenizer)
    return _outputs(search, search.run(capacity=config.max_active_rows), "best_of_n", config, answer_tokenizer)


def beam_search(
    model: Any,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    search_config: SearchConfig | None = None,
    answer_tokenizer: Any | None = None,
    **model_kwargs: Any,
) -> SearchOutput:
    """Beam search over steps, as search-and-learn's: N rows per round, the N/M best survive, M children each.

    ``prompt ─N→ steps ─keep N/M→ each ─M→ steps ─keep N/M→ ...`` (N = 8, M = 4: 8 children, 2 beams of 4 children)

    Every round N rows sample to their next step; rows that finish (EOS, a stop, the length limit) are kept until the
    prompt has N candidates, and the ``N // M`` best of the others (by ``ranking``) survive. The survivors share the
    next round's N children, so each has M of them; when fewer than ``N // M`` are left, the better-ranked ones get
    the extra children, as search-and-learn repeats its surviving beams up to N. Rounds are per prompt: a prompt
    whose rows have all reached their step expands at once, without waiting for the other prompts of the batch.
    """
    config = _config_for(model, search_config, "beam")
    n = config.num_candidates
    search = _engine(model, input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs, config)
    beams_kept = n // config.beam_width
    rounds = search.run(True, beams_kept, n, config.ranking, capacity=config.max_active_rows)
    return _outputs(search, rounds, "beam", config, answer_tokenizer)


def dvts(
    model: Any,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    search_config: SearchConfig | None = None,
    answer_tokenizer: Any | None = None,
    **model_kwargs: Any,
) -> SearchOutput:
    """Diverse Verifier Tree Search, as search-and-learn's: N/M independent subtrees, each expanded M ways per step.

    ``prompt ─ N/M subtrees ─M→ steps ─keep 1→ ─M→ steps ─keep 1→ ...`` (N = 8, M = 4: 2 subtrees of 4 children)

    Each subtree continues with its best child only (by ``ranking``), which again expands M ways. Finished
    trajectories are kept until the prompt has N; a subtree ends when all its children have finished. Rounds are
    per subtree: a subtree whose children have all reached their step expands at once, without waiting for the
    other subtrees, and its children always sample in its own slots (``g * M + j``).
    """
    config = _config_for(model, search_config, "dvts")
    n, m = config.num_candidates, config.beam_width
    search = _engine(model, input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs, config)
    subtree = torch.arange(n, device=input_ids.device) // m
    search.group_slots = m  # subtree g's children always sample in slots g * M .. g * M + M - 1
    rounds = search.run(True, 1, m, config.ranking, first_groups=subtree, capacity=config.max_active_rows)
    return _outputs(search, rounds, "dvts", config, answer_tokenizer)


SEARCH_STRATEGIES: dict[str, Callable[..., SearchOutput]] = {"best_of_n": best_of_n, "beam": beam_search, "dvts": dvts}


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------

_GENERATE_SIGNATURE = inspect.signature(GenerationMixin.generate)
_SEARCH_SETTINGS = tuple(f.name for f in dataclasses.fields(SearchConfig))
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


@torch.no_grad()
def search_generate(
    model: Any, *args: Any, search_config: SearchConfig | None = None, **kwargs: Any
) -> SearchOutput | Iterator[tuple[int, SearchOutput]]:
    """Sample N candidates per prompt with a search strategy, score every step online with the SPRM head, pick one.

    The search settings are the fields of [`SearchConfig`] (``search``, ``num_candidates`` / ``reasoning_effort``,
    ``beam_width``, ``ranking``, ``selection``, pruning, ``seed``, ...), given either as keywords of the same names
    (what ``model.generate`` passes) or as one ``search_config``. All other arguments are transformers' ``generate``
    arguments (``max_new_tokens``, ``temperature``, ``top_p``, ``stopping_criteria``, ``stop_strings`` with
    ``tokenizer``, ``generation_config``, ...); sampling is always on.

    Returns:
        [`SearchOutput`].

    Raises:
        ValueError: a setting out of range, one transformers' argument a search cannot honour, or settings given
            both as keywords and as ``search_config``.
    """
    given = {name: kwargs.pop(name) for name in _SEARCH_SETTINGS if name in kwargs}
    if search_config is not None and given:
        raise ValueError(
            f"Pass the search settings either as keywords or as `search_config`, not both (got {sorted(given)})."
        )
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError("Search generation supports decoder-only models only.")
    config = (search_config or SearchConfig(**given)).resolved(model.config.reasoning_effort_presets)

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
    # Search always samples: validating the settings as sampling ones spares transformers' warning that sampling
    # flags (temperature, top_p) "may be ignored" when the caller did not also write `do_sample=True`.
    generation_config, _ = model._prepare_generation_config(user_config, **{**extra, "do_sample": True})
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
    if not callable(config.selection) and resolve_selection(config.selection)[1] and tokenizer is None:
        raise ValueError(
            f"`selection={config.selection!r}` votes on answers: pass `tokenizer=` to decode the candidates."
        )
    adaptive = config.adaptive
    if (
        adaptive is not None
        and adaptive.consensus is not None
        and adaptive.consensus_by == "vote"
        and tokenizer is None
    ):
        raise ValueError(
            "`adaptive` with `consensus_by='vote'` reads the candidates' answers: pass `tokenizer=`, or use "
            "`consensus_by='score'` or `consensus=None`."
        )
    if generation_config.stop_strings:
        if tokenizer is None:
            raise ValueError("`stop_strings` need the model's tokenizer: pass `tokenizer=` to `generate`.")
        criteria = StoppingCriteriaList(arguments.get("stopping_criteria") or [])
        criteria.append(StopStringCriteria(tokenizer, generation_config.stop_strings))
        arguments["stopping_criteria"] = criteria
        extra["stop_strings"] = None
    extra["do_sample"] = True
    # A list of seeds gives each prompt a generator of its own (the strategy builds them); an int seeds this call.
    global_seed = None if check_prompt_seeds(config.seed, input_ids.shape[0]) is not None else config.seed
    device = execution_device(model)
    with eval_mode(model), _seeded(global_seed, device):
        result = GenerationMixin.generate(
            model,
            input_ids.to(device),
            custom_generate=SEARCH_STRATEGIES[config.search],
            search_config=config,
            answer_tokenizer=tokenizer,
            **arguments,
            **extra,
        )
    return _streamed(model, result, global_seed) if config.stream else result


def _streamed(model: Any, outputs: Iterator[Any], seed: int | None) -> Iterator[Any]:
    """Iterate a streaming search as ``generate`` runs one: without gradients, in eval mode, under its seed."""
    with torch.no_grad(), eval_mode(model), _seeded(seed, execution_device(model)):
        yield from outputs


__all__ = [
    "BEAM_WIDTH_MEANING",
    "AdaptiveConfig",
    "RANKINGS",
    "SEARCHES",
    "SEARCH_STRATEGIES",
    "SearchConfig",
    "beam_search",
    "best_of_n",
    "default_beam_width",
    "dvts",
    "resolve_num_candidates",
    "search_generate",
]
