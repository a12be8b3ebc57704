"""Realistic-size MetaStone-S1 run (Qwen2-0.5B shape, random bf16 weights) to size a 7B/32B run.

The model is a ``MetaStoneForCausalLMWithSPRM`` built from a config of the size of Qwen2-0.5B (d=896, 24 layers,
14 heads / 2 KV heads, MLP 4864, vocab 151936, tied embeddings) with random weights: backbone in bfloat16, SPRM head
in float32 (checked). Nothing is downloaded. It is built with ``AutoModelForCausalLM.from_config(config,
dtype=torch.bfloat16)``, which creates the weights in bf16 directly (no float32 copy: peak RSS ~ the bf16 model).

Phases (``--phases``, comma-separated; default all):

* ``score``: ``model.score_trajectories`` on ``--num-trajectories`` (4) random trajectories of ``--seq-len`` (2048)
  tokens with a ``<think> ... </think>`` span holding a step token every ~40 tokens; ``batch_size=1``, then
  ``batch_size=4`` (skipped when 4x the batch-1 working memory would not fit in the available RAM). The scores of
  the two runs are compared.
* ``generate``: Best-of-N, ``model.generate(ids, num_candidates=4, max_new_tokens=64, do_sample=True)`` on a
  ``--prompt-len`` (300) token prompt ending in ``<think>``. Random weights almost never sample the step token, so a
  ``sequence_bias`` calibrated on the prompt's logits makes it come with probability ``--step-rate`` (1/16) per token
  (full-vocabulary sampling, ``top_k=0``, as in TRL's rollouts). Reports the online scorer's state
  (``scoring_state_bytes`` of the output: one small (position, logit) record per step, no hidden state) per step
  and per generated token; then measures, with the same seed, what ``generate(num_return_sequences=4,
  output_hidden_states=True)`` keeps: ``(num_layers + 1) * d * 2`` bytes per token per candidate in bf16.
* ``train``: ``--train-steps`` (2) ``SPRMGRPOTrainer`` steps on CPU (``use_cpu=True``, ``bf16=False``: no autocast,
  the model itself is bf16), batch 4 = 1 prompt x 4 generations, ``--max-completion-length`` 32 tokens, the same
  calibrated step bias, a reward alternating 1/0 within each group (both SPRM labels, non-zero advantages), and
  ``sprm_truncated="as_reward"``: random weights never emit EOS, and the default ``"exclude"`` would leave the SPR
  loss without steps. Then the AdamW state bytes per optimizer parameter group (the head's group is ``"sprm_head"``).
* ``report``: head / backbone parameters and memory, head vs policy optimizer memory, scorer vs ``hidden_states``
  bytes per token, and an extrapolation to the 1.5B / 7B / 32B MetaStone-S1 backbones (Qwen2 shapes of
  DeepSeek-R1-Distill-Qwen-1.5B / -7B and QwQ-32B) from formulas that are printed next to the 0.5B measurements;
  the formulas' parameter counts are also checked against a ``meta``-device ``Qwen2ForCausalLM`` build.

Memory: each measurement runs in its own fresh subprocess (``--threads`` OMP/torch threads) that builds the model,
calls the measured function once on the same shapes (oneDNN creates its bf16 kernels per shape, which takes seconds:
that first call's time is printed apart), then resets the kernel's peak-RSS mark (Linux ``/proc/self/clear_refs``
= 5) and reads ``VmHWM`` after the measured call. So each peak belongs to that measurement alone and, minus the RSS
just before it (model built), gives the measurement's working memory (activations, KV cache, gradients, optimizer
state). Where the reset is impossible, the lifetime peak (``ru_maxrss``, model build included) is printed and marked.
Times: the best of ``--repeats`` (2) calls for ``score``/``generate``, each optimizer step for ``train``; wall clock
on a possibly shared machine, so the 1-minute load average before/after each measurement is printed.

Tokenizer: ``score`` and ``generate`` use token ids only: the official ids (step ``'.\\n\\n'`` = 382, ``<think>`` =
151648, ``</think>`` = 151649) or those of ``--tokenizer``. ``train`` needs a tokenizer: ``--tokenizer PATH`` (a
local DeepSeek-R1-Distill-Qwen tokenizer directory, e.g.) or, by default, the tiny in-memory
``metastone_hf.tiny.tiny_tokenizer``, the model's step/think ids then taken from it (the model keeps vocab 151936;
sampled ids outside the tiny vocabulary decode to nothing, which the trivial reward ignores).

    python benchmarks/bench_realistic.py                       # all phases, 2 threads, tiny tokenizer for `train`
    python benchmarks/bench_realistic.py --tokenizer /path/to/deepseek-r1-distill-qwen-7b
    python benchmarks/bench_realistic.py --phases score,report --seq-len 4096 --threads 4

CPU only; about 5 minutes with 2 threads on an idle AVX512-BF16 machine (peak RSS ~5 GiB, in the train phase).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PHASES = ("score", "generate", "train", "report")
OFFICIAL_IDS = {"step_token_ids": [382], "think_start_token_id": 151648, "think_end_token_id": 151649}

# Qwen2-0.5B shape (measured here) and the MetaStone-S1 backbones (extrapolated). The 1.5B/7B/32B fields are those of
# DeepSeek-R1-Distill-Qwen-1.5B, DeepSeek-R1-Distill-Qwen-7B and QwQ-32B (all with untied LM heads).
QWEN2_0_5B = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "max_position_embeddings": 32768,
}
TARGETS = {
    "1.5B": {
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": False,
    },
    "7B": {
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
    },
    "32B": {
        "hidden_size": 5120,
        "intermediate_size": 27648,
        "num_hidden_layers": 64,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
    },
}

MiB = 2**20
GiB = 2**30
# One online-scorer step record (search_rows_metastone.StepRecords): an int64 position and a float32 logit.
RECORD_BYTES = 8 + 4


# --------------------------------------------------------------------------------------------------
# Formulas (validated against the 0.5B measurements in the report)
# --------------------------------------------------------------------------------------------------


def head_params(d: int, multiplier: int = 2) -> int:
    """``Linear(d, m d) + Linear(m d, 1)``: ``m d^2 + m d + m d + 1`` (``2 d^2 + 4 d + 1`` for m = 2)."""
    return multiplier * d * d + 2 * multiplier * d + 1


def qwen2_params(c: dict[str, Any]) -> int:
    """Parameters of a Qwen2 causal LM (biases on q/k/v only; a tied LM head adds nothing)."""
    d, inter, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = c["num_key_value_heads"] * (d // c["num_attention_heads"])
    per_layer = (d * d + d) + 2 * (d * kv + kv) + d * d + 3 * d * inter + 2 * d
    return vocab * d + layers * per_layer + d + (0 if c["tie_word_embeddings"] else vocab * d)


def adamw_state_bytes(params: int, tensors: int, state_bytes_per_element: int) -> int:
    """``exp_avg`` + ``exp_avg_sq`` (in the parameter's dtype for torch's AdamW) + a float32 ``step`` per tensor."""
    return 2 * state_bytes_per_element * params + 4 * tensors


def hidden_states_bytes_per_token(c: dict[str, Any], element_bytes: int = 2) -> int:
    """What ``output_hidden_states=True`` keeps per decoded token per candidate: all layers + embeddings."""
    return (c["num_hidden_layers"] + 1) * c["hidden_size"] * element_bytes


# --------------------------------------------------------------------------------------------------
# Memory and load
# --------------------------------------------------------------------------------------------------


def _status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        return None
    return None


def _ru_maxrss_mib() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MiB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def rss_mib() -> float:
    current = _status_mib("VmRSS")
    return _ru_maxrss_mib() if current is None else current


def release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so that memory freed by an
    earlier call (the first, kernel-creating one) is not counted in the next window's starting RSS, where the
    measured call would reuse it without raising the peak."""
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakRSS:
    """Wall time and peak RSS of a block, the peak reset at its start where Linux allows it (``clear_refs``)."""

    def __enter__(self) -> PeakRSS:
        release_free_memory()
        self.before = rss_mib()
        try:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
            self.exact = _status_mib("VmHWM") is not None
        except OSError:
            self.exact = False
        self.load_before = os.getloadavg()[0]
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.start
        self.peak = (_status_mib("VmHWM") if self.exact else None) or _ru_maxrss_mib()
        self.after = rss_mib()
        self.load_after = os.getloadavg()[0]

    def as_dict(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "rss_before_mib": self.before,
            "peak_rss_mib": self.peak,
            "rss_after_mib": self.after,
            "peak_is_per_measurement": self.exact,
            "load": [self.load_before, self.load_after],
        }


def measure(call: Any, repeats: int) -> tuple[Any, dict[str, Any]]:
    """Run ``call`` ``repeats`` times (each its own peak-RSS window); the fastest time and the highest peak."""
    runs, out = [], None
    for _ in range(max(repeats, 1)):
        out = None  # free the previous result before the next window opens
        with PeakRSS() as run:
            out = call()
        runs.append(run.as_dict())
    summary = dict(runs[0])
    summary["seconds_all"] = [r["seconds"] for r in runs]
    summary["seconds"] = min(summary["seconds_all"])
    summary["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    summary["load"] = [runs[0]["load"][0], runs[-1]["load"][1]]
    return out, summary


# --------------------------------------------------------------------------------------------------
# Child side: build the model, run one measurement
# --------------------------------------------------------------------------------------------------


def load_tokenizer(options: argparse.Namespace, need: bool) -> tuple[Any, dict[str, Any], str]:
    """(tokenizer or None, step/think ids, description)."""
    from metastone_hf import MetaStoneConfig

    if options.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(options.tokenizer)
        if len(tokenizer) > QWEN2_0_5B["vocab_size"]:
            raise ValueError(f"{options.tokenizer} has {len(tokenizer)} tokens, more than the model's vocabulary.")
        ids = MetaStoneConfig.sprm_token_ids_from_tokenizer(tokenizer)
        return tokenizer, ids, f"{options.tokenizer} ({len(tokenizer)} tokens)"
    if need:
        from metastone_hf.tiny import tiny_tokenizer

        tokenizer = tiny_tokenizer()
        ids = MetaStoneConfig.sprm_token_ids_from_tokenizer(tokenizer)
        return tokenizer, ids, f"tiny_tokenizer ({len(tokenizer)} tokens; no --tokenizer given)"
    return None, dict(OFFICIAL_IDS), "none (official DeepSeek-R1-Distill-Qwen ids)"


def build_model(ids: dict[str, Any], tokenizer: Any, seed: int) -> tuple[Any, dict[str, Any]]:
    """The 0.5B-shaped MetaStone model in bf16 (head float32), plus its parameter/memory facts."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from metastone_hf import MetaStoneConfig, MetaStoneForCausalLMWithSPRM

    text = Qwen2Config(**QWEN2_0_5B)
    if tokenizer is not None:
        text.eos_token_id = tokenizer.eos_token_id
        text.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    else:
        text.eos_token_id = text.pad_token_id = 151643  # <｜end▁of▁sentence｜>
    config = MetaStoneConfig(text_config=text, **ids)
    config.eos_token_id, config.pad_token_id = text.eos_token_id, text.pad_token_id
    torch.manual_seed(seed)
    with PeakRSS() as build:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    if not isinstance(model, MetaStoneForCausalLMWithSPRM):
        raise TypeError(f"from_config built a {type(model).__name__}")
    model.generation_config.eos_token_id = text.eos_token_id
    model.generation_config.pad_token_id = text.pad_token_id
    head = list(model.sprm_head.parameters())
    head_ids = {id(p) for p in head}
    backbone = [p for p in model.parameters() if id(p) not in head_ids]  # deduplicated: tied weights count once
    head_dtypes = sorted({str(p.dtype) for p in head})
    backbone_dtypes = sorted({str(p.dtype) for p in backbone})
    if head_dtypes != ["torch.float32"] or backbone_dtypes != ["torch.bfloat16"]:
        raise RuntimeError(f"unexpected dtypes: head {head_dtypes}, backbone {backbone_dtypes}")
    facts = {
        "head_params": sum(p.numel() for p in head),
        "head_bytes": sum(p.numel() * p.element_size() for p in head),
        "head_tensors": len(head),
        "head_dtype": head_dtypes[0],
        "backbone_params": sum(p.numel() for p in backbone),
        "backbone_bytes": sum(p.numel() * p.element_size() for p in backbone),
        "backbone_tensors": len(backbone),
        "backbone_dtype": backbone_dtypes[0],
        "tied": model.lm_head.weight is model.model.embed_tokens.weight,
        "build": build.as_dict(),
        "rss_after_build_mib": rss_mib(),
        "ids": ids,
    }
    return model, facts


def synthetic_trajectories(n: int, length: int, ids: dict[str, Any], vocab_limit: int, seed: int):
    """``[n, length]`` random ids: a prompt, ``<think>``, a step token every ~40 tokens, ``</think>``, an answer."""
    import torch

    step, start, end = ids["step_token_ids"][0], ids["think_start_token_id"], ids["think_end_token_id"]
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab_limit, (n, length), generator=generator)
    reserved = torch.tensor([*ids["step_token_ids"], start, end])
    x = torch.where(torch.isin(x, reserved), torch.zeros_like(x) + 15, x)  # 15: any ordinary token
    think_at, end_at = length // 8, max(length - 64, length // 8 + 2)
    x[:, think_at], x[:, end_at] = start, end
    for row in range(n):
        positions = torch.arange(think_at + 20, end_at - 1, 40)
        positions = positions + torch.randint(0, 20, positions.shape, generator=generator)
        x[row, positions[positions < end_at - 1]] = step
    return x


def calibrated_step_bias(model: Any, input_ids: Any, step_id: int, rate: float) -> float:
    """Logit bias that makes full-vocabulary sampling pick the step token with probability ``rate`` after this
    prompt (random weights almost never pick it: ~1/151936). The last-position logits of a random model hardly
    change from position to position, so the measured step density stays close to ``rate``."""
    import math

    import torch

    with torch.no_grad():
        logits = model(input_ids=input_ids, logits_to_keep=1, return_sprm_logits=False).logits[0, -1].float()
    others = torch.cat([logits[:step_id], logits[step_id + 1 :]]).logsumexp(0).item()
    return others - logits[step_id].item() + math.log(rate / (1.0 - rate))


def record_layout() -> tuple[int, str]:
    """(bytes, description) of one online-scorer step record."""
    return RECORD_BYTES, "StepRecords: position int64 + logit float32 (array data)"


def child_score(options: argparse.Namespace, batch_size: int) -> dict[str, Any]:
    import torch

    tokenizer, ids, tokenizer_note = load_tokenizer(options, need=False)
    model, facts = build_model(ids, tokenizer, options.seed)
    model.eval()
    limit = min(len(tokenizer) if tokenizer is not None else 151643, 151643)
    x = synthetic_trajectories(options.num_trajectories, options.seq_len, ids, limit, options.seed)
    # First call on the exact shape: oneDNN creates its bf16 kernels per shape (seconds), then the measured call.
    with PeakRSS() as cold:
        model.score_trajectories(x[:batch_size], batch_size=batch_size)
    out, run = measure(lambda: model.score_trajectories(x, batch_size=batch_size), options.repeats)
    return {
        "model": facts,
        "tokenizer": tokenizer_note,
        "batch_size": batch_size,
        "tokens": int(x.numel()),
        "num_steps": out.num_steps.tolist(),
        "scores": out.scores.tolist(),
        "cold": cold.as_dict(),
        "cold_tokens": int(x[:batch_size].numel()),
        "run": run,
        "threads": torch.get_num_threads(),
    }


def child_generate(options: argparse.Namespace, variant: str) -> dict[str, Any]:
    import torch

    tokenizer, ids, tokenizer_note = load_tokenizer(options, need=False)
    model, facts = build_model(ids, tokenizer, options.seed)
    model.eval()
    limit = min(len(tokenizer) if tokenizer is not None else 151643, 151643)
    # A question of random ordinary tokens (no step token), then the generation prompt's `<think>`.
    generator = torch.Generator().manual_seed(options.seed + 1)
    prompt = torch.randint(0, limit, (1, options.prompt_len), generator=generator)
    reserved = torch.tensor([*ids["step_token_ids"], ids["think_start_token_id"], ids["think_end_token_id"]])
    prompt = torch.where(torch.isin(prompt, reserved), torch.zeros_like(prompt) + 15, prompt)
    prompt[0, -1] = ids["think_start_token_id"]
    step = ids["step_token_ids"][0]
    bias = calibrated_step_bias(model, prompt, step, options.step_rate)
    sampling = {
        "max_new_tokens": options.new_tokens,
        "min_new_tokens": options.new_tokens,
        "top_k": 0,  # full-vocabulary sampling, as TRL's GRPO rollouts (the bias is calibrated for it)
        "sequence_bias": {(step,): bias},
        "pad_token_id": model.generation_config.pad_token_id,
    }
    n = options.candidates
    result: dict[str, Any] = {"model": facts, "tokenizer": tokenizer_note, "variant": variant, "candidates": n}
    result.update(prompt_len=int(prompt.shape[1]), threads=torch.get_num_threads(), step_bias=bias)
    if variant == "bon":

        def call() -> Any:
            return model.generate(prompt, num_candidates=n, do_sample=True, progress_bar=False, seed=0, **sampling)

        with PeakRSS() as cold:  # first call: oneDNN kernels for new shapes
            call()
        out, run = measure(call, options.repeats)
        generated = out.num_generated_tokens.sum().item()
        # Step records counted from the sequences (independently of the scorer): generated step tokens that do not
        # follow a step token or `<think>` (the mask's local rules; the span rules are applied at the end).
        length = prompt.shape[1]
        tokens, mask = out.candidates[0], out.candidate_attention_mask[0].bool()
        step_ids = torch.tensor(ids["step_token_ids"])
        new_tokens, previous = tokens[:, length:], tokens[:, length - 1 : -1]
        candidate_steps = torch.isin(new_tokens, step_ids) & mask[:, length:] & ~torch.isin(previous, step_ids)
        candidate_steps &= previous != ids["think_start_token_id"]
        record_bytes, record_layout_text = record_layout()
        result.update(
            cold=cold.as_dict(),
            run=run,
            generated_tokens=int(generated),
            scoring_state_bytes=int(out.scoring_state_bytes),
            recorded_steps=int(candidate_steps.sum()),
            record_bytes=record_bytes,
            record_layout=record_layout_text,
            step_tokens=int((new_tokens == step).sum()),
            scored_steps=int(out.num_steps.sum().item()),
            total_length=int(out.candidates.shape[-1]),
            scores=out.scores[0].tolist(),
            candidates=out.candidates[0].tolist(),
        )
    else:

        def call() -> Any:
            torch.manual_seed(0)  # Best-of-N's `seed=0`: same candidates
            return model.generate(
                prompt,
                do_sample=True,
                num_return_sequences=n,
                output_hidden_states=True,
                return_dict_in_generate=True,
                **sampling,
            )

        with PeakRSS() as cold:
            call()
        out, run = measure(call, options.repeats)
        prefill = sum(h.nbytes for h in out.hidden_states[0])
        decode = sum(h.nbytes for step_states in out.hidden_states[1:] for h in step_states)
        result.update(
            cold=cold.as_dict(),
            run=run,
            hidden_states_bytes=int(prefill + decode),
            prefill_hidden_states_bytes=int(prefill),
            decode_hidden_states_bytes=int(decode),
            decode_forwards=len(out.hidden_states) - 1,
            hidden_dtype=str(out.hidden_states[0][0].dtype),
            candidates=out.sequences.tolist(),
        )
    return result


def child_train(options: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers
    from datasets import Dataset
    from transformers import TrainerCallback

    from metastone_hf.training import SPRMGRPOConfig, SPRMGRPOTrainer

    transformers.logging.set_verbosity_error()
    tokenizer, ids, tokenizer_note = load_tokenizer(options, need=True)
    model, facts = build_model(ids, tokenizer, options.seed)
    model.train()
    step = ids["step_token_ids"][0]
    think = tokenizer.convert_ids_to_tokens(ids["think_start_token_id"])
    questions = ["What is 2 + 3?", "How many apples are left if we buy 7 and eat 2?", "What is 6 times 7?", "Is 9 odd?"]
    prompts = [f"Question: {q} Please reason step by step. {think}\n" for q in questions]
    per_step = options.batch // options.num_generations
    first = tokenizer(prompts[0], return_tensors="pt").input_ids
    bias = calibrated_step_bias(model, first, step, options.step_rate)
    count = max(len(prompts), per_step * options.train_steps)
    dataset = Dataset.from_dict({"prompt": [prompts[i % len(prompts)] for i in range(count)]})

    def alternating_reward(completions: list[Any], **kwargs: Any) -> list[float]:
        return [float(i % 2 == 0) for i in range(len(completions))]  # both labels in every group

    args = SPRMGRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-realistic-"),
        use_cpu=True,
        bf16=False,  # no autocast on CPU; the model itself is bf16 (head float32)
        per_device_train_batch_size=options.batch,
        num_generations=options.num_generations,
        max_completion_length=options.max_completion_length,
        max_steps=options.train_steps,
        learning_rate=1e-6,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        gradient_checkpointing=options.gradient_checkpointing,
        generation_kwargs={"sequence_bias": [[[step], bias]]},  # TRL samples the full vocabulary (top_k=0)
        sprm_truncated="as_reward",
        seed=options.seed,
        disable_tqdm=True,
    )
    trainer = SPRMGRPOTrainer(
        model=model,
        reward_funcs=alternating_reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.start = 0.0

        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            self.times.append(time.perf_counter() - self.start)

    timer = Timer()
    trainer.add_callback(timer)
    rollout_times: list[float] = []
    generate_and_score = trainer._generate_and_score_completions

    def timed_generate_and_score(*a: Any, **k: Any) -> Any:
        start = time.perf_counter()
        output = generate_and_score(*a, **k)
        rollout_times.append(time.perf_counter() - start)
        return output

    trainer._generate_and_score_completions = timed_generate_and_score
    with PeakRSS() as run:
        trainer.train()

    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    groups = []
    for index, group in enumerate(optimizer.param_groups):
        states = [optimizer.state.get(p, {}) for p in group["params"]]
        tensors = [t for s in states for t in s.values() if torch.is_tensor(t)]
        groups.append(
            {
                "name": group.get("name", f"policy[{index}]"),
                "params": sum(p.numel() for p in group["params"]),
                "param_tensors": len(group["params"]),
                "param_dtypes": sorted({str(p.dtype) for p in group["params"]}),
                "lr": group["lr"],
                "weight_decay": group["weight_decay"],
                "state_bytes": sum(t.numel() * t.element_size() for t in tensors),
                "state_dtypes": sorted({f"{k}:{v.dtype}" for s in states for k, v in s.items() if torch.is_tensor(v)}),
            }
        )
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "model": facts,
        "tokenizer": tokenizer_note,
        "optimizer": type(optimizer).__name__,
        "groups": groups,
        "step_seconds": timer.times,
        "rollout_seconds": rollout_times,
        "run": run.as_dict(),
        "logs": [
            {k: h.get(k) for k in ("loss", "sprm/loss", "sprm/steps", "completions/mean_length", "grad_norm")}
            for h in logs
        ],
        "gradient_checkpointing": options.gradient_checkpointing,
        "threads": torch.get_num_threads(),
        "step_bias": bias,
    }


def run_child(options: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(options.threads)
    kind, _, variant = options._child.partition(":")
    if kind == "score":
        result = child_score(options, int(variant))
    elif kind == "generate":
        result = child_generate(options, variant)
    else:
        result = child_train(options)
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------------
# Parent side: run the measurements, print them and the report
# --------------------------------------------------------------------------------------------------


def spawn(child: str, argv: list[str], threads: int) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *argv, "--_child", child],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"measurement {child} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return json.loads(lines[-1][len("RESULT ") :])


def fmt_run(run: dict[str, Any]) -> str:
    """Time, peak RSS of the measurement and its increase over the RSS just before it (model built, warmed up)."""
    mark = "" if run["peak_is_per_measurement"] else " (lifetime peak incl. build: VmHWM reset unavailable)"
    times = run.get("seconds_all", [run["seconds"]])
    spread = f" (best of {len(times)}: {', '.join(f'{t:.1f}' for t in times)})" if len(times) > 1 else ""
    return (
        f"{run['seconds']:.1f} s{spread}; peak RSS {run['peak_rss_mib']:,.0f} MiB{mark} = {run['rss_before_mib']:,.0f} MiB "
        f"before + {working_mib(run):,.0f} MiB working memory; load {run['load'][0]:.2f}->{run['load'][1]:.2f}"
    )


def working_mib(run: dict[str, Any]) -> float:
    return run["peak_rss_mib"] - run["rss_before_mib"]


def print_model(facts: dict[str, Any], tokenizer: str) -> None:
    build = facts["build"]
    print(
        f"model: MetaStoneForCausalLMWithSPRM, Qwen2-0.5B shape, random weights: backbone {facts['backbone_params']:,} "
        f"params {facts['backbone_dtype']} ({facts['backbone_bytes'] / MiB:,.1f} MiB, LM head tied: {facts['tied']}); "
        f"SPRM head {facts['head_params']:,} params {facts['head_dtype']} ({facts['head_bytes'] / MiB:.2f} MiB)"
    )
    print(f"  config {json.dumps(QWEN2_0_5B)}; ids {facts['ids']}; tokenizer: {tokenizer}")
    print(
        f"  build (AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)): {build['seconds']:.1f} s, RSS "
        f"{build['rss_before_mib']:,.0f} -> {facts['rss_after_build_mib']:,.0f} MiB (peak {build['peak_rss_mib']:,.0f})"
    )


def mem_available_mib() -> float | None:
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def phase_score(options: argparse.Namespace, argv: list[str], results: dict[str, Any]) -> None:
    print(f"\n== phase 1: score_trajectories, {options.num_trajectories} x {options.seq_len} tokens ==")
    runs = []
    for batch_size in dict.fromkeys((1, options.num_trajectories)):
        if runs:
            working = working_mib(runs[0]["run"])
            available = mem_available_mib()
            if available is not None and working * batch_size > 0.8 * available:
                print(f"batch_size={batch_size}: skipped ({batch_size} x {working:,.0f} MiB > 80% of {available:,.0f})")
                break
        r = spawn(f"score:{batch_size}", argv, options.threads)
        if not results.get("model"):
            results["model"] = r["model"]
            print_model(r["model"], r["tokenizer"])
        seconds = r["run"]["seconds"]
        print(
            f"batch_size={batch_size}: {fmt_run(r['run'])}\n"
            f"  {r['tokens'] / seconds:,.0f} tok/s, {seconds / options.num_trajectories:.2f} s/trajectory; first call on "
            f"this shape ({r['cold_tokens']} tokens, oneDNN kernel creation): {r['cold']['seconds']:.1f} s; steps per "
            f"trajectory {r['num_steps']}; scores {[round(v, 4) for v in r['scores']]}"
        )
        runs.append(r)
    if len(runs) == 2:
        diff = max(abs(a - b) for a, b in zip(runs[0]["scores"], runs[1]["scores"]))
        print(f"max |score(batch_size=1) - score(batch_size={options.num_trajectories})| = {diff:.2e}")
    results["score"] = runs


def phase_generate(options: argparse.Namespace, argv: list[str], results: dict[str, Any]) -> None:
    n, new, cfg = options.candidates, options.new_tokens, results["model_cfg"]
    print(
        f"\n== phase 2: Best-of-{n}, {new} new tokens, prompt {options.prompt_len} tokens, step rate "
        f"{options.step_rate:.4f} =="
    )
    bon = spawn("generate:bon", argv, options.threads)
    if not results.get("model"):
        results["model"] = bon["model"]
        print_model(bon["model"], bon["tokenizer"])
    print(
        f"generate(num_candidates={n}, do_sample=True, top_k=0, sequence_bias step +{bon['step_bias']:.2f}): "
        f"{fmt_run(bon['run'])}\n  {bon['generated_tokens'] / bon['run']['seconds']:.1f} generated tok/s (all "
        f"candidates); first call: {bon['cold']['seconds']:.1f} s"
    )
    records, generated = bon["recorded_steps"], bon["generated_tokens"]
    per_token = bon["scoring_state_bytes"] / generated
    density = records / generated
    print(
        f"  online scorer state (SearchOutput.scoring_state_bytes): {bon['scoring_state_bytes']:,} B = "
        f"{bon['scoring_state_bytes'] / max(records, 1):.1f} B x {records} step records (counted from the sequences) for {generated} generated tokens = {per_token:.2f} B per generated token "
        f"({density:.3f} records/token; {bon['step_tokens']} step tokens sampled, {bon['scored_steps']} scored after "
        f"the step mask); scores {[round(v, 4) for v in bon['scores']]}"
    )
    hs = spawn("generate:hidden", argv, options.threads)
    measured = hs["decode_hidden_states_bytes"] / (n * hs["decode_forwards"])
    formula = hidden_states_bytes_per_token(cfg)
    print(
        f"generate(num_return_sequences={n}, output_hidden_states=True, same seed): {fmt_run(hs['run'])}\n"
        f"  (prefills the prompt {n} times); first call: {hs['cold']['seconds']:.1f} s"
    )
    ratio = f"{measured / per_token:,.0f}x" if per_token else "n/a (no step recorded)"
    print(
        f"  hidden_states kept: {hs['hidden_states_bytes'] / MiB:,.1f} MiB {hs['hidden_dtype']} (prompt: "
        f"{hs['prefill_hidden_states_bytes'] / MiB:,.1f} MiB); per decoded token per candidate: measured "
        f"{measured:,.0f} B, formula (L+1)*d*2 = {cfg['num_hidden_layers'] + 1}*{cfg['hidden_size']}*2 = {formula:,} B; "
        f"{ratio} the scorer's; same candidates as Best-of-{n}: {hs['candidates'] == bon['candidates']}"
    )
    results["generate"] = {"bon": bon, "hidden": hs, "per_token": per_token, "density": density, "hs": measured}


def phase_train(options: argparse.Namespace, argv: list[str], results: dict[str, Any]) -> None:
    print(
        f"\n== phase 3: SPRMGRPOTrainer, {options.train_steps} steps, batch {options.batch} "
        f"({options.num_generations} generations per prompt), max_completion_length {options.max_completion_length}, "
        f"gradient_checkpointing={options.gradient_checkpointing} =="
    )
    r = spawn("train", argv, options.threads)
    if not results.get("model"):
        results["model"] = r["model"]
        print_model(r["model"], r["tokenizer"])
    print(f"tokenizer: {r['tokenizer']}; model ids {r['model']['ids']}; step bias +{r['step_bias']:.2f}")
    print(f"trainer.train(): {fmt_run(r['run'])}")
    for i, (total, rollout) in enumerate(zip(r["step_seconds"], r["rollout_seconds"])):
        log = r["logs"][i] if i < len(r["logs"]) else {}
        print(
            f"  step {i + 1}{' (first: kernel creation)' if i == 0 else ''}: {total:.1f} s (rollout {rollout:.1f} s, "
            f"loss + backward + optimizer {total - rollout:.1f} s); "
            + ", ".join(f"{k}={v:.4g}" for k, v in log.items() if isinstance(v, (int, float)))
        )
    print(f"optimizer {r['optimizer']}: state after {options.train_steps} steps, per parameter group:")
    for g in r["groups"]:
        print(
            f"  {g['name']:<10}{g['params']:>13,} params in {g['param_tensors']:>3} tensors {g['param_dtypes']}, "
            f"lr now {g['lr']:.1e}, wd {g['weight_decay']}: state {g['state_bytes'] / MiB:>9,.2f} MiB "
            f"({g['state_bytes'] / max(g['params'], 1):.2f} B/param) {g['state_dtypes']}"
        )
    results["train"] = r


def meta_param_count(config_fields: dict[str, Any]) -> int:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**config_fields))
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


def phase_report(options: argparse.Namespace, results: dict[str, Any]) -> None:
    print("\n== report ==")
    base = results["model_cfg"]
    d = base["hidden_size"]
    facts = results.get("model")
    if facts is None:
        meta = meta_param_count(base)
        print("(no measurement ran: the 0.5B 'measured' parameter counts come from a meta-device Qwen2 build)")
        facts = {"head_params": head_params(d), "head_bytes": 4 * head_params(d)}
        facts.update(backbone_params=meta, backbone_bytes=2 * meta)
    rows: list[tuple[str, float | None, float, str]] = [
        ("head params", facts["head_params"], head_params(d), "2d^2+4d+1"),
        ("head weights, bytes (fp32)", facts["head_bytes"], 4 * head_params(d), "4 (2d^2+4d+1)"),
        ("backbone params", facts["backbone_params"], qwen2_params(base), "Qwen2 count (tied head)"),
        ("backbone weights, bytes (bf16)", facts["backbone_bytes"], 2 * qwen2_params(base), "2 params"),
    ]
    train, generate = results.get("train"), results.get("generate")
    if train:
        head_group = next(g for g in train["groups"] if g["name"] == "sprm_head")
        policy = [g for g in train["groups"] if g["name"] != "sprm_head"]
        policy_state = sum(g["state_bytes"] for g in policy)
        policy_params = sum(g["params"] for g in policy)
        policy_tensors = sum(g["param_tensors"] for g in policy)
        rows += [
            ("policy params in the optimizer", policy_params, qwen2_params(base), "= backbone params"),
            ("head AdamW state, bytes", head_group["state_bytes"], adamw_state_bytes(head_params(d), 4, 4), "8/param"),
            (
                "policy AdamW state, bytes",
                policy_state,
                adamw_state_bytes(policy_params, policy_tensors, 2),
                "4/param (bf16 states)",
            ),
        ]
    if generate:
        bon = generate["bon"]
        per_record = bon["scoring_state_bytes"] / bon["recorded_steps"] if bon["recorded_steps"] else None
        rows += [
            ("scorer bytes per step record", per_record, bon["record_bytes"], bon["record_layout"]),
            (
                "scorer bytes per generated token",
                generate["per_token"],
                bon["record_bytes"] * generate["density"],
                f"{bon['record_bytes']} x {generate['density']:.3f} records/token",
            ),
            ("hidden_states bytes per token", generate["hs"], hidden_states_bytes_per_token(base), "(L+1) d 2"),
        ]
    print("0.5B, measured vs formula (formulas: the extrapolation below; 'step' = 4 B per parameter tensor):")
    print(f"  {'quantity':<34}{'measured':>18}{'formula':>18}  formula")
    for name, measured, formula, text in rows:
        if measured is None:
            print(f"  {name:<34}{'n/a':>18}{formula:>18,.2f}  {text}")
            continue
        ok = "ok" if abs(measured - formula) <= 1e-6 * max(abs(formula), 1.0) else "DIFFERS"
        print(f"  {name:<34}{measured:>18,.2f}{formula:>18,.2f}  {text} [{ok}]")
    if train:
        print(
            f"  head / policy optimizer state here: {head_group['state_bytes'] / policy_state:.3%}. The policy's AdamW "
            "states are bf16 because torch keeps them in the parameter dtype (pure-bf16 training, as here); with fp32 "
            "states (mixed precision with fp32 master weights, DeepSpeed) the policy needs 8 B/param (+4 B/param fp32 "
            "master copy), the head always 8 B/param."
        )

    sizes = {"0.5B": base, **TARGETS}
    print(
        "\nextrapolation (Qwen2 shapes of DeepSeek-R1-Distill-Qwen-1.5B/-7B and QwQ-32B; parameter formula checked "
        "against a meta-device Qwen2ForCausalLM build):"
    )
    print(
        f"  {'model':<6}{'d':>6}{'L':>4}{'vocab':>8}{'tied':>6}{'backbone params':>17}{'bf16 GiB':>10}"
        f"{'head params':>13}{'head MiB':>10}{'head AdamW':>12}{'policy AdamW':>14}{'head/policy':>13}"
    )
    print(
        f"  {'':<6}{'':>6}{'':>4}{'':>8}{'':>6}{'':>17}{'':>10}{'':>13}{'(fp32)':>10}{'MiB':>12}{'GiB (fp32)':>14}{'optimizer':>13}"
    )
    checks = []
    for name, c in sizes.items():
        backbone, hp = qwen2_params(c), head_params(c["hidden_size"])
        checks.append(f"{name} {'ok' if backbone == meta_param_count(c) else 'DIFFERS'}")
        head_opt, policy_opt = adamw_state_bytes(hp, 4, 4), 8 * backbone
        print(
            f"  {name:<6}{c['hidden_size']:>6}{c['num_hidden_layers']:>4}{c['vocab_size']:>8}"
            f"{'yes' if c['tie_word_embeddings'] else 'no':>6}{backbone:>17,}{2 * backbone / GiB:>10.2f}{hp:>13,}"
            f"{4 * hp / MiB:>10.2f}{head_opt / MiB:>12.2f}{policy_opt / GiB:>14.2f}{head_opt / policy_opt:>13.3%}"
        )
    print("  formula == meta-device count: " + ", ".join(checks))

    density = generate["density"] if generate else None
    print("\nscoring memory per generated token per candidate (the scorer's records do not depend on the model):")
    measured_head = f"scorer at {density:.3f} rec/tok" if density is not None else "scorer (measured)"
    print(f"  {'model':<6}{'hidden_states (L+1)d2':>24}{'scorer, worst case':>21}{measured_head:>26}{'hs / worst':>13}")
    record_bytes = generate["bon"]["record_bytes"] if generate else RECORD_BYTES
    worst = record_bytes / 2  # a step token right after a step token is not a step: <= 1 record per 2 tokens
    for name, c in sizes.items():
        hs = hidden_states_bytes_per_token(c)
        at_density = f"{record_bytes * density:.2f} B" if density is not None else "-"
        print(f"  {name:<6}{hs:>22,} B{worst:>19.1f} B{at_density:>26}{hs / worst:>12,.0f}x")
    big = TARGETS["32B"]
    print(
        f"  e.g. 32B, N=32 candidates x 32k generated tokens: output_hidden_states would keep "
        f"{hidden_states_bytes_per_token(big) * 32 * 32768 / GiB:,.0f} GiB; the scorer's records <= "
        f"{worst * 32 * 32768 / MiB:,.1f} MiB"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per scored trajectory (phase score)")
    parser.add_argument("--num-trajectories", type=int, default=4, help="trajectories scored (phase score)")
    parser.add_argument("--prompt-len", type=int, default=300, help="prompt tokens (phase generate)")
    parser.add_argument("--new-tokens", type=int, default=64, help="generated tokens per candidate (phase generate)")
    parser.add_argument("--candidates", type=int, default=4, help="N of Best-of-N (phase generate)")
    parser.add_argument(
        "--step-rate",
        type=float,
        default=1 / 16,
        help="probability of sampling the step token per generated token (a calibrated logit bias; random weights)",
    )
    parser.add_argument("--train-steps", type=int, default=2, help="optimizer steps (phase train)")
    parser.add_argument("--batch", type=int, default=4, help="per_device_train_batch_size (phase train)")
    parser.add_argument("--num-generations", type=int, default=4, help="GRPO group size (phase train)")
    parser.add_argument("--max-completion-length", type=int, default=32, help="(phase train)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="(phase train)")
    parser.add_argument("--tokenizer", default=None, help="local tokenizer directory (default: tiny tokenizer)")
    parser.add_argument("--threads", type=int, default=2, help="torch / OMP threads of every measurement")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per score/generate measurement (best)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    options.phase_list = [p.strip() for p in options.phases.split(",") if p.strip()]
    unknown = set(options.phase_list) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}; choose from {','.join(PHASES)}")
    return options


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    options = parse_args(argv)
    if options._child:
        run_child(options)
        return {}
    forwarded = [a for a in argv]
    started = time.perf_counter()
    print(
        f"bench_realistic: phases {options.phase_list}; threads {options.threads} (OMP_NUM_THREADS={options.threads} "
        f"in every measurement subprocess); python {sys.version.split()[0]}; load {os.getloadavg()[0]:.2f}; "
        f"MemAvailable {mem_available_mib() or float('nan'):,.0f} MiB"
    )
    results: dict[str, Any] = {"model_cfg": dict(QWEN2_0_5B)}
    if "score" in options.phase_list:
        phase_score(options, forwarded, results)
    if "generate" in options.phase_list:
        phase_generate(options, forwarded, results)
    if "train" in options.phase_list:
        phase_train(options, forwarded, results)
    if "report" in options.phase_list:
        phase_report(options, results)
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s; load {os.getloadavg()[0]:.2f}")
    return results


if __name__ == "__main__":
    main()
