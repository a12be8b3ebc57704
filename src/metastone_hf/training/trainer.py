"""GRPO with the MetaStone-S1 self-supervised process reward loss, on top of TRL's ``GRPOTrainer``.

[`SPRMGRPOTrainer`] adds the SPR loss (see :mod:`metastone_hf.training.loss`) to TRL's GRPO loss:

* the head reads the feature layer (``model.layers[-2]``) of the *same* forward pass TRL runs for the policy
  log-probs, captured with ``model.capture_sprm_features()`` (no second forward);
* each completion's outcome label comes from its reward (``reward > sprm_correct_threshold``), kept from
  ``_calculate_rewards`` and carried with the batch through TRL's shuffling and splitting;
* the features reach the head with the backbone gradient scaled by ``sprm_feature_grad_scale`` (1e-4);
* the head sits in its own optimizer parameter group (``sprm_learning_rate``, ``sprm_weight_decay``) with its own
  schedule (``sprm_lr_scheduler_type``, constant) and its own gradient clipping (``sprm_max_grad_norm``), and keeps
  float32 weights whatever the policy's dtype, as in the official training;
* the SPR loss is divided by the gradient-accumulation steps like TRL's loss and shares its backward;
* ``sprm/*`` metrics go through the Trainer's logging; the head is saved with every checkpoint (it is part
  of the model, or of the adapter's ``modules_to_save`` with PEFT) and restored on resume.

The head's optimizer group, schedule and clipping are in :mod:`metastone_hf.training.head_optimization`; checkpoints
are written atomically by :class:`~metastone_hf.training.checkpoints.AtomicCheckpointsMixin`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers.trainer_utils import SchedulerType
from trl import GRPOConfig, GRPOTrainer

from ..lora import sprm_peft_config
from .checkpoints import AtomicCheckpointsMixin
from .head_optimization import (
    clip_gradients,
    give_head_its_schedule,
    move_head_to_own_group,
    schedule_lambda,
    split_policy_and_head,
)
from .loss import STAT_KEYS, grad_scaled_features, sprm_loss, sprm_metrics_from_stats, stack_stats

logger = logging.getLogger(__name__)

TRUNCATED_MODES = ("exclude", "as_reward")


@dataclass
class SPRMGRPOConfig(GRPOConfig):
    r"""[`~trl.GRPOConfig`] plus the SPRM (self-supervised process reward model) fields of MetaStone-S1.

    Every GRPO argument keeps TRL's meaning and default (policy learning rate 1e-6 as in the paper). Only
    the SPRM fields are added, each with the paper's default:

    Parameters that control the SPR loss:
        sprm_loss_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the SPR loss added to the GRPO loss (paper: 1, same backward pass).
        sprm_correct_threshold (`float`, *optional*, defaults to `0.5`):
            A completion is labelled correct when its reward is strictly above this value.
        sprm_label_reward_index (`int` or `None`, *optional*, defaults to `None`):
            Which reward gives the label. `None`: the weighted sum of all reward functions (the reward GRPO uses);
            an int `i`: the raw output of the `i`-th reward function (e.g. the accuracy reward when a format
            reward is also used).
        sprm_agreement_filter (`bool`, *optional*, defaults to `True`):
            Dynamic weight: keep a step only where the head already agrees with the outcome.
        sprm_class_balance (`bool`, *optional*, defaults to `True`):
            Balance the kept positive/negative steps with counts summed over all processes.
        sprm_positive_class_factor (`float`, *optional*, defaults to `1.5`):
            Extra factor on positive steps in the class balance.
        sprm_count_smoothing (`float`, *optional*, defaults to `1.0`):
            Added to each (global) class count before balancing.
        sprm_eps (`float`, *optional*, defaults to `1e-5`):
            Added to the sum of weights in the normaliser.
        sprm_truncated (`str`, *optional*, defaults to `"exclude"`):
            What the SPR loss does with completions that end without EOS (cut off by `max_completion_length`).
            `"exclude"`: their steps are ignored, since the outcome of an unfinished answer says little about its
            steps (the official code's intent). `"as_reward"`: they are labelled by their reward like any other
            completion, so a truncated wrong answer counts as negative (what the official code does in practice).

    Parameters that control how the head trains:
        sprm_learning_rate (`float` or `None`, *optional*, defaults to `1e-5`):
            Learning rate of the head's own optimizer parameter group (official: 1e-5, while the policy uses
            1e-6). `None`: the head shares the policy's groups, learning rate and schedule.
        sprm_lr_scheduler_type (`str` or `None`, *optional*, defaults to `"constant"`):
            Schedule of the head's learning rate (official: constant, while the policy follows
            `lr_scheduler_type`). Any of transformers' `LambdaLR`-based schedule names (`"constant"`, `"linear"`,
            `"cosine"`, ...), which then uses the policy's warmup and number of steps. `None`: the head follows the
            policy's schedule.
        sprm_weight_decay (`float`, *optional*, defaults to `0.01`):
            AdamW weight decay of the head's parameter group (official: 0.01).
        sprm_max_grad_norm (`float` or `None`, *optional*, defaults to `1.0`):
            The head's gradients are clipped to this norm on their own, and the policy's to `max_grad_norm` without
            the head's (official: each to 1.0), so a large head gradient never shrinks the policy's update. The
            head's pre-clip norm is logged as `sprm/grad_norm`; `grad_norm` is then the policy's. `0`: the head is not
            clipped (but still kept out of the policy's norm). `None`: one global norm over policy and head, clipped
            to `max_grad_norm` (the Trainer's default behaviour). Not available under DeepSpeed, whose engine
            clips all gradients together with its `gradient_clipping` setting.
        sprm_feature_grad_scale (`float`, *optional*, defaults to `1e-4`):
            Scale of the gradient the SPR loss sends into the backbone through the features
            (`f * s + f.detach() * (1 - s)`): `1e-4` lets the head barely move the policy, `0` detaches it.

    The head keeps its dropout (0.5) in training unless `disable_dropout=True`, which TRL applies to every dropout
    module of the model, the head's included.

    Defaults changed from [`~trl.GRPOConfig`]:
        ddp_find_unused_parameters (`bool` or `None`, *optional*, defaults to `False`):
            The head runs outside the DDP-wrapped forward (on features captured inside it), so DDP must not look
            for unused parameters (that search would mark the head unused and then fail when its gradient
            arrives). `None` is turned into `False`.
    """

    sprm_loss_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the SPR loss added to the GRPO loss (paper: 1)."},
    )
    sprm_learning_rate: float | None = field(
        default=1e-5,
        metadata={
            "help": "Learning rate of the SPRM head's own parameter group (official 1e-5; the policy uses "
            "`learning_rate`, 1e-6). None: the head shares the policy's learning rate."
        },
    )
    sprm_lr_scheduler_type: str | None = field(
        default="constant",
        metadata={
            "help": "Learning-rate schedule of the SPRM head (official: constant); a transformers schedule name, or "
            "None to follow the policy's schedule."
        },
    )
    sprm_weight_decay: float = field(
        default=0.01,
        metadata={"help": "AdamW weight decay of the SPRM head's parameter group (official 0.01)."},
    )
    sprm_max_grad_norm: float | None = field(
        default=1.0,
        metadata={
            "help": "Clip the SPRM head's gradients to this norm separately from the policy's (official 1.0); 0: do "
            "not clip the head; None: one global norm over policy and head (clipped to max_grad_norm)."
        },
    )
    sprm_feature_grad_scale: float = field(
        default=1e-4,
        metadata={
            "help": "Scale of the backbone gradient coming from the SPR loss through the features "
            "(f * s + f.detach() * (1 - s)); 0 detaches the features."
        },
    )
    sprm_correct_threshold: float = field(
        default=0.5,
        metadata={"help": "A completion is labelled correct when its reward is strictly above this threshold."},
    )
    sprm_label_reward_index: int | None = field(
        default=None,
        metadata={
            "help": "Reward function whose raw output gives the label; None uses the weighted sum of all rewards."
        },
    )
    sprm_agreement_filter: bool = field(
        default=True,
        metadata={"help": "Keep a step only where the head already agrees with the outcome (paper's dynamic weight)."},
    )
    sprm_class_balance: bool = field(
        default=True,
        metadata={"help": "Balance kept positive/negative steps with global counts (+ smoothing)."},
    )
    sprm_positive_class_factor: float = field(
        default=1.5,
        metadata={"help": "Extra factor on positive steps in the class balance (paper: 1.5)."},
    )
    sprm_count_smoothing: float = field(
        default=1.0,
        metadata={"help": "Added to each global class count before balancing (paper: 1)."},
    )
    sprm_eps: float = field(
        default=1e-5,
        metadata={"help": "Added to the sum of weights in the loss normaliser (paper: 1e-5)."},
    )
    sprm_truncated: str = field(
        default="exclude",
        metadata={
            "help": "Completions without EOS: 'exclude' ignores their steps (official intent); 'as_reward' labels "
            "them by their reward like the others (official code in practice).",
            "choices": list(TRUNCATED_MODES),
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = False
        if self.sprm_learning_rate is not None and self.sprm_learning_rate < 0:
            raise ValueError(f"`sprm_learning_rate` must be >= 0, got {self.sprm_learning_rate}.")
        if not 0.0 <= self.sprm_feature_grad_scale <= 1.0:
            raise ValueError(f"`sprm_feature_grad_scale` must be in [0, 1], got {self.sprm_feature_grad_scale}.")
        if self.sprm_truncated not in TRUNCATED_MODES:
            raise ValueError(f"`sprm_truncated` must be one of {list(TRUNCATED_MODES)}, got {self.sprm_truncated!r}.")
        if self.sprm_max_grad_norm is not None and self.sprm_max_grad_norm < 0:
            raise ValueError(
                f"`sprm_max_grad_norm` must be >= 0 (0: no clipping) or None, got {self.sprm_max_grad_norm}."
            )
        if self.sprm_lr_scheduler_type is not None:
            valid = [t.value for t in SchedulerType]
            if self.sprm_lr_scheduler_type not in valid:
                raise ValueError(
                    f"`sprm_lr_scheduler_type={self.sprm_lr_scheduler_type!r}` is not a transformers schedule; choose "
                    f"one of {valid} or None (follow the policy)."
                )


def _is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


class SPRMGRPOTrainer(AtomicCheckpointsMixin, GRPOTrainer):
    """TRL's [`~trl.GRPOTrainer`] that also trains the MetaStone SPRM head with the SPR loss.

    Takes exactly the arguments of ``GRPOTrainer`` (``model`` may be a MetaStone checkpoint path or a
    [`MetaStoneForCausalLMWithSPRM`], possibly loaded with ``trust_remote_code``); ``args`` is a
    [`SPRMGRPOConfig`]. With ``peft_config`` the backbone gets the adapter and the head is trained in full
    (``"sprm_head"`` is added to ``modules_to_save``).

    Example:
        ```python
        from metastone_hf.training import SPRMGRPOConfig, SPRMGRPOTrainer
        from trl.rewards import accuracy_reward

        trainer = SPRMGRPOTrainer(
            model="path/to/metastone-checkpoint",
            reward_funcs=accuracy_reward,
            args=SPRMGRPOConfig(output_dir="out", sprm_learning_rate=1e-5),
            train_dataset=dataset,
        )
        trainer.train()
        ```
    """

    _tag_names = ["trl", "grpo", "metastone", "sprm"]

    def __init__(self, model: Any, *args: Any, peft_config: Any | None = None, **kwargs: Any) -> None:
        args_index = 1  # GRPOTrainer(model, reward_funcs, args, ...)
        training_args = kwargs.get("args", args[args_index] if len(args) > args_index else None)
        if training_args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "metastone") or "model"
            training_args = SPRMGRPOConfig(f"{str(name).rstrip('/').split('/')[-1]}-SPRM-GRPO")
            if len(args) > args_index:
                args = (*args[:args_index], training_args, *args[args_index + 1 :])
            else:
                kwargs["args"] = training_args
        if not isinstance(training_args, SPRMGRPOConfig):
            raise TypeError(
                f"`args` must be a `SPRMGRPOConfig` (a `GRPOConfig` with the SPRM fields), got "
                f"{type(training_args).__name__}. Build it with `SPRMGRPOConfig(**your_grpo_kwargs)`."
            )
        if peft_config is not None:
            peft_config = sprm_peft_config(peft_config)
        self._sprm_rewards_per_func: torch.Tensor | None = None
        super().__init__(model, *args, peft_config=peft_config, **kwargs)
        self._sprm_model(self.model)  # fail early when the model has no SPRM head
        if getattr(self, "vllm_generation", None) is not None:
            send_backbone_only_to_vllm(self.vllm_generation)
        self._check_head_trainable()
        self._keep_head_in_fp32()
        if self.args.sprm_max_grad_norm is not None and self.is_deepspeed_enabled:
            logger.warning(
                "DeepSpeed clips the policy's and the SPRM head's gradients together (its `gradient_clipping`); "
                "`sprm_max_grad_norm` is not applied."
            )

    # ------------------------------------------------------------------ model access
    def _sprm_model(self, model: nn.Module) -> nn.Module:
        """The MetaStone module inside DDP/DeepSpeed and PEFT wrappers."""
        unwrapped = self.accelerator.unwrap_model(model) if hasattr(self, "accelerator") else model
        if _is_peft_model(unwrapped):
            unwrapped = unwrapped.get_base_model()
        if not (hasattr(unwrapped, "capture_sprm_features") and hasattr(unwrapped, "sprm_head")):
            raise TypeError(
                f"{type(self).__name__} needs a MetaStone model with an SPRM head (`MetaStoneForCausalLMWithSPRM`, "
                f"e.g. from `MetaStoneForCausalLMWithSPRM.from_backbone(...)`); got {type(unwrapped).__name__}. "
                "For plain GRPO use `trl.GRPOTrainer`."
            )
        return unwrapped

    def _sprm_head_parameters(self) -> list[nn.Parameter]:
        head = self._sprm_model(self.model).sprm_head
        return [p for p in head.parameters() if p.requires_grad]

    def _check_head_trainable(self) -> None:
        head_params = self._sprm_head_parameters()
        if not head_params:
            raise ValueError(
                "The SPRM head has no trainable parameter. With PEFT keep `'sprm_head'` in `modules_to_save` "
                "(SPRMGRPOTrainer adds it to the `peft_config` it is given); with a PEFT model built yourself, "
                "use `metastone_hf.training.sprm_peft_config(config)`."
            )

    def _keep_head_in_fp32(self) -> None:
        """Give a half-precision head float32 weights: at lr 1e-5 most AdamW updates round away in bf16.

        Every loading path already keeps the head in float32; this catches a model cast by hand (``model.to(bf16)``).
        DeepSpeed casts the whole module itself and keeps float32 master weights in its optimizer, so it is left alone.
        """
        head = self._sprm_model(self.model).sprm_head
        if all(p.dtype == torch.float32 for p in head.parameters()) or self.is_deepspeed_enabled:
            return
        dtypes = sorted({str(p.dtype) for p in head.parameters()})
        logger.warning("The SPRM head was in %s; training it in float32 (the policy keeps its dtype).", dtypes)
        head.float()

    # ------------------------------------------------------------------ labels
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """TRL's reward computation; keeps the (all-process) per-function rewards for the SPRM labels."""
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._sprm_rewards_per_func = rewards_per_func.detach()
        return rewards_per_func

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """TRL's batch plus, per completion (shuffled and split with it): ``sprm_reward`` (the reward that labels it),
        ``sprm_correct`` (reward > threshold), ``sprm_truncated`` (no EOS) and ``sprm_excluded`` (no reward)."""
        self._sprm_rewards_per_func = None
        output = super()._generate_and_score_completions(inputs)
        rewards_per_func = self._sprm_rewards_per_func
        if rewards_per_func is None:
            raise RuntimeError("GRPOTrainer did not call `_calculate_rewards`; cannot label the SPRM steps.")
        # Rewards are computed on the completions of all processes; keep this process's slice (as TRL does).
        local = output["completion_ids"].shape[0]
        start = self.accelerator.process_index * local
        rewards_per_func = rewards_per_func[start : start + local].to(output["completion_ids"].device)
        index = self.args.sprm_label_reward_index
        if index is None:
            weights = self.reward_weights.to(rewards_per_func.device)
            rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
            unscorable = torch.isnan(rewards_per_func).all(dim=1)
        else:
            rewards = rewards_per_func[:, index]
            unscorable = torch.isnan(rewards)
        completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]
        lengths = completion_mask.sum(dim=1)
        last = completion_ids.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        eos_ids = torch.tensor(self.eos_token_ids, device=completion_ids.device, dtype=completion_ids.dtype)
        ended = torch.isin(last, eos_ids) & (lengths > 0)
        output["sprm_reward"] = rewards
        output["sprm_correct"] = torch.nan_to_num(rewards, nan=0.0) > self.args.sprm_correct_threshold
        output["sprm_truncated"] = ~ended
        output["sprm_excluded"] = unscorable
        return output

    # ------------------------------------------------------------------ loss
    def _compute_loss(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """TRL's GRPO loss plus ``sprm_loss_weight`` times the SPR loss, from one forward pass."""
        metastone = self._sprm_model(model)
        # The hook sits on the feature layer's `__call__`, outside gradient checkpointing's recompute: it fires
        # once per forward, and is removed before TRL's caller runs backward.
        with metastone.capture_sprm_features() as captured:
            loss = super()._compute_loss(model, inputs)
        if not captured:
            raise RuntimeError("The SPRM feature layer did not run during the policy forward pass.")
        features = captured[0] if len(captured) == 1 else torch.cat(captured, dim=0)

        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        if features.shape[:2] != input_ids.shape:
            raise RuntimeError(
                f"Captured SPRM features of shape {tuple(features.shape)} do not match the batch {tuple(input_ids.shape)}."
            )
        score_mask = metastone.sprm_score_mask(input_ids, attention_mask)
        # Only steps whose step token was generated: their score position is at or after the last prompt token.
        score_mask[:, : max(prompt_ids.shape[1] - 1, 0)] = False

        scale = self.args.sprm_feature_grad_scale
        step_features = grad_scaled_features(features[score_mask], scale)
        step_logits = metastone.sprm_logits_from_features(step_features)
        logits = step_logits.new_zeros(score_mask.shape).masked_scatter(score_mask, step_logits)

        mode = "train" if self.model.training else "eval"
        num_processes = self.accelerator.num_processes

        def count_reduce(counts: torch.Tensor) -> torch.Tensor:
            return self.accelerator.reduce(counts, reduction="sum") if num_processes > 1 else counts

        args = self.args
        out = sprm_loss(
            logits,
            score_mask,
            inputs["sprm_correct"],
            inputs["sprm_truncated"] | inputs["sprm_excluded"]
            if args.sprm_truncated == "exclude"
            else inputs["sprm_excluded"],
            agreement_filter=args.sprm_agreement_filter,
            class_balance=args.sprm_class_balance,
            positive_class_factor=args.sprm_positive_class_factor,
            count_smoothing=args.sprm_count_smoothing,
            eps=args.sprm_eps,
            exclude_truncated=True,
            count_reduce=count_reduce,
        )
        normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        loss = loss + args.sprm_loss_weight * out.loss / normalizer

        # Metrics: one collective for all counters, then ratios of global sums.
        stats = stack_stats(out.stats)
        loss_value = out.loss.detach().float().reshape(1)
        packed = torch.cat([stats, loss_value, torch.ones(1, device=stats.device)])
        if num_processes > 1:
            packed = self.accelerator.reduce(packed, reduction="sum")
        values = packed.tolist()  # one device sync for all metrics
        metrics = sprm_metrics_from_stats(dict(zip(STAT_KEYS, values[: len(STAT_KEYS)])))
        self._metrics[mode]["sprm/loss"].append(values[-2] / values[-1])
        for key, value in metrics.items():
            self._metrics[mode][f"sprm/{key}"].append(value)
        return loss

    # ------------------------------------------------------------------ the head's optimizer group, schedule, clipping
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Trainer's optimizer, with the SPRM head in its own parameter group (``sprm_learning_rate``)."""
        built_here = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if built_here and self.args.sprm_learning_rate is not None:
            moved = move_head_to_own_group(
                optimizer, self._sprm_head_parameters(), self.args.sprm_learning_rate, self.args.sprm_weight_decay
            )
            if not moved:
                logger.warning(
                    "The optimizer `%s` builds its own parameter groups; the SPRM head shares the policy's learning "
                    "rate.",
                    self.args.optim,
                )
        return optimizer

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        """Trainer's scheduler for the policy; the head's group follows ``sprm_lr_scheduler_type`` (constant)."""
        built_here = self.lr_scheduler is None
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        head_type = self.args.sprm_lr_scheduler_type
        if not built_here or head_type is None:
            return scheduler
        if not isinstance(scheduler, LambdaLR):
            raise ValueError(
                f"`lr_scheduler_type={self.args.lr_scheduler_type!r}` builds a {type(scheduler).__name__}, which cannot "
                "give the SPRM head its own schedule: set `sprm_lr_scheduler_type=None` (the head follows the policy) "
                "or use a LambdaLR-based schedule (constant, linear, cosine, ...)."
            )
        warmup = self.args.get_warmup_steps(num_training_steps)
        give_head_its_schedule(scheduler, schedule_lambda(head_type, warmup, num_training_steps))
        return scheduler

    def _clips_head_separately(self) -> bool:
        return self.args.sprm_max_grad_norm is not None and not self.is_deepspeed_enabled

    def _clip_grad_norm(self, model: nn.Module) -> Any:
        """Clip the policy's gradients to ``max_grad_norm``, leaving the head's out of the norm; returns its norm."""
        if not self._clips_head_separately():
            return super()._clip_grad_norm(model)
        policy, _ = split_policy_and_head(model.parameters(), self._sprm_head_parameters())
        return self.accelerator.clip_grad_norm_(policy, self.args.max_grad_norm)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        """The policy's gradient norm; clips the head's gradients to ``sprm_max_grad_norm`` and logs their norm.

        Runs once per optimizer step, after the policy is clipped (or not, with ``max_grad_norm=0``) and after the
        gradients are unscaled and synchronised across processes.
        """
        if self._clips_head_separately():
            policy, head = split_policy_and_head(model.parameters(), self._sprm_head_parameters())
            if grad_norm is None:
                grad_norm = self.accelerator.clip_grad_norm_(policy, float("inf"))  # measure only
            self._metrics["train"]["sprm/grad_norm"].append(clip_gradients(head, self.args.sprm_max_grad_norm))
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    # ------------------------------------------------------------------ saving
    def _save(self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
        """Trainer's ``save_pretrained`` folder, with two engine fixes (``save_model`` calls this on every rank).

        * DeepSpeed: the engine's state dict holds the head in the training dtype (bf16 under mixed precision); the
          head is written from the ZeRO optimizer's float32 master weights instead, i.e. the head training updates.
        * FSDP2 gives the sharded model a generated class (``FSDP<Name>``) defined in torch; ``save_pretrained`` would
          record it in ``auto_map`` and copy torch's files as the remote code. The model's own class is used instead.
        """
        if self.is_deepspeed_enabled:
            master_head = self._fp32_master_head()  # on every rank: gathering ZeRO-3 partitions is a collective
            if state_dict:  # under ZeRO-3 only the main process holds the gathered state dict
                state_dict = {**state_dict, **master_head}
        with _saved_as_own_class(self.accelerator.unwrap_model(self.model, keep_torch_compile=False)):
            super()._save(output_dir, state_dict=state_dict)

    def _fp32_master_head(self) -> dict[str, torch.Tensor]:
        """The head's float32 master weights kept by DeepSpeed's ZeRO optimizer, named as in the model's state dict.

        A collective under ZeRO-3 (the partitions are gathered): every rank calls it.
        """
        from deepspeed.utils import safe_get_full_fp32_param

        head_ids = {id(p) for p in self._sprm_head_parameters()}
        model = self.accelerator.unwrap_model(self.model)
        weights: dict[str, torch.Tensor] = {}
        for name, parameter in model.named_parameters():
            if id(parameter) in head_ids:
                master = safe_get_full_fp32_param(parameter)
                if master is not None:
                    weights[name] = master.detach().cpu().contiguous()
        return weights


def send_backbone_only_to_vllm(generation: Any) -> Any:
    """Make TRL's vLLM weight sync (``VLLMGeneration``, colocate or server) send the backbone alone.

    vLLM serves the backbone as the plain causal LM it is (``Qwen2ForCausalLM``, ...), whose ``load_weights`` knows
    no ``sprm_head.*`` tensor. The backbone's names already are the plain model's (the flat layout), and TRL has
    merged LoRA adapters and stripped PEFT's prefixes before this filter sees them. Every tensor is still walked
    (and gathered under ZeRO-3 / FSDP, a collective on every process); the head's are just not sent.
    """
    walk = generation._iter_named_params

    def backbone_params() -> Any:
        for name, param in walk():
            if not name.startswith("sprm_head."):
                yield name, param

    generation._iter_named_params = backbone_params
    return generation


@contextlib.contextmanager
def _saved_as_own_class(model: nn.Module) -> Iterator[None]:
    """Give a model sharded by FSDP2 its own class while it is saved.

    ``fully_shard`` gives the model a class generated in torch (``FSDP<Name>``); ``save_pretrained`` would record it
    in ``auto_map`` and copy torch's files as the remote code.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        yield
        return
    sharded_class = type(model)
    if not issubclass(sharded_class, FSDPModule):
        yield
        return
    model.__class__ = next(base for base in sharded_class.__mro__ if not issubclass(base, FSDPModule))
    try:
        yield
    finally:
        model.__class__ = sharded_class


__all__ = ["TRUNCATED_MODES", "SPRMGRPOConfig", "SPRMGRPOTrainer"]
