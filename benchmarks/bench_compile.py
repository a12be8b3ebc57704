"""Plain decoding with a static cache: ``torch.compile`` (inductor) vs eager, on CPU.

Plain ``generate`` (no Best-of-N) does not run the SPRM head, so the decode step of a MetaStone model compiles as
one full graph (``fullgraph=True``), like the stock Qwen2 model's. This prints, for the same greedy decode:

* eager: ``generate(..., cache_implementation="static", disable_compile=True)``;
* compiled: ``generate(..., cache_implementation="static", compile_config=CompileConfig(fullgraph=True))``, which
  transformers compiles automatically on accelerators; on CPU ``_compile_all_devices`` asks for it;
* the stock ``Qwen2ForCausalLM`` with the same weights, compiled the same way, as the reference speed-up.

The first compiled call includes compilation (reported apart); timings are medians of ``--repeats`` later calls.
Tokens must match exactly between eager and compiled (greedy decoding).

Usage: ``OMP_NUM_THREADS=1 python benchmarks/bench_compile.py [--layers 8 --hidden 256 --new-tokens 128]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from transformers import CompileConfig, Qwen2ForCausalLM

from metastone_hf.tiny import tiny_metastone


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args()


def timed(
    model: torch.nn.Module, ids: torch.Tensor, repeats: int, **settings
) -> tuple[float, list[float], torch.Tensor]:
    start = time.perf_counter()
    first = model.generate(ids, **settings)
    first_time = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = model.generate(ids, **settings)
        times.append(time.perf_counter() - start)
        if not torch.equal(out, first):
            raise SystemExit("decoding is not deterministic across calls")
    return first_time, times, first


def main() -> None:
    args = parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    overrides = {"num_hidden_layers": args.layers, "hidden_size": args.hidden, "intermediate_size": 2 * args.hidden}
    model = tiny_metastone(seed=0, text_overrides=overrides)
    stock = Qwen2ForCausalLM(model.config.text_config).eval()
    stock.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("sprm_head.")})
    ids = torch.randint(8, model.config.text_config.vocab_size, (args.batch, args.prompt))
    settings = {
        "max_new_tokens": args.new_tokens,
        "min_new_tokens": args.new_tokens,
        "do_sample": False,
        "cache_implementation": "static",
        "pad_token_id": 0,
    }
    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True

    print(
        f"{args.layers} layers, d={args.hidden}, batch {args.batch}, prompt {args.prompt}, {args.new_tokens} new "
        f"tokens, greedy, static cache; OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    )
    rows = {}
    for name, net, extra in (
        ("MetaStone eager", model, {"disable_compile": True}),
        ("MetaStone compiled", model, {"compile_config": compile_config}),
        ("Qwen2 eager", stock, {"disable_compile": True}),
        ("Qwen2 compiled", stock, {"compile_config": compile_config}),
    ):
        torch._dynamo.reset()
        first, times, out = timed(net, ids, args.repeats, **settings, **extra)
        rows[name] = (first, statistics.median(times), out)
        print(f"{name:20s} first call {first:7.2f}s   median {statistics.median(times):.3f}s")
    same = torch.equal(rows["MetaStone eager"][2], rows["MetaStone compiled"][2])
    same_stock = torch.equal(rows["MetaStone eager"][2], rows["Qwen2 eager"][2])
    print(f"tokens: compiled == eager {same}; MetaStone == Qwen2 {same_stock}")
    speedup = rows["MetaStone eager"][1] / rows["MetaStone compiled"][1]
    stock_speedup = rows["Qwen2 eager"][1] / rows["Qwen2 compiled"][1]
    print(f"speed-up eager/compiled: MetaStone {speedup:.2f}x, Qwen2 {stock_speedup:.2f}x")
    print(f"MetaStone/Qwen2 compiled time: {rows['MetaStone compiled'][1] / rows['Qwen2 compiled'][1]:.3f}")


if __name__ == "__main__":
    main()
