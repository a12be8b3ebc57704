"""LoRA for MetaStone models: adapters on the backbone, the SPRM head trained in full.

Pitfall: PEFT's ``target_modules="all-linear"`` also matches the head's two ``nn.Linear`` layers, which then
get low-rank adapters instead of being trained in full (and are saved only as adapters). This helper
excludes ``sprm_head`` (and ``lm_head``, which TRL refuses to adapt) from the targets and lists the head in
``modules_to_save`` so the adapter checkpoint carries the complete head.
"""

from __future__ import annotations

import copy
from typing import Any

SPRM_HEAD_MODULES = ("sprm_head.0", "sprm_head.3")


def metastone_lora_config(
    r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    target_modules: str | list[str] = "all-linear",
    train_sprm_head: bool = True,
    **lora_kwargs: Any,
) -> Any:
    """A ``peft.LoraConfig`` for a MetaStone model: LoRA on the backbone, the SPRM head fully trainable.

    Args:
        r, lora_alpha, lora_dropout: the usual LoRA hyper-parameters.
        target_modules: backbone modules to adapt; ``"all-linear"`` is safe here because the head and
            ``lm_head`` are excluded.
        train_sprm_head: keep a full trainable copy of the head in the adapter (``modules_to_save``).
        lora_kwargs: any other ``LoraConfig`` field.
    """
    from peft import LoraConfig, TaskType

    modules_to_save = list(lora_kwargs.pop("modules_to_save", None) or [])
    if train_sprm_head and "sprm_head" not in modules_to_save:
        modules_to_save.append("sprm_head")
    exclude = list(lora_kwargs.pop("exclude_modules", None) or [])
    exclude += [m for m in (*SPRM_HEAD_MODULES, "lm_head") if m not in exclude]
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules,
        exclude_modules=exclude,
        modules_to_save=modules_to_save or None,
        task_type=lora_kwargs.pop("task_type", TaskType.CAUSAL_LM),
        **lora_kwargs,
    )


def sprm_peft_config(peft_config: Any) -> Any:
    """A copy of ``peft_config`` that trains the SPRM head fully: ``"sprm_head"`` joins ``modules_to_save``.

    PEFT then keeps a trainable copy of the head (saved in the adapter). The head's linears and ``lm_head`` are
    also excluded from the LoRA targets, so ``target_modules="all-linear"`` is safe.
    """
    config = copy.deepcopy(peft_config)
    modules = list(getattr(config, "modules_to_save", None) or [])
    if "sprm_head" not in modules:
        modules.append("sprm_head")
    config.modules_to_save = modules
    if hasattr(config, "exclude_modules"):
        exclude = config.exclude_modules
        exclude = [exclude] if isinstance(exclude, str) else list(exclude or [])
        config.exclude_modules = exclude + [m for m in (*SPRM_HEAD_MODULES, "lm_head") if m not in exclude]
    return config
