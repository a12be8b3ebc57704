"""The demo's SPRM head as a process reward model, measured with ProcessBench's metric on synthetic traces.

Held-out demo problems are written as ProcessBench rows (:func:`metastone_hf.demo.task.processbench_trace`): half
with every step right (label -1), half taking the stale edge at the trap node (label = that step) and continuing
correctly from the wrong node. The traces are scored by ``metastone_hf.processbench.evaluate_processbench`` exactly as
``metastone eval --data processbench`` scores the real benchmark: error accuracy, correct accuracy and their
harmonic mean F1, at threshold 0.5 and at the threshold tuned on the even-position half (measured on the odd one).

    OMP_NUM_THREADS=2 python benchmarks/bench_processbench_demo.py [--checkpoint metastone-demo/checkpoint]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from metastone_hf.demo import task
from metastone_hf.demo.pipeline import trained_demo_model
from metastone_hf.processbench import ProcessBenchTrace, evaluate_processbench, format_processbench


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=None, help="a `metastone demo` checkpoint folder (default: train one)")
    parser.add_argument("--problems", type=int, default=400, help="held-out problems (two traces each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the summary here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    model, tokenizer = trained_demo_model(args.checkpoint, args.seed)
    if args.checkpoint is None:
        print(f"trained the demo model in {time.perf_counter() - start:.0f}s (seed {args.seed})")
    problems = task.make_split("test", args.problems, seed=args.seed)
    # Erroneous at positions 1, 2 mod 4: both halves of the tuned threshold (even / odd positions) hold both kinds.
    rows = [task.processbench_trace(p, erroneous=i % 4 in (1, 2)) for i, p in enumerate(problems)]
    traces = [ProcessBenchTrace(r["id"], r["problem"], r["steps"], r["label"]) for r in rows]
    start = time.perf_counter()
    summary = evaluate_processbench(model, tokenizer, {"demo": traces}, lambda problem: problem, progress_bar=False)
    seconds = time.perf_counter() - start
    labels = [t.label for t in traces]
    print(
        f"{len(traces)} synthetic traces ({sum(label != -1 for label in labels)} with a known first wrong step at "
        f"positions {sorted(set(label for label in labels if label != -1))}); threads "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; scored in {seconds:.1f}s"
    )
    print(format_processbench(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
