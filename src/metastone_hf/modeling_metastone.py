"""MetaStone-S1: a causal LM whose backbone also feeds a self-supervised process reward model (SPRM) head.

The model is *flat* (``model``, ``lm_head``, ``sprm_head``) so its backbone tensor names equal those of
``Qwen2ForCausalLM`` and any Qwen/Llama-style checkpoint loads as is.

Self-contained on purpose: this file is copied into every saved checkpoint and imports only ``torch``,
``transformers`` and its sibling files.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.auto.auto_factory import _get_model_class
from transformers.utils import can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_metastone import MetaStoneConfig
from .generation_metastone import search_generate
from .scoring_metastone import (
    SPRMScores,
    build_sprm_scores,
    check_token_batch,
    eval_mode,
    execution_device,
    sprm_score_mask,
    sprm_step_token_mask,
    sprm_trajectory_log_scores,
)

logger = logging.get_logger(__name__)


@dataclass
class MetaStoneCausalLMOutputWithPast(CausalLMOutputWithPast):
    """Causal-LM output plus the SPRM head's logits from the same forward pass.

    Args:
        sprm_logits (`torch.FloatTensor` of shape `(batch_size, kept_positions)`):
            SPRM logit at every position kept by ``logits_to_keep``: the logit at ``t`` is the step score
            if token ``t + 1`` ends a step. ``sigmoid`` gives the score.
        sprm_score_mask (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            1 at the positions whose logit scores a step (official step mask), 0 elsewhere, when the whole sequence
            was given as ``input_ids`` (no cache prefix) and all positions were kept. An integer tensor, like every
            output of a transformers model (outputs are compared by subtraction); ``.bool()`` indexes with it.
    """

    sprm_logits: torch.FloatTensor | None = None
    sprm_score_mask: torch.LongTensor | None = None


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------


class MetaStoneSPRMHead(nn.Sequential):
    """``Linear(d, m*d) -> ReLU -> Dropout(p) -> Linear(m*d, 1)``: one logit per position.

    An ``nn.Sequential`` so its parameter names (``0.weight``, ``0.bias``, ``3.weight``, ``3.bias``) equal the
    official ``score_module.pt``. Parameters: ``2 m d^2 ... = 2d^2 + 4d + 1`` for ``m = 2``.

    Built in float32 whatever the default dtype: the head is trained at lr 1e-5 on weights of ~0.02, and bf16 has a
    spacing of ~8e-5 there, so a bf16 head would round most AdamW updates away.
    """

    def __init__(self, hidden_size: int, multiplier: int = 2, dropout: float = 0.5):
        width = hidden_size * multiplier
        super().__init__(
            nn.Linear(hidden_size, width, dtype=torch.float32),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(width, 1, dtype=torch.float32),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return super().forward(features).squeeze(-1)


class MetaStonePreTrainedModel(PreTrainedModel):
    config_class = MetaStoneConfig
    config: MetaStoneConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # Plain decoding (`generate` without Best-of-N) does not run the head, so its forward has no hook to trace.
    _can_compile_fullgraph = True
    # The head keeps float32 weights when the backbone is loaded in bf16/fp16 (see `MetaStoneSPRMHead`). The
    # transformers quantizers that quantize at load through `get_modules_to_not_convert` (bitsandbytes, torchao,
    # quanto, and most others) also leave the modules named in `_keep_in_fp32_modules` unconverted, whatever their own
    # `modules_to_not_convert` says, so the head (~0.3% of the weights, trained at lr 1e-5) is not quantized. The few
    # that pick modules otherwise (HQQ's `skip_modules`, pre-quantized GPTQ/AQLM/... checkpoints) are caught by the
    # check at the end of `from_pretrained`, which warns when the head's parameters are not plain float32.
    _keep_in_fp32_modules = ["sprm_head"]
    _keep_in_fp32_modules_strict = ["sprm_head"]

    @staticmethod
    def import_backbone_class(config: PreTrainedConfig | None) -> type[nn.Module] | None:
        """Resolve (and so import) the class ``AutoModel`` builds for ``config.text_config``; ``None`` if unknown.

        transformers builds a model inside its initialisation contexts, DeepSpeed ZeRO-3's ``zero.Init`` among them.
        ``zero.Init`` wraps the ``__init__`` of every module class created while it is active and restores the
        ``__init__`` it saw at class creation when it exits. A class decorator that replaces ``__init__`` after the
        class is created (``kernels``' ``use_kernelized_func`` on the attention classes) is then undone for good,
        while the ``forward`` it replaced stays: every backbone built afterwards (a resumed trainer, GRPO's reference
        model) fails. ``AutoModelForCausalLM`` never meets this because it resolves the class before building it;
        MetaStone builds its backbone inside ``__init__``, so its classes resolve the backbone first as well.
        """
        text_config = getattr(config, "text_config", None)
        if text_config is None or type(text_config) not in AutoModel._model_mapping:
            return None  # AutoModel.from_config raises its own error in __init__
        return _get_model_class(text_config, AutoModel._model_mapping)

    @classmethod
    def get_init_context(cls, *args: Any, **kwargs: Any) -> list:
        config = kwargs.get("config", next((a for a in args if isinstance(a, PreTrainedConfig)), None))
        cls.import_backbone_class(config)
        return super().get_init_context(*args, **kwargs)

    @classmethod
    def _from_config(cls, config: MetaStoneConfig, **kwargs: Any) -> MetaStonePreTrainedModel:
        cls.import_backbone_class(config)
        return super()._from_config(config, **kwargs)


class MetaStoneForCausalLMWithSPRM(MetaStonePreTrainedModel, GenerationMixin):
    """Policy LM and SPRM head on one backbone.

    ``forward`` returns the usual causal-LM output plus ``sprm_logits`` computed from the feature layer of
    the *same* forward pass (a forward hook keeps only that layer's output, never all hidden states).
    ``generate`` without Best-of-N arguments is exactly transformers' ``generate``.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # The plans of Qwen2/Qwen3/LlamaForCausalLM for `lm_head`; the backbone brings its own (`model.*`). The SPRM head
    # is small and reads the feature layer's output, which is whole (not sharded) under these plans: it is replicated.
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}
    _fsdp_plan = {"lm_head": "keep_full_weight"}

    def __init__(self, config: MetaStoneConfig):
        super().__init__(config)
        self.model = AutoModel.from_config(config.text_config)
        self._no_split_modules = list(getattr(self.model, "_no_split_modules", None) or [])
        text = config.text_config
        self.vocab_size = text.vocab_size
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.sprm_head = MetaStoneSPRMHead(text.hidden_size, config.sprm_hidden_multiplier, config.sprm_dropout)
        # transformers records one auto class per model class; AutoModel must resolve to this class too.
        auto_map = dict(getattr(config, "auto_map", None) or {})
        auto_map.setdefault("AutoModel", "modeling_metastone.MetaStoneForCausalLMWithSPRM")
        config.auto_map = auto_map
        self.post_init()

    # ------------------------------------------------------------------ plumbing
    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings

    def get_decoder(self) -> nn.Module:
        return self.model

    @property
    def sprm_feature_module(self) -> nn.Module:
        """The module whose output feeds the head: ``model.layers[index - 1]``, or the final norm for ``-1``."""
        index = self.config.feature_layer_index()
        if index == self.config.text_config.num_hidden_layers:
            return self.model.norm
        return self.model.layers[index - 1]

    @contextlib.contextmanager
    def capture_sprm_features(self) -> Iterator[list[torch.Tensor]]:
        """Collect the feature-layer output of every forward run inside the block (a forward hook).

        This is how training reads the head's features from the policy's own forward (e.g. TRL's fused
        log-prob path) without a second pass. With gradient checkpointing the hook still fires once per forward:
        the recompute during ``backward`` runs the layer's ``forward``, not its hooks.
        """
        captured: list[torch.Tensor] = []
        module = self.sprm_feature_module

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured.append(output[0] if isinstance(output, tuple) else output)

        handle = module.register_forward_hook(hook)
        try:
            yield captured
        finally:
            handle.remove()

    def sprm_logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Head logits ``[...]`` for features ``[..., d]`` (the head runs in its own parameter dtype)."""
        head_dtype = next(self.sprm_head.parameters()).dtype  # works when PEFT wraps the head, too
        return self.sprm_head(features.to(head_dtype))

    # ------------------------------------------------------------------ forward
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Any | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_sprm_logits: bool = True,
        **kwargs: Any,
    ) -> MetaStoneCausalLMOutputWithPast:
        r"""Causal-LM forward plus SPRM logits.

        Args:
            return_sprm_logits: compute the head on the positions kept by ``logits_to_keep`` (default). The
                head is ~0.4% of a 7B forward. ``labels`` give the LM loss alone, which never reaches the head: for
                LM-loss-only training (SFT, DPO) freeze the head (``sprm_head.requires_grad_(False)``), or
                distributed data parallel stops on a trainable parameter without a gradient and weight decay
                shrinks the head.
            Other arguments: as ``Qwen2ForCausalLM.forward``.
        """
        backbone_inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "cache": cache,
            "inputs_embeds": inputs_embeds,
            "use_cache": use_cache,
            **kwargs,
        }
        if return_sprm_logits:
            with self.capture_sprm_features() as captured:
                outputs = self.model(**backbone_inputs)
        else:
            outputs = self.model(**backbone_inputs)
        hidden_states = outputs.last_hidden_state
        logits = self.lm_head(slice_logits_to_keep(hidden_states, logits_to_keep))

        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )

        sprm_logits = score_mask = None
        if return_sprm_logits:
            sprm_logits = self.sprm_logits_from_features(slice_logits_to_keep(captured[-1], logits_to_keep))
            all_positions_kept = isinstance(logits_to_keep, int) and logits_to_keep == 0
            if input_ids is not None and all_positions_kept and _no_cached_prefix(outputs.cache, input_ids):
                score_mask = self.sprm_score_mask(input_ids, attention_mask).long()

        return MetaStoneCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            sprm_logits=sprm_logits,
            sprm_score_mask=score_mask,
        )

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: Any | None = None,
        attention_mask: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """transformers' inputs for a decoding step; plain decoding skips the SPRM head (no hook, compilable).

        The signature is transformers' own, so ``generate`` sees that ``inputs_embeds`` is forwarded (PEFT prompt
        and prefix tuning, multimodal wrappers). The search engine's forwards pass ``return_sprm_logits=False`` too:
        they capture the feature layer and run the head only on the rows whose new token is a step token.
        """
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            cache=cache,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        model_inputs.setdefault("return_sprm_logits", False)
        return model_inputs

    # ------------------------------------------------------------------ scoring
    def sprm_score_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, T]`` positions whose SPRM logit scores a step, with this model's step/think token ids."""
        step_mask = sprm_step_token_mask(
            input_ids,
            self.config.step_token_ids,
            self.config.think_start_token_id,
            self.config.think_end_token_id,
            attention_mask,
        )
        return sprm_score_mask(step_mask)

    @torch.no_grad()
    def score_trajectories(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        batch_size: int | None = None,
    ) -> SPRMScores:
        """Score whole trajectories (prompt + completion) with the SPRM head in one forward each.

        Works with left or right padding; batched results equal one-by-one results. The head always runs
        without dropout here, whatever the model's train/eval mode.

        Args:
            input_ids: ``[B, T]`` or ``[T]`` token ids.
            attention_mask: ``[B, T]``, 1 for real tokens; defaults to all ones.
            batch_size: score at most this many rows per forward (memory bound); default all at once.
        """
        input_ids, attention_mask = check_token_batch(input_ids, attention_mask, self.config.text_config.vocab_size)
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"`batch_size` must be an int >= 1 (rows per forward) or None, got {batch_size!r}.")
        max_positions = getattr(self.config.text_config, "max_position_embeddings", None)
        if max_positions is not None and input_ids.shape[1] > max_positions:
            raise ValueError(
                f"Trajectories of {input_ids.shape[1]} tokens exceed the backbone's context window "
                f"(max_position_embeddings={max_positions}); truncate them or use a longer-context backbone."
            )
        device = execution_device(self)
        input_ids = input_ids.to(device)
        attention_mask = attention_mask.to(device)
        chunk = batch_size or input_ids.shape[0]
        logits_chunks = []
        with eval_mode(self):
            for start in range(0, input_ids.shape[0], chunk):
                ids = input_ids[start : start + chunk]
                mask = attention_mask[start : start + chunk]
                position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
                with self.capture_sprm_features() as captured:
                    self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
                logits_chunks.append(self.sprm_logits_from_features(captured[-1]).float())
        step_logits = torch.cat(logits_chunks, dim=0)
        return build_sprm_scores(step_logits, self.sprm_score_mask(input_ids, attention_mask))

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        *args: Any,
        search: str | None = None,
        reasoning_effort: str | None = None,
        num_candidates: int | None = None,
        beam_width: int | None = None,
        ranking: str | None = None,
        selection: str | Any | None = None,
        answer_extractor: Any | None = None,
        prune_threshold: float | None = None,
        prune_top_k: int | None = None,
        prune_min_steps: int | None = None,
        remove_stopped_rows: bool | None = None,
        progress_bar: bool | None = None,
        seed: int | None = None,
        adaptive: Any | None = None,
        **kwargs: Any,
    ) -> Any:
        r"""transformers' ``generate``, plus test-time search guided by the SPRM head (Best-of-N, beam, DVTS).

        Without ``search``, ``reasoning_effort`` and ``num_candidates`` this is exactly
        ``GenerationMixin.generate(*args, **kwargs)`` (TRL rollouts rely on it). With any of them it returns N
        candidates per prompt, each step scored online by the head in the forward that wrote it, and the chosen one
        (a ``SearchOutput``); every argument is documented in ``generation_metastone.SearchConfig``.

        Args:
            search: ``"best_of_n"`` (default), ``"beam"`` (beam search over steps) or ``"dvts"``.
            reasoning_effort: ``"low"`` / ``"medium"`` / ``"high"`` -> N from ``config.reasoning_effort_presets``.
            num_candidates: N candidates per prompt (>= 1).
            beam_width: M, the children each kept beam expands into: beam search keeps N/M beams per step, DVTS
                runs N/M subtrees (search-and-learn's meaning).
            ranking: ``"mean"`` (running geometric mean, default) or ``"last"`` (last step's score) between beams.
            selection: ``"sprm"`` (default), ``"sprm_vote"``, ``"majority"`` or a callable.
            answer_extractor: decoded completion -> answer (voting); default: last ``\boxed{}`` via math-verify.
            prune_threshold / prune_top_k / prune_min_steps: opt-in SPRM-guided early stopping (Best-of-N).
            remove_stopped_rows: stopped rows leave the batch and the cache (default True).
            progress_bar: tqdm bar over sampled tokens (default off, like transformers' ``generate``).
            seed: seed this call's sampling (the caller's RNG state is restored).
            adaptive: opt-in adaptive compute for Best-of-N (``AdaptiveConfig``, a dict of its fields, or
                ``"sprm"`` / ``"confidence"``): warm-up threshold, early stopping, consensus.
        """
        options = {
            "beam_width": beam_width,
            "ranking": ranking,
            "selection": selection,
            "answer_extractor": answer_extractor,
            "prune_threshold": prune_threshold,
            "prune_top_k": prune_top_k,
            "prune_min_steps": prune_min_steps,
            "remove_stopped_rows": remove_stopped_rows,
            "progress_bar": progress_bar,
            "seed": seed,
            "adaptive": adaptive,
        }
        options = {name: value for name, value in options.items() if value is not None}
        if search is None and reasoning_effort is None and num_candidates is None:
            if options:
                raise ValueError(
                    f"{sorted(options)} only apply to search generation: also pass `num_candidates=N` or "
                    "`reasoning_effort=` ('low', 'medium', 'high'), and `search=` for a step-level search."
                )
            return super().generate(*args, **kwargs)
        if reasoning_effort is None and num_candidates is None:
            reasoning_effort = "medium"
        return search_generate(
            self,
            *args,
            search=search or "best_of_n",
            reasoning_effort=reasoning_effort,
            num_candidates=num_candidates,
            **options,
            **kwargs,
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, *args: Any, sprm_head_may_be_missing: bool = False, **kwargs: Any) -> Any:
        """``PreTrainedModel.from_pretrained``, refusing a checkpoint that lacks the SPRM head weights.

        A silently re-initialised head would score at random. To wrap a plain causal LM checkpoint with a
        fresh head use [`from_backbone`] (or pass ``sprm_head_may_be_missing=True``).
        """
        if args and kwargs.get("config") is None and not sprm_head_may_be_missing:
            _refuse_plain_causal_lm(args[0], kwargs)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing = sorted(k for k in info.get("missing_keys", ()) if k.startswith("sprm_head."))
        if missing and not sprm_head_may_be_missing:
            raise ValueError(
                f"The checkpoint has no SPRM head weights (missing {missing}); the head would score at random. "
                "To add a fresh head to a plain causal LM use `MetaStoneForCausalLMWithSPRM.from_backbone(path)`, "
                "or convert an official release (with score_module.pt) with `metastone convert`."
            )
        quantized = model.quantized_sprm_head_parameters()
        if quantized:
            logger.warning(
                "The SPRM head was quantized (%s): its scores will drift from the float32 head's. The head is kept out "
                "of transformers' quantizers; load without a quantizer that overrides that, or quantize the backbone "
                "only (e.g. skip `sprm_head` in your quantization recipe).",
                ", ".join(quantized),
            )
        return (model, info) if want_info else model

    def quantized_sprm_head_parameters(self) -> list[str]:
        """Names of the head's parameters that are not plain float32 tensors (quantized, e.g. int8 or a tensor
        subclass of a quantization library); empty for a head as it should be."""
        return [
            name
            for name, parameter in self.sprm_head.named_parameters()
            if parameter.dtype != torch.float32
            or type(parameter.data).__name__ not in ("Tensor", "DTensor")  # a quantization library's subclass
        ]

    @classmethod
    def from_backbone(
        cls,
        backbone: str | PreTrainedModel,
        tokenizer: Any | None = None,
        step_mode: str = "official",
        **sprm_kwargs: Any,
    ) -> MetaStoneForCausalLMWithSPRM:
        """Wrap an existing causal LM (a path/Hub id or a loaded model) with a freshly initialised SPRM head.

        Backbone and LM-head weights are used as they are, in their dtype; the head is float32. ``sprm_kwargs`` go
        to [`MetaStoneConfig`] (``sprm_feature_layer``, ``step_token_ids``, ...); with ``tokenizer`` the step and
        think ids are read from it, the step tokens chosen by ``step_mode`` (``"official"``, ``"paper"`` or
        ``"zh"``, see ``MetaStoneConfig.sprm_token_ids_from_tokenizer``). Loading kwargs such as ``dtype`` apply
        when ``backbone`` is a path.
        """
        load_kwargs = {k: sprm_kwargs.pop(k) for k in _LOAD_KWARGS if k in sprm_kwargs}
        if tokenizer is not None:
            for key, value in MetaStoneConfig.sprm_token_ids_from_tokenizer(tokenizer, mode=step_mode).items():
                sprm_kwargs.setdefault(key, value)
        elif step_mode != "official":
            raise ValueError(f"`step_mode={step_mode!r}` reads the step tokens from a tokenizer: pass `tokenizer=`.")
        if isinstance(backbone, (str, bytes)) or hasattr(backbone, "__fspath__"):
            text_config = AutoConfig.from_pretrained(
                backbone, trust_remote_code=load_kwargs.get("trust_remote_code", False)
            )
            if isinstance(text_config, MetaStoneConfig):
                raise ValueError(f"{backbone} is already a MetaStone checkpoint; load it with `from_pretrained`.")
            config = MetaStoneConfig(text_config=text_config.to_dict(), **sprm_kwargs)
            return cls.from_pretrained(backbone, config=config, sprm_head_may_be_missing=True, **load_kwargs)
        if not isinstance(backbone, PreTrainedModel) or not hasattr(backbone, "lm_head"):
            raise TypeError(
                "`backbone` must be a path/Hub id or a loaded causal LM with `.model` and `.lm_head` "
                f"(e.g. Qwen2ForCausalLM); got {type(backbone).__name__}."
            )
        if isinstance(backbone, MetaStoneForCausalLMWithSPRM):
            raise ValueError("`backbone` is already a MetaStone model.")
        config = MetaStoneConfig(text_config=copy.deepcopy(backbone.config), **sprm_kwargs)
        config.tie_word_embeddings = bool(getattr(backbone.config, "tie_word_embeddings", False))
        with torch.device("meta"):
            wrapped = cls(config)
        wrapped.model = backbone.model
        wrapped.lm_head = backbone.lm_head
        reference = backbone.lm_head.weight
        head = MetaStoneSPRMHead(config.text_config.hidden_size, config.sprm_hidden_multiplier, config.sprm_dropout)
        wrapped.sprm_head = head.to(device=reference.device)
        wrapped._init_sprm_head()
        if getattr(backbone, "generation_config", None) is not None:
            wrapped.generation_config = copy.deepcopy(backbone.generation_config)
        return wrapped

    def _init_sprm_head(self) -> None:
        std = getattr(self.config.text_config, "initializer_range", 0.02) or 0.02
        for module in self.sprm_head:
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                nn.init.zeros_(module.bias)


def _refuse_plain_causal_lm(path: Any, kwargs: dict[str, Any]) -> None:
    """Fail before anything is allocated when ``path`` holds a plain causal LM (its head would be random)."""
    if isinstance(path, PreTrainedConfig) or path is None:
        return
    hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    config_dict, _ = PreTrainedConfig.get_config_dict(path, **hub_kwargs)
    model_type = config_dict.get("model_type")
    if model_type in (None, MetaStoneConfig.model_type):
        return
    raise ValueError(
        f"{path} is a plain `{model_type}` checkpoint, not a MetaStone one: it has no SPRM head, which would score at "
        f"random. Wrap it with a fresh head with `MetaStoneForCausalLMWithSPRM.from_backbone({str(path)!r}, "
        "tokenizer=tokenizer)`, or convert an official MetaStone-S1 release (with score_module.pt) with "
        "`metastone convert`."
    )


_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


def _no_cached_prefix(cache: Any, input_ids: torch.Tensor) -> bool:
    """True when ``input_ids`` is the whole sequence (no earlier tokens held in the cache)."""
    return cache is None or cache.get_seq_length() == input_ids.shape[1]


_LOAD_KWARGS = ("dtype", "device_map", "attn_implementation", "trust_remote_code", "revision", "token", "cache_dir")


MetaStoneConfig.register_for_auto_class()
MetaStoneForCausalLMWithSPRM.register_for_auto_class("AutoModel")
MetaStoneForCausalLMWithSPRM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "check_token_batch",
    "MetaStoneCausalLMOutputWithPast",
    "MetaStoneForCausalLMWithSPRM",
    "MetaStonePreTrainedModel",
    "MetaStoneSPRMHead",
    "SPRMScores",
    "build_sprm_scores",
    "sprm_score_mask",
    "sprm_step_token_mask",
    "sprm_trajectory_log_scores",
]
