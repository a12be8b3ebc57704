"""Step-level search vs Best-of-N on a demo task: accuracy against generated tokens, wall time, pruning savings.

The demo model (``metastone demo``: a tiny Qwen2-style MetaStone policy with its SPRM head, SFT then joint GRPO +
SPR training on a synthetic task, ``--task short``, ``long`` or ``verify``, see ``metastone_hf.demo.task``)
is trained once (or read with ``--checkpoint``, which must come from the same ``--task`` / ``--hops``), then every
strategy answers the same held-out problems with the same N (M = ``--beam-width``, search-and-learn's meaning):

* Best-of-N: N samples, each to its end; the best-scored one is the answer;
* majority vote over the same N samples (the same tokens): the most frequent boxed answer;
* beam search over steps: at every step the N/M best beams (running geometric-mean score) continue, M children
  each;
* DVTS: N/M independent subtrees, each expanded M ways at every step and continued with its best child.

For each, it prints the accuracy of the chosen answer with a 95% bootstrap interval over problems, tokens generated
(all branches) and processed per problem, and wall time; then Best-of-N with SPRM-guided pruning
(``prune_top_k=N/4``) with stopped rows removed from the batch versus kept as padding (the same candidates; the time
and the forwards saved). Ratios are measured in one run. The plot of accuracy against generated tokens goes to
``--plot`` (default ``docs/search_accuracy_vs_tokens.png``, ``docs/search_long_accuracy_vs_tokens.png`` for the
long task, ``docs/search_verify_accuracy_vs_tokens.png`` for the verify task).

    OMP_NUM_THREADS=1 python benchmarks/bench_search.py --task long [--checkpoint out/checkpoint] [--problems 200]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

from metastone_hf.demo import task
from metastone_hf.demo.pipeline import DemoConfig, trained_demo_model
from metastone_hf.metrics import bootstrap_ci, vote_accuracy

STRATEGIES = {
    "best_of_n": lambda n, m: {"search": "best_of_n"},
    "beam": lambda n, m: {"search": "beam", "beam_width": min(m, n)},
    "dvts": lambda n, m: {"search": "dvts", "beam_width": min(m, n)},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=None, help="a `metastone demo` checkpoint folder (default: train one)")
    parser.add_argument("--save-checkpoint", default=None, help="where to keep the trained checkpoint")
    parser.add_argument(
        "--task", choices=sorted(task.TASKS), default="short", help="the demo task (see metastone demo)"
    )
    parser.add_argument("--hops", type=int, default=None, help="steps per trajectory (default: the task's own)")
    parser.add_argument("--problems", type=int, default=200, help="held-out problems")
    parser.add_argument("--budgets", type=int, nargs="+", default=[4, 8, 16, 32], help="N values")
    parser.add_argument(
        "--beam-width",
        type=int,
        default=4,
        metavar="M",
        help="children per kept beam for beam search and DVTS (search-and-learn's meaning and default)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-pruning", action="store_true", help="skip the pruning comparison")
    parser.add_argument("--plot", default=None, help="the accuracy-vs-tokens plot (default: by task, in docs/)")
    parser.add_argument("--json", default=None, help="write the measurements here")
    return parser.parse_args()


def trained_model(args: argparse.Namespace):
    from metastone_hf.hub import save_checkpoint

    start = time.perf_counter()
    model, tokenizer = trained_demo_model(args.checkpoint, args.seed, args.task, args.hops)
    if args.checkpoint is None:
        print(f"trained the demo model in {time.perf_counter() - start:.0f}s")
        if args.save_checkpoint:
            save_checkpoint(model, args.save_checkpoint, tokenizer, overwrite=True)
    return model, tokenizer


def run(model, tokenizer, problems, n: int, seed: int, batch_size: int, max_new_tokens: int, **options) -> dict:
    """Answer every problem with one strategy: per-problem correctness of the chosen candidate (and, for Best-of-N, of
    majority vote over the same candidates) and the costs."""
    correct, voted, generated, processed, saved = [], [], 0, 0, 0
    candidates_equal: list[torch.Tensor] = []
    calls = [0]
    handle = model.model.embed_tokens.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    start = time.perf_counter()
    try:
        for first in range(0, len(problems), batch_size):
            batch = problems[first : first + batch_size]
            inputs = tokenizer([p.prompt for p in batch], return_tensors="pt", padding=True)
            out = model.generate(
                inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                num_candidates=n,
                seed=seed + first,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                progress_bar=False,
                **options,
            )
            width = inputs["input_ids"].shape[1]
            texts = tokenizer.batch_decode(out.sequences[:, width:], skip_special_tokens=True)
            correct += [task.reward(text, p.answer) > 0.5 for text, p in zip(texts, batch)]
            if options.get("search") == "best_of_n":
                for b, p in enumerate(batch):
                    candidates = tokenizer.batch_decode(out.candidates[b, :, width:], skip_special_tokens=True)
                    right = [[task.reward(text, p.answer) > 0.5 for text in candidates]]
                    answers = [[task.extract_answer(text) for text in candidates]]
                    voted += vote_accuracy(np.array(right, dtype=float), answers, n).tolist()
            generated += out.tokens_generated
            processed += out.tokens_processed
            saved += out.tokens_saved
            candidates_equal.append(out.candidates.flatten(0, 1))
    finally:
        handle.remove()
    seconds = time.perf_counter() - start
    result = {
        **accuracy(correct),
        "tokens_generated": generated,
        "tokens_processed": processed,
        "tokens_saved": saved,
        "forwards": calls[0],
        "seconds": seconds,
        "candidates": candidates_equal,
    }
    if voted:
        result["majority"] = accuracy(voted)
    return result


def accuracy(per_problem: list) -> dict:
    """Mean per-problem correctness with its 95% percentile-bootstrap interval over problems."""
    values = np.asarray(per_problem, dtype=float)
    low, high = bootstrap_ci(values, 0.95)
    return {"accuracy": float(values.mean()), "ci_low": low, "ci_high": high}


def cell(row: dict) -> str:
    return f"{100 * row['accuracy']:5.1f} [{100 * row['ci_low']:5.1f}, {100 * row['ci_high']:5.1f}]"


def plot(results: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    styles = {
        "best_of_n": ("Best-of-N (SPRM)", "o", "-"),
        "majority": ("majority vote (same samples)", "v", "-"),
        "beam": ("beam search", "s", "--"),
        "dvts": ("DVTS", "^", ":"),
        "pruned": ("Best-of-N + pruning (top N/4)", "D", "-."),
    }
    for name, rows in results.items():
        if not rows:
            continue
        xs = [r["tokens_generated"] / r["problems"] for r in rows]
        ys = [100 * r["accuracy"] for r in rows]
        label, marker, line = styles[name]
        (drawn,) = ax.plot(xs, ys, marker=marker, linestyle=line, label=label, alpha=0.85)
        if all("ci_low" in r for r in rows):
            low, high = [100 * r["ci_low"] for r in rows], [100 * r["ci_high"] for r in rows]
            ax.fill_between(xs, low, high, alpha=0.1, color=drawn.get_color())
        if name == "best_of_n":
            for x, y, r in zip(xs, ys, rows):
                ax.annotate(f"N={r['n']}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens generated per problem (all branches)")
    ax.set_ylabel("accuracy of the chosen answer (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    config = DemoConfig.for_task(args.task, args.hops, seed=args.seed)
    plot_path = args.plot or (
        "docs/search_accuracy_vs_tokens.png"
        if args.task == "short"
        else f"docs/search_{args.task}_accuracy_vs_tokens.png"
    )
    model, tokenizer = trained_model(args)
    problems = config.demo_task.make_split("test", args.problems, seed=args.seed + 101)
    max_new = config.max_completion_length
    print(
        f"task {args.task}: {config.demo_task.description}; {len(problems)} held-out problems, batch "
        f"{args.batch_size} prompts, max {max_new} new tokens, T=1.0, M={args.beam_width} children per kept beam; "
        f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, torch threads {torch.get_num_threads()}, seed {args.seed}"
    )
    header = (
        f"{'strategy':<12}{'N':>4}{'accuracy % [95% CI]':>24}{'gen tok/problem':>17}{'proc tok/problem':>18}"
        f"{'wall s':>9}"
    )
    print(header)
    print("-" * len(header))
    results: dict[str, list[dict]] = {name: [] for name in (*STRATEGIES, "majority")}
    for n in args.budgets:
        for name, options in STRATEGIES.items():
            result = run(
                model, tokenizer, problems, n, args.seed, args.batch_size, max_new, **options(n, args.beam_width)
            )
            result.update(n=n, problems=len(problems))
            result.pop("candidates")
            majority = result.pop("majority", None)
            rows = [(name, result)]
            if majority is not None:  # majority vote over the Best-of-N candidates: the same tokens and time
                same_cost = {k: result[k] for k in ("tokens_generated", "tokens_processed", "seconds", "n", "problems")}
                results["majority"].append({**majority, **same_cost})
                rows.append(("majority", results["majority"][-1]))
            results[name].append(result)
            for label, row in rows:
                print(
                    f"{label:<12}{n:>4}{cell(row):>24}{row['tokens_generated'] / len(problems):>17.1f}"
                    f"{row['tokens_processed'] / len(problems):>18.1f}{row['seconds']:>9.2f}"
                )
    print("-" * len(header))
    for n_index, n in enumerate(args.budgets):
        base = results["best_of_n"][n_index]
        for name in ("beam", "dvts", "majority"):
            row = results[name][n_index]
            apart = row["ci_low"] > base["ci_high"] or row["ci_high"] < base["ci_low"]
            print(
                f"N={n}: {name} vs Best-of-N: accuracy {100 * (row['accuracy'] - base['accuracy']):+.1f} points "
                f"(95% intervals {'apart' if apart else 'overlap'}), "
                f"generated tokens x{row['tokens_generated'] / base['tokens_generated']:.2f}, "
                f"wall time x{row['seconds'] / base['seconds']:.2f}"
            )

    results["pruned"] = []
    if not args.no_pruning:
        print("\npruning (Best-of-N, prune_top_k=N/4, prune_min_steps=1): stopped rows removed vs kept as padding")
    for n in [] if args.no_pruning else args.budgets:
        options = {"prune_top_k": max(1, n // 4), "prune_min_steps": 1}
        common = (model, tokenizer, problems, n, args.seed, args.batch_size, max_new)
        removed = run(*common, remove_stopped_rows=True, **options)
        kept = run(*common, remove_stopped_rows=False, **options)
        same = all(torch.equal(a, b) for a, b in zip(removed.pop("candidates"), kept.pop("candidates")))
        results["pruned"].append({**removed, "n": n, "problems": len(problems)})
        print(
            f"N={n}: same candidates {same}; accuracy {cell(removed)}; tokens saved "
            f"{removed['tokens_saved'] / len(problems):.1f}/problem; backbone tokens processed "
            f"{removed['tokens_processed']:,} vs {kept['tokens_processed']:,} "
            f"(x{removed['tokens_processed'] / kept['tokens_processed']:.2f}); wall {removed['seconds']:.2f}s vs "
            f"{kept['seconds']:.2f}s (x{removed['seconds'] / kept['seconds']:.2f})"
        )
    title = (
        f"metastone demo --task {args.task} ({config.demo_task.hops} steps): SPRM-guided search\n"
        f"{len(problems)} held-out problems, seed {args.seed}, M = {args.beam_width}; shaded: 95% bootstrap intervals"
    )
    plot(results, plot_path, title)
    print(f"\nplot: {plot_path}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
