"""Adaptive test-time compute on a demo task: accuracy against generated tokens per question.

Every setting answers the same held-out problems of a ``metastone demo`` task (``--task short``, ``long`` or
``verify``; the model is read with ``--checkpoint`` or trained now), each question sampling from its own seed:

* Best-of-N (SPRM) at N = ``--budgets`` (4, 8, 16, 32): N samples, the best-scored one;
* beam search and DVTS over steps at the same N (M = 4 children per kept beam);
* adaptive SPRM (``generate(adaptive=AdaptiveConfig(signal="sprm", ...))``, at most ``--max-n`` = 32 candidates):
  warm-up candidates set a threshold on the worst step score, later candidates stop below it, the question stops
  at its consensus; the pick is the best SPRM score among the finished candidates;
* adaptive token confidence (``signal="confidence"``, DeepConf's online mode: no verifier; the pick is the
  confidence-weighted vote), with the same warm-up, percentile and consensus settings.

For each it prints the accuracy of the chosen answer with a 95% bootstrap interval over problems, generated tokens
per question (stopped candidates included), candidates used and decode steps per question (steps in which the
question had a row decoding; for the fixed strategies the longest candidate), and checks the target: an
adaptive SPRM setting inside (or above) Best-of-N@32's interval with at most 40% of its tokens. One plot per task goes to
``--plot`` (default ``docs/adaptive_<task>_accuracy_vs_tokens.png``).

    OMP_NUM_THREADS=1 python benchmarks/bench_adaptive.py --task short --checkpoint /tmp/demo-short/checkpoint
    OMP_NUM_THREADS=1 python benchmarks/bench_adaptive.py --task verify --checkpoint PATH
    OMP_NUM_THREADS=1 python benchmarks/bench_adaptive.py --syncs   # host syncs per decode step, no demo model

``--syncs`` counts host-device syncs per decode step (``bench_eval_batching.py``'s counter) for plain Best-of-N
and the adaptive settings on that script's varying-length workload (tiny random model, paper protocol).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

from metastone_hf import AdaptiveConfig
from metastone_hf.demo import task
from metastone_hf.demo.pipeline import DemoConfig, trained_demo_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_search import accuracy, cell  # the sibling benchmark's accuracy with its interval, and its table cell

# name -> (signal-independent settings); each runs once with signal="sprm" and once with signal="confidence".
ADAPTIVE = {
    "w2-score": {"warmup": 2, "keep_percent": 90, "consensus": 0.9999, "consensus_by": "score"},
    "w4-score": {"warmup": 4, "keep_percent": 90, "consensus": 0.9999, "consensus_by": "score"},
    "w4-low-score": {"warmup": 4, "keep_percent": 10, "consensus": 0.9999, "consensus_by": "score"},
    "w4-vote0.95": {"warmup": 4, "keep_percent": 90, "consensus": 0.95},
    "w4-low-vote0.95": {"warmup": 4, "keep_percent": 10, "consensus": 0.95},
    "w8-low-vote0.95": {"warmup": 8, "keep_percent": 10, "consensus": 0.95},
    "w4-low-stop-only": {"warmup": 4, "keep_percent": 10, "consensus": None},
    "w4-low-score.9987": {"warmup": 4, "keep_percent": 10, "consensus": 0.9987, "consensus_by": "score"},
    "w4-low-score.9985": {"warmup": 4, "keep_percent": 10, "consensus": 0.9985, "consensus_by": "score"},
    "w8-low-stop-only": {"warmup": 8, "keep_percent": 10, "consensus": None},
    "w2-low-score.9987": {"warmup": 2, "keep_percent": 10, "consensus": 0.9987, "consensus_by": "score"},
    "w2-low-score.9986": {"warmup": 2, "keep_percent": 10, "consensus": 0.9986, "consensus_by": "score"},
    "w4-low-score.9986": {"warmup": 4, "keep_percent": 10, "consensus": 0.9986, "consensus_by": "score"},
}
"""Settings run with each signal. ``consensus_by="score"`` (SPRM: the best finished trajectory score reaches the
value; the demo's head puts right trajectories at ~0.99999 and wrong ones at ~0.9995) has no counterpart without a
verifier: the confidence signal runs those settings with its vote at 0.95."""
SETTING_NAME = re.compile(
    r"w(\d+)(-low)?-(?:(score)(\.\d+)?|vote(0?\.\d+|1)|(stop-only))(?:-p(\d+))?(?:-win(\d+))?(?:-floor(\.\d+))?"
)


def setting_fields(name: str) -> dict:
    """The fields of setting ``name``: :data:`ADAPTIVE`'s, or read from the name's pattern ``w<warm-up>[-low]-`` then
    ``score[.<value>]`` (score consensus, 0.9999 without a value), ``vote<value>`` or ``stop-only`` (no consensus);
    ``-low`` keeps 10% of the warm-up candidates above the threshold, 90% without it; a suffix ``-p<k>`` sets
    ``parallel`` (candidates in flight after the warm-up), ``-win<k>`` the SPRM ``window`` (steps) and ``-floor.<s>``
    the SPRM ``threshold_floor`` as a step score (its log; the confidence signal runs without it)."""
    if name in ADAPTIVE:
        return dict(ADAPTIVE[name])
    match = SETTING_NAME.fullmatch(name)
    if match is None:
        raise SystemExit(
            f"unknown adaptive setting {name!r}: use one of {list(ADAPTIVE)} or the pattern {SETTING_NAME.pattern}"
        )
    warmup, low, score, score_value, vote, _, parallel, window, floor = match.groups()
    fields = {"warmup": int(warmup), "keep_percent": 10 if low else 90}
    if parallel:
        fields["parallel"] = int(parallel)
    if window:
        fields["window"] = int(window)
    if floor:
        fields["threshold_floor"] = math.log(float("0" + floor))
    if score:
        fields.update(consensus=float("0" + score_value) if score_value else 0.9999, consensus_by="score")
    else:
        fields["consensus"] = float(vote) if vote else None
    return fields


CONFIDENCE_WINDOW = 8  # tokens (the demo's candidates are 20-45 tokens long; DeepConf's 2048 is for long traces)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=None, help="a `metastone demo` checkpoint folder (default: train one)")
    parser.add_argument("--task", choices=sorted(task.TASKS), default="short", help="the demo task")
    parser.add_argument("--hops", type=int, default=None, help="steps per trajectory (default: the task's own)")
    parser.add_argument("--problems", type=int, default=200, help="held-out problems")
    parser.add_argument("--budgets", type=int, nargs="+", default=[4, 8, 16, 32], help="N of the fixed strategies")
    parser.add_argument("--max-n", type=int, default=32, help="the most candidates an adaptive question may use")
    parser.add_argument("--beam-width", type=int, default=4, metavar="M", help="children per kept beam")
    parser.add_argument("--batch-size", type=int, default=8, help="questions per generate call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--settings",
        nargs="+",
        default=list(ADAPTIVE)[:7],
        help=f"adaptive settings (default: the first 7 of {list(ADAPTIVE)}; others by the pattern "
        "w<warm-up>[-low]-score[.<value>] | -vote<value> | -stop-only)",
    )
    parser.add_argument("--plot", default=None, help="the plot (default: docs/adaptive_<task>_accuracy_vs_tokens.png)")
    parser.add_argument("--json", default=None, help="write the measurements here")
    parser.add_argument("--syncs", action="store_true", help="only count host syncs per decode step (no demo model)")
    return parser.parse_args()


def sync_part() -> None:
    """Host syncs per decode step: plain Best-of-N vs adaptive, one generate call, on bench_eval_batching's workload."""
    from bench_eval_batching import QUESTIONS, DecodeCounter, build, counting_syncs, workload_kwargs

    from metastone_hf.evaluation import EVAL_PROTOCOLS, build_prompt_builder

    class Args:
        hidden, layers, step_every, eos_every = 128, 4, 75, 200

    tokenizer, model = build(Args)
    extra = workload_kwargs(tokenizer, model, Args)
    protocol = EVAL_PROTOCOLS["paper"]
    counter = DecodeCounter(model)
    settings = {
        "best_of_n": {},
        "adaptive sprm": {"adaptive": AdaptiveConfig(warmup=4, keep_percent=50, consensus=0.5, consensus_by="score")},
        "adaptive confidence": {
            "adaptive": AdaptiveConfig(signal="confidence", warmup=4, keep_percent=50, consensus=None, window=16)
        },
    }
    print("host syncs per decode step (N = 8, cap 192 tokens, paper protocol, 4-layer d=128 model):")
    for prompts in (1, 4):
        inputs = tokenizer(
            [build_prompt_builder(tokenizer, model)(q) for q in QUESTIONS[:prompts]],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        )
        for name, options in settings.items():
            kwargs = dict(
                **inputs, do_sample=True, temperature=protocol.temperature, top_p=protocol.top_p, top_k=0,
                repetition_penalty=protocol.repetition_penalty, max_new_tokens=192, num_candidates=8,
                pad_token_id=tokenizer.pad_token_id, seed=list(range(11, 11 + prompts)), **options, **extra,
            )  # fmt: skip
            counter.reset()
            with counting_syncs() as syncs:
                out = model.generate(**kwargs)
            print(
                f"  {name:<20} prompts {prompts}: {counter.steps:>5} decode steps, {out.tokens_generated:>5} tokens, "
                f"{syncs.count / counter.steps:.2f} syncs/step"
            )
    counter.close()


def run(model, tokenizer, problems, n, seed, batch_size, max_new_tokens, **options) -> dict:
    """Answer every problem with one setting; per-problem correctness, tokens, candidates and decode steps."""
    correct, tokens, used, steps = [], [], [], []
    start = time.perf_counter()
    for first in range(0, len(problems), batch_size):
        batch = problems[first : first + batch_size]
        inputs = tokenizer([p.prompt for p in batch], return_tensors="pt", padding=True)
        out = model.generate(
            inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            num_candidates=n,
            seed=[seed * 1_000_003 + first + i for i in range(len(batch))],
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tokenizer=tokenizer,
            answer_extractor=task.extract_answer,
            progress_bar=False,
            **options,
        )
        width = inputs["input_ids"].shape[1]
        texts = tokenizer.batch_decode(out.sequences[:, width:], skip_special_tokens=True)
        correct += [task.reward(text, p.answer) > 0.5 for text, p in zip(texts, batch)]
        if out.used is not None:  # adaptive
            tokens += out.num_generated_tokens.sum(dim=1).tolist()
            used += out.used.sum(dim=1).tolist()
            steps += out.prompt_decode_steps.tolist()
        else:
            if options.get("search", "best_of_n") == "best_of_n":
                tokens += out.num_generated_tokens.sum(dim=1).tolist()
            else:  # every branch, dropped ones included, spread evenly (the output counts the whole call)
                tokens += [out.tokens_generated / len(batch)] * len(batch)
            used += [n] * len(batch)
            steps += out.num_generated_tokens.max(dim=1).values.tolist()
    return {
        **accuracy(correct),
        "tokens": float(np.mean(tokens)),
        "candidates": float(np.mean(used)),
        "decode_steps": float(np.mean(steps)),
        "seconds": time.perf_counter() - start,
        "n": n,
    }


def plot(results: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    curves = {
        "best_of_n": ("Best-of-N (SPRM), N = 4..32", "o", "-"),
        "beam": ("beam search", "s", "--"),
        "dvts": ("DVTS", "^", ":"),
    }
    for name, (label, marker, line) in curves.items():
        rows = results[name]
        xs, ys = [r["tokens"] for r in rows], [100 * r["accuracy"] for r in rows]
        (drawn,) = ax.plot(xs, ys, marker=marker, linestyle=line, label=label, alpha=0.8)
        ax.fill_between(
            xs,
            [100 * r["ci_low"] for r in rows],
            [100 * r["ci_high"] for r in rows],
            alpha=0.08,
            color=drawn.get_color(),
        )
        if name == "best_of_n":
            for x, y, r in zip(xs, ys, rows):
                ax.annotate(f"N={r['n']}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    for signal, (label, marker, color) in {
        "sprm": ("adaptive, SPRM step scores", "*", "tab:red"),
        "confidence": ("adaptive, token confidence (DeepConf)", "P", "tab:purple"),
    }.items():
        rows = results[signal]
        xs, ys = [r["tokens"] for r in rows], [100 * r["accuracy"] for r in rows]
        errors = [[y - 100 * r["ci_low"] for y, r in zip(ys, rows)], [100 * r["ci_high"] - y for y, r in zip(ys, rows)]]
        ax.errorbar(xs, ys, yerr=errors, fmt=marker, color=color, label=label, markersize=9, capsize=2, alpha=0.85)
        for x, y, r in zip(xs, ys, rows):
            ax.annotate(r["setting"], (x, y), textcoords="offset points", xytext=(5, 3), fontsize=6, color=color)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("generated tokens per question (stopped candidates and all branches included)")
    ax.set_ylabel("accuracy of the chosen answer (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if args.syncs:
        sync_part()
        return
    config = DemoConfig.for_task(args.task, args.hops, seed=args.seed)
    start = time.perf_counter()
    model, tokenizer = trained_demo_model(args.checkpoint, args.seed, args.task, args.hops)
    if args.checkpoint is None:
        print(f"trained the demo model in {time.perf_counter() - start:.0f}s")
    problems = config.demo_task.make_split("test", args.problems, seed=args.seed + 101)
    max_new = config.max_completion_length
    print(
        f"task {args.task}: {config.demo_task.description}; {len(problems)} held-out problems, {args.batch_size} "
        f"questions per call, max {max_new} new tokens, T=1.0, M={args.beam_width}; adaptive N <= {args.max_n}, "
        f"confidence window {CONFIDENCE_WINDOW} tokens, top-k 20; OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, "
        f"torch threads {torch.get_num_threads()}, seed {args.seed}"
    )
    header = (
        f"{'strategy':<20}{'setting':<19}{'N':>4}{'accuracy % [95% CI]':>24}{'tok/question':>14}{'cand/q':>8}"
        f"{'steps/q':>9}{'wall s':>8}"
    )
    print(header)
    print("-" * len(header))
    common = (model, tokenizer, problems)

    def show(name: str, setting: str, row: dict) -> None:
        print(
            f"{name:<20}{setting:<19}{row['n']:>4}{cell(row):>24}{row['tokens']:>14.1f}{row['candidates']:>8.1f}"
            f"{row['decode_steps']:>9.1f}{row['seconds']:>8.1f}"
        )

    results: dict[str, list[dict]] = {"best_of_n": [], "beam": [], "dvts": [], "sprm": [], "confidence": []}
    for n in args.budgets:
        for name, options in {
            "best_of_n": {},
            "beam": {"search": "beam", "beam_width": min(args.beam_width, n)},
            "dvts": {"search": "dvts", "beam_width": min(args.beam_width, n)},
        }.items():
            row = run(*common, n, args.seed, args.batch_size, max_new, **options)
            results[name].append(row)
            show(name, "-", row)
    for setting in args.settings:
        for signal in ("sprm", "confidence"):
            fields = dict(setting_fields(setting), signal=signal)
            options = {}
            if signal == "confidence":
                fields["window"] = CONFIDENCE_WINDOW
                fields.pop("threshold_floor", None)  # a log step score: no meaning for a token confidence
                if fields.get("consensus_by") == "score":  # no trajectory score without a verifier: the vote
                    fields.update(consensus_by="vote", consensus=0.95)
                options["selection"] = "sprm_vote"  # with the confidence signal: the confidence-weighted vote
            row = run(
                *common, args.max_n, args.seed, args.batch_size, max_new, adaptive=AdaptiveConfig(**fields), **options
            )
            row.update(setting=setting, fields=fields)
            results[signal].append(row)
            show(f"adaptive-{signal}", setting, row)
    print("-" * len(header))

    reference = next((r for r in results["best_of_n"] if r["n"] == max(args.budgets)), None)
    if reference is not None:
        print(
            f"target: an adaptive SPRM setting with accuracy inside (or above) Best-of-N@{reference['n']}'s 95% interval "
            f"[{100 * reference['ci_low']:.1f}, {100 * reference['ci_high']:.1f}] and <= 40% of its "
            f"{reference['tokens']:.1f} tokens/question ({0.4 * reference['tokens']:.1f})"
        )
        for signal in ("sprm", "confidence"):
            for row in results[signal]:
                where = (
                    "below"
                    if row["accuracy"] < reference["ci_low"]
                    else ("above" if row["accuracy"] > reference["ci_high"] else "inside")
                )
                share = row["tokens"] / reference["tokens"]
                verdict = "MET" if where != "below" and share <= 0.4 else "not met"
                print(
                    f"  {signal:<11}{row['setting']:<18} accuracy {100 * row['accuracy']:5.1f} "
                    f"({where}), tokens {100 * share:5.1f}% of BoN@{reference['n']}: "
                    f"{verdict}"
                )
    print("SPRM vs confidence, same settings (intervals apart = the 95% intervals do not overlap):")
    for sprm, conf in zip(results["sprm"], results["confidence"]):
        apart = sprm["ci_low"] > conf["ci_high"] or sprm["ci_high"] < conf["ci_low"]
        print(
            f"  {sprm['setting']:<18} SPRM {cell(sprm)} at {sprm['tokens']:6.1f} tok vs confidence {cell(conf)} at "
            f"{conf['tokens']:6.1f} tok: {'apart' if apart else 'overlap'}"
        )
    plot_path = args.plot or f"docs/adaptive_{args.task}_accuracy_vs_tokens.png"
    title = (
        f"metastone demo --task {args.task} ({config.demo_task.hops} steps): adaptive compute vs fixed N\n"
        f"{len(problems)} held-out problems, seed {args.seed}; 95% bootstrap intervals"
    )
    plot(results, plot_path, title)
    print(f"plot: {plot_path}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
