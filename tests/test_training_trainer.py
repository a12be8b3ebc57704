"""`SPRMGRPOTrainer` on CPU with tiny models: learning, one forward, scaling, param groups, PEFT, resume.

The synthetic task: prompts end with ``<think>``; the policy samples from {A, B, step, EOS} (every other token is
suppressed, EOS only after 6 tokens); a completion is correct when every step token is preceded by ``A``. The
head can see it (the token at the score position), the policy cannot learn it in a few steps at lr 1e-6, and
about 5% of completions are truncated.
"""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from metastone_hf.metrics import roc_auc
from metastone_hf.tiny import save_tiny_checkpoint, tiny_metastone_for_tokenizer, tiny_tokenizer
from metastone_hf.training import SPRMGRPOConfig, SPRMGRPOTrainer

PROMPT = "Question: go <think>"


class SyntheticTask:
    """Tokenizer, reward, dataset and held-out completions of the A/B step task."""

    def __init__(self) -> None:
        self.tok = tiny_tokenizer()
        self.A, self.B = self.tok.convert_tokens_to_ids(["A", "B"])
        self.STEP = self.tok.convert_tokens_to_ids(".\n\n")
        self.EOS = self.tok.eos_token_id
        allowed = {self.A, self.B, self.STEP, self.EOS}
        self.suppress = [i for i in range(len(self.tok)) if i not in allowed]

    def label(self, ids: list[int]) -> bool:
        before_steps = [ids[i - 1] for i in range(1, len(ids)) if ids[i] == self.STEP and ids[i - 1] != self.STEP]
        return bool(before_steps) and all(t == self.A for t in before_steps)

    def reward(self, completions: list[Any], completion_ids: list[list[int]], **kwargs: Any) -> list[float]:
        return [float(self.label(ids)) for ids in completion_ids]

    def dataset(self, n: int = 256) -> Dataset:
        return Dataset.from_dict({"prompt": [PROMPT] * n})

    def model(self, seed: int = 0):
        model = tiny_metastone_for_tokenizer(self.tok, seed=seed)
        with torch.no_grad():
            model.lm_head.weight.zero_()  # uniform sampling over the allowed tokens
        return model

    def heldout(self, n: int = 300, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Completions sampled like the policy samples them, left-padded, with labels (rows with a step only)."""
        rng = random.Random(seed)
        prompt = self.tok.encode(PROMPT, add_special_tokens=False)
        rows, labels = [], []
        while len(rows) < n:
            completion: list[int] = []
            while len(completion) < 16:
                token = rng.choice([self.A, self.B, self.STEP] + ([self.EOS] if len(completion) >= 6 else []))
                completion.append(token)
                if token == self.EOS:
                    break
            if self.STEP in completion[1:]:
                rows.append(prompt + completion)
                labels.append(self.label(completion))
        width = max(map(len, rows))
        ids = torch.full((n, width), self.tok.pad_token_id)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        return ids, mask, torch.tensor(labels)

    def args(self, output_dir: Path, **overrides: Any) -> SPRMGRPOConfig:
        fields: dict[str, Any] = {
            "output_dir": str(output_dir),
            "use_cpu": True,
            "bf16": False,
            "per_device_train_batch_size": 16,
            "num_generations": 8,
            "max_completion_length": 16,
            "max_steps": 2,
            "learning_rate": 1e-6,
            "sprm_learning_rate": 1e-2,
            "logging_steps": 1,
            "report_to": "none",
            "save_strategy": "no",
            "gradient_checkpointing": False,
            "generation_kwargs": {"suppress_tokens": self.suppress, "min_new_tokens": 6},
            "seed": 0,
            "dataloader_num_workers": 0,
        }
        fields.update(overrides)
        return SPRMGRPOConfig(**fields)

    def trainer(self, output_dir: Path, model: Any = None, **overrides: Any) -> SPRMGRPOTrainer:
        peft_config = overrides.pop("peft_config", None)
        return SPRMGRPOTrainer(
            model=self.model() if model is None else model,
            reward_funcs=self.reward,
            args=self.args(output_dir, **overrides),
            train_dataset=self.dataset(),
            processing_class=self.tok,
            peft_config=peft_config,
        )


@pytest.fixture(scope="module")
def task() -> SyntheticTask:
    return SyntheticTask()


def head_param_group(optimizer: Any) -> dict | None:
    """The optimizer's SPRM-head parameter group (the trainer names it ``sprm_head``)."""
    return next((g for g in optimizer.param_groups if g.get("name") == "sprm_head"), None)


def heldout_auc(model: Any, heldout: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> float:
    ids, mask, labels = heldout
    scores = model.score_trajectories(ids, mask)
    log_scores, labels = scores.log_scores.float(), labels.bool()
    return roc_auc(log_scores[labels].numpy(), log_scores[~labels].numpy())


def sprm_history(trainer: SPRMGRPOTrainer, key: str) -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h]


def test_tiny_tokenizer_matches_a_tiny_model(task):
    tok = task.tok
    assert tok.padding_side == "left"
    assert len(tok.encode(".\n\n", add_special_tokens=False)) == 1
    text = "Janet sells 16 - 3 = 13 eggs.\n\nSo qzx \\boxed{18}</think>"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    ids = [*tok.encode("<think>a.\n\nb</think>", add_special_tokens=False), tok.eos_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "<think>a.\n\nb</think>"
    model = task.model()
    assert model.config.step_token_ids == tok.encode(".\n\n", add_special_tokens=False)
    assert model.config.think_start_token_id == tok.convert_tokens_to_ids("<think>")
    assert model.config.text_config.vocab_size == len(tok)
    prompt = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("Assistant: <think>\n")


# ---------------------------------------------------------------------------------------------- learning
def test_spr_loss_falls_and_head_auc_rises(task, tmp_path):
    heldout = task.heldout()
    trainer = task.trainer(tmp_path, max_steps=40)
    auc_before = heldout_auc(trainer.model, heldout)
    trainer.train()
    auc_after = heldout_auc(trainer.model, heldout)
    losses = sprm_history(trainer, "sprm/loss")
    assert len(losses) == 40
    early, late = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert late < early - 0.05, (early, late)
    assert auc_after >= 0.75, (auc_before, auc_after)
    assert auc_after > auc_before + 0.2, (auc_before, auc_after)
    # The metrics go through the Trainer's logging.
    logged = trainer.state.log_history[-2]
    for key in ("sprm/kept_fraction", "sprm/kept_pos", "sprm/kept_neg", "sprm/score_correct", "sprm/score_incorrect"):
        assert key in logged


# ---------------------------------------------------------------------------------------------- mechanics
def _batch(trainer: SPRMGRPOTrainer, task: SyntheticTask) -> dict[str, Any]:
    trainer.model.train()
    examples = [{"prompt": PROMPT} for _ in range(trainer.args.per_device_train_batch_size)]
    return trainer._generate_and_score_completions(examples)


def test_labels_follow_rewards_and_truncation(task, tmp_path):
    trainer = task.trainer(tmp_path, per_device_train_batch_size=32)
    batch = _batch(trainer, task)
    for ids, mask, correct, truncated in zip(
        batch["completion_ids"], batch["completion_mask"], batch["sprm_correct"], batch["sprm_truncated"]
    ):
        completion = ids[mask.bool()].tolist()
        assert bool(correct) == task.label(completion)
        assert bool(truncated) == (completion[-1] != task.EOS)
    torch.testing.assert_close(batch["sprm_reward"], batch["sprm_correct"].float())


def test_one_forward_and_gradient_accumulation_scaling(task, tmp_path):
    trainer = task.trainer(tmp_path, gradient_accumulation_steps=2)
    batch = _batch(trainer, task)
    trainer.current_gradient_accumulation_steps = 2  # set by the training loop; TRL's loss reads it too
    backbone = trainer.model.model
    calls = []
    handle = backbone.register_forward_hook(lambda *a: calls.append(1))

    def loss_with(weight: float) -> torch.Tensor:
        trainer.args.sprm_loss_weight = weight
        torch.manual_seed(0)  # same head dropout mask
        with torch.no_grad():
            return trainer._compute_loss(trainer.model, batch)

    try:
        full = loss_with(1.0)
        assert len(calls) == 1, "the SPR loss must reuse the policy forward pass"
        spr = trainer._metrics["train"]["sprm/loss"][-1]
        grpo_only = loss_with(0.0)
    finally:
        handle.remove()
    assert trainer.current_gradient_accumulation_steps == 2
    assert spr > 0
    assert (full - grpo_only).item() == pytest.approx(spr / 2, rel=1e-4, abs=1e-6)


def test_feature_gradient_scale(task, tmp_path):
    trainer = task.trainer(tmp_path)
    batch = _batch(trainer, task)
    trainer.current_gradient_accumulation_steps = 1
    param = trainer.model.model.layers[0].mlp.up_proj.weight

    def backbone_grad(weight: float, scale: float) -> torch.Tensor:
        trainer.args.sprm_loss_weight, trainer.args.sprm_feature_grad_scale = weight, scale
        trainer.model.zero_grad()
        torch.manual_seed(0)
        trainer._compute_loss(trainer.model, batch).backward()
        return param.grad.detach().clone()

    g_policy = backbone_grad(0.0, 1e-4)
    g0, g1, g_small = backbone_grad(1.0, 0.0), backbone_grad(1.0, 1.0), backbone_grad(1.0, 1e-4)
    torch.testing.assert_close(g0, g_policy)  # scale 0: the SPR loss does not touch the backbone
    assert (g1 - g0).abs().max() > 1e-6
    torch.testing.assert_close(g_small - g0, 1e-4 * (g1 - g0), rtol=1e-3, atol=1e-9)
    assert trainer.model.sprm_head[0].weight.grad.abs().sum() > 0


def test_head_has_its_own_param_group(task, tmp_path):
    trainer = task.trainer(tmp_path, sprm_learning_rate=3e-5, sprm_weight_decay=0.01, weight_decay=0.0)
    optimizer = trainer.create_optimizer()
    head_group = head_param_group(optimizer)
    assert head_group is not None
    assert head_group["lr"] == 3e-5 and head_group["weight_decay"] == 0.01
    head_ids = {id(p) for p in trainer.model.sprm_head.parameters()}
    assert {id(p) for p in head_group["params"]} == head_ids
    others = [p for g in optimizer.param_groups if g is not head_group for p in g["params"]]
    assert all(id(p) not in head_ids for p in others)
    assert all(g["lr"] == 1e-6 for g in optimizer.param_groups if g is not head_group)
    total = sum(p.numel() for p in trainer.model.parameters())
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == total


def test_rejects_model_without_head(task, tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(task.tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    with pytest.raises(TypeError, match="SPRM head"):
        task.trainer(tmp_path, model=Qwen2ForCausalLM(config))


# ---------------------------------------------------------------------------------------------- PEFT
def test_peft_adapter_contains_head_and_reloads(task, tmp_path):
    from peft import LoraConfig, PeftModel

    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = task.trainer(tmp_path, peft_config=peft_config, max_steps=3, learning_rate=1e-3)
    head_before = trainer.model.get_base_model().sprm_head.modules_to_save["default"][0].weight.detach().clone()
    trainer.train()
    out = tmp_path / "adapter"
    trainer.save_model(str(out))

    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert "sprm_head" in adapter_config["modules_to_save"]
    keys = load_file(str(out / "adapter_model.safetensors")).keys()
    assert any("sprm_head" in k for k in keys) and any("lora_A" in k for k in keys)
    assert not any("sprm_head" in k and "lora" in k for k in keys)  # the head is saved whole, never LoRA'd
    trained = trainer.model.get_base_model().sprm_head.modules_to_save["default"]
    assert not torch.equal(trained[0].weight, head_before)

    ids, mask, _ = task.heldout(n=12)
    reloaded = PeftModel.from_pretrained(task.model(), str(out))
    torch.testing.assert_close(
        trainer.model.eval().score_trajectories(ids, mask).log_scores,
        reloaded.eval().score_trajectories(ids, mask).log_scores,
    )
    trained_scores = trainer.model.merge_and_unload().eval().score_trajectories(ids, mask).log_scores
    reloaded_scores = reloaded.merge_and_unload().eval().score_trajectories(ids, mask).log_scores
    torch.testing.assert_close(trained_scores, reloaded_scores)


# ---------------------------------------------------------------------------------------------- checkpoints
class _Snapshot(TrainerCallback):
    """Records the head weights and the optimizer state when training (re)starts."""

    def __init__(self) -> None:
        self.head: dict[str, torch.Tensor] = {}
        self.optimizer: dict[str, Any] = {}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.head = {k: v.detach().clone() for k, v in model.sprm_head.state_dict().items()}
        self.optimizer = copy.deepcopy(optimizer.state_dict())  # live tensors keep changing


def test_resume_restores_head_and_optimizer_with_gradient_checkpointing(task, tmp_path):
    first = task.trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=2, gradient_checkpointing=True)
    first.train()
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "model.safetensors").exists() and (checkpoint / "optimizer.pt").exists()
    saved = load_file(str(checkpoint / "model.safetensors"))
    saved_head = {k.removeprefix("sprm_head."): v for k, v in saved.items() if k.startswith("sprm_head.")}
    assert set(saved_head) == {"0.weight", "0.bias", "3.weight", "3.bias"}
    for key, value in first.model.sprm_head.state_dict().items():
        torch.testing.assert_close(saved_head[key], value)

    snapshot = _Snapshot()
    second = task.trainer(tmp_path, model=task.model(seed=7), max_steps=3, gradient_checkpointing=True)
    second.add_callback(snapshot)
    second.train(resume_from_checkpoint=str(checkpoint))
    for key, value in saved_head.items():
        torch.testing.assert_close(snapshot.head[key], value)
    saved_optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert len(snapshot.optimizer["param_groups"]) == len(saved_optimizer["param_groups"])
    head_group = next(g for g in snapshot.optimizer["param_groups"] if g.get("name") == "sprm_head")
    assert head_group["weight_decay"] == 0.01
    for index, state in saved_optimizer["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(snapshot.optimizer["state"][index][name], value)
    assert second.state.global_step == 3


# ---------------------------------------------------------------------------------------------- example script
REPO = Path(__file__).resolve().parents[1]


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


SMOKE_FLAGS = [
    "--max_steps", "2", "--per_device_train_batch_size", "4", "--num_generations", "4",
    "--max_completion_length", "32", "--use_cpu", "--bf16", "false", "--gradient_checkpointing", "false",
    "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no",
]  # fmt: skip


@pytest.mark.slow
def test_example_script_runs_two_steps(tmp_path, data_dir):
    checkpoint = save_tiny_checkpoint(str(tmp_path / "tiny-metastone"))
    out = tmp_path / "grpo-sprm-tiny"
    command = [
        sys.executable, str(REPO / "examples" / "grpo_sprm.py"), "--model_name_or_path", checkpoint,
        "--dataset_path", str(data_dir / "gsm8k_test.jsonl"), "--max_train_samples", "32",
        "--output_dir", str(out), *SMOKE_FLAGS,
    ]  # fmt: skip
    proc = _run(command, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "'sprm/loss'" in proc.stdout + proc.stderr
    assert (out / "model.safetensors").exists()
    saved = load_file(str(out / "model.safetensors"))
    assert any(k.startswith("sprm_head.") for k in saved)


@pytest.mark.slow
def test_plain_trl_grpo_trains_a_metastone_checkpoint(tmp_path, data_dir):
    checkpoint = save_tiny_checkpoint(str(tmp_path / "tiny-metastone"))
    prepared = tmp_path / "gsm8k-grpo"
    export = [
        sys.executable, str(REPO / "examples" / "grpo_sprm.py"), "--dataset_path",
        str(data_dir / "gsm8k_test.jsonl"), "--max_train_samples", "16", "--export_dataset_dir", str(prepared),
    ]  # fmt: skip
    proc = _run(export, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trl_cli = Path(sys.executable).parent / "trl"
    trl = [str(trl_cli)] if trl_cli.exists() else [sys.executable, "-m", "trl.cli"]
    command = [
        *trl, "grpo", "--model_name_or_path", checkpoint, "--trust_remote_code", "--dataset_name", str(prepared),
        "--reward_funcs", "accuracy_reward", "--output_dir", str(tmp_path / "trl-grpo"), *SMOKE_FLAGS,
    ]  # fmt: skip
    proc = _run(command, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert (tmp_path / "trl-grpo" / "model.safetensors").exists()


def test_bf16_mixed_precision_step_on_cpu(task, tmp_path):
    trainer = task.trainer(tmp_path, max_steps=2, bf16=True)
    trainer.train()
    losses = sprm_history(trainer, "sprm/loss")
    assert len(losses) == 2 and all(0.0 < loss < 10.0 for loss in losses)
    assert next(trainer.model.sprm_head.parameters()).dtype == torch.float32  # master weights stay fp32


# ---------------------------------------------------------------------------------------------- real-scale fidelity
def _head_update(trainer: SPRMGRPOTrainer) -> tuple[float, float]:
    """Train; return the fraction of the head's first-layer weights that changed and the update's norm."""
    head = trainer._sprm_model(trainer.model).sprm_head
    before = head[0].weight.detach().float().clone()
    trainer.train()
    delta = head[0].weight.detach().float() - before
    return (delta != 0).float().mean().item(), delta.norm().item()


def test_bf16_checkpoint_trains_its_head_like_fp32(task, tmp_path):
    from metastone_hf import MetaStoneForCausalLMWithSPRM

    checkpoint = tmp_path / "ckpt"
    task.model().save_pretrained(checkpoint)
    moved = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = MetaStoneForCausalLMWithSPRM.from_pretrained(checkpoint, dtype=dtype)
        assert model.model.embed_tokens.weight.dtype == dtype  # the policy keeps the dtype it was loaded in
        assert all(p.dtype == torch.float32 for p in model.sprm_head.parameters())
        trainer = task.trainer(tmp_path / str(dtype), model=model, max_steps=3, sprm_learning_rate=1e-5)
        moved[dtype] = _head_update(trainer)
    changed_fp32, norm_fp32 = moved[torch.float32]
    changed_bf16, norm_bf16 = moved[torch.bfloat16]
    assert changed_fp32 > 0.99 and changed_bf16 > 0.99, moved
    assert 0.5 < norm_bf16 / norm_fp32 < 2.0, moved


def test_a_head_cast_to_bf16_by_hand_trains_in_fp32(task, tmp_path, caplog):
    model = task.model().to(torch.bfloat16)
    assert next(model.sprm_head.parameters()).dtype == torch.bfloat16
    with caplog.at_level("WARNING"):
        trainer = task.trainer(tmp_path, model=model, max_steps=2, sprm_learning_rate=1e-5)
    assert "training it in float32" in caplog.text
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    changed, _ = _head_update(trainer)
    assert changed > 0.99


class _GradientRecorder(TrainerCallback):
    """Gradients as the optimizer sees them (after clipping)."""

    def __init__(self) -> None:
        self.clipped: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        named = model.named_parameters()
        self.clipped.append({n: p.grad.detach().clone() for n, p in named if p.grad is not None})


def _record_pre_clip_gradients(trainer: SPRMGRPOTrainer) -> list[dict[str, torch.Tensor]]:
    """Patch the trainer so that the gradients are recorded just before any clipping happens."""
    recorded: list[dict[str, torch.Tensor]] = []
    clip, measure = trainer._clip_grad_norm, trainer._get_grad_norm

    def snapshot(model):
        named = model.named_parameters()
        recorded.append({n: p.grad.detach().clone() for n, p in named if p.grad is not None})

    def clip_grad_norm(model):
        snapshot(model)
        return clip(model)

    def get_grad_norm(model, grad_norm=None):
        if grad_norm is None:  # the policy was not clipped: nothing recorded yet for this step
            snapshot(model)
        return measure(model, grad_norm=grad_norm)

    trainer._clip_grad_norm, trainer._get_grad_norm = clip_grad_norm, get_grad_norm
    return recorded


def _clipped_reference(grads: dict[str, torch.Tensor], groups: list[list[str]], norms: list[float]):
    """``torch.nn.utils.clip_grad_norm_`` applied to each group of (copied) gradients on its own."""
    reference = {n: g.clone() for n, g in grads.items()}
    pre_clip = []
    for names, max_norm in zip(groups, norms):
        params = []
        for name in names:
            p = torch.nn.Parameter(torch.zeros_like(reference[name]))
            p.grad = reference[name]
            params.append(p)
        pre_clip.append(float(torch.nn.utils.clip_grad_norm_(params, max_norm)))
    return reference, pre_clip


@pytest.mark.parametrize(
    "setting",
    ["separate", "separate_accumulation", "separate_peft", "policy_unclipped", "joint"],
)
def test_policy_and_head_gradients_are_clipped_separately(task, tmp_path, setting):
    from peft import LoraConfig

    overrides: dict[str, Any] = {"max_steps": 2, "max_grad_norm": 1e-3, "sprm_max_grad_norm": 1e-4}
    if setting == "separate_accumulation":
        overrides.update(gradient_accumulation_steps=2, per_device_train_batch_size=8)
    if setting == "separate_peft":
        overrides["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    if setting == "policy_unclipped":
        overrides["max_grad_norm"] = 0.0
    if setting == "joint":
        overrides["sprm_max_grad_norm"] = None
    trainer = task.trainer(tmp_path, **overrides)
    recorder = _GradientRecorder()
    trainer.add_callback(recorder)
    pre_clip = _record_pre_clip_gradients(trainer)
    trainer.train()
    assert len(pre_clip) == len(recorder.clipped) == 2  # once per optimizer step, accumulation included

    head_names = [n for n in pre_clip[0] if ".sprm_head." in f".{n}" and "original_module" not in n]
    policy_names = [n for n in pre_clip[0] if n not in head_names]
    assert head_names and policy_names
    logged_policy = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    logged_head = [h["sprm/grad_norm"] for h in trainer.state.log_history if "sprm/grad_norm" in h]
    for step, (grads, clipped) in enumerate(zip(pre_clip, recorder.clipped)):
        if setting == "joint":
            reference, (joint_norm,) = _clipped_reference(grads, [policy_names + head_names], [1e-3])
            assert logged_policy[step] == pytest.approx(joint_norm, rel=1e-4)
        else:
            policy_max = float("inf") if setting == "policy_unclipped" else 1e-3
            reference, (policy_norm, head_norm) = _clipped_reference(
                grads, [policy_names, head_names], [policy_max, 1e-4]
            )
            assert logged_policy[step] == pytest.approx(policy_norm, rel=1e-4)
            assert logged_head[step] == pytest.approx(head_norm, rel=1e-4)
            # One joint norm would have clipped the head differently: the test can tell the two apart.
            joint, _ = _clipped_reference(grads, [policy_names + head_names], [1e-3])
            assert not torch.allclose(joint[head_names[0]], clipped[head_names[0]])
        for name in policy_names + head_names:
            torch.testing.assert_close(clipped[name], reference[name], rtol=1e-5, atol=1e-12)
    if setting == "joint":
        assert not logged_head


def test_head_learning_rate_stays_constant_while_the_policy_decays(task, tmp_path):
    class LearningRates(TrainerCallback):
        def __init__(self) -> None:
            self.seen: list[tuple[float, float]] = []

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            head = head_param_group(optimizer)
            policy = next(g for g in optimizer.param_groups if g is not head)
            self.seen.append((policy["lr"], head["lr"]))

    for head_schedule in ("constant", None):
        recorder = LearningRates()
        trainer = task.trainer(
            tmp_path / str(head_schedule),
            max_steps=4,
            learning_rate=1e-6,
            sprm_learning_rate=1e-5,
            lr_scheduler_type="linear",
            sprm_lr_scheduler_type=head_schedule,
        )
        trainer.add_callback(recorder)
        trainer.train()
        policy_lrs = [p for p, _ in recorder.seen]
        head_lrs = [h for _, h in recorder.seen]
        assert policy_lrs == pytest.approx([1e-6 * (4 - k) / 4 for k in range(1, 5)])
        if head_schedule == "constant":
            assert head_lrs == pytest.approx([1e-5] * 4)
        else:
            assert head_lrs == pytest.approx([1e-5 * (4 - k) / 4 for k in range(1, 5)])


def test_head_schedule_needs_a_lambda_schedule(task, tmp_path):
    with pytest.raises(ValueError, match="sprm_lr_scheduler_type"):
        task.args(tmp_path, sprm_lr_scheduler_type="not_a_schedule")
    with pytest.raises(ValueError, match="sprm_truncated"):
        task.args(tmp_path, sprm_truncated="drop")
    with pytest.raises(ValueError, match="sprm_max_grad_norm"):
        task.args(tmp_path, sprm_max_grad_norm=-1.0)


def test_truncated_completions_excluded_or_labelled_by_reward(task, tmp_path):
    trainer = task.trainer(tmp_path, per_device_train_batch_size=32)
    batch = _batch(trainer, task)
    trainer.current_gradient_accumulation_steps = 1
    truncated = torch.arange(32) % 3 == 0  # hand-picked rows, whatever the sampler did
    batch["sprm_truncated"] = truncated
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    steps_per_row = trainer.model.sprm_score_mask(ids, mask)[:, batch["prompt_ids"].shape[1] - 1 :].sum(dim=1)
    correct = batch["sprm_correct"]
    assert steps_per_row[truncated].sum() > 0 and (~correct[truncated]).any()

    logged = {}
    for mode in ("exclude", "as_reward"):
        trainer.args.sprm_truncated = mode
        trainer._metrics["train"].clear()
        with torch.no_grad():
            trainer._compute_loss(trainer.model, batch)
        logged[mode] = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert logged["exclude"]["sprm/steps"] == steps_per_row[~truncated].sum().item()
    assert logged["as_reward"]["sprm/steps"] == steps_per_row.sum().item()
    positive_steps = steps_per_row[correct].sum().item()
    assert logged["as_reward"]["sprm/pos_step_fraction"] == pytest.approx(positive_steps / steps_per_row.sum().item())


def vllm_weight_stream(trainer: SPRMGRPOTrainer) -> list[tuple[str, torch.Tensor]]:
    """What TRL's vLLM weight sync would send for this trainer's model, without vLLM: TRL's own `VLLMGeneration`
    walk (PEFT merge included) on an object that holds only what the walk reads, filtered as the trainer does."""
    from trl.distributed import DistributedBackend
    from trl.generation.vllm_generation import VLLMGeneration

    from metastone_hf.training.trainer import send_backbone_only_to_vllm

    generation = VLLMGeneration.__new__(VLLMGeneration)
    generation.model, generation.accelerator = trainer.model, trainer.accelerator
    generation._dist = DistributedBackend(trainer.accelerator)
    send_backbone_only_to_vllm(generation)
    return [(name, param.detach().clone()) for name, param in generation._iter_named_params()]


def test_vllm_weight_sync_sends_the_plain_backbone(task, tmp_path):
    trainer = task.trainer(tmp_path)
    sent = vllm_weight_stream(trainer)
    twin = AutoModelForCausalLM.from_config(trainer.model.config.text_config)  # what vLLM serves: the plain class
    assert [(n, tuple(p.shape)) for n, p in sent] == [(n, tuple(p.shape)) for n, p in twin.named_parameters()]
    own = dict(trainer.model.named_parameters())
    assert all(torch.equal(p, own[n]) for n, p in sent)


def test_vllm_weight_sync_sends_the_merged_lora_backbone(task, tmp_path):
    import copy

    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = task.trainer(tmp_path, peft_config=config)
    with torch.no_grad():  # adapters that change the weights once merged (LoRA's B starts at zero)
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    layer = trainer.model.get_base_model().model.layers[0].self_attn.q_proj
    base_before = layer.base_layer.weight.detach().clone()
    sent = vllm_weight_stream(trainer)
    merged = copy.deepcopy(trainer.model).merge_and_unload()
    reference = [(n, p) for n, p in merged.named_parameters() if not n.startswith("sprm_head.")]
    twin = AutoModelForCausalLM.from_config(merged.config.text_config)
    assert [n for n, _ in sent] == [n for n, _ in twin.named_parameters()] == [n for n, _ in reference]
    for (name, got), (_, expected) in zip(sent, reference):
        torch.testing.assert_close(got, expected.detach(), msg=name)
    # The merged weight written out by hand (LoRA: W + B A alpha / r), not the base one.
    by_hand = base_before + layer.lora_B["default"].weight @ layer.lora_A["default"].weight * (8 / 4)
    torch.testing.assert_close(dict(sent)[q_proj], by_hand.detach())
    assert not torch.allclose(dict(sent)[q_proj], base_before)
    # The trainer keeps training the adapters: after the sync they are unmerged again, and its base weight is the one it
    # had before (up to the rounding of merging and unmerging).
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight.detach(), base_before)
