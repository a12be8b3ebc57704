"""Step-level search vs Best-of-N on the demo task: accuracy against generated tokens, wall time, pruning savings.

The demo model (``metastone demo``: a tiny Qwen2-style MetaStone policy with its SPRM head, SFT then joint GRPO +
SPR training on the synthetic stale-fact task) is trained once (or read with ``--checkpoint``), then every strategy
answers the same held-out problems with the same N:

* Best-of-N: N samples, each to its end; the best-scored one is the answer;
* beam search over steps: at every step the N/4 best beams (running geometric-mean score) continue, 4 children
  each;
* DVTS: N/4 independent subtrees, each expanded 4 ways at every step and continued with its best child.

For each, it prints accuracy of the chosen answer, tokens generated (all branches) and processed, and wall time;
then Best-of-N with SPRM-guided pruning (``prune_top_k=N/4``) with stopped rows removed from the batch versus kept
as padding (the same candidates; the time and the forwards saved). Ratios are measured in one run. The plot of
accuracy against generated tokens goes to ``--plot``.

    OMP_NUM_THREADS=2 python benchmarks/bench_search.py [--checkpoint out/checkpoint] [--problems 200]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from metastone_hf.demo import task
from metastone_hf.demo.pipeline import trained_demo_model

STRATEGIES = {
    "best_of_n": lambda n: {"search": "best_of_n"},
    "beam": lambda n: {"search": "beam", "beam_width": max(1, n // 4)},
    "dvts": lambda n: {"search": "dvts", "beam_width": min(4, n)},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=None, help="a `metastone demo` checkpoint folder (default: train one)")
    parser.add_argument("--save-checkpoint", default=None, help="where to keep the trained checkpoint")
    parser.add_argument("--problems", type=int, default=200, help="held-out problems")
    parser.add_argument("--budgets", type=int, nargs="+", default=[4, 16, 64], help="N values")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="docs/search_accuracy_vs_tokens.png")
    parser.add_argument("--json", default=None, help="write the measurements here")
    return parser.parse_args()


def trained_model(args: argparse.Namespace):
    from metastone_hf.hub import save_checkpoint

    start = time.perf_counter()
    model, tokenizer = trained_demo_model(args.checkpoint, args.seed)
    if args.checkpoint is None:
        print(f"trained the demo model in {time.perf_counter() - start:.0f}s")
        if args.save_checkpoint:
            save_checkpoint(model, args.save_checkpoint, tokenizer, overwrite=True)
    return model, tokenizer


def run(model, tokenizer, problems, n: int, seed: int, batch_size: int, **options) -> dict:
    """Answer every problem with one strategy; accuracy of the chosen candidates and the costs."""
    correct, generated, processed, saved = 0, 0, 0, 0
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
                max_new_tokens=32,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                progress_bar=False,
                **options,
            )
            width = inputs["input_ids"].shape[1]
            texts = tokenizer.batch_decode(out.sequences[:, width:], skip_special_tokens=True)
            correct += sum(task.reward(text, p.answer) > 0.5 for text, p in zip(texts, batch))
            generated += out.tokens_generated
            processed += out.tokens_processed
            saved += out.tokens_saved
            candidates_equal.append(out.candidates.flatten(0, 1))
    finally:
        handle.remove()
    return {
        "accuracy": correct / len(problems),
        "tokens_generated": generated,
        "tokens_processed": processed,
        "tokens_saved": saved,
        "forwards": calls[0],
        "seconds": time.perf_counter() - start,
        "candidates": candidates_equal,
    }


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    styles = {
        "best_of_n": ("Best-of-N", "o", "-"),
        "beam": ("beam search", "s", "--"),
        "dvts": ("DVTS", "^", ":"),
        "pruned": ("Best-of-N + pruning (top N/4)", "D", "-."),
    }
    for name, rows in results.items():
        xs = [r["tokens_generated"] / r["problems"] for r in rows]
        ys = [100 * r["accuracy"] for r in rows]
        label, marker, line = styles[name]
        ax.plot(xs, ys, marker=marker, linestyle=line, label=label, alpha=0.85)
        for x, y, r in zip(xs, ys, rows):
            ax.annotate(f"N={r['n']}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens generated per problem (all branches)")
    ax.set_ylabel("accuracy of the chosen answer (%)")
    ax.set_title("metastone demo: SPRM-guided search, held-out problems")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    model, tokenizer = trained_model(args)
    problems = task.make_split("test", args.problems, seed=args.seed + 101)
    print(
        f"{len(problems)} held-out problems, batch {args.batch_size} prompts, max 32 new tokens, T=1.0; "
        f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    )
    header = f"{'strategy':<12}{'N':>4}{'accuracy':>10}{'gen tok/problem':>17}{'proc tok/problem':>18}{'wall s':>9}"
    print(header)
    print("-" * len(header))
    results: dict[str, list[dict]] = {name: [] for name in STRATEGIES}
    for n in args.budgets:
        for name, options in STRATEGIES.items():
            result = run(model, tokenizer, problems, n, args.seed, args.batch_size, **options(n))
            result.update(n=n, problems=len(problems))
            result.pop("candidates")
            results[name].append(result)
            print(
                f"{name:<12}{n:>4}{100 * result['accuracy']:>9.1f}%{result['tokens_generated'] / len(problems):>17.1f}"
                f"{result['tokens_processed'] / len(problems):>18.1f}{result['seconds']:>9.2f}"
            )
    print("-" * len(header))
    for n_index, n in enumerate(args.budgets):
        base = results["best_of_n"][n_index]
        for name in ("beam", "dvts"):
            row = results[name][n_index]
            print(
                f"N={n}: {name} vs Best-of-N: accuracy {100 * (row['accuracy'] - base['accuracy']):+.1f} points, "
                f"generated tokens x{row['tokens_generated'] / base['tokens_generated']:.2f}, "
                f"wall time x{row['seconds'] / base['seconds']:.2f}"
            )

    print("\npruning (Best-of-N, prune_top_k=N/4, prune_min_steps=1): stopped rows removed vs kept as padding")
    results["pruned"] = []
    for n in args.budgets:
        options = {"prune_top_k": max(1, n // 4), "prune_min_steps": 1}
        removed = run(model, tokenizer, problems, n, args.seed, args.batch_size, remove_stopped_rows=True, **options)
        kept = run(model, tokenizer, problems, n, args.seed, args.batch_size, remove_stopped_rows=False, **options)
        same = all(torch.equal(a, b) for a, b in zip(removed.pop("candidates"), kept.pop("candidates")))
        results["pruned"].append({**removed, "n": n, "problems": len(problems)})
        print(
            f"N={n}: same candidates {same}; accuracy {100 * removed['accuracy']:.1f}%; tokens saved "
            f"{removed['tokens_saved'] / len(problems):.1f}/problem; backbone tokens processed "
            f"{removed['tokens_processed']:,} vs {kept['tokens_processed']:,} "
            f"(x{removed['tokens_processed'] / kept['tokens_processed']:.2f}); wall {removed['seconds']:.2f}s vs "
            f"{kept['seconds']:.2f}s (x{removed['seconds'] / kept['seconds']:.2f})"
        )
    plot(results, args.plot)
    print(f"\nplot: {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
