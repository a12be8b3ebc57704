"""Decode steps, occupancy, host syncs and tokens/s of Best-of-N, beam search and DVTS, on CPU, hardware-free counts.

On a GPU a decode step of a 1.5B-32B model is memory-bound: it costs about the same for 4 rows as for 32, so wall
time follows the number of **decode steps** (backbone forwards over one new token per row) and the host-device
syncs, not the number of rows. This script counts both on a tiny model, independently of the hardware:

* **decode steps**: a forward hook on the backbone (``model.model``) counts the forwards that feed one token per
  row, and the rows each one holds; **occupancy** = rows per decode step / capacity (the rows the batch was sized
  for: questions per call x rows per question);
* **ideal** (Best-of-N): generated tokens / capacity + one length cap for the final drain;
* **syncs per decode step**: a ``TorchDispatchMode`` counts the ops that stall the host on CUDA
  (``aten._local_scalar_dense``: ``item``/``bool``/``int`` of a tensor; ``nonzero``; ``unique``; ``masked_select``;
  indexing or ``index_put`` with a boolean mask; ``repeat_interleave`` with tensor repeats) plus ``Tensor.tolist``
  calls, over whole ``generate`` calls, divided by their decode steps;
* **tokens/s** on this CPU, where a forward costs per row (so wall time follows the decode steps only partly).

The workload has varying lengths: EOS is sampled (a sequence bias makes candidates stop anywhere from a few tokens
to the cap), a step token comes every ~75 tokens (a real trace's paragraph rate), under the paper's protocol
(temperature 0.6, top_p 0.95, repetition_penalty 1.05). Two parts:

1. ``metastone eval``'s runner (``question_records``) at ``--batch-size`` 1 and B, for every strategy; the records
   at batch size B must equal those at 1 (checked);
2. one ``generate`` call with several prompts (and one with a single prompt), with the sync count.

    OMP_NUM_THREADS=1 python benchmarks/bench_eval_batching.py [--questions 16 --samples 8 --new-tokens 192]
"""

from __future__ import annotations

import argparse
import math
import os
import time
from contextlib import contextmanager

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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
SEARCHES = ("best_of_n", "beam", "dvts")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8, help="N candidates per question")
    parser.add_argument("--beam-width", type=int, default=4, help="M of beam search / DVTS")
    parser.add_argument("--new-tokens", type=int, default=192, help="the length cap")
    parser.add_argument("--step-every", type=float, default=75.0, help="mean tokens between step tokens")
    parser.add_argument("--eos-every", type=float, default=200.0, help="mean tokens before EOS (before the cap)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4, help="questions per batch in the eval part")
    parser.add_argument("--prompts", type=int, default=4, help="prompts of the one-call part")
    parser.add_argument("--searches", nargs="+", default=list(SEARCHES), choices=SEARCHES)
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


class DecodeCounter:
    """Counts backbone forwards with one new token per row (decode steps) and the rows they hold."""

    def __init__(self, model):
        self.steps = self.rows = self.prefills = 0
        self.handle = model.model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs["inputs_embeds"]
        if ids.shape[1] == 1:
            self.steps += 1
            self.rows += ids.shape[0]
        else:
            self.prefills += 1

    def reset(self) -> None:
        self.steps = self.rows = self.prefills = 0

    def close(self) -> None:
        self.handle.remove()


_SYNC_OPS = {
    "aten._local_scalar_dense.default",
    "aten.nonzero.default",
    "aten.nonzero_static.default",
    "aten._unique2.default",
    "aten.unique_dim.default",
    "aten.unique_consecutive.default",
    "aten.masked_select.default",
}


class SyncCounter(TorchDispatchMode):
    """Ops that make the host wait for the device on CUDA (counted on CPU, where they are free)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if name in _SYNC_OPS:
            self.count += 1
        elif name.startswith(("aten.index.Tensor", "aten.index_put")):
            indices = args[1] if len(args) > 1 else ()
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ()):
                self.count += 1
        elif (
            name.startswith("aten.repeat_interleave")
            and isinstance(args[0], torch.Tensor)
            and "output_size" not in kwargs
        ):
            self.count += 1
        return func(*args, **kwargs)


@contextmanager
def counting_syncs():
    counter = SyncCounter()
    tolist = torch.Tensor.tolist

    def counted_tolist(self):
        counter.count += 1
        return tolist(self)

    torch.Tensor.tolist = counted_tolist
    try:
        with counter:
            yield counter
    finally:
        torch.Tensor.tolist = tolist


def workload_kwargs(tokenizer, model, args) -> dict:
    """A sequence bias for the step token and EOS that gives the asked mean gaps at temperature 0.6."""
    vocab = len(tokenizer)
    temperature = 0.6
    step = int(model.config.step_token_ids[0])
    eos = tokenizer.eos_token_id
    # A tiny random model's logits are near flat: p(token) ~ exp(bias / T) / V.
    bias = {
        (step,): temperature * math.log(vocab / args.step_every),
        (eos,): temperature * math.log(vocab / args.eos_every),
    }
    return {"sequence_bias": bias}


def build(args):
    tokenizer = tiny_tokenizer()
    model = tiny_metastone_for_tokenizer(
        tokenizer, hidden_size=args.hidden, num_hidden_layers=args.layers, text_overrides={"intermediate_size": 352}
    ).eval()
    return tokenizer, model


def eval_part(args, tokenizer, model, extra, counter) -> None:
    examples = [EvalExample(q, "2", str(i)) for i, q in enumerate((QUESTIONS * 8)[: args.questions])]
    protocol, _ = resolve_protocol(EVAL_PROTOCOLS["paper"], max_new_tokens=args.new_tokens)
    prompt_builder = build_prompt_builder(tokenizer, model)
    print(
        f"\n## metastone eval's runner: {len(examples)} questions x N={args.samples} (M={args.beam_width}), cap "
        f"{args.new_tokens} tokens, step every ~{args.step_every:.0f}, EOS every ~{args.eos_every:.0f}"
    )
    print(
        f"{'search':>10} {'batch':>5} {'capacity':>8} {'decode steps':>12} {'ideal':>7} {'x ideal':>7} "
        f"{'rows/step':>9} {'occupancy':>9} {'tokens':>7} {'steps/ktok':>10} {'seconds':>8} {'tok/s':>7} {'same':>5}"
    )
    per_token: dict[str, float] = {}
    for search in args.searches:
        plan = EvalPlan(
            protocol, args.samples, {str(args.samples): args.samples}, (search,),
            beam_width=None if search == "best_of_n" else args.beam_width,
        )  # fmt: skip
        reference = None
        for batch_size in (1, args.batch_size):
            counter.reset()
            start = time.perf_counter()
            records = list(
                question_records(
                    model, tokenizer, examples, range(len(examples)), plan, prompt_builder=prompt_builder,
                    batch_size=batch_size, progress_bar=False, generate_kwargs=extra,
                )
            )  # fmt: skip
            seconds = time.perf_counter() - start
            results = [{k: {f: v for f, v in r.items() if f != "seconds"} for k, r in rec["results"].items()}
                       for rec in records]  # fmt: skip
            same = "ref" if reference is None else str(_same(reference, results))
            reference = reference or results
            tokens = sum(r["tokens_generated"] for rec in records for r in rec["results"].values())
            capacity = batch_size * args.samples
            ideal = tokens / capacity + args.new_tokens
            rows_per_step = counter.rows / max(counter.steps, 1)
            per_token[f"{search}@{batch_size}"] = counter.steps / tokens
            print(
                f"{search:>10} {batch_size:>5} {capacity:>8} {counter.steps:>12} {ideal:>7.0f} "
                f"{counter.steps / ideal:>7.2f} {rows_per_step:>9.1f} {rows_per_step / capacity:>9.2f} {tokens:>7} "
                f"{1000 * counter.steps / tokens:>10.1f} {seconds:>8.1f} {tokens / seconds:>7.0f} {same:>5}"
            )
    for search in args.searches:
        if search != "best_of_n" and "best_of_n" in args.searches:
            ratio = per_token[f"{search}@{args.batch_size}"] / per_token[f"best_of_n@{args.batch_size}"]
            print(
                f"{search}: decode steps per generated token / Best-of-N's at batch size {args.batch_size}: {ratio:.2f}x"
            )


def _same(a, b) -> bool:
    for ra, rb in zip(a, b, strict=True):
        for key in ra:
            x, y = ra[key], rb[key]
            if x["completions"] != y["completions"] or x["tokens"] != y["tokens"] or x["chosen"] != y["chosen"]:
                return False
            if any(abs(p - q) > 1e-4 for p, q in zip(x["scores"], y["scores"], strict=True)):
                return False
    return True


def generate_part(args, tokenizer, model, extra, counter) -> None:
    protocol = EVAL_PROTOCOLS["paper"]
    prompt_builder = build_prompt_builder(tokenizer, model)
    print(f"\n## one generate call: N={args.samples}, M={args.beam_width}, cap {args.new_tokens}, paper protocol")
    print(
        f"{'search':>10} {'prompts':>7} {'capacity':>8} {'decode steps':>12} {'rows/step':>9} {'occupancy':>9} "
        f"{'tokens':>7} {'steps/ktok':>10} {'syncs/step':>10} {'seconds':>8} {'tok/s':>7}"
    )
    for prompts in (1, args.prompts):
        texts = [prompt_builder(q) for q in QUESTIONS[:prompts]]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        for search in args.searches:
            options = {"search": search, "num_candidates": args.samples}
            if search != "best_of_n":
                options["beam_width"] = args.beam_width
            kwargs = dict(
                **inputs, do_sample=True, temperature=protocol.temperature, top_p=protocol.top_p, top_k=0,
                repetition_penalty=protocol.repetition_penalty, max_new_tokens=args.new_tokens,
                pad_token_id=tokenizer.pad_token_id, seed=list(range(11, 11 + prompts)), **options, **extra,
            )  # fmt: skip
            counter.reset()
            start = time.perf_counter()
            out = model.generate(**kwargs)
            seconds = time.perf_counter() - start
            steps, rows = counter.steps, counter.rows
            tokens = int(out.tokens_generated)
            counter.reset()
            with counting_syncs() as syncs:
                again = model.generate(**kwargs)
            assert torch.equal(again.candidates, out.candidates)
            capacity = prompts * args.samples
            print(
                f"{search:>10} {prompts:>7} {capacity:>8} {steps:>12} {rows / steps:>9.1f} "
                f"{rows / steps / capacity:>9.2f} {tokens:>7} {1000 * steps / tokens:>10.1f} "
                f"{syncs.count / counter.steps:>10.1f} {seconds:>8.2f} {tokens / seconds:>7.0f}"
            )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    tokenizer, model = build(args)
    extra = workload_kwargs(tokenizer, model, args)
    counter = DecodeCounter(model)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {args.layers} layers, d={args.hidden} ({params / 1e6:.2f}M params), fp32 CPU, threads="
        f"{torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})"
    )
    if not args.skip_generate:
        generate_part(args, tokenizer, model, extra, counter)
    if not args.skip_eval:
        eval_part(args, tokenizer, model, extra, counter)
    counter.close()


if __name__ == "__main__":
    main()
