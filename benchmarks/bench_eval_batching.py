"""Evaluation throughput: several questions per ``generate`` call vs one, on a small model, CPU.

The same questions are evaluated by the eval runner (``metastone_hf.eval_runner.question_records``: Best-of-N with
online scoring under the paper's sampling protocol, a short token budget) with ``--batch-size`` 1 and 4, in
interleaved repeats of one process. Each question samples from its own seed, so both produce the same records
(checked); the script prints generated tokens per second for each and their ratio.

    OMP_NUM_THREADS=1 python benchmarks/bench_eval_batching.py [--questions 8 --samples 8 --new-tokens 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from metastone_hf.eval_runner import EvalPlan, question_records
from metastone_hf.evaluation import EVAL_PROTOCOLS, EvalExample, build_prompt_builder, resolve_protocol
from metastone_hf.tiny import tiny_metastone_for_tokenizer, tiny_tokenizer

QUESTIONS = [
    "how many apples are left if you have five and eat two",
    "what is the total cost of three books at four dollars each",
    "how many days are in two weeks",
    "what is half of twelve",
    "how many minutes are in one hour and a half",
    "what is the sum of seven and eight",
    "how many feet are in three yards",
    "what is ten minus four",
    "how many cents are in two dollars",
    "what is the product of six and seven",
    "how many eggs are in two dozen",
    "what is twenty divided by five",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8, help="M candidates per question")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = tiny_tokenizer()
    model = tiny_metastone_for_tokenizer(
        tokenizer, hidden_size=args.hidden, num_hidden_layers=args.layers, text_overrides={"intermediate_size": 352}
    ).eval()
    examples = [EvalExample(q, "2", str(i)) for i, q in enumerate((QUESTIONS * 4)[: args.questions])]
    protocol, _ = resolve_protocol(EVAL_PROTOCOLS["paper"], max_new_tokens=args.new_tokens)
    plan = EvalPlan(protocol, args.samples, {str(args.samples): args.samples})
    build = build_prompt_builder(tokenizer, model)

    def run(batch_size: int) -> tuple[float, int, list]:
        start = time.perf_counter()
        records = list(
            question_records(
                model, tokenizer, examples, range(len(examples)), plan, prompt_builder=build,
                batch_size=batch_size, progress_bar=False,
            )
        )  # fmt: skip
        seconds = time.perf_counter() - start
        tokens = sum(r["results"]["best_of_n"]["tokens_generated"] for r in records)
        return seconds, tokens, [r["results"] for r in records]

    run(args.batch_sizes[-1])  # warm-up
    times: dict[int, list[float]] = {b: [] for b in args.batch_sizes}
    tokens: dict[int, int] = {}
    results: dict[int, list] = {}
    for _ in range(args.repeats):
        for batch_size in args.batch_sizes:
            seconds, count, records = run(batch_size)
            times[batch_size].append(seconds)
            tokens[batch_size], results[batch_size] = count, records
    same = all(results[b] == results[args.batch_sizes[0]] for b in args.batch_sizes)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {args.layers} layers, d={args.hidden} ({params / 1e6:.2f}M params), fp32 CPU, threads="
        f"{torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}); {len(examples)} "
        f"questions x M={args.samples}, paper protocol with max_new_tokens={args.new_tokens}, repeats={args.repeats} "
        "(median)"
    )
    print(f"{'batch size':>10} {'rows/call':>9} {'seconds':>9} {'tokens':>8} {'tokens/s':>10}")
    rates = {}
    for batch_size in args.batch_sizes:
        median = statistics.median(times[batch_size])
        rates[batch_size] = tokens[batch_size] / median
        print(
            f"{batch_size:>10} {batch_size * args.samples:>9} {median:>9.2f} {tokens[batch_size]:>8} "
            f"{rates[batch_size]:>10.0f}"
        )
    first, last = args.batch_sizes[0], args.batch_sizes[-1]
    print(f"records identical across batch sizes: {same}")
    print(f"ratio: tokens/s at batch size {last} / at {first} = {rates[last] / rates[first]:.2f}x")


if __name__ == "__main__":
    main()
