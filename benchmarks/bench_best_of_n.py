"""Best-of-N with online SPRM scoring vs plain sampling vs the official re-scoring, on CPU.

Variants, all sampling the same N candidates per prompt for the same seed:

* (a) plain sampling: ``generate(do_sample=True, num_return_sequences=N)`` (no scores; N prefills);
* (b) ours: ``generate(num_candidates=N)``: one prefill, cache expanded N times, step scores read online from
  the forward pass that sampled each step token;
* (c) the official way: (a), then one full forward per candidate with ``output_hidden_states=True`` (batch 1,
  like the official scoring server), ``hidden_states[-2]`` at the step positions through the head.

Timings are medians over ``--repeats`` interleaved runs of one process. Memory is the exact size of the tensors
each method holds *for scoring* (summed ``nbytes``; CPU RSS is too coarse for kilobytes):
(b) the sparse step records at the end of decoding (``SearchOutput.scoring_state_bytes``, the only state that grows)
plus the one-off ``[N, T]`` logit/flag tensors used to apply the step mask at the end; (c) the ``hidden_states``
tuple of one batch-1 re-scoring forward; (d) for reference, ``generate(output_hidden_states=True)`` (every layer
of every step, the naive online alternative), measured on the short case.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/bench_best_of_n.py [--new-tokens 128 --candidates 8 ...]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from metastone_hf import scoring_metastone, search_tree_metastone
from metastone_hf.tiny import tiny_metastone

STEP, THINK = 5, 6


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=704)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--candidates", type=int, default=8, help="N")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--short-prompt", type=int, default=32)
    parser.add_argument("--long-prompt", type=int, default=1024)
    parser.add_argument("--step-bias", type=float, default=6.0, help="logit bias on the step token (steps appear)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return {
        "max_new_tokens": args.new_tokens,
        "min_new_tokens": args.new_tokens,
        "pad_token_id": 0,
        "sequence_bias": {(STEP,): args.step_bias},
    }


def plain(model, ids, args):
    torch.manual_seed(args.seed)
    return model.generate(ids, do_sample=True, num_return_sequences=args.candidates, **sampling_kwargs(args))


def ours(model, ids, args):
    return model.generate(
        ids, num_candidates=args.candidates, seed=args.seed, progress_bar=False, **sampling_kwargs(args)
    )


@torch.no_grad()
def official(model, ids, args):
    """Sample, then re-run each candidate alone keeping all hidden states (the official scoring server)."""
    candidates = plain(model, ids, args)
    scores, peak_bytes = [], 0
    for row in candidates:
        outputs = model.model(row[None], output_hidden_states=True)
        peak_bytes = max(peak_bytes, sum(h.nbytes for h in outputs.hidden_states))
        positions = model.sprm_score_mask(row[None])[0].nonzero().flatten()
        logits = model.sprm_head(outputs.hidden_states[-2][0, positions]).float()
        scores.append(torch.nn.functional.logsigmoid(logits).mean().exp() if positions.numel() else torch.tensor(0.0))
        del outputs
    return candidates, torch.stack(scores), peak_bytes


def scorer_share(model, args) -> tuple[float, float]:
    """(seconds in the step bookkeeping, total seconds) for one short (b) run.

    The SPRM head itself runs inside the sampling forward; the bookkeeping is what online scoring adds per decoded
    token: the incremental step rule and the per-row stop/step checks (``StepSearch._settle``).
    """
    spent = [0.0]
    patched = [(search_tree_metastone.StepSearch, "_settle"), (scoring_metastone.IncrementalStepRule, "update")]
    originals = [(owner, name, getattr(owner, name)) for owner, name in patched]

    def timing(original):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                spent[0] += time.perf_counter() - start

        return wrapper

    for owner, name, original in originals:
        setattr(owner, name, timing(original))
    try:
        ids = torch.tensor([[1, THINK, *range(8, 8 + args.short_prompt - 2)]])
        total, _ = timed(ours, model, ids, args)
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
    return spent[0], total


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def run_case(model, prompt_length: int, args, with_official: bool) -> dict:
    generator = torch.Generator().manual_seed(args.seed + prompt_length)
    body = torch.randint(8, args.vocab, (prompt_length - 2,), generator=generator)
    ids = torch.cat([torch.tensor([1, THINK]), body])[None]
    times = {"a": [], "b": [], "c": []}
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits every variant alike
        t, cand_a = timed(plain, model, ids, args)
        times["a"].append(t)
        t, out_b = timed(ours, model, ids, args)
        times["b"].append(t)
        if with_official:
            t, (_, scores_c, peak_c) = timed(official, model, ids, args)
            times["c"].append(t)
    result = {name: statistics.median(values) for name, values in times.items() if values}
    assert torch.equal(out_b.candidates[0], cand_a), "prefill-once sampling differs from num_return_sequences"
    result["steps"] = out_b.num_steps.float().mean().item()
    rows, total = out_b.candidates.shape[1:]
    result["mem_b"] = out_b.scoring_state_bytes
    result["mem_b_final"] = rows * total * (4 + 1)  # dense float logits + recorded flags, once, at the end
    if with_official:
        result["mem_c"] = peak_c
        result["score_diff"] = (out_b.scores[0] - scores_c).abs().max().item()
    return result


def kib(n: float) -> str:
    return f"{n / 1024:,.1f} KiB"


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    text = {
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "vocab_size": args.vocab,
    }
    model = tiny_metastone(seed=args.seed, text_overrides=text)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"model: {args.layers} layers, d={args.hidden}, vocab={args.vocab} ({params:.1f}M params), fp32 CPU, "
        f"threads={torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}), "
        f"N={args.candidates}, new tokens={args.new_tokens}, repeats={args.repeats} (median)"
    )
    ours(model, torch.tensor([[1, THINK, 9, 10]]), argparse.Namespace(**{**vars(args), "new_tokens": 4}))  # warm-up

    short = run_case(model, args.short_prompt, args, with_official=True)
    long = run_case(model, args.long_prompt, args, with_official=False)

    # (d) the naive online alternative: every layer of every decoding step kept by generate
    ids = torch.tensor([[1, THINK, *range(8, 8 + args.short_prompt - 2)]])
    torch.manual_seed(args.seed)
    with_states = model.generate(
        ids,
        do_sample=True,
        num_return_sequences=args.candidates,
        output_hidden_states=True,
        return_dict_in_generate=True,
        **sampling_kwargs(args),
    )
    mem_d = sum(h.nbytes for step in with_states.hidden_states for h in step)
    del with_states

    bookkeeping, total = scorer_share(model, args)

    rule = "-" * 96
    print(rule)
    print(f"{'case':<34}{'(a) plain':>12}{'(b) ours':>12}{'(c) official':>14}{'b/a':>8}{'c/b':>8}{'steps/cand':>11}")
    print(rule)
    print(
        f"{f'short prompt P={args.short_prompt}':<34}{short['a']:>11.3f}s{short['b']:>11.3f}s{short['c']:>13.3f}s"
        f"{short['b'] / short['a']:>8.3f}{short['c'] / short['b']:>8.2f}{short['steps']:>11.1f}"
    )
    print(
        f"{f'long prompt P={args.long_prompt} (prefill once)':<34}{long['a']:>11.3f}s{long['b']:>11.3f}s{'-':>14}"
        f"{long['b'] / long['a']:>8.3f}{'-':>8}{long['steps']:>11.1f}"
    )
    print(rule)
    print(f"online scores vs official re-scoring (short case): max |diff| = {short['score_diff']:.2e}")
    print(
        f"online-scoring bookkeeping (step rule + per-row checks), short case: {bookkeeping * 1e3:.1f} ms of "
        f"{total:.3f} s = {100 * bookkeeping / total:.2f}% (b/a also includes the prefill-once saving)"
    )
    print(f"prefill-once speed-up at P={args.long_prompt}: a/b = {long['a'] / long['b']:.2f}x (same samples)")
    print("extra memory for scoring (exact tensor bytes, short case):")
    print(f"  (b) ours, held while decoding (sparse step records): {kib(short['mem_b'])}")
    print(f"  (b) ours, one-off at the end (step-mask assembly [N, T]): {kib(short['mem_b_final'])}")
    print(f"  (c) official, hidden_states of one batch-1 re-scoring forward: {kib(short['mem_c'])}")
    print(f"  (d) generate(output_hidden_states=True), all layers x all steps: {kib(mem_d)}")
    print(f"  long case: (b) records {kib(long['mem_b'])}")
    print(
        f"ratios: b/a={short['b'] / short['a']:.3f} (target <= 1.05)  c/b={short['c'] / short['b']:.2f}  "
        f"long a/b={long['a'] / long['b']:.2f}  memory c/b={short['mem_c'] / max(short['mem_b'], 1):.0f}x  "
        f"d/b={mem_d / max(short['mem_b'], 1):.0f}x"
    )


if __name__ == "__main__":
    main()
