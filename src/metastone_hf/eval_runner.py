"""Running an evaluation: questions through ``generate`` with every search strategy, over processes, resumable.

:func:`question_records` samples a list of questions with continuous batching (``batch_size`` questions in flight;
the next one is admitted into the running decode the moment one finishes) and yields one JSON-ready record per
question:
for Best-of-N the ``M`` candidates every N is computed from (the official K-groups-of-N metric), for beam search and
DVTS one search per N, each with its candidates' texts, SPRM scores, step scores, answers, correctness and tokens.
:func:`run_evaluation` spreads the questions over the processes of an ``accelerate launch`` and keeps every finished
question in an :class:`~metastone_hf.eval_store.EvalStore`, so a killed run resumes where it stopped.

Each question samples from a generator seeded with ``question_seed(seed, index)`` only, so its record is the same
whatever the batch size, the number of processes, or which questions a resumed run still had to do.
"""

from __future__ import annotations

import hashlib
import json
import resource
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .eval_store import EvalStore
from .evaluation import (
    EvalExample,
    EvalProtocol,
    EvalRecords,
    build_prompt_builder,
    grade_answer,
    parse_gold,
    protocol_record,
    records_to_eval_records,
    resolve_protocol,
)
from .scoring_metastone import execution_device

SEARCHES = ("best_of_n", "beam", "dvts")
"""The strategies an evaluation can run: ``generate(search=...)``."""

ROWS_PER_CALL = 32
"""Default number of rows (questions x candidates) per ``generate`` call: sensible for a 7B model with long
reasoning on one 80 GB GPU, and more than enough to keep a CPU busy."""


def question_seed(seed: int, index: int) -> int:
    """The sampling seed of question ``index`` in a run with ``seed``: a function of those two only."""
    return (seed * 1_000_003 + index) % 2**63


def default_batch_size(samples: int) -> int:
    """Questions per ``generate`` call so that a call holds about :data:`ROWS_PER_CALL` rows."""
    return max(1, ROWS_PER_CALL // max(1, samples))


@dataclass(frozen=True)
class EvalPlan:
    """What an evaluation samples for each question.

    Args:
        protocol: the resolved sampling protocol.
        samples: ``M``, the Best-of-N candidates per question (every N of ``budgets`` is computed from them).
        budgets: ``{label: N}`` the budgets reported.
        searches: the strategies run (``"best_of_n"`` samples ``M`` once; ``"beam"`` / ``"dvts"`` search once per N).
        beam_width: M of beam search / DVTS, the children each kept beam expands into (``None``: generate's
            default, ``default_beam_width``: 4 for beam search, N/4 for DVTS when 4 divides N).
        seed: the run's seed; question ``i`` uses ``question_seed(seed, i)``.
        adaptive: adaptive-compute settings run besides (``metastone eval --adaptive``): ``(name, fields)`` pairs, each
            field dict an ``AdaptiveConfig``'s; each runs Best-of-N with ``adaptive=`` and at most ``samples``
            candidates per question (run key ``"adaptive:<name>"``). Empty by default (nothing changes).
    """

    protocol: EvalProtocol
    samples: int
    budgets: dict[str, int]
    searches: tuple[str, ...] = ("best_of_n",)
    beam_width: int | None = None
    seed: int = 0
    adaptive: tuple[tuple[str, dict], ...] = ()

    def __post_init__(self) -> None:
        unknown = [s for s in self.searches if s not in SEARCHES]
        if unknown or not self.searches:
            raise ValueError(f"Unknown search strategies {unknown}; valid: {list(SEARCHES)}.")
        if self.beam_width is not None:
            bad = [n for n in self.budgets.values() if n % self.beam_width]
            if bad and any(s != "best_of_n" for s in self.searches):
                raise ValueError(f"--beam-width {self.beam_width} does not divide N = {bad}; choose one that does.")
        if self.adaptive:
            from .adaptive_metastone import AdaptiveConfig

            names = [name for name, _ in self.adaptive]
            if len(set(names)) != len(names):
                raise ValueError(f"Adaptive settings need distinct names, got {names}.")
            for _, fields in self.adaptive:
                AdaptiveConfig(**fields).checked(self.samples)

    def runs(self) -> list[tuple[str, str, int]]:
        """``(key, search, N)`` of every ``generate`` call made per batch of questions."""
        runs = [("best_of_n", "best_of_n", self.samples)] if "best_of_n" in self.searches else []
        for search in self.searches:
            if search != "best_of_n":
                runs += [(f"{search}@{n}", search, n) for n in sorted(set(self.budgets.values()))]
        runs += [(f"adaptive:{name}", "best_of_n", self.samples) for name, _ in self.adaptive]
        return runs


def resolve_sampling(
    protocol: str | EvalProtocol,
    presets: dict[str, int],
    num_samples: int | None = None,
    **overrides: Any,
) -> tuple[EvalProtocol, int, list[str]]:
    """The protocol with ``overrides`` applied, ``M`` candidates per question and the names of what was overridden.

    ``M`` defaults to the protocol's ``samples_per_question``, else the largest N of ``presets``; any other ``M``
    is an override too.
    """
    settings, overridden = resolve_protocol(protocol, **overrides)
    default_samples = settings.samples_per_question or max(presets.values())
    samples = default_samples if num_samples is None else num_samples
    if samples != default_samples:
        overridden = sorted([*overridden, "samples_per_question"])
    return settings, samples, overridden


def _question_hash(examples: Sequence[EvalExample]) -> str:
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([example.id, example.prompt, example.answer]).encode())
    return digest.hexdigest()[:16]


def run_settings(
    plan: EvalPlan, examples: Sequence[EvalExample], model: str, data: str, prompt_template: str, dtype: str
) -> dict:
    """Every setting that changes an evaluation's numbers: what a resumed run must share with the first one.

    The device is not one of them: a run preempted on one machine may resume on another. A run with a step search
    records what ``beam_width`` means (``beam_width_meaning``): a run written when beam search kept M beams (rather
    than N/M beams of M children) lacks it, so resuming it is refused instead of mixing two different searches;
    likewise a DVTS run records ``dvts_rounds`` (rounds per subtree, which sample differently from the older
    rounds per batch).
    """
    from .generation_metastone import BEAM_WIDTH_MEANING

    step_search = [s for s in plan.searches if s != "best_of_n"]
    return {
        "model": str(model),
        "dtype": str(dtype),
        "data": {"source": str(data), "questions": len(examples), "sha256": _question_hash(examples)},
        "protocol": protocol_record(plan.protocol, plan.samples),
        "budgets": plan.budgets,
        "searches": list(plan.searches),
        "beam_width": plan.beam_width,
        **({"beam_width_meaning": BEAM_WIDTH_MEANING} if step_search else {}),
        # DVTS samples differently since its rounds are per subtree (fixed slots per subtree): an older DVTS run
        # lacks this and is not resumed with these samples.
        **({"dvts_rounds": "per_subtree"} if "dvts" in plan.searches else {}),
        "seed": plan.seed,
        "prompt_template": prompt_template,
        **({"adaptive": {name: dict(fields) for name, fields in plan.adaptive}} if plan.adaptive else {}),
    }


def _peak_memory_bytes(device: Any) -> int:
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _tokens_per_prompt(out: Any) -> list[int]:
    """Tokens sampled for each prompt, every branch included (the segments of its search tree)."""
    return [sum(node.end - node.start for node in tree[1:]) for tree in out.search_tree]


def _candidates(
    out: Any, b: int, prompt_length: int, tokenizer: Any, extractor: Callable, grade: Callable[[str], bool | None]
) -> dict[str, Any]:
    texts = tokenizer.batch_decode(out.candidates[b, :, prompt_length:], skip_special_tokens=True)
    answers = [extractor(t) for t in texts]
    return {
        "completions": texts,
        "scores": out.log_scores[b].double().exp().cpu().tolist(),  # float64: no ties at 1.0
        "step_scores": [s.cpu().tolist() for s in out.step_scores[b]],
        "answers": [None if a is None else str(a) for a in answers],
        "correct": [bool(grade(t)) for t in texts],
        "tokens": out.num_generated_tokens[b].cpu().tolist(),
        "chosen": int(out.chosen_index[b]),
    }


def question_records(
    model: Any,
    tokenizer: Any,
    examples: Sequence[EvalExample],
    indices: Sequence[int],
    plan: EvalPlan,
    *,
    prompt_builder: Callable[[str], str],
    answer_extractor: Callable[[str], Any] | None = None,
    grader: Callable[[str, str], bool] = grade_answer,
    batch_size: int | None = None,
    progress_bar: bool = True,
    generate_kwargs: dict[str, Any] | None = None,
) -> Iterator[dict[str, Any]]:
    """Sample, score, extract and grade questions ``indices`` of ``examples``; one record per question, in order.

    A record holds the question (``index``, ``id``, ``gold``, ``gold_parsed``) and, under ``results``, one entry per
    run of ``plan.runs()`` (``"best_of_n"``, ``"beam@8"``, ...) with every candidate's ``completions``, ``scores``,
    ``step_scores``, ``answers``, ``correct``, ``tokens``, the ``chosen`` index and ``tokens_generated`` (all
    branches). With the default ``grader``, a gold answer math-verify cannot parse is recorded as
    ``gold_parsed: false`` and graded wrong (never compared as raw text); another ``grader`` judges every gold itself.

    ``batch_size`` questions are in flight per strategy (capacity: ``batch_size`` x the rows of one question); the
    next question joins the running decode the moment one finishes (``generate(max_active_rows=..., stream=True)``).
    Each record also holds ``decode``: its share of the decode steps (backbone forwards) and of the rows they
    decoded since the previous record, and the capacity, from which the mean occupancy (rows per decode step /
    capacity) follows.
    """
    from tqdm.auto import tqdm

    from .selection_metastone import extract_boxed_answer

    extractor = answer_extractor or extract_boxed_answer
    device = execution_device(model)  # walks the modules: once, not per record
    settings = plan.protocol
    batch_size = batch_size or default_batch_size(plan.samples)
    runs = plan.runs()
    adaptive_settings = {f"adaptive:{name}": fields for name, fields in plan.adaptive}
    window = len(indices) if len(runs) == 1 else batch_size * WINDOW_BATCHES
    bar = tqdm(total=len(indices), desc="eval", unit="question", disable=not progress_bar, dynamic_ncols=True)
    started, generated_total = time.perf_counter(), 0
    counter = DecodeSteps(model)
    last_time, last_steps, last_rows = started, 0, 0
    try:
        for start in range(0, len(indices), max(window, 1)):
            chunk = list(indices[start : start + window])
            inputs = tokenizer(
                [prompt_builder(examples[i].prompt) for i in chunk],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            )
            inputs = {k: v.to(device) for k, v in inputs.items()}
            prompt_length = inputs["input_ids"].shape[1]
            # math-verify must parse a gold answer for the default grader; a grader of the caller's judges every gold.
            golds = [grader is not grade_answer or parse_gold(examples[i].answer) is not None for i in chunk]
            seeds = [question_seed(plan.seed, i) for i in chunk]
            results: list[dict[str, Any]] = [{} for _ in chunk]
            runs_left = [len(runs)] * len(chunk)
            emitted = 0
            for key, search, n in runs:
                options: dict[str, Any] = {"search": search}
                if search != "best_of_n" and plan.beam_width is not None:
                    options["beam_width"] = plan.beam_width
                capacity = batch_size * n
                adaptive = adaptive_settings.get(key)
                if adaptive is not None:
                    options.update(adaptive_options(adaptive, tokenizer, extractor))
                    capacity = batch_size * options["adaptive"].width
                counter.capacity = capacity
                finished = model.generate(
                    **inputs,
                    num_candidates=n,
                    do_sample=True,
                    temperature=settings.temperature,
                    top_p=settings.top_p,
                    top_k=settings.top_k,
                    repetition_penalty=settings.repetition_penalty,
                    max_new_tokens=settings.max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    seed=seeds,
                    progress_bar=False,
                    max_active_rows=capacity,
                    stream=True,
                    **options,
                    **(generate_kwargs or {}),
                )
                for b, out in finished:
                    gold = examples[chunk[b]].answer
                    result = _candidates(
                        out, 0, prompt_length, tokenizer, extractor, lambda t, g=gold, ok=golds[b]: ok and grader(t, g)
                    )
                    spent = _tokens_per_prompt(out)[0]
                    results[b][key] = {"search": search, "n": n, **result, "tokens_generated": spent}
                    if out.used is not None:  # adaptive compute: what the question used
                        results[b][key].update(
                            adaptive=dict(adaptive_settings[key]),
                            used=out.used[0].cpu().tolist(),
                            stopped=(out.pruned[0] & out.used[0]).cpu().tolist(),
                            candidates_used=int(out.used[0].sum()),
                            decode_steps=int(out.prompt_decode_steps[0]),
                            threshold=float(out.adaptive_threshold[0]),
                        )
                    generated_total += spent
                    runs_left[b] -= 1
                    # Records leave in question order, each as soon as it and every earlier one are complete; each
                    # takes its share of the wall time and decode steps since the previous one left.
                    ready = emitted
                    while ready < len(chunk) and runs_left[ready] == 0:
                        ready += 1
                    if ready == emitted:
                        continue
                    now = time.perf_counter()
                    share = 1 / (ready - emitted)
                    steps, rows = counter.steps - last_steps, counter.rows - last_rows
                    for c in range(emitted, ready):
                        yield {
                            "index": chunk[c],
                            "id": examples[chunk[c]].id,
                            "gold": examples[chunk[c]].answer,
                            "gold_parsed": golds[c],
                            "results": results[c],
                            "seconds": (now - last_time) * share,
                            "decode": {"steps": steps * share, "rows": rows * share, "capacity": capacity},
                            "peak_memory_bytes": _peak_memory_bytes(device),
                        }
                        results[c] = {}
                    bar.update(ready - emitted)
                    emitted, last_time, last_steps, last_rows = ready, now, counter.steps, counter.rows
                    elapsed = now - started
                    bar.set_postfix_str(
                        f"{generated_total / max(elapsed, 1e-9):,.0f} tok/s, occupancy {counter.occupancy():.2f}",
                        refresh=False,
                    )
    finally:
        counter.close()
        bar.close()


def adaptive_options(fields: dict, tokenizer: Any, extractor: Callable) -> dict[str, Any]:
    """``generate`` options of an adaptive setting: the ``AdaptiveConfig``, the tokenizer and extractor its vote
    reads, and for the confidence signal DeepConf's pick (the confidence-weighted vote)."""
    from .adaptive_metastone import AdaptiveConfig

    config = AdaptiveConfig(**fields)
    options: dict[str, Any] = {"adaptive": config, "tokenizer": tokenizer, "answer_extractor": extractor}
    if config.signal == "confidence":
        options["selection"] = "sprm_vote"  # weighed by the confidence statistics: DeepConf's vote
    return options


def parse_adaptive(text: str) -> tuple[str, dict]:
    """``metastone eval --adaptive`` values: ``SIGNAL[:key=value,...]`` -> ``(name, AdaptiveConfig fields)``.

    ``sprm``, ``confidence``, ``sprm:warmup=8,keep_percent=10,consensus=0.95``, ``sprm:consensus=none`` ...; the name is
    the text itself. Raises ``ValueError`` for an unknown field or a bad value.
    """
    from dataclasses import fields as dataclass_fields

    from .adaptive_metastone import AdaptiveConfig

    signal, _, rest = text.partition(":")
    values: dict[str, Any] = {"signal": signal}
    known = {f.name for f in dataclass_fields(AdaptiveConfig)}
    for item in filter(None, rest.split(",")):
        key, sep, raw = item.partition("=")
        if not sep or key not in known or key == "signal":
            raise ValueError(
                f"--adaptive {text!r}: {item!r} is not key=value with a key of {sorted(known - {'signal'})}"
            )
        if raw.lower() == "none":
            value: Any = None
        elif key == "consensus_by":
            value = raw
        else:
            try:
                value = int(raw) if key in ("warmup", "window", "confidence_top_k", "parallel") else float(raw)
            except ValueError as error:
                raise ValueError(f"--adaptive {text!r}: bad value for {key}: {raw!r}") from error
        values[key] = value
    AdaptiveConfig(**values).checked(10**9)  # range checks (N is checked when it runs)
    return text, values


WINDOW_BATCHES = 16
"""With several strategies or budgets per question, questions go through each of them in windows of this many
batches (each a continuous stream), and a window's records leave when its last strategy has finished them."""


class DecodeSteps:
    """Counts the backbone forwards that decode one token per row, the rows they hold, against a capacity."""

    def __init__(self, model: Any):
        self.steps = self.rows = 0
        self.capacity_rows = 0  # sum over decode steps of the capacity they ran with
        self.capacity = 1
        backbone = getattr(model, "model", None)
        self.handle = backbone.register_forward_hook(self._hook, with_kwargs=True) if backbone is not None else None

    def _hook(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is not None and ids.shape[1] == 1:
            self.steps += 1
            self.rows += ids.shape[0]
            self.capacity_rows += self.capacity

    def occupancy(self) -> float:
        """Mean rows per decode step / capacity."""
        return self.rows / self.capacity_rows if self.capacity_rows else float("nan")

    def close(self) -> None:
        if self.handle is not None:
            self.handle.remove()


def run_best_of_n_eval(
    model: Any,
    tokenizer: Any,
    examples: Sequence[EvalExample],
    num_samples: int | None = None,
    *,
    protocol: str | EvalProtocol = "paper",
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    max_new_tokens: int | None = None,
    prompt_builder: Callable[[str], str] | None = None,
    prompt_template: str = "paper",
    answer_extractor: Callable[[str], str | None] | None = None,
    grader: Callable[[str, str], bool] = grade_answer,
    batch_size: int | None = None,
    seed: int = 0,
    progress_bar: bool = True,
    keep_completions: bool = False,
    **generate_kwargs: Any,
) -> EvalRecords:
    """Sample ``num_samples`` candidates per question with Best-of-N generate, score, extract and grade them (in memory).

    Sampling follows ``protocol`` (default ``"paper"``: temperature 0.6, top_p 0.95, no top-k cut, repetition
    penalty 1.05, up to 32768 new tokens, as many candidates as the largest reasoning-effort N). Every sampling
    argument left at ``None`` takes the protocol's value; a given one overrides it. The resolved settings are
    recorded in the returned records' ``protocol``. For runs that must survive a kill, spread over processes or
    compare search strategies, use :func:`run_evaluation`.

    Args:
        num_samples: candidates per question ``M``; default: the protocol's ``samples_per_question``, else the
            largest N of ``model.config.reasoning_effort_presets``.
        protocol: a name in :data:`~metastone_hf.evaluation.EVAL_PROTOCOLS` or an ``EvalProtocol``.
        temperature, top_p, top_k, repetition_penalty, max_new_tokens: override the protocol's value.
        prompt_builder: question text -> model input text; default: ``prompt_template`` (see
            :func:`~metastone_hf.evaluation.build_prompt_builder`).
        prompt_template: a name in :data:`~metastone_hf.evaluation.PROMPT_TEMPLATES` or a string with
            ``{question}``; ignored when ``prompt_builder`` is given.
        answer_extractor: completion -> canonical answer for voting; default: the Best-of-N default (``\\boxed``
            via math-verify).
        batch_size: questions in flight (continuous batching); default: about :data:`ROWS_PER_CALL` rows. Question ``i``
            samples from a generator of its own (``question_seed(seed, i)``): the records do not depend on it.
        generate_kwargs: any other ``generate`` argument (``min_p``, ``stop_strings``, ...).
    """
    settings, samples, overridden = resolve_sampling(
        protocol,
        model.config.reasoning_effort_presets,
        num_samples,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        max_new_tokens=max_new_tokens,
    )
    plan = EvalPlan(settings, samples, {str(samples): samples}, ("best_of_n",), seed=seed)
    records = list(
        question_records(
            model,
            tokenizer,
            examples,
            range(len(examples)),
            plan,
            prompt_builder=prompt_builder or build_prompt_builder(tokenizer, model, prompt_template),
            answer_extractor=answer_extractor,
            grader=grader,
            batch_size=batch_size,
            progress_bar=progress_bar,
            generate_kwargs=generate_kwargs,
        )
    )
    result = records_to_eval_records(
        records, protocol_record(settings, samples, overridden, seed, generate_kwargs, prompt_template)
    )
    if not keep_completions:
        result.completions = []
    return result


def _distributed_state() -> Any:
    from accelerate import PartialState

    return PartialState()


STALL_SECONDS = 3600.0
"""How long the main process waits for another process that has stopped appending records (see `run_evaluation`)."""


def _wait_for_the_other_processes(
    store: EvalStore, run_id: str, world: int, poll_seconds: float, stall_seconds: float
) -> None:
    """Return once every process has written its completion marker; raise when one stops making progress."""

    def progress(rank: int) -> int:
        path = store.records_path(rank)
        return path.stat().st_size if path.exists() else -1

    last = {rank: (progress(rank), time.monotonic()) for rank in range(world)}
    while True:
        pending = [rank for rank in range(world) if not store.marker(run_id, rank).exists()]
        if not pending:
            return
        now = time.monotonic()
        for rank in pending:
            size = progress(rank)
            if size != last[rank][0]:
                last[rank] = (size, now)
            elif now - last[rank][1] > stall_seconds:
                raise RuntimeError(
                    f"Process {rank} of {world} has written no record for {stall_seconds:.0f} s and has not finished: "
                    f"it has most likely died (see its log). The records written so far are kept in {store.folder}; "
                    "run the same command again to resume."
                )
        time.sleep(poll_seconds)


def run_evaluation(
    model: Any,
    tokenizer: Any,
    examples: Sequence[EvalExample],
    plan: EvalPlan,
    output_dir: str | Path,
    *,
    settings: dict[str, Any],
    prompt_builder: Callable[[str], str],
    overwrite: bool = False,
    batch_size: int | None = None,
    progress_bar: bool = True,
    state: Any | None = None,
    poll_seconds: float = 2.0,
    stall_seconds: float = STALL_SECONDS,
) -> list[dict[str, Any]] | None:
    """Evaluate every question not yet in ``output_dir``, spread over the processes; return all records on the main one.

    The main process checks (or writes) ``settings`` in the folder first: a folder holding a run with other
    settings is refused (:class:`~metastone_hf.eval_store.ResumeMismatchError`) unless ``overwrite``. Then every
    process takes its share of the questions still missing (``PartialState.split_between_processes``) and appends
    each finished question's record to its own file. The main process waits until every process has finished its
    share, merges the files into ``records.jsonl`` and returns every record in question order; the other processes
    return ``None``. Under several nodes, ``output_dir`` must be a folder every node sees.

    Args:
        state: accelerate's ``PartialState`` (default: the current one; one process without ``accelerate launch``).
        poll_seconds: how often the main process looks for the others' completion markers.
        stall_seconds: once it has finished its own share, the main process waits for each other process as long
            as that process keeps appending records; one that has written nothing for ``stall_seconds`` (default
            one hour: far longer than one question takes) without finishing has most likely died, and the main
            process stops with an error naming it. Its records so far are kept: the same command resumes.
    """
    from accelerate.utils import broadcast_object_list

    state = state or _distributed_state()
    rank, world = state.process_index, state.num_processes
    store = EvalStore(output_dir, rank, world)
    # The main process checks the folder; the others learn the outcome (an error, or the run's id) from it.
    outcome: list[Any] = [None, uuid.uuid4().hex[:12]]
    refusal: Exception | None = None
    if state.is_main_process:
        try:
            if store.prepare(settings, overwrite=overwrite):
                print(f"resuming the evaluation in {store.folder}", file=sys.stderr)
            store.clear_markers()
        except Exception as caught:
            refusal, outcome[0] = caught, f"{type(caught).__name__}: {caught}"
    if world > 1:
        state.wait_for_everyone()
        broadcast_object_list(outcome, from_process=0)
    if refusal is not None:
        raise refusal
    if outcome[0] is not None:
        raise ValueError(f"The main process refused the evaluation: {outcome[0]}")
    run_id = outcome[1]
    done = store.load()
    todo = [i for i in range(len(examples)) if i not in done]
    with state.split_between_processes(todo) as mine:
        mine = list(mine)
    store.open_for_append()
    for record in question_records(
        model,
        tokenizer,
        examples,
        mine,
        plan,
        prompt_builder=prompt_builder,
        batch_size=batch_size,
        progress_bar=progress_bar and state.is_main_process,
    ):
        store.append({**record, "rank": rank, "world_size": world, "run_id": run_id})
    store.marker(run_id, rank).write_text("done\n")
    if not state.is_main_process:
        return None
    _wait_for_the_other_processes(store, run_id, world, poll_seconds, stall_seconds)
    records = store.load()
    missing = [i for i in range(len(examples)) if i not in records]
    if missing:
        raise RuntimeError(f"Questions {missing[:10]} have no record after every process finished.")
    store.consolidate(records.values())
    store.clear_markers()
    return [records[i] for i in range(len(examples))]


__all__ = [
    "ROWS_PER_CALL",
    "SEARCHES",
    "EvalPlan",
    "default_batch_size",
    "question_records",
    "question_seed",
    "resolve_sampling",
    "run_best_of_n_eval",
    "run_evaluation",
    "run_settings",
]
