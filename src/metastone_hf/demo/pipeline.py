"""``metastone demo``: the paper's mechanism, end to end, on a CPU in a few minutes, with nothing downloaded.

1. **Model**: a tiny Qwen2-style MetaStone model (d=64, 3 layers) built from a config, with the task's own
   tokenizer (:func:`metastone_hf.demo.task.build_tokenizer`).
2. **SFT warm start** on an *imperfect* teacher: it sometimes follows a stale fact, so sampled trajectories
   contain wrong steps, and on about half of the problems the same wrong answer is the plurality.
3. **Joint GRPO + SPR training** with :class:`~metastone_hf.training.SPRMGRPOTrainer`: outcome rewards only;
   the head (its logits first centred on teacher steps, see :func:`centre_sprm_head`) learns which steps
   lead to failure from the final answers alone (small policy learning rate, so the policy stays imperfect and
   there is something left for Best-of-N to fix).
4. **Evaluation** on held-out problems: pass@1, random pick, majority vote, SPRM-weighted vote and BoN-SPRM for
   N = 2 / 8 / 32 (low / medium / high) with the official K-groups-of-N averaging and bootstrap intervals; beam
   search and DVTS over steps at the same N; the SPRM AUC overall and per kind of policy error; accuracy against
   N and against the tokens generated; a checkpoint with a filled model card.

The targets (the paper's scaling shape, :func:`check_targets`) are checked and printed; a missed target is
reported, never hidden.

``metastone demo --task long`` (:meth:`DemoConfig.for_task`) runs the same pipeline on the long task
(:data:`~metastone_hf.demo.task.TASKS`: 7 steps, an independent teacher error of 0.3 at every step), where errors
compound and step-level search beats Best-of-N at equal generated tokens; its targets say so (beam search and
DVTS above BoN-SPRM at N = 4, 8 and 16 with 95% intervals apart, BoN-SPRM above majority vote).

``metastone demo --task verify`` runs it on the verify task, whose wrong steps are written like right ones, and adds
:func:`verify_analysis`: the head's step AUC against two baselines that see only each step's own tokens, and the
ProcessBench-format result with 95% intervals (targets: :func:`check_verify_targets`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import task

QUICK = {"sft_steps": 30, "rl_steps": 2, "eval_problems": 4, "samples": 8}
# The long task's budgets (:meth:`DemoConfig.for_task`): fewer SFT / GRPO steps than the short task (its sequences
# are longer), 200 held-out problems, N = 4 ... 32, and search-and-learn's default tree for both searches (M = 4
# children per kept beam: beam search keeps N/4 beams, DVTS runs N/4 subtrees).
LONG = {"sft_steps": 1200, "rl_steps": 60, "eval_problems": 200, "budgets": (4, 8, 16, 32), "beam_width": 4}
# The verify task's budgets: 3000 SFT steps that train the head too, from the teacher's outcomes (run_sft: at 1800
# steps the head's step AUC was 0.80 on seed 0, at 3000 0.96), the short task's GRPO, N = 4 ... 32 and the long task's
# search tree.
VERIFY = {
    "sft_steps": 3000,
    "eval_problems": 200,
    "budgets": (4, 8, 16, 32),
    "beam_width": 4,
    "sft_sprm_loss_weight": 1.0,
}
# What each error type of every task is, for the error table.
ERROR_DESCRIPTIONS = {**task.ERROR_TYPES, **task.VERIFY_ERROR_TYPES}


@dataclass
class DemoConfig:
    """Budgets and hyper-parameters of the demo (the defaults meet the targets in 3-5 minutes on 2 cores).

    The defaults are the short task's; :meth:`for_task` gives the long task's (``task_name="long"``).
    """

    seed: int = 0
    # the task (demo.task.TASKS) and its steps per trajectory (None: the task's own, 3 for "short")
    task_name: str = "short"
    hops: int | None = None
    # model
    hidden_size: int = 64
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 256
    # SFT warm start on the imperfect teacher
    sft_steps: int = 1800
    sft_batch_size: int = 64
    sft_learning_rate: float = 3e-3
    # weight of the head's outcome-labelled loss during SFT (0: the head is trained only with GRPO, as in the paper);
    # see run_sft
    sft_sprm_loss_weight: float = 0.0
    teacher_error_rates: tuple[float, ...] = task.TEACHER_ERROR_RATES  # see task.DemoTask.teacher_error_rates
    # joint GRPO + SPR
    rl_steps: int = 120
    rl_prompts_per_step: int = 16
    num_generations: int = 8
    policy_learning_rate: float = 3e-6
    sprm_learning_rate: float = 1e-3
    max_completion_length: int = 32
    # evaluation
    eval_problems: int = 400
    samples: int = 32
    eval_batch_size: int = 8
    temperature: float = 1.0
    # the N evaluated (None: the model's reasoning-effort presets, N = 2 / 8 / 32), and M of the step-level searches
    # (None: generate's default tree, see SEARCHES)
    budgets: tuple[int, ...] | None = None
    beam_width: int | None = None

    @classmethod
    def for_task(cls, name: str = "short", hops: int | None = None, **overrides: Any) -> DemoConfig:
        """The configuration of task ``name`` (``"short"``: the defaults; ``"long"``: :data:`LONG`), with ``hops``
        steps per trajectory (the task's own when ``None``) and completions long enough for them."""
        demo_task = task.get_task(name, hops)
        config = cls(
            task_name=name,
            hops=demo_task.hops,
            teacher_error_rates=demo_task.teacher_error_rates,
            max_completion_length=demo_task.completion_tokens + 11,  # 32 for the short task's three steps
            **{"long": LONG, "verify": VERIFY}.get(name, {}),
        )
        return replace(config, **overrides)

    @property
    def demo_task(self) -> task.DemoTask:
        """The :class:`~metastone_hf.demo.task.DemoTask` this configuration trains and evaluates on."""
        return task.get_task(self.task_name, self.hops)

    def quick(self) -> DemoConfig:
        """Tiny budgets for a CI smoke run of the whole path (targets are not expected to be met)."""
        return replace(self, **QUICK)


# ---------------------------------------------------------------------------------------------- model
def build_demo_model(tokenizer: Any, config: DemoConfig) -> Any:
    """A Qwen2-style MetaStone model sized by ``config``, its vocab and step/think ids read from ``tokenizer``."""
    from ..tiny import tiny_metastone_for_tokenizer

    model = tiny_metastone_for_tokenizer(
        tokenizer,
        seed=config.seed,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        text_overrides={
            "intermediate_size": config.intermediate_size,
            "num_attention_heads": config.num_heads,
            "num_key_value_heads": config.num_heads,
            "max_position_embeddings": 128,
            "tie_word_embeddings": True,
            "bos_token_id": tokenizer.bos_token_id,
        },
    )
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


# ---------------------------------------------------------------------------------------------- SFT
def sft_batch(
    tokenizer: Any,
    problems: list[Any],
    rng: random.Random,
    rates: tuple[float, ...],
    demo_task: task.DemoTask | None = None,
    return_outcomes: bool = False,
):
    """Prompt + teacher completion (``demo_task``'s teacher, the short task's by default) + EOS, left padded, loss
    on the completion only: ``(input_ids, attention_mask, labels)``, and with ``return_outcomes`` a ``[B]`` bool
    tensor telling which completions end on the right answer (the outcome reward, nothing about the steps)."""
    teacher = (demo_task or task.TASKS["short"]).teacher_completion
    prompts = [p.prompt for p in problems]
    completions = [teacher(p, rng, rates) for p in problems]
    texts = [p.prompt + c + tokenizer.eos_token for p, c in zip(problems, completions)]
    encoded = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    labels = encoded.input_ids.masked_fill(encoded.attention_mask == 0, -100)
    for i, prompt in enumerate(prompts):
        start = int((encoded.attention_mask[i] == 0).sum()) + len(tokenizer(prompt, add_special_tokens=False).input_ids)
        labels[i, :start] = -100
    if not return_outcomes:
        return encoded.input_ids, encoded.attention_mask, labels
    outcomes = torch.tensor([task.reward(c, p.answer) > 0.5 for p, c in zip(problems, completions)])
    return encoded.input_ids, encoded.attention_mask, labels, outcomes


def run_sft(model: Any, tokenizer: Any, config: DemoConfig, progress: bool = True) -> list[float]:
    """AdamW, 30 warm-up steps, cosine decay to 10%; returns the loss every 100 steps.

    With ``config.sft_sprm_loss_weight > 0`` the head learns during SFT too, from the teacher completions' outcomes
    only: :func:`~metastone_hf.training.sprm_loss` without the agreement filter (a head at chance agrees with the
    outcome on half of the steps at random, and the filter then drives every score to one class: measured on the
    verify task), added to the LM loss, with the backbone's full gradient. A backbone trained from scratch on next-token
    prediction alone computes nothing at the position the head reads (it only has to predict the step token there),
    so on the verify task no head on its features can check a step (a supervised probe with the true step labels
    reaches AUC 0.67 there); this loss makes the backbone compute there what the outcome depends on.
    """
    from tqdm.auto import tqdm

    from ..training import sprm_loss

    rng = random.Random(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.sft_learning_rate, weight_decay=0.01, betas=(0.9, 0.98))

    def schedule(step: int) -> float:
        warmup = min(1.0, (step + 1) / 30)
        return warmup * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(config.sft_steps, 1))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    train_head = config.sft_sprm_loss_weight > 0
    model.train()
    losses, window = [], []
    bar = tqdm(range(config.sft_steps), desc="SFT warm start", disable=not progress, leave=False)
    for step in bar:
        problems = config.demo_task.make_split("train", config.sft_batch_size, seed=config.seed * 100_000 + step)
        ids, mask, labels, outcomes = sft_batch(
            tokenizer, problems, rng, config.teacher_error_rates, config.demo_task, return_outcomes=True
        )
        output = model(input_ids=ids, attention_mask=mask, labels=labels, return_sprm_logits=train_head)
        loss = output.loss
        if train_head:
            head_loss = sprm_loss(
                output.sprm_logits, output.sprm_score_mask.bool(), outcomes, agreement_filter=False
            ).loss
            loss = loss + config.sft_sprm_loss_weight * head_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        window.append(output.loss.item())
        if (step + 1) % 100 == 0 or step + 1 == config.sft_steps:
            losses.append(sum(window) / len(window))
            window = []
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


# ---------------------------------------------------------------------------------------------- GRPO + SPR
def centre_sprm_head(model: Any, tokenizer: Any, config: DemoConfig, trajectories: int = 256) -> float:
    """Shift the head's output bias so that its step logits on teacher-style trajectories have median 0.

    The SPR loss keeps only the steps the head already agrees with (``z > 0`` on a correct trajectory, ``z < 0``
    on a wrong one). A freshly initialised head on a tiny model's features gives nearly the same small logit to
    every step, often with one sign for all of them; it then sees one class only and pushes every score towards it
    (measured: trajectory AUC 0.42 and 0.50 on two runs). Centring the logits gives both classes steps to learn
    from from the first update. Only the bias moves, so the head's ranking of steps is unchanged. Returns the shift.
    """
    problems = config.demo_task.make_split("train", trajectories, seed=config.seed * 100_000 + 99_991)
    ids, mask, _ = sft_batch(
        tokenizer, problems, random.Random(config.seed), config.teacher_error_rates, config.demo_task
    )
    with torch.no_grad():
        logits = torch.cat(model.score_trajectories(ids, mask).step_logits)
        shift = float(logits.median())
        model.sprm_head[-1].bias -= shift
    return shift


def run_grpo_sprm(model: Any, tokenizer: Any, config: DemoConfig, work_dir: Path, progress: bool = True) -> list[dict]:
    """Joint GRPO + SPR loss with SPRMGRPOTrainer on train problems (outcome reward only).

    The head is centred first (:func:`centre_sprm_head`); returns the trainer's logs, the first entry recording
    the centring shift as ``{"sprm_head_bias_shift": ...}``.
    """
    from datasets import Dataset

    from ..training import SPRMGRPOConfig, SPRMGRPOTrainer

    shift = centre_sprm_head(model, tokenizer, config)

    problems = config.demo_task.make_split("train", config.rl_steps * config.rl_prompts_per_step, seed=config.seed + 7)
    dataset = Dataset.from_dict({"prompt": [p.prompt for p in problems], "answer": [p.answer for p in problems]})
    args = SPRMGRPOConfig(
        output_dir=str(work_dir),
        use_cpu=True,
        bf16=False,
        seed=config.seed,
        max_steps=config.rl_steps,
        per_device_train_batch_size=config.rl_prompts_per_step * config.num_generations,
        num_generations=config.num_generations,
        max_completion_length=config.max_completion_length,
        learning_rate=config.policy_learning_rate,
        sprm_learning_rate=config.sprm_learning_rate,
        lr_scheduler_type="constant",
        temperature=config.temperature,
        logging_steps=max(1, config.rl_steps // 10),
        save_strategy="no",
        report_to="none",
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        gradient_checkpointing=False,  # a 0.2M-parameter model: recomputation would only cost time
    )
    trainer = SPRMGRPOTrainer(
        model=model, reward_funcs=task.reward_fn, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    model.eval()
    return [{"sprm_head_bias_shift": shift}] + [h for h in trainer.state.log_history if "loss" in h]


def trained_demo_model(
    checkpoint: str | Path | None = None, seed: int = 0, task_name: str = "short", hops: int | None = None
) -> tuple[Any, Any]:
    """The demo's model and tokenizer: loaded from a ``metastone demo`` checkpoint, or trained now (SFT, then GRPO +
    SPR loss, as the demo does, on task ``task_name`` with ``hops`` steps) when ``checkpoint`` is ``None``. Returned
    in eval mode."""
    if checkpoint is not None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True)
        return model.eval(), AutoTokenizer.from_pretrained(checkpoint)
    import tempfile

    config = DemoConfig.for_task(task_name, hops, seed=seed)
    tokenizer = task.build_tokenizer()
    model = build_demo_model(tokenizer, config)
    run_sft(model, tokenizer, config, progress=False)
    with tempfile.TemporaryDirectory() as work_dir:
        run_grpo_sprm(model, tokenizer, config, Path(work_dir), progress=False)
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------------------------- evaluation
# Step-level searches evaluated beside Best-of-N, with M = DemoConfig.beam_width children per kept beam, or
# generate's default tree (beam search: N/4 beams of 4 children each; DVTS: 4 subtrees of N/4 children each).
SEARCHES = {"beam": "beam search over steps", "dvts": "DVTS"}


def search_tree_text(beam_width: int | None) -> str:
    """What the step-level searches of the demo expand, in words."""
    if beam_width is None:
        return (
            "generate's default tree: beam search keeps N/4 beams of 4 children each, DVTS runs 4 subtrees of N/4 "
            "children each; at N = 2 one beam of 2 and 2 subtrees of 1"
        )
    return (
        f"M = {beam_width} children per kept beam for both: beam search keeps N/{beam_width} beams, DVTS runs "
        f"N/{beam_width} subtrees"
    )


@dataclass
class DemoEvaluation:
    """Everything the demo measures on its held-out problems.

    Attributes:
        summary: :func:`~metastone_hf.evaluation.summarize` of the Best-of-N samples (pass@1, random, majority,
            SPRM vote and BoN-SPRM per N, SPRM AUC).
        records: the sampled candidates (correctness, scores, answers, completions).
        tokens: ``[questions, samples]`` tokens each candidate generated (EOS included).
        searches: ``{"beam@8 (medium)": {"mean", "ci_low", "ci_high", "n", "tokens_per_question"}, ...}``: accuracy of
            the answer each step-level search returns, and the tokens it generated per question (all branches).
        errors: per error type (:data:`~metastone_hf.demo.task.ERROR_TYPES`) of the sampled trajectories, see
            :func:`error_type_stats`.
        tree: what the step-level searches expanded, in words (:func:`search_tree_text`).
    """

    summary: dict[str, Any]
    records: Any
    tokens: Any
    searches: dict[str, dict[str, float]]
    errors: dict[str, dict[str, float]]
    tree: str = ""


def error_type_stats(
    problems: list[Any], completions: list[list[str]], correct: Any, scores: Any, demo_task: Any = None
) -> dict:
    """How often the policy makes each kind of error, and how well the SPRM score catches it.

    For each type of :data:`~metastone_hf.demo.task.ERROR_TYPES`: ``share``, the fraction of sampled trajectories
    that contain it; ``wrong``, the number of wrong trajectories that contain it; ``auc``, the probability that a
    correct trajectory outscores a wrong one with that error (ties count half; NaN when there is none).
    """
    from ..metrics import roc_auc

    demo_task = demo_task or task.TASKS["short"]
    correct, scores = np.asarray(correct, dtype=bool), np.asarray(scores, dtype=float)
    kinds = [[demo_task.classify_errors(p, text) for text in row] for p, row in zip(problems, completions)]
    total = correct.size
    stats = {}
    for error in demo_task.error_types:
        has = np.array([[error in k for k in row] for row in kinds], dtype=bool)
        stats[error] = {
            "share": float(has.sum() / total),
            "wrong": int((has & ~correct).sum()),
            "auc": roc_auc(scores[correct], scores[has & ~correct]),
        }
    return stats


def evaluate_demo(model: Any, tokenizer: Any, config: DemoConfig, progress: bool = True) -> DemoEvaluation:
    """Best-of-N samples of every held-out problem, their metrics and error types, then the step-level searches.

    The questions go through the eval runner (:func:`~metastone_hf.eval_runner.question_records`), as
    ``metastone eval`` sends them: problem ``i`` samples from a generator of its own
    (``question_seed(config.seed, i)``), so the numbers do not depend on ``config.eval_batch_size``.
    """
    from ..eval_runner import EvalPlan, question_records
    from ..evaluation import EvalExample, EvalProtocol, EvalRecords, protocol_record, summarize
    from ..metrics import bootstrap_ci, budget_items, metric_key

    problems = config.demo_task.make_split("test", config.eval_problems, seed=config.seed)
    # The demo samples exactly as its policy was trained (plain temperature sampling, no penalty), not with the
    # paper's evaluation protocol, which is tuned for long natural-language reasoning.
    protocol = EvalProtocol(
        name="demo",
        temperature=config.temperature,
        top_p=1.0,
        top_k=0,
        repetition_penalty=1.0,
        max_new_tokens=config.max_completion_length,
        samples_per_question=config.samples,
        description="metastone demo: the synthetic task's training-time sampling",
    )
    evaluated = model.config.reasoning_effort_presets if config.budgets is None else config.budgets
    budgets = [(label, n) for label, n in budget_items(evaluated) if n <= config.samples]
    plan = EvalPlan(
        protocol,
        config.samples,
        dict(budgets),
        ("best_of_n", *SEARCHES),
        beam_width=config.beam_width,
        seed=config.seed,
    )
    examples = [EvalExample(prompt=p.prompt, answer=str(p.answer), id=str(p.uid)) for p in problems]
    rows = list(
        question_records(
            model,
            tokenizer,
            examples,
            range(len(examples)),
            plan,
            prompt_builder=lambda prompt: prompt,  # a problem's prompt is the whole model input
            answer_extractor=task.extract_answer,
            grader=lambda completion, answer: task.reward(completion, answer) > 0.5,
            batch_size=config.eval_batch_size,
            progress_bar=progress,
        )
    )
    sampled = [row["results"]["best_of_n"] for row in rows]
    records = EvalRecords(
        np.array([r["correct"] for r in sampled], dtype=float),
        np.array([r["scores"] for r in sampled], dtype=float),
        [r["answers"] for r in sampled],
        [r["completions"] for r in sampled],
        protocol=protocol_record(protocol, config.samples, seed=config.seed),
    )
    summary = summarize(records, dict(budgets))

    searches: dict[str, dict[str, float]] = {}
    for search in SEARCHES:
        for label, n in budgets:
            runs = [row["results"][f"{search}@{n}"] for row in rows]
            right = np.array([float(r["correct"][r["chosen"]]) for r in runs])
            low, high = bootstrap_ci(right, summary["confidence"])
            searches[metric_key(search, n, label)] = {
                "mean": float(np.mean(right)),
                "ci_low": low,
                "ci_high": high,
                "n": n,
                "tokens_per_question": sum(r["tokens_generated"] for r in runs) / len(problems),
            }
    errors = error_type_stats(problems, records.completions, records.correct, records.scores, config.demo_task)
    tokens = np.array([r["tokens"] for r in sampled])
    return DemoEvaluation(summary, records, tokens, searches, errors, search_tree_text(config.beam_width))


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _interval(entry: dict[str, float]) -> str:
    return f"{_pct(entry['mean'])} [{_pct(entry['ci_low'])}, {_pct(entry['ci_high'])}]"


# The N at which the long task's step-level searches must beat Best-of-N: up to 16, where Best-of-N has not caught up.
LONG_SEARCH_BUDGETS = (4, 8, 16)


def check_long_targets(
    summary: dict[str, Any], searches: dict[str, dict[str, float]] | None
) -> list[tuple[str, bool, str]]:
    """The long task's targets: where errors compound, step-level search beats Best-of-N at equal tokens.

    Beam search and DVTS are above BoN-SPRM at N = 4, 8 and 16 with 95% bootstrap intervals that do not overlap
    (the search's lower end above BoN-SPRM's upper end), BoN-SPRM beats majority vote at every N evaluated and does
    not fall as N grows, and the SPRM separates correct from incorrect trajectories (AUC >= 0.85).
    """
    from ..metrics import budget_items, metric_key

    metrics, searches = summary["metrics"], searches or {}
    labels = {n: label for label, n in budget_items(summary["budgets"])}
    bon = {n: metrics.get(metric_key("bon_sprm", n, label)) for n, label in labels.items()}
    if any(n not in labels or bon[n] is None for n in LONG_SEARCH_BUDGETS):
        return [("long-task targets", False, "N = 4, 8 and 16 were not all evaluated (fewer than 16 samples)")]
    targets = []
    for search in SEARCHES:
        found = [searches.get(metric_key(search, n, labels[n])) for n in LONG_SEARCH_BUDGETS]
        met = all(
            entry is not None and entry["ci_low"] > bon[n]["ci_high"] for n, entry in zip(LONG_SEARCH_BUDGETS, found)
        )
        values = "; ".join(
            f"N={n}: " + ("not run" if entry is None else f"{_interval(entry)} vs {_interval(bon[n])}")
            for n, entry in zip(LONG_SEARCH_BUDGETS, found)
        )
        targets.append((f"{search} above BoN-SPRM at N = 4, 8, 16 (95% intervals apart)", met, values))
    ns = sorted(n for n in labels if bon[n] is not None)
    majority = {n: metrics[metric_key("majority", n, labels[n])]["mean"] for n in ns}
    targets.append((
        "BoN-SPRM > majority at every N",
        all(bon[n]["mean"] > majority[n] for n in ns),
        "; ".join(f"N={n}: {_pct(bon[n]['mean'])} vs {_pct(majority[n])}" for n in ns),
    ))  # fmt: skip
    rising = all(bon[a]["mean"] <= bon[b]["mean"] for a, b in itertools.pairwise(ns))
    targets.append(("BoN-SPRM rises with N", rising, " <= ".join(_pct(bon[n]["mean"]) for n in ns)))
    auc = summary["sprm_auc"]
    targets.append(("SPRM AUC >= 0.85", (not math.isnan(auc)) and auc >= 0.85, f"{auc:.3f}"))
    return targets


def check_targets(
    summary: dict[str, Any], searches: dict[str, dict[str, float]] | None = None, task_name: str = "short"
) -> list[tuple[str, bool, str]]:
    """The demo's targets, the paper's test-time-scaling shape: (name, met, measured values).

    Short task: BoN-SPRM rises with the effort (N = 2 <= 8 <= 32), beats majority vote at N = 8 and 32, is at least
    10 points above pass@1 at N = 32, and the SPRM separates correct from incorrect trajectories (AUC >= 0.85).
    Long task (``task_name="long"``, with the step-level ``searches`` of :class:`DemoEvaluation`): see
    :func:`check_long_targets`.
    """
    from ..metrics import budget_items, metric_key

    if task_name == "long":
        return check_long_targets(summary, searches)
    metrics = summary["metrics"]
    keys = {
        n: (metric_key("bon_sprm", n, label), metric_key("majority", n, label))
        for label, n in budget_items(summary["budgets"])
    }
    if not all(n in keys and keys[n][0] in metrics for n in (2, 8, 32)):
        return [
            ("BoN-SPRM targets", False, "N = 2, 8 and 32 were not all evaluated (fewer than 32 samples per problem)")
        ]
    bon = {n: metrics[keys[n][0]]["mean"] for n in (2, 8, 32)}
    majority = {n: metrics[keys[n][1]]["mean"] for n in (8, 32)}
    pass1, auc = metrics["pass@1"]["mean"], summary["sprm_auc"]

    return [
        ("BoN-SPRM@2 <= @8 <= @32", bon[2] <= bon[8] <= bon[32], " <= ".join(_pct(bon[n]) for n in (2, 8, 32))),
        ("BoN-SPRM@8 > majority@8", bon[8] > majority[8], f"{_pct(bon[8])} vs {_pct(majority[8])}"),
        ("BoN-SPRM@32 > majority@32", bon[32] > majority[32], f"{_pct(bon[32])} vs {_pct(majority[32])}"),
        ("BoN-SPRM@32 >= pass@1 + 10 points", bon[32] >= pass1 + 0.10, f"{_pct(bon[32])} vs {_pct(pass1)} + 10"),
        ("SPRM AUC >= 0.85", (not math.isnan(auc)) and auc >= 0.85, f"{auc:.3f}"),
    ]


# ---------------------------------------------------------------------------------------------- the verify task
# Teacher traces behind the step-level comparison of the head with the bag-of-tokens baselines: the baselines are
# fitted on the train ones and everything is measured on the held-out ones.
VERIFY_BASELINE_TRAIN, VERIFY_BASELINE_HELD_OUT = 3000, 400


def _logistic_regression_auc(train_x: Any, train_y: Any, test_x: Any, test_y: Any, l2: float = 1e-3) -> float:
    """Held-out AUC of an L2-regularised logistic regression (full-batch L-BFGS in float64, classes balanced)."""
    from ..metrics import roc_auc

    x, y = torch.as_tensor(train_x, dtype=torch.float64), torch.as_tensor(train_y, dtype=torch.float64)
    weight = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    balance = torch.where(y > 0.5, 0.5 / y.mean(), 0.5 / (1 - y.mean()))
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = x @ weight + bias
        loss = (balance * torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")).mean()
        loss = loss + l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        scores = (torch.as_tensor(test_x, dtype=torch.float64) @ weight + bias).numpy()
    test_y = np.asarray(test_y, dtype=bool)
    return roc_auc(scores[test_y], scores[~test_y])


def labelled_teacher_steps(tokenizer: Any, demo_task: Any, problems: list[Any], seed: int) -> list[dict]:
    """One teacher completion per problem, its steps labelled up to the first wrong one
    (:func:`~metastone_hf.demo.task.verify_step_labels`): ``[{"problem", "completion", "steps": [(ids, right)], ...}]``
    with each step's own token ids (the step token excluded)."""
    rng = random.Random(seed)
    traces = []
    for problem in problems:
        completion = demo_task.teacher_completion(problem, rng)
        steps = [
            (tokenizer.encode(text, add_special_tokens=False), right)
            for text, right in task.verify_step_labels(problem, completion)
        ]
        traces.append({"problem": problem, "completion": completion, "steps": steps})
    return traces


def bag_of_tokens_aucs(train: list[dict], held_out: list[dict], vocab_size: int) -> dict[str, float]:
    """Held-out step AUCs (right vs wrong) of two baselines that see only each step's own tokens: logistic regression
    on the step's token counts, and on its last token (the position the head reads)."""
    features = {}
    for name, traces in (("train", train), ("held_out", held_out)):
        steps = [step for trace in traces for step in trace["steps"]]
        counts = np.zeros((len(steps), vocab_size))
        last = np.zeros((len(steps), vocab_size))
        for row, (ids, _) in enumerate(steps):
            np.add.at(counts[row], ids, 1.0)
            last[row, ids[-1]] = 1.0
        features[name] = (counts, last, np.array([right for _, right in steps], dtype=float))
    (train_counts, train_last, train_y), (test_counts, test_last, test_y) = features["train"], features["held_out"]
    return {
        "token_counts": _logistic_regression_auc(train_counts, train_y, test_counts, test_y),
        "last_token": _logistic_regression_auc(train_last, train_y, test_last, test_y),
    }


def head_step_scores(model: Any, tokenizer: Any, traces: list[dict], batch_size: int = 64) -> list[list[float]]:
    """The head's score of each labelled step of ``traces`` (read where the step's step token was predicted)."""
    scores = []
    for start in range(0, len(traces), batch_size):
        batch = traces[start : start + batch_size]
        texts = [t["problem"].prompt + t["completion"] + tokenizer.eos_token for t in batch]
        encoded = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        result = model.score_trajectories(encoded.input_ids, encoded.attention_mask)
        for row, trace in enumerate(batch):
            scores.append(result.step_scores[row].tolist()[: len(trace["steps"])])
    return scores


def paired_step_auc(model: Any, tokenizer: Any, problems: list[Any], resamples: int = 1000) -> dict[str, Any]:
    """The head's step AUC on pairs of completions that differ in one step
    (:func:`~metastone_hf.demo.task.verify_paired_completions`): the trap's step citing the current fact against the
    same step citing the overridden one, after the same prompt and the same earlier steps. Unlike the AUC on teacher
    traces, nothing but the cited fact differs, so the layout of the prompt (how far down an update is listed, which
    decides how often the teacher errs) cannot stand in for checking the step. Returns the AUC with a bootstrap 95%
    interval over problems and the share of pairs where the right step scores higher."""
    from ..metrics import roc_auc

    texts, hops = [], []
    for problem in problems:
        right, wrong, hop = task.verify_paired_completions(problem)
        texts += [problem.prompt + right + tokenizer.eos_token, problem.prompt + wrong + tokenizer.eos_token]
        hops += [hop, hop]
    encoded = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    result = model.score_trajectories(encoded.input_ids, encoded.attention_mask, batch_size=128)
    scores = np.array([float(result.step_scores[row][hop]) for row, hop in enumerate(hops)])
    right, wrong = scores[0::2], scores[1::2]
    rng = np.random.default_rng(0)
    draws = [roc_auc(right[i], wrong[i]) for i in rng.integers(0, len(problems), (resamples, len(problems)))]
    return {
        "pairs": len(problems),
        "auc": roc_auc(right, wrong),
        "auc_ci": (float(np.nanquantile(draws, 0.025)), float(np.nanquantile(draws, 0.975))),
        "right_above_wrong": float(np.mean(right > wrong)),
    }


def processbench_with_intervals(
    model: Any, tokenizer: Any, problems: list[Any], confidence: float = 0.95, resamples: int = 2000
) -> dict[str, Any]:
    """ProcessBench's metric on synthetic traces with a known first wrong step
    (:func:`~metastone_hf.demo.task.verify_processbench_trace`, erroneous at positions 1 and 2 mod 4): error / correct
    accuracy and F1 at threshold 0.5 and at the threshold tuned on the even positions (measured on the odd ones),
    each with a percentile bootstrap interval over traces."""
    from ..processbench import ProcessBenchTrace, best_threshold, first_error, processbench_f1, score_traces

    rows = [task.verify_processbench_trace(p, erroneous=i % 4 in (1, 2)) for i, p in enumerate(problems)]
    traces = [ProcessBenchTrace(r["id"], r["problem"], r["steps"], r["label"]) for r in rows]
    scores, _ = score_traces(model, tokenizer, traces, lambda problem: problem, progress_bar=False)
    labels = np.array([t.label for t in traces])
    tuned = best_threshold(scores[0::2], list(labels[0::2]))
    rng = np.random.default_rng(0)
    result = {}
    for name, threshold, rows_used in (
        ("at_0.5", 0.5, np.arange(len(traces))),
        ("tuned", tuned, np.arange(1, len(traces), 2)),
    ):
        predicted = np.array([first_error(scores[i], threshold) for i in rows_used])
        truth = labels[rows_used]
        entry = {"threshold": threshold, "traces": len(rows_used), **processbench_f1(predicted, truth)}
        draws = [
            processbench_f1(predicted[idx], truth[idx])
            for idx in rng.integers(0, len(rows_used), (resamples, len(rows_used)))
        ]
        alpha = (1 - confidence) / 2
        for metric in ("error_acc", "correct_acc", "f1"):
            values = np.array([d[metric] for d in draws])
            entry[f"{metric}_ci"] = (float(np.nanquantile(values, alpha)), float(np.nanquantile(values, 1 - alpha)))
        result[name] = entry
    return result


def verify_analysis(model: Any, tokenizer: Any, config: DemoConfig) -> dict[str, Any]:
    """What the verify task adds to the demo's evaluation: does the head check a step against the prompt, where a
    step's own tokens say nothing about whether it is right?

    On held-out teacher traces (steps labelled up to the first wrong one): the head's step AUC (right vs wrong steps),
    overall and among the steps at nodes whose fact was updated (where right and wrong steps cite the same node), and
    the two bag-of-tokens baselines of :func:`bag_of_tokens_aucs` (fitted on train traces); then the ProcessBench-format
    result of :func:`processbench_with_intervals` on held-out problems.
    """
    from ..metrics import roc_auc

    demo_task = config.demo_task
    train = labelled_teacher_steps(
        tokenizer,
        demo_task,
        demo_task.make_split("train", VERIFY_BASELINE_TRAIN, seed=config.seed * 100_000 + 77_777),
        config.seed + 1,
    )
    held_out_problems = demo_task.make_split("test", VERIFY_BASELINE_HELD_OUT, seed=config.seed + 555)
    held_out = labelled_teacher_steps(tokenizer, demo_task, held_out_problems, config.seed + 2)
    baselines = bag_of_tokens_aucs(train, held_out, len(tokenizer))
    head = head_step_scores(model, tokenizer, held_out)
    right, wrong, right_updated = [], [], []
    for trace, scores in zip(held_out, head):
        updated = {k for k, _, _ in trace["problem"].facts if sum(f[0] == k for f in trace["problem"].facts) > 1}
        for (_ids, is_right), score, text in zip(
            trace["steps"], scores, task.verify_step_labels(trace["problem"], trace["completion"])
        ):
            (right if is_right else wrong).append(score)
            if is_right and text[0][0] in updated:
                right_updated.append(score)
    # interval of the head's step AUC: bootstrap over held-out traces
    per_trace = [(scores, [is_right for _, is_right in trace["steps"]]) for trace, scores in zip(held_out, head)]
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(300):
        picked = [per_trace[i] for i in rng.integers(0, len(per_trace), len(per_trace))]
        pos = [s for scores, flags in picked for s, f in zip(scores, flags) if f]
        neg = [s for scores, flags in picked for s, f in zip(scores, flags) if not f]
        draws.append(roc_auc(pos, neg))
    processbench = processbench_with_intervals(
        model, tokenizer, demo_task.make_split("test", config.eval_problems * 2, seed=config.seed + 999)
    )
    paired = paired_step_auc(model, tokenizer, held_out_problems)
    return {
        "held_out_traces": len(held_out),
        "right_steps": len(right),
        "wrong_steps": len(wrong),
        "head_step_auc": roc_auc(right, wrong),
        "head_step_auc_ci": (float(np.nanquantile(draws, 0.025)), float(np.nanquantile(draws, 0.975))),
        "head_step_auc_updated_nodes": roc_auc(right_updated, wrong),
        "right_steps_at_updated_nodes": len(right_updated),
        "head_wrong_step_mean": float(np.mean(wrong)) if wrong else float("nan"),
        "head_right_step_mean": float(np.mean(right)) if right else float("nan"),
        "bag_of_tokens_auc": baselines["token_counts"],
        "last_token_auc": baselines["last_token"],
        "processbench": processbench,
        "paired": paired,
    }


def format_verify_analysis(analysis: dict[str, Any]) -> str:
    """The verify task's extra tables: step AUCs of the head and the bag-of-tokens baselines, and ProcessBench."""
    low, high = analysis["head_step_auc_ci"]
    paired = analysis["paired"]
    lines = [
        f"Does the head verify? Steps of {analysis['held_out_traces']} held-out teacher traces, labelled up to the "
        f"first wrong one ({analysis['right_steps']} right, {analysis['wrong_steps']} wrong):",
        "",
        "| scorer | sees | step AUC (right vs wrong) |",
        "|---|---|---|",
        f"| SPRM head | the prompt and the steps so far | {analysis['head_step_auc']:.3f} [{low:.3f}, {high:.3f}] |",
        f"| SPRM head, at updated nodes only | ({analysis['right_steps_at_updated_nodes']} right steps) | "
        f"{analysis['head_step_auc_updated_nodes']:.3f} |",
        f"| SPRM head, paired: the trap's step citing the current vs the overridden fact | the same prompt and earlier "
        f"steps ({paired['pairs']} pairs; right above wrong in {100 * paired['right_above_wrong']:.1f}%) | "
        f"{paired['auc']:.3f} [{paired['auc_ci'][0]:.3f}, {paired['auc_ci'][1]:.3f}] |",
        f"| logistic regression, token counts | the step's own tokens | {analysis['bag_of_tokens_auc']:.3f} |",
        f"| logistic regression, last token | the token the head reads at | {analysis['last_token_auc']:.3f} |",
        "",
        f"Mean head score: right steps {analysis['head_right_step_mean']:.3f}, wrong steps "
        f"{analysis['head_wrong_step_mean']:.3f}.",
        "",
        "ProcessBench format, synthetic traces with a known first wrong step (the overridden fact cited at the trap), "
        "95% bootstrap intervals:",
        "",
        "| threshold | traces | error acc | correct acc | F1 |",
        "|---|---|---|---|---|",
    ]
    for name, entry in analysis["processbench"].items():
        label = "0.5" if name == "at_0.5" else f"tuned {entry['threshold']:.3g} (on even, measured on odd)"
        cells = [
            f"{entry[m]:.1f} [{entry[m + '_ci'][0]:.1f}, {entry[m + '_ci'][1]:.1f}]"
            for m in ("error_acc", "correct_acc", "f1")
        ]
        lines.append(f"| {label} | {entry['traces']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_verify_targets(summary: dict[str, Any], analysis: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """The verify task's targets: BoN-SPRM@32 at least 10 points above pass@1 and above majority@32, the SPRM
    separates correct from incorrect trajectories and right from wrong steps (AUC >= 0.85, on teacher traces and on
    pairs that differ in the cited fact only), and neither bag-of-tokens baseline does (held-out step AUC <= 0.60)."""
    from ..metrics import budget_items, metric_key

    metrics = summary["metrics"]
    labels = {n: label for label, n in budget_items(summary["budgets"])}
    if 32 not in labels:
        return [("verify-task targets", False, "N = 32 was not evaluated (fewer than 32 samples per problem)")]
    bon = metrics[metric_key("bon_sprm", 32, labels[32])]["mean"]
    majority = metrics[metric_key("majority", 32, labels[32])]["mean"]
    pass1, auc = metrics["pass@1"]["mean"], summary["sprm_auc"]
    step_auc, paired_auc = analysis["head_step_auc"], analysis["paired"]["auc"]
    return [
        ("BoN-SPRM@32 >= pass@1 + 10 points", bon >= pass1 + 0.10, f"{_pct(bon)} vs {_pct(pass1)} + 10"),
        ("BoN-SPRM@32 > majority@32", bon > majority, f"{_pct(bon)} vs {_pct(majority)}"),
        ("SPRM AUC >= 0.85", (not math.isnan(auc)) and auc >= 0.85, f"{auc:.3f}"),
        ("SPRM step AUC >= 0.85", (not math.isnan(step_auc)) and step_auc >= 0.85, f"{step_auc:.3f}"),
        ("SPRM paired step AUC >= 0.85", (not math.isnan(paired_auc)) and paired_auc >= 0.85, f"{paired_auc:.3f}"),
        *(
            (f"{name} AUC <= 0.60", analysis[key] <= 0.60, f"{analysis[key]:.3f}")
            for name, key in (("bag-of-tokens", "bag_of_tokens_auc"), ("last-token", "last_token_auc"))
        ),
    ]


def format_results(evaluation: DemoEvaluation) -> str:
    """The results table (Best-of-N metrics plus the step-level searches), tokens per question, and error types."""
    from ..evaluation import format_table
    from ..metrics import budget_items, metric_key

    summary, searches = evaluation.summary, evaluation.searches
    budgets = budget_items(summary["budgets"])
    lines = format_table(summary).split("\n")
    after = next(i for i, line in enumerate(lines) if line.startswith("| bon_sprm |")) + 1
    for search in SEARCHES:
        cells = []
        for label, n in budgets:
            entry = searches.get(metric_key(search, n, label))
            cells.append(
                "-"
                if entry is None
                else f"{100 * entry['mean']:.1f} [{100 * entry['ci_low']:.1f}, {100 * entry['ci_high']:.1f}]"
            )
        lines.insert(after, f"| {search} | " + " | ".join(cells) + " |")
        after += 1
    per_candidate = float(evaluation.tokens.mean())
    lines.append(
        f"beam, dvts: step-level search over the same problems (generate(search=...); {evaluation.tree}), the "
        f"answer it returns. Generated "
        f"tokens per question: {per_candidate:.1f} per sample, so N x {per_candidate:.1f} for the Best-of-N rows; "
        + "; ".join(
            f"{search} " + " / ".join(f"{searches[metric_key(search, n, label)]['tokens_per_question']:.0f}"
                                     for label, n in budgets if metric_key(search, n, label) in searches)
            for search in SEARCHES
        )
        + "."
    )  # fmt: skip
    lines += [
        "",
        f"Errors in the {evaluation.tokens.size} sampled trajectories (share of all; SPRM AUC: correct vs wrong "
        "ones with that error):",
        "",
    ]
    lines += ["| error | trajectories | wrong ones | SPRM AUC | what it is |", "|---|---|---|---|---|"]
    for error, stats in evaluation.errors.items():
        auc = "n/a" if math.isnan(stats["auc"]) else f"{stats['auc']:.3f}"
        lines.append(
            f"| {error} | {100 * stats['share']:.2f}% | {stats['wrong']} | {auc} | {ERROR_DESCRIPTIONS.get(error, '')} |"
        )
    return "\n".join(lines)


def accuracy_vs_tokens_curves(evaluation: DemoEvaluation) -> dict[str, list[dict[str, float]]]:
    """Points of the accuracy-vs-generated-tokens plot: one curve per method, one point per N."""
    from ..metrics import budget_items, metric_key

    summary, metrics = evaluation.summary, evaluation.summary["metrics"]
    per_candidate = float(evaluation.tokens.mean())
    curves: dict[str, list[dict[str, float]]] = {"pass@1": [{**metrics["pass@1"], "n": 1, "tokens": per_candidate}]}
    for method, name in (("majority", "majority"), ("bon_sprm", "BoN-SPRM")):
        curves[name] = [
            {**metrics[key], "n": n, "tokens": n * per_candidate}
            for label, n in budget_items(summary["budgets"])
            if (key := metric_key(method, n, label)) in metrics
        ]
    for search, name in SEARCHES.items():
        curves[name] = [
            {**entry, "tokens": entry["tokens_per_question"]}
            for key, entry in evaluation.searches.items()
            if key.startswith(f"{search}@")
        ]
    return curves


# ---------------------------------------------------------------------------------------------- driver
def run_demo(config: DemoConfig, output_dir: str | Path, overwrite: bool = False, progress: bool = True) -> dict:
    """Run the whole demo and write ``output_dir``.

    Outputs: ``checkpoint/`` (with its model card), ``results.md`` (tables, targets, timings), ``accuracy_vs_n.png``,
    ``accuracy_vs_tokens.png``, ``demo_report.json`` (summary and every sampled candidate) and ``demo_run.json``
    (configuration, timings, training logs, step-level searches, error types, targets).
    """
    import tempfile

    from transformers.utils import logging as hf_logging

    from ..atomic_writes import atomic_output_dir
    from ..evaluation import plot_accuracy_vs_n, plot_accuracy_vs_tokens, save_report
    from ..hub import EvalDataset, eval_results_from_report, save_checkpoint

    long_task = config.task_name in ("long", "verify")  # the tasks named in their titles
    DEMO_EVAL_DATASET = (
        EvalDataset(
            name="Fact-update pointer chase (synthetic, metastone demo --task verify)",
            type="metastone-demo-verify-fact-update-pointer-chase",
            split="test",
        )
        if config.task_name == "verify"
        else EvalDataset(
            name="Long stale-fact pointer chase (synthetic, metastone demo --task long)"
            if long_task
            else "Stale-fact pointer chase (synthetic, metastone demo)",
            type="metastone-demo-long-stale-fact-pointer-chase"
            if long_task
            else "metastone-demo-stale-fact-pointer-chase",
            split="test",
        )
    )
    title = f"metastone demo --task {config.task_name}" if long_task else "metastone demo"

    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} already exists; pass --overwrite or choose another --output-dir.")
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 renames, not for demo users
    timings: dict[str, float] = {}
    start = time.perf_counter()

    def phase(name: str, began: float) -> None:
        timings[name] = round(time.perf_counter() - began, 1)
        print(f"[{name}] done in {timings[name]:.1f}s", flush=True)

    tokenizer = task.build_tokenizer()
    model = build_demo_model(tokenizer, config)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"model: Qwen2-style, d={config.hidden_size}, {config.num_layers} layers, {parameters:,} parameters "
          f"(SPRM head {sum(p.numel() for p in model.sprm_head.parameters()):,}); "
          f"{torch.get_num_threads()} CPU thread(s)", flush=True)  # fmt: skip
    if config.demo_task != task.TASKS["short"]:  # the short demo prints what it always printed
        print(f"task: {config.demo_task.description}", flush=True)

    began = time.perf_counter()
    sft_losses = run_sft(model, tokenizer, config, progress)
    phase("sft", began)

    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as work_dir:
        rl_log = run_grpo_sprm(model, tokenizer, config, Path(work_dir), progress)
    phase("grpo+spr", began)

    began = time.perf_counter()
    evaluation = evaluate_demo(model, tokenizer, config, progress)
    phase("eval", began)

    summary = evaluation.summary
    analysis = None
    if config.task_name == "verify":
        began = time.perf_counter()
        analysis = verify_analysis(model, tokenizer, config)
        phase("verify", began)
        targets = check_verify_targets(summary, analysis)
    else:
        targets = check_targets(summary, evaluation.searches, config.task_name)
    timings["total"] = round(time.perf_counter() - start, 1)
    lines = [format_results(evaluation)]
    if analysis is not None:
        lines += ["", format_verify_analysis(analysis)]
    lines += ["", "Targets:"]
    lines += [f"  [{'MET' if met else 'MISSED'}] {name}: {values}" for name, met, values in targets]
    lines.append(
        f"\nwall time: {timings['total']:.0f}s ({', '.join(f'{k} {v:.0f}s' for k, v in timings.items() if k != 'total')}); "
        f"{torch.get_num_threads()} CPU thread(s), seed {config.seed}"
    )
    report_text = "\n".join(lines)
    searched = "; ".join(
        f"{key} {100 * entry['mean']:.1f}% ({entry['tokens_per_question']:.0f} tokens/question)"
        for key, entry in evaluation.searches.items()
    )

    # The model reads a question as it is and thinks right after it: the `metastone` commands prompt it that way.
    model.config.prompt_template = "{question}" + task.THINK
    with atomic_output_dir(output_dir, overwrite=overwrite) as staging:
        save_checkpoint(
            model,
            staging / "checkpoint",
            tokenizer,
            eval_results=eval_results_from_report(summary, DEMO_EVAL_DATASET),
            notes=(
                f"Trained by `{title}` on the synthetic {config.demo_task.description} "
                if long_task
                else "Trained by `metastone demo` on the synthetic stale-fact pointer-chase task "
            )
            + "(metastone_hf.demo.task) from scratch on a CPU: a demonstration of the mechanism, not a useful model."
            + (f" Step-level search with the same head (answer accuracy): {searched}." if searched else ""),
        )
        (staging / "results.md").write_text(report_text + "\n")
        plot_accuracy_vs_n(summary, staging / "accuracy_vs_n.png", title=f"{title}: held-out accuracy vs N")
        plot_accuracy_vs_tokens(
            accuracy_vs_tokens_curves(evaluation),
            staging / "accuracy_vs_tokens.png",
            title=f"{title}: accuracy vs generated tokens",
        )
        save_report(summary, evaluation.records, staging / "demo_report.json")
        extra = {"config": asdict(config), "threads": torch.get_num_threads(), "timings_s": timings,
                 "sft_loss_every_100_steps": sft_losses, "grpo_log": rl_log,
                 "searches": evaluation.searches, "error_types": evaluation.errors,
                 "tokens_per_sample": float(evaluation.tokens.mean()),
                 "targets": [{"name": n, "met": m, "values": v} for n, m, v in targets],
                 **({"verify": analysis} if analysis is not None else {})}  # fmt: skip
        (staging / "demo_run.json").write_text(json.dumps(extra, indent=1, default=str))
    print("\n" + report_text)
    print(
        f"\noutputs: {output_dir}/ (checkpoint/, results.md, accuracy_vs_n.png, accuracy_vs_tokens.png, "
        "demo_report.json, demo_run.json)"
    )
    print(f"load it: AutoModel.from_pretrained('{output_dir / 'checkpoint'}', trust_remote_code=True)")
    return {"summary": summary, "targets": targets, "timings": timings, "evaluation": evaluation}


def _idle_cores(cores: set[int], seconds: float = 0.3) -> float | None:
    """How many of ``cores`` were idle over the next ``seconds`` (Linux ``/proc/stat``); None where unreadable."""

    def snapshot() -> dict[int, tuple[int, int]]:
        times = {}
        with open("/proc/stat") as stat:
            for line in stat:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
                    values = [int(v) for v in fields]
                    times[int(name[3:])] = (values[3] + values[4], sum(values))  # idle + iowait, all
        return times

    try:
        before = snapshot()
        time.sleep(seconds)
        after = snapshot()
    except (OSError, ValueError, IndexError):
        return None
    idle = [(after[c][0] - before[c][0]) / max(1, after[c][1] - before[c][1]) for c in before if c in after]
    return sum(idle) if idle else None


def default_threads() -> int:
    """CPU threads for the demo when ``--threads`` is not given: 2 when two cores are idle, else 1.

    The model's matrices are 64 wide, so more than two threads only add synchronisation. Two threads make the SFT
    phase about a third faster on an idle machine (one demo run here: 95 s vs 138 s), but on cores shared with
    other work they wait for each other at every operation (with another demo running: 308 s vs 191 s), so the
    second thread is used only when the cores this process may run on are idle now (sampled for 0.3 s; the load
    average where that cannot be read). The results do not depend on this choice: the tables at 1 and 2 threads
    were identical on every seed we compared.
    """
    try:
        cores = set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = set(range(os.cpu_count() or 1))
    if len(cores) < 2:
        return 1
    idle = _idle_cores(cores)
    if idle is None:
        try:
            idle = len(cores) - os.getloadavg()[0]
        except OSError:
            return 1
    return 2 if idle >= 1.8 else 1


def run_demo_from_args(args: argparse.Namespace) -> int:
    """``metastone demo`` entry point: exit 0 when every target is met (always 0 with --quick)."""
    torch.set_num_threads(args.threads or default_threads())
    config = DemoConfig.for_task(args.task, args.hops, seed=args.seed)
    if args.quick:
        config = config.quick()
    overrides = {"sft_steps": args.sft_steps, "rl_steps": args.rl_steps, "eval_problems": args.eval_problems}
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    if args.samples != DemoConfig.samples and not args.quick:
        config = replace(config, samples=args.samples)
    result = run_demo(config, args.output_dir, overwrite=args.overwrite, progress=not args.no_progress)
    missed = [name for name, met, _ in result["targets"] if not met]
    if missed and not args.quick:
        print(f"\n{len(missed)} target(s) missed: {'; '.join(missed)}", file=sys.stderr)
        return 1
    return 0
