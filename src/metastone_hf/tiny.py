"""Tiny backbones built from configs, for tests, benchmarks and CPU demos (nothing is downloaded)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaConfig, PreTrainedConfig, Qwen2Config, Qwen3Config

from .configuration_metastone import MetaStoneConfig
from .modeling_metastone import MetaStoneForCausalLMWithSPRM

_ARCHITECTURES: dict[str, type[PreTrainedConfig]] = {"qwen2": Qwen2Config, "qwen3": Qwen3Config, "llama": LlamaConfig}


def tiny_text_config(architecture: str = "qwen2", **overrides: Any) -> PreTrainedConfig:
    """A small decoder config (``qwen2``, ``qwen3`` or ``llama``); ``overrides`` replace any field."""
    if architecture not in _ARCHITECTURES:
        raise ValueError(f"Unknown architecture {architecture!r}; choose one of {sorted(_ARCHITECTURES)}.")
    fields: dict[str, Any] = {
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    }
    if architecture == "qwen3":
        fields["head_dim"] = 16
    fields.update(overrides)
    return _ARCHITECTURES[architecture](**fields)


def tiny_metastone(
    architecture: str = "qwen2",
    seed: int = 0,
    text_overrides: dict[str, Any] | None = None,
    **sprm_kwargs: Any,
) -> MetaStoneForCausalLMWithSPRM:
    """A randomly initialised tiny MetaStone model in eval mode (deterministic for a given ``seed``)."""
    sprm_kwargs.setdefault("step_token_ids", [5])
    sprm_kwargs.setdefault("think_start_token_id", 6)
    sprm_kwargs.setdefault("think_end_token_id", 7)
    config = MetaStoneConfig(text_config=tiny_text_config(architecture, **(text_overrides or {})), **sprm_kwargs)
    torch.manual_seed(seed)
    model = MetaStoneForCausalLMWithSPRM(config)
    # A freshly initialised head gives logits ~1e-4; scale it so that scores differ visibly in tests.
    with torch.no_grad():
        for parameter in model.sprm_head.parameters():
            parameter.mul_(30.0)
    return model.eval()
