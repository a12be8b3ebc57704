"""Training MetaStone-S1 with TRL: the SPR loss and a GRPO trainer that adds it.

* :func:`sprm_loss`: the self-supervised process reward loss (paper defaults, every knob an argument).
* :class:`SPRMGRPOConfig` / :class:`SPRMGRPOTrainer`: TRL's GRPO plus the SPR loss from the same forward pass.
"""

from ..lora import sprm_peft_config
from .loss import (
    STAT_KEYS,
    SPRLossOutput,
    grad_scaled_features,
    sprm_loss,
    sprm_metrics_from_stats,
    stack_stats,
)
from .trainer import SPRMGRPOConfig, SPRMGRPOTrainer

__all__ = [
    "STAT_KEYS",
    "SPRLossOutput",
    "SPRMGRPOConfig",
    "SPRMGRPOTrainer",
    "grad_scaled_features",
    "sprm_loss",
    "sprm_metrics_from_stats",
    "sprm_peft_config",
    "stack_stats",
]
