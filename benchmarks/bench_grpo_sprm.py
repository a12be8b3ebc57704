"""Seconds per optimizer step and peak memory: `SPRMGRPOTrainer` vs plain TRL `GRPOTrainer`.

Same tiny MetaStone model, same data, same seeds. Each trainer runs in its own fresh subprocess (so the peak
memory of one does not hide the other's); with ``--repeats R`` the two alternate R times and the best median
of each is kept (the machine is shared). Peak memory is ``torch.cuda.max_memory_allocated`` on GPU and the
process's peak RSS (``ru_maxrss``) on CPU.

The task makes many scored steps (the policy samples from {A, B, step, EOS}, EOS only after
``--min_new_tokens``), so the head really runs on a third of the completion tokens.

    OMP_NUM_THREADS=1 python benchmarks/bench_grpo_sprm.py            # CPU
    python benchmarks/bench_grpo_sprm.py --hidden_size 256 --num_layers 4 --batch 32   # GPU, bf16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run_one(kind: str, options: argparse.Namespace) -> dict[str, Any]:
    """Train ``options.steps`` optimizer steps with one trainer kind; returns timings and peak memory."""
    import resource

    import torch
    import transformers
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from metastone_hf.tiny import tiny_metastone_for_tokenizer, tiny_tokenizer
    from metastone_hf.training import SPRMGRPOConfig, SPRMGRPOTrainer

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    transformers.logging.set_verbosity_error()
    cuda = torch.cuda.is_available() and not options.cpu
    tok = tiny_tokenizer()
    allowed = set(tok.convert_tokens_to_ids(["A", "B", ".\n\n"])) | {tok.eos_token_id}
    suppress = [i for i in range(len(tok)) if i not in allowed]
    step_id = tok.convert_tokens_to_ids(".\n\n")
    a_id = tok.convert_tokens_to_ids("A")

    def reward(completions: list[Any], completion_ids: list[list[int]], **kwargs: Any) -> list[float]:
        out = []
        for ids in completion_ids:
            before = [ids[i - 1] for i in range(1, len(ids)) if ids[i] == step_id and ids[i - 1] != step_id]
            out.append(float(bool(before) and all(t == a_id for t in before)))
        return out

    model = tiny_metastone_for_tokenizer(
        tok, seed=0, hidden_size=options.hidden_size, num_hidden_layers=options.num_layers
    )
    with torch.no_grad():
        model.lm_head.weight.zero_()
    common = {
        "output_dir": tempfile.mkdtemp(prefix=f"bench-{kind}-"),
        "use_cpu": not cuda,
        "bf16": cuda,
        "per_device_train_batch_size": options.batch,
        "num_generations": options.num_generations,
        "max_completion_length": options.max_completion_length,
        "max_steps": options.steps,
        "learning_rate": 1e-6,
        "logging_steps": 1,
        "report_to": "none",
        "save_strategy": "no",
        "gradient_checkpointing": options.gradient_checkpointing,
        "generation_kwargs": {"suppress_tokens": suppress, "min_new_tokens": options.min_new_tokens},
        "seed": 0,
        "disable_tqdm": True,
    }
    dataset = Dataset.from_dict({"prompt": ["Question: go <think>"] * (options.batch * options.steps)})
    if kind == "sprm":
        trainer: GRPOTrainer = SPRMGRPOTrainer(
            model=model, reward_funcs=reward, args=SPRMGRPOConfig(**common), train_dataset=dataset, processing_class=tok
        )
    else:
        trainer = GRPOTrainer(
            model=model, reward_funcs=reward, args=GRPOConfig(**common), train_dataset=dataset, processing_class=tok
        )

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._start = 0.0

        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            self._start = time.perf_counter()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._start)

    timer = Timer()
    trainer.add_callback(timer)
    rollout_times: list[float] = []
    generate_and_score = trainer._generate_and_score_completions

    def timed_generate_and_score(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        output = generate_and_score(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        rollout_times.append(time.perf_counter() - start)
        return output

    trainer._generate_and_score_completions = timed_generate_and_score
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    timed = timer.times[options.warmup :]
    # One rollout per optimizer step here (steps_per_generation = gradient_accumulation_steps = 1).
    update_only = [t - g for t, g in zip(timer.times, rollout_times)][options.warmup :]
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
        peak_kind = "cuda_max_allocated_MiB"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        peak_kind = "peak_rss_MiB"
    steps_logged = [h.get("sprm/steps") for h in trainer.state.log_history if "sprm/steps" in h]
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {
        "kind": kind,
        "median_s_per_step": statistics.median(timed),
        "mean_s_per_step": statistics.fmean(timed),
        "min_s_per_step": min(timed),
        "median_update_s_per_step": statistics.median(update_only),
        "mean_completion_length": statistics.fmean(lengths),
        "steps_timed": len(timed),
        "peak_memory": peak,
        "peak_kind": peak_kind,
        "device": "cuda" if cuda else "cpu",
        "scored_steps_per_batch": statistics.fmean(steps_logged) if steps_logged else None,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each trainer; best median kept")
    parser.add_argument("--batch", type=int, default=16, help="per-device batch (completions per step)")
    parser.add_argument("--num_generations", type=int, default=8)
    parser.add_argument("--max_completion_length", type=int, default=64)
    parser.add_argument("--min_new_tokens", type=int, default=32)
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--cpu", action="store_true", help="force CPU even when CUDA is available")
    parser.add_argument("--_child", choices=["plain", "sprm"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    options = parse_args(argv)
    if options._child:
        print("RESULT " + json.dumps(run_one(options._child, options)), flush=True)
        return {}
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
    results: dict[str, list[dict[str, Any]]] = {"plain": [], "sprm": []}
    for _ in range(options.repeats):
        for kind in ("plain", "sprm"):
            proc = subprocess.run(
                [sys.executable, os.path.abspath(__file__), *forwarded, "--_child", kind],
                capture_output=True,
                text=True,
                check=False,
            )
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                raise RuntimeError(f"{kind} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            results[kind].append(json.loads(lines[-1][len("RESULT ") :]))
    best = {kind: min(runs, key=lambda r: r["median_s_per_step"]) for kind, runs in results.items()}
    plain, sprm = best["plain"], best["sprm"]
    ratio = sprm["median_s_per_step"] / plain["median_s_per_step"]
    memory_ratio = sprm["peak_memory"] / plain["peak_memory"]
    print(
        f"device={plain['device']} model: d={options.hidden_size}, layers={options.num_layers}; batch={options.batch}, "
        f"G={options.num_generations}, max_completion_length={options.max_completion_length}, steps={options.steps} "
        f"(warmup {options.warmup}), repeats={options.repeats}, gradient_checkpointing={options.gradient_checkpointing}"
    )
    print(f"scored SPRM steps per batch (SPRM run): {sprm['scored_steps_per_batch']:.1f}")
    for kind, label in (("plain", "GRPOTrainer (plain)"), ("sprm", "SPRMGRPOTrainer")):
        runs = ", ".join(f"{r['median_s_per_step']:.4f}" for r in results[kind])
        r = best[kind]
        print(
            f"{label:22s} median s/step {r['median_s_per_step']:.4f} (runs: {runs}; min {r['min_s_per_step']:.4f}); "
            f"without rollout {r['median_update_s_per_step']:.4f}; mean completion length "
            f"{r['mean_completion_length']:.1f}; {r['peak_kind']} {r['peak_memory']:.1f}"
        )
    update_ratio = sprm["median_update_s_per_step"] / plain["median_update_s_per_step"]
    print(f"ratio s/step SPRM / plain = {ratio:.3f}  (target <= 1.10)")
    print(f"ratio s/step without rollout (loss + backward + optimizer) SPRM / plain = {update_ratio:.3f}")
    print(f"ratio peak memory SPRM / plain = {memory_ratio:.3f}")
    return {"ratio": ratio, "update_ratio": update_ratio, "memory_ratio": memory_ratio, "plain": plain, "sprm": sprm}


if __name__ == "__main__":
    main()
