"""metastone: demo, generate, score, convert, eval, train and push MetaStone-S1 models.

Run ``metastone <command> --help`` for each command's options.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class CLIError(Exception):
    """A user-facing error: printed as ``error: ...`` with exit status 2, no traceback."""


# ------------------------------------------------------------------------------------------ helpers
def _load_model_and_tokenizer(path: str, dtype: str | None = None, device: str | None = None) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import metastone_hf  # noqa: F401  (registers the model type; remote code also works)

    if not Path(path).exists():
        raise CLIError(f"{path} not found: give the folder of a metastone-hf checkpoint (see `metastone convert`).")
    torch_dtype = getattr(torch, dtype) if dtype else "auto"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=True)
    if not hasattr(model, "score_trajectories"):
        raise CLIError(f"{path} is not a MetaStone checkpoint (model type {model.config.model_type!r}).")
    if device:
        model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


# Below this size a model runs as fast on one CPU thread as on more: its matrices are too small to split, and extra
# threads only wait for each other (far longer on shared cores). Measured here, generate() at 1 vs 2 threads: 0.10 s
# vs 0.11 s at 0.2M parameters, 0.47 s vs 0.35 s at 4.4M. torch's default is one thread per core.
TINY_MODEL_PARAMETERS = 1_000_000


def _set_threads(threads: int | None, model: Any | None = None) -> None:
    """``--threads`` when given; else one thread for a tiny model on the CPU, and torch's own default otherwise."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    elif model is not None and model.device.type == "cpu" and model.num_parameters() < TINY_MODEL_PARAMETERS:
        torch.set_num_threads(1)


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="folder of a metastone-hf checkpoint")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="weights dtype")
    parser.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: where it loads)")
    parser.add_argument(
        "--threads",
        type=POSITIVE_INT,
        default=None,
        help="torch CPU threads (default: 1 for a CPU model under 1M parameters, else torch's default)",
    )


# An interactive answer should come back in minutes, not hours: the paper's 32768-token budget is for `eval`.
GENERATE_MAX_NEW_TOKENS = 4096
BEAM_WIDTH_HELP = (
    "children per kept beam, as in search-and-learn: beam keeps N/M beams per step, dvts runs N/M subtrees; N must "
    "be a multiple of M (default: beam 4, dvts N/4, when 4 divides N)"
)


def _bounded(kind: type, low: float, high: float | None = None, low_inclusive: bool = False) -> Any:
    """An argparse type: ``kind`` within (low, high] (or [low, high] with ``low_inclusive``), else a clear error."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n int' if kind is int else ' number'}") from None
        above = value >= low if low_inclusive else value > low
        if not above or (high is not None and value > high):
            interval = (
                f"{'[' if low_inclusive else '('}{low}, {high if high is not None else 'inf'}{']' if high else ')'}"
            )
            raise argparse.ArgumentTypeError(f"{value} is outside {interval}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE_INT = _bounded(int, 0)
NON_NEGATIVE_INT = _bounded(int, 0, low_inclusive=True)
POSITIVE_FLOAT = _bounded(float, 0.0)
PROBABILITY = _bounded(float, 0.0, 1.0)


_SAMPLING_FLAGS = (
    ("--temperature", POSITIVE_FLOAT, "temperature"),
    ("--top-p", PROBABILITY, "top_p"),
    ("--top-k", NON_NEGATIVE_INT, "top_k"),
    ("--repetition-penalty", POSITIVE_FLOAT, "repetition_penalty"),
)


def _add_sampling_flags(parser: argparse.ArgumentParser, paper: Any, override: bool) -> None:
    """The sampler's flags: defaulting to the paper's values (``generate``) or overriding a protocol (``eval``)."""
    for flag, kind, field in _SAMPLING_FLAGS:
        value = getattr(paper, field)
        shown = f"{value}, i.e. no top-k cut" if field == "top_k" and value == 0 else value
        if override:
            parser.add_argument(flag, type=kind, default=None, help=f"override the protocol's value (paper: {shown})")
        else:
            parser.add_argument(flag, type=kind, default=value, help=f"default: the paper's ({shown})")


def _add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """``generate``'s sampling flags: the paper's sampling settings, with a shorter budget for interactive use."""
    from .evaluation import EVAL_PROTOCOLS

    paper = EVAL_PROTOCOLS["paper"]
    effort = parser.add_mutually_exclusive_group()
    effort.add_argument(
        "--effort", choices=["low", "medium", "high"], default=None, help="reasoning effort (N = 2/8/32)"
    )
    effort.add_argument("--num-candidates", type=POSITIVE_INT, default=None, help="N candidates per prompt")
    parser.add_argument(
        "--search",
        choices=["best_of_n", "beam", "dvts"],
        default="best_of_n",
        help="best_of_n: N independent samples (the paper); beam: beam search over steps (the N/M best beams "
        "continue, M children each); dvts: N/M independent subtrees expanded M ways at every step",
    )
    parser.add_argument("--beam-width", type=POSITIVE_INT, default=None, metavar="M", help=BEAM_WIDTH_HELP)
    parser.add_argument(
        "--max-new-tokens",
        type=POSITIVE_INT,
        default=GENERATE_MAX_NEW_TOKENS,
        help=f"tokens per candidate (default {GENERATE_MAX_NEW_TOKENS}; the paper's evaluation allows "
        f"{paper.max_new_tokens}, so long reasoning may be cut off here)",
    )
    _add_sampling_flags(parser, paper, override=False)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_protocol_arguments(parser: argparse.ArgumentParser) -> None:
    """``eval``'s sampling flags: a registered protocol, each setting overridable (None = the protocol's)."""
    from .evaluation import EVAL_PROTOCOLS

    described = "; ".join(f"{name}: {p.description.rstrip('.')}" for name, p in EVAL_PROTOCOLS.items())
    parser.add_argument(
        "--protocol", choices=sorted(EVAL_PROTOCOLS), default="paper", help=f"sampling protocol ({described})"
    )
    paper = EVAL_PROTOCOLS["paper"]
    _add_sampling_flags(parser, paper, override=True)
    parser.add_argument(
        "--max-new-tokens",
        type=POSITIVE_INT,
        default=None,
        help=f"override the protocol's value (paper: {paper.max_new_tokens})",
    )
    parser.add_argument(
        "--samples-per-question",
        type=POSITIVE_INT,
        default=None,
        metavar="M",
        help="candidates sampled per question (default: the largest N of the requested efforts); every N is "
        "scored on K = M // N groups of N, so M must be a multiple of each requested N",
    )


# ------------------------------------------------------------------------------------------ commands
def _read_lines(path: str, what: str) -> list[str]:
    """The non-empty lines of a text file, checked before any model is loaded."""
    file = Path(path)
    if not file.is_file():
        raise CLIError(f"{path} not found: {what} must be a text file.")
    lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise CLIError(f"{path} is empty: {what} needs at least one non-empty line.")
    return lines


def cmd_generate(args: argparse.Namespace) -> int:
    if args.prompt is not None and not args.prompt.strip():
        raise CLIError("--prompt is empty: give the question text.")
    prompts = [args.prompt] if args.prompt else _read_lines(args.prompt_file, "--prompt-file")
    model, tokenizer = _load_model_and_tokenizer(args.model, args.dtype, args.device)
    _set_threads(args.threads, model)
    from .evaluation import resolve_model_prompt
    from .scoring_metastone import execution_device

    if args.raw_prompt:
        build = lambda text: text  # noqa: E731
        print("prompt template: none (--raw-prompt: the prompt is the model input as given)", file=sys.stderr)
    else:
        build, _, used = resolve_model_prompt(tokenizer, model, args.prompt_template, default="plain")
        print(used, file=sys.stderr)
    inputs = tokenizer([build(p) for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False).to(
        execution_device(model)
    )
    effort = args.effort if args.num_candidates is None else None
    out = model.generate(
        **inputs,
        reasoning_effort=effort or (None if args.num_candidates else "medium"),
        num_candidates=args.num_candidates,
        search=args.search,
        beam_width=args.beam_width,
        selection=args.selection,
        tokenizer=tokenizer,
        do_sample=True,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        max_new_tokens=args.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        seed=args.seed,
        progress_bar=not args.no_progress,
    )
    prompt_length = inputs["input_ids"].shape[1]
    results = []
    for b, prompt in enumerate(prompts):
        candidates = tokenizer.batch_decode(out.candidates[b, :, prompt_length:], skip_special_tokens=True)
        chosen = int(out.chosen_index[b])
        results.append(
            {
                "prompt": prompt,
                "chosen_index": chosen,
                "answer": candidates[chosen],
                "scores": [round(float(s), 6) for s in out.scores[b]],
                "num_steps": out.num_steps[b].tolist(),
                "candidates": candidates if args.all_candidates else None,
            }
        )
        if not args.json:
            print(f"=== prompt {b}: chosen candidate {chosen} (score {float(out.scores[b, chosen]):.4f})")
            print(candidates[chosen])
            print(
                "candidate scores: "
                + ", ".join(
                    f"{i}:{float(s):.3f}({int(k)} steps)"
                    for i, (s, k) in enumerate(zip(out.scores[b], out.num_steps[b]))
                )
            )
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    questions: dict[int, str] = {}  # row -> question, for rows whose prompt the template builds
    if args.text is not None:
        if not args.text.strip():
            raise CLIError("--text is empty: give the trajectory (prompt + completion).")
        texts = [args.text]
    else:
        texts = []
        for number, line in enumerate(_read_lines(args.input, "--input"), 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise CLIError(f"{args.input}:{number} is not valid JSON ({error.msg}).") from None
            if isinstance(row, dict) and isinstance(row.get("text"), str):
                texts.append(row["text"])
            elif (
                isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str)
            ):
                texts.append(row["prompt"] + row["completion"])
            elif (
                isinstance(row, dict)
                and isinstance(row.get("question"), str)
                and isinstance(row.get("completion"), str)
            ):
                questions[len(texts)] = row["question"]
                texts.append(row["completion"])
            else:
                raise CLIError(
                    f"{args.input}:{number}: each row needs `text`, `prompt` and `completion`, or `question` and "
                    "`completion` (strings)."
                )
    model, tokenizer = _load_model_and_tokenizer(args.model, args.dtype, args.device)
    _set_threads(args.threads, model)
    if questions:
        from .evaluation import resolve_model_prompt

        build, _, used = resolve_model_prompt(tokenizer, model, args.prompt_template, default="paper")
        print(used, file=sys.stderr)
        for row, question in questions.items():
            texts[row] = build(question) + texts[row]
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    result = model.score_trajectories(encoded["input_ids"], encoded["attention_mask"], batch_size=args.batch_size)
    rows = [
        {"score": float(s), "num_steps": int(k), "step_scores": [round(float(x), 6) for x in steps]}
        for s, k, steps in zip(result.scores, result.num_steps, result.step_scores)
    ]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for i, row in enumerate(rows):
            steps = " ".join(f"{x:.3f}" for x in row["step_scores"])
            print(f"[{i}] score={row['score']:.4f} steps={row['num_steps']} step_scores: {steps}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import run_convert

    return run_convert(args)


def cmd_eval_processbench(args: argparse.Namespace) -> int:
    """``metastone eval --data processbench``: the head as a PRM, ProcessBench's first-error metric per split."""
    from .atomic_writes import write_json_atomic
    from .evaluation import resolve_model_prompt, resolve_prompt_template
    from .math_datasets import DatasetDownloadError
    from .processbench import evaluate_processbench, format_processbench, load_processbench

    if args.prompt_template is not None:
        resolve_prompt_template(args.prompt_template)  # a bad template is refused before the model loads
    splits = args.split.split(",") if args.split else None
    try:
        traces = load_processbench(args.data_dir or "processbench", splits=splits, limit=args.limit)
    except DatasetDownloadError as error:
        raise CLIError(str(error)) from error
    model, tokenizer = _load_model_and_tokenizer(args.model, args.dtype, args.device)
    _set_threads(args.threads, model)
    prompt_builder, template, used = resolve_model_prompt(tokenizer, model, args.prompt_template, default="paper")
    print(used, file=sys.stderr)
    summary = evaluate_processbench(
        model,
        tokenizer,
        traces,
        prompt_builder,
        batch_size=args.batch_size or 8,
        progress_bar=not args.no_progress,
    )
    summary.update(model=str(args.model), data=str(args.data_dir or "Qwen/ProcessBench"), prompt_template=template)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = out_dir / "processbench_report.json"
    write_json_atomic(report, summary)
    print(format_processbench(summary))
    print(f"\nreport: {report}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.data == "processbench":
        return cmd_eval_processbench(args)
    from .eval_runner import EvalPlan, parse_adaptive, resolve_sampling, run_evaluation, run_settings
    from .evaluation import (
        EVAL_PROTOCOLS,
        format_table,
        load_eval_examples,
        plot_accuracy_vs_n,
        plot_accuracy_vs_tokens,
        protocol_record,
        resolve_model_prompt,
        resolve_prompt_template,
        save_report,
        summarize_records,
        tokens_curves,
    )
    from .math_datasets import DatasetDownloadError

    _warn_if_launched_alone()
    if args.prompt_template is not None:
        resolve_prompt_template(args.prompt_template)  # a bad template is refused before the model loads
    try:
        adaptive = tuple(parse_adaptive(text) for text in dict.fromkeys(args.adaptive))  # so is a bad --adaptive
    except ValueError as error:
        raise CLIError(str(error)) from error
    # The data first: a missing file or an unreachable Hub should not cost a model load.
    try:
        examples = load_eval_examples(args.data, args.data_dir, limit=args.limit, split=args.split)
    except DatasetDownloadError as error:
        raise CLIError(str(error)) from error
    import torch
    from accelerate import PartialState

    # Without a GPU, accelerate sets up several processes (gloo) only when told to run on the CPU.
    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != state.num_processes:
        raise CLIError(
            f"{launched} processes were launched but accelerate set up {state.num_processes}; they would write the "
            "same records. Launch with a multi-process config (e.g. `accelerate launch --multi_gpu "
            "--num_processes N -m metastone_hf.cli eval ...`)."
        )
    device = args.device if args.device is not None or state.num_processes == 1 else str(state.device)
    model, tokenizer = _load_model_and_tokenizer(args.model, args.dtype, device)
    _set_threads(args.threads, model)
    prompt_builder, template, used = resolve_model_prompt(tokenizer, model, args.prompt_template, default="paper")
    if state.is_main_process:
        print(used, file=sys.stderr)
    presets = model.config.reasoning_effort_presets
    efforts = args.efforts or list(presets)
    unknown = [e for e in efforts if e not in presets]
    if unknown:
        raise CLIError(f"unknown effort(s) {unknown}; this model knows {sorted(presets)}.")
    budgets = {e: presets[e] for e in efforts}
    requested = args.samples_per_question
    samples = _samples_per_question(
        EVAL_PROTOCOLS[args.protocol].samples_per_question if requested is None else requested, budgets
    )
    protocol, samples, overridden = resolve_sampling(
        args.protocol,
        presets,
        samples,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        max_new_tokens=args.max_new_tokens,
    )
    try:
        plan = EvalPlan(
            protocol, samples, budgets, tuple(dict.fromkeys(args.search)), args.beam_width, args.seed, adaptive
        )
    except ValueError as error:
        raise CLIError(str(error)) from error
    settings = run_settings(plan, examples, args.model, args.data, template, str(model.dtype))
    out_dir = Path(args.output_dir)
    records = run_evaluation(
        model,
        tokenizer,
        examples,
        plan,
        out_dir,
        settings=settings,
        prompt_builder=prompt_builder,
        overwrite=args.overwrite,
        batch_size=args.batch_size,
        progress_bar=not args.no_progress,
        state=state,
        **({} if args.stall_timeout is None else {"stall_seconds": args.stall_timeout}),
    )
    if torch.distributed.is_initialized():
        # Torn down here rather than at interpreter exit, where gloo's threads can abort a finished run.
        torch.distributed.destroy_process_group()
    if records is None:  # not the main process: the main one writes the report
        return 0
    summary = summarize_records(
        records, budgets, protocol_record(protocol, samples, overridden, args.seed, prompt_template=template)
    )
    summary["dataset"] = str(args.data)  # `metastone push` names the benchmark in the model card from it
    summary["searches"] = list(plan.searches)
    report = save_report(summary, records, out_dir / "eval_report.json")
    title = f"{Path(args.model).name} on {Path(str(args.data)).stem}"
    plots = [
        plot_accuracy_vs_n(summary, out_dir / "accuracy_vs_n.png", title=title),
        plot_accuracy_vs_tokens(tokens_curves(summary), out_dir / "accuracy_vs_tokens.png", title=title),
    ]
    print(format_table(summary))
    used = summary["protocol"]
    # More or fewer samples per question change only the variance of the K-group average, not what it estimates.
    if used["name"] != "paper" or set(used["overridden"]) - {"samples_per_question"}:
        print("note: not the paper's sampling protocol; accuracies are not comparable with the paper's.")
    print(f"\nreport:  {report}\nrecords: {out_dir / 'records.jsonl'}\nplots:   {', '.join(map(str, plots))}")
    return 0


def _warn_if_launched_alone() -> None:
    """Say so when ``accelerate launch`` was asked for several processes but started this one alone.

    ``accelerate launch --cpu --num_processes N`` runs accelerate's single-process launcher: it sets a rendezvous
    address for N processes (``MASTER_PORT``) but starts one, with no ``WORLD_SIZE``. The evaluation would run on one
    process, N times slower than asked, without a word.
    """
    launched_by_accelerate = "ACCELERATE_MIXED_PRECISION" in os.environ
    if launched_by_accelerate and "MASTER_PORT" in os.environ and "WORLD_SIZE" not in os.environ:
        print(
            "warning: `accelerate launch` was asked for several processes but started this one alone (its `--cpu` "
            "launcher runs a single process); the evaluation runs on 1 process. On a machine without GPUs, launch N "
            "gloo processes with `accelerate launch --multi_gpu --num_processes N -m metastone_hf.cli eval ...`.",
            file=sys.stderr,
            flush=True,
        )


def _samples_per_question(requested: int | None, budgets: dict[str, int]) -> int:
    """Candidates per question ``M`` for the requested budgets (default: the largest N).

    The metrics split a question's M candidates into K = M // N groups of N and drop any remainder, so an M
    that is not a multiple of some requested N would silently leave candidates out of that N's numbers: refused.
    """
    largest = max(budgets.values())
    if requested is None:
        return largest
    if requested < largest:
        raise CLIError(f"--samples-per-question {requested} is below the largest requested N ({largest}).")
    uneven = sorted({n for n in budgets.values() if requested % n})
    if uneven:
        raise CLIError(
            f"--samples-per-question {requested} is not a multiple of N = {uneven}: the metrics score K = M // N "
            f"whole groups of N, and the remaining candidates would be left out; use a multiple of "
            f"{math.lcm(*budgets.values())}."
        )
    return requested


def cmd_push(args: argparse.Namespace) -> int:
    """Push a checkpoint with a freshly rendered model card.

    Each ``--metrics`` report becomes a results table and ``model-index`` metadata for its dataset (``--dataset``,
    one per report, or the report's own ``dataset`` field). A single report that names no dataset still fills a
    plain table, without ``model-index``. ``base_model`` is ``--base-model``, else the one in the checkpoint's card.
    """
    from .hub import card_base_model, eval_results_from_report, push_checkpoint, report_metrics, report_summary

    reports = args.metrics or []
    datasets = args.dataset or []
    if datasets and len(datasets) != len(reports):
        raise CLIError(
            f"--dataset names {len(datasets)} dataset(s) for {len(reports)} --metrics report(s): "
            "give one per report, in the same order."
        )
    eval_results: list[Any] = []
    metrics = None
    for index, path in enumerate(reports):
        summary = report_summary(path)
        dataset = datasets[index] if datasets else summary.get("dataset")
        if dataset:
            eval_results += eval_results_from_report(summary, dataset)
        elif len(reports) == 1:
            metrics = report_metrics(summary)
            print(
                f"note: {path} does not say which dataset it measured, so its numbers go into a plain table "
                "only; pass --dataset (e.g. math500) to publish them as model-index results as well."
            )
        else:
            raise CLIError(f"{path} does not say which dataset it measured: pass --dataset, one per report.")
    model, tokenizer = _load_model_and_tokenizer(args.model)
    base_model = args.base_model or card_base_model(args.model)
    info = push_checkpoint(
        model,
        args.repo_id,
        tokenizer,
        private=args.private,
        token=args.token,
        base_model=base_model,
        metrics=metrics,
        eval_results=eval_results or None,
    )
    print(f"Pushed to {args.repo_id}: {info}")
    return 0


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from .math_datasets import DatasetDownloadError
    from .training.script import run_training_cli

    try:
        return run_training_cli(extra)
    except DatasetDownloadError as error:
        raise CLIError(str(error)) from error


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo.pipeline import run_demo_from_args

    return run_demo_from_args(args)


# ------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metastone", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of every error (before the command)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="reproduce the paper's mechanism end to end on a CPU (no downloads)")
    from .demo.options import add_demo_arguments

    add_demo_arguments(demo)
    demo.set_defaults(func=cmd_demo)

    gen = sub.add_parser("generate", help="Best-of-N answer for a prompt, with every candidate's SPRM score")
    _add_model_arguments(gen)
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the question")
    source.add_argument("--prompt-file", help="a text file, one prompt per line")
    _add_sampling_arguments(gen)
    gen.add_argument("--selection", choices=["sprm", "sprm_vote", "majority"], default="sprm")
    gen.add_argument(
        "--prompt-template",
        default=None,
        help="default: the template the checkpoint records (config.prompt_template), else 'plain' (the question as "
        "the user message of the chat template, then <think>); 'paper' or a text holding {question} as in eval",
    )
    gen.add_argument("--raw-prompt", action="store_true", help="the prompt is the model input as given (no template)")
    gen.add_argument("--all-candidates", action="store_true", help="include every candidate's text in --json output")
    gen.add_argument("--json", action="store_true", help="print JSON")
    gen.set_defaults(func=cmd_generate)

    score = sub.add_parser("score", help="SPRM scores of given trajectories (prompt + completion)")
    _add_model_arguments(score)
    given = score.add_mutually_exclusive_group(required=True)
    given.add_argument("--text", help="one trajectory")
    given.add_argument(
        "--input",
        help="jsonl, per row: `text` (the whole trajectory), `prompt` + `completion` (the prompt as the model read "
        "it), or `question` + `completion` (the prompt is built from the question with the prompt template)",
    )
    score.add_argument(
        "--prompt-template",
        default=None,
        help="for `question` rows: default the checkpoint's recorded template, else 'paper'; as in eval",
    )
    score.add_argument("--batch-size", type=POSITIVE_INT, default=8, help="trajectories per forward")
    score.add_argument("--json", action="store_true")
    score.set_defaults(func=cmd_score)

    convert = sub.add_parser("convert", help="official MetaStone-S1 release -> metastone-hf checkpoint")
    from .convert import add_convert_arguments

    add_convert_arguments(convert)
    convert.set_defaults(func=cmd_convert)

    ev = sub.add_parser(
        "eval",
        help="evaluation on a dataset: pass@1, maj@N, BoN-SPRM@N, beam / DVTS, plots; resumable, runs under "
        "`accelerate launch` over several processes",
    )
    _add_model_arguments(ev)
    ev.add_argument(
        "--data",
        required=True,
        help="aime24 | aime25 | gsm8k | math500 (downloaded from the Hugging Face Hub, or read from --data-dir), "
        "processbench (the head as a PRM on Qwen/ProcessBench, or on the <split>.json files of --data-dir), or a local "
        ".jsonl / .json / .parquet file or dataset folder (fields: prompt|problem|question, answer)",
    )
    ev.add_argument(
        "--data-dir",
        default=None,
        help="read a named dataset from this folder instead of the Hub: it holds aime24.jsonl, aime25.jsonl, "
        "gsm8k_test.jsonl, math500_test.jsonl (or <name>.jsonl)",
    )
    ev.add_argument(
        "--split", default=None, help="dataset split (default: the benchmark's; for a local DatasetDict folder)"
    )
    ev.add_argument("--efforts", nargs="+", default=None, help="efforts to report (default: all presets)")
    ev.add_argument("--limit", type=POSITIVE_INT, default=None, help="first N questions only")
    ev.add_argument(
        "--batch-size",
        type=POSITIVE_INT,
        default=None,
        help="questions per generate call (default: about 32 rows per call, e.g. 1 question at M = 32); the "
        "records do not depend on it",
    )
    _add_protocol_arguments(ev)
    ev.add_argument(
        "--search",
        nargs="+",
        choices=["best_of_n", "beam", "dvts"],
        default=["best_of_n"],
        help="strategies to evaluate (several allowed): best_of_n samples M once and reports every N from it; "
        "beam and dvts run one search per question and N",
    )
    ev.add_argument("--beam-width", type=POSITIVE_INT, default=None, metavar="M", help=BEAM_WIDTH_HELP)
    ev.add_argument(
        "--adaptive",
        nargs="+",
        default=[],
        metavar="SIGNAL[:key=value,...]",
        help="also run adaptive compute (off by default), each setting with at most M candidates per question: "
        "'sprm' (the SPRM step scores) or 'confidence' (DeepConf's token confidence), optionally with AdaptiveConfig "
        "fields, e.g. 'sprm:warmup=8,keep_percent=10,consensus=0.95' or 'confidence:window=64,consensus=none'; rows "
        "with tokens, decode steps and candidates per question go into the table, report, plots and model card "
        "(docs/generation-and-search.md, 'Adaptive compute')",
    )
    ev.add_argument(
        "--prompt-template",
        default=None,
        help="default: the template the checkpoint records (config.prompt_template, the whole model input), else "
        "'paper'. A user message: 'paper' (the question, then 'Please reason step by step, and put your final "
        "answer within \\boxed{}.'), 'plain' (the question alone), or a text holding {question}; then the chat "
        "template and <think>",
    )
    ev.add_argument("--seed", type=int, default=0, help="question i samples with a seed made of it and i")
    ev.add_argument(
        "--output-dir",
        default="metastone-eval",
        help="where records.jsonl (one line per finished question), run.json, the report and plots go; re-running "
        "the same command there resumes",
    )
    ev.add_argument(
        "--overwrite", action="store_true", help="discard the records already in --output-dir and start afresh"
    )
    ev.add_argument(
        "--stall-timeout",
        type=POSITIVE_FLOAT,
        default=None,
        metavar="SECONDS",
        help="under several processes, once done with its own questions the main process stops with an error naming "
        "a process that has written no record for this long (default: 3600, one hour); raise it when one batch of "
        "questions can take longer",
    )
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=cmd_eval)

    train = sub.add_parser(
        "train",
        help="GRPO + SPR loss training (all `trl grpo` flags plus --sprm_*); see `metastone train --help`",
        add_help=False,
    )
    train.set_defaults(func=cmd_train, passthrough=True)

    push = sub.add_parser("push", help="push a checkpoint (with a rendered model card) to the Hugging Face Hub")
    push.add_argument("--model", required=True, help="checkpoint folder")
    push.add_argument("--repo-id", required=True, help="e.g. your-name/metastone-s1-7b")
    push.add_argument(
        "--metrics",
        nargs="+",
        default=None,
        metavar="EVAL_REPORT",
        help="eval_report.json file(s) of `metastone eval`: results table and model-index metadata of the card",
    )
    push.add_argument(
        "--dataset",
        nargs="+",
        default=None,
        help="what each --metrics report measured, in the same order: aime24, gsm8k, math500 (their Hub datasets), "
        "or any name (default: the report's own `dataset` field)",
    )
    push.add_argument(
        "--base-model",
        default=None,
        help="Hub id of the model this one was trained or converted from, e.g. MetaStoneTec/MetaStone-S1-7B "
        "(default: the base_model in the checkpoint's own model card, if any)",
    )
    push.add_argument("--private", action="store_true")
    push.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")
    push.set_defaults(func=cmd_push)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = bool(argv) and argv[0] == "--debug"
    if argv and argv[debug:][:1] == ["train"]:
        return _run(lambda: cmd_train(argparse.Namespace(), argv[debug + 1 :]), debug)
    args = build_parser().parse_args(argv)
    return _run(lambda: args.func(args), args.debug)


def _raised_by_this_package(error: BaseException) -> bool:
    """Whether the innermost frame of ``error`` is this package's code (or its remote-code copy in a checkpoint)."""
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    if frame is None:
        return False
    path = Path(frame.tb_frame.f_code.co_filename).resolve()
    return Path(__file__).resolve().parent in path.parents or path.name.endswith("_metastone.py")


def _run(command: Any, debug: bool = False) -> int:
    """Run a command: input errors print ``error: ...`` (exit 2); anything else keeps its traceback.

    Input errors are :class:`CLIError`, missing or existing files, unreachable data, and each ``ValueError`` this
    package raises when it checks what it was given. A ``ValueError`` from deeper down (torch, transformers) is a
    bug to see, not an input to fix, so it is raised with its traceback, as is everything under ``--debug``.
    """
    try:
        return int(command() or 0)
    except (CLIError, FileNotFoundError, FileExistsError, ConnectionError, ValueError) as error:
        if debug or (isinstance(error, ValueError) and not _raised_by_this_package(error)):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
