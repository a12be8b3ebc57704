"""metastone-hf: MetaStone-S1 (policy + self-supervised process reward head) for Hugging Face Transformers."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_metastone import MetaStoneConfig
from .generation_metastone import AdaptiveConfig, SearchConfig, search_generate
from .modeling_metastone import (
    MetaStoneCausalLMOutputWithPast,
    MetaStoneForCausalLMWithSPRM,
    MetaStoneSPRMHead,
    SPRMScores,
    sprm_score_mask,
    sprm_step_token_mask,
    sprm_trajectory_log_scores,
)
from .search_output_metastone import SearchOutput
from .selection_metastone import extract_boxed_answer

AutoConfig.register("metastone", MetaStoneConfig, exist_ok=True)
AutoModel.register(MetaStoneConfig, MetaStoneForCausalLMWithSPRM, exist_ok=True)
AutoModelForCausalLM.register(MetaStoneConfig, MetaStoneForCausalLMWithSPRM, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "AdaptiveConfig",
    "MetaStoneCausalLMOutputWithPast",
    "MetaStoneConfig",
    "MetaStoneForCausalLMWithSPRM",
    "MetaStoneSPRMHead",
    "SPRMScores",
    "SearchConfig",
    "SearchOutput",
    "extract_boxed_answer",
    "search_generate",
    "sprm_score_mask",
    "sprm_step_token_mask",
    "sprm_trajectory_log_scores",
]
