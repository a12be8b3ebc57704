"""Configuration of MetaStone-S1: a decoder LM backbone plus a self-supervised process reward (SPRM) head.

Self-contained on purpose: this file is copied into every saved checkpoint and must import with only
``torch`` and ``transformers`` installed.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Token ids of the DeepSeek-R1-Distill-Qwen tokenizer (the MetaStone-S1 1.5B/7B backbone):
# '.\n\n' -> 382 (the official step token), '<think>' -> 151648, '</think>' -> 151649.
DEFAULT_STEP_TOKEN_IDS = (382,)
DEFAULT_THINK_START_TOKEN_ID = 151648
DEFAULT_THINK_END_TOKEN_ID = 151649
DEFAULT_STEP_TEXT = ".\n\n"
DEFAULT_REASONING_EFFORT = {"low": 2, "medium": 8, "high": 32}


class MetaStoneConfig(PreTrainedConfig):
    r"""Configuration of [`MetaStoneForCausalLMWithSPRM`].

    The backbone is any Qwen2/Qwen3/Llama-style decoder config, stored as the sub-config ``text_config``;
    the remaining fields describe the SPRM head and the step segmentation.

    Args:
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the decoder backbone. A config object is deep-copied so that the new model never
            shares (and silently mutates) the config of a live model. Defaults to a Qwen2 config.
        sprm_feature_layer (`int`, defaults to -2):
            Index into the usual ``hidden_states`` tuple whose states feed the head: ``-2`` is the output
            of ``model.layers[-2]`` (the paper's choice); ``-1`` is the final, normed hidden state;
            ``i >= 1`` is the output of ``model.layers[i - 1]``.
        sprm_hidden_multiplier (`int`, defaults to 2):
            Width of the head's hidden layer as a multiple of ``hidden_size`` (paper: 2).
        sprm_dropout (`float`, defaults to 0.5):
            Dropout between the head's two linear layers (active only in training mode).
        step_token_ids (`list[int]`, *optional*):
            Token ids that end a reasoning step. Defaults to ``[382]``, what ``'.\n\n'`` encodes to with
            the Qwen2 / DeepSeek-R1-Distill tokenizers. Use [`MetaStoneConfig.sprm_token_ids_from_tokenizer`]
            for other tokenizers.
        think_start_token_id (`int`, *optional*):
            Id of ``<think>``. ``None`` means the tokenizer has no thinking span: the whole sequence is
            scored. Defaults to 151648.
        think_end_token_id (`int`, *optional*):
            Id of ``</think>``. ``None``: the span runs to the end of the sequence. Defaults to 151649.
        reasoning_effort_presets (`dict[str, int]`, *optional*):
            Number of Best-of-N candidates per effort level. Defaults to ``{"low": 2, "medium": 8, "high": 32}``.
        prompt_template (`str`, *optional*):
            How the model was trained to read a question: the whole model input, with ``{question}`` where the
            question goes (the CPU demo's models: ``"{question}<think>"``). The ``metastone`` commands build their
            prompts with it unless told otherwise. ``None`` (default): the tokenizer's chat template, then
            ``<think>``, as the DeepSeek-R1-Distill / MetaStone-S1 models are prompted.
        tie_word_embeddings (`bool`, *optional*):
            Whether ``lm_head`` shares the input embedding matrix. Defaults to the backbone's setting.
    """

    model_type = "metastone"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2")}

    text_config: dict | PreTrainedConfig | None = None
    sprm_feature_layer: int = -2
    sprm_hidden_multiplier: int = 2
    sprm_dropout: float = 0.5
    step_token_ids: list[int] | None = None
    think_start_token_id: int | None = DEFAULT_THINK_START_TOKEN_ID
    think_end_token_id: int | None = DEFAULT_THINK_END_TOKEN_ID
    reasoning_effort_presets: dict[str, int] | None = None
    tie_word_embeddings: bool | None = None
    prompt_template: str | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if isinstance(self.text_config, PreTrainedConfig):
            self.text_config = copy.deepcopy(self.text_config)
        elif self.text_config is not None and not isinstance(self.text_config, dict):
            raise TypeError(
                f"`text_config` must be a dict or a `PreTrainedConfig` (e.g. `Qwen2Config(...)`), "
                f"got {type(self.text_config).__name__}."
            )
        super().__post_init__(**kwargs)
        if self.step_token_ids is None:
            self.step_token_ids = list(DEFAULT_STEP_TOKEN_IDS)
        else:
            self.step_token_ids = [int(i) for i in self.step_token_ids]
        if self.reasoning_effort_presets is None:
            self.reasoning_effort_presets = dict(DEFAULT_REASONING_EFFORT)
        if self.tie_word_embeddings is None:
            self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        self.validate_sprm()

    @classmethod
    def get_config_dict(
        cls, pretrained_model_name_or_path: Any, **kwargs: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The checkpoint's config dict; a plain causal-LM config (e.g. a Qwen2 checkpoint) becomes the backbone.

        Without this, ``MetaStoneConfig.from_pretrained(<Qwen2 folder>)`` would read the Qwen2 fields as unknown
        top-level fields and fall back to a default-sized backbone.
        """
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        return wrap_backbone_config_dict(config_dict), kwargs

    # ------------------------------------------------------------------ validation
    def validate_sprm(self) -> None:
        """Check the backbone and the SPRM fields; raise ``ValueError`` naming the problem and the fix."""
        text = self.text_config
        if getattr(text, "is_encoder_decoder", False):
            raise ValueError(
                f"MetaStone needs a decoder-only causal LM backbone; `{text.model_type}` is an encoder-decoder "
                "model. Use a Qwen2, Qwen3 or Llama-style config."
            )
        for field in ("hidden_size", "num_hidden_layers", "vocab_size"):
            if getattr(text, field, None) is None:
                raise ValueError(
                    f"Backbone config `{text.model_type}` has no `{field}`: MetaStone needs a decoder LM config "
                    "(Qwen2, Qwen3, Llama-style) with `hidden_size`, `num_hidden_layers` and `vocab_size`."
                )
        self.feature_layer_index()  # raises when the backbone is too shallow for the feature layer
        if not isinstance(self.sprm_hidden_multiplier, int) or self.sprm_hidden_multiplier < 1:
            raise ValueError(f"`sprm_hidden_multiplier` must be a positive int, got {self.sprm_hidden_multiplier!r}.")
        if not 0.0 <= float(self.sprm_dropout) < 1.0:
            raise ValueError(f"`sprm_dropout` must be in [0, 1), got {self.sprm_dropout!r}.")
        if len(self.step_token_ids) == 0:
            raise ValueError(
                "`step_token_ids` is empty: give at least one token id that ends a reasoning step "
                "(for Qwen2 tokenizers `tokenizer.encode('.\\n\\n', add_special_tokens=False)` = [382])."
            )
        vocab = int(text.vocab_size)
        named_ids = {f"step_token_ids[{i}]": t for i, t in enumerate(self.step_token_ids)}
        named_ids["think_start_token_id"] = self.think_start_token_id
        named_ids["think_end_token_id"] = self.think_end_token_id
        for name, token_id in named_ids.items():
            if token_id is not None and not 0 <= int(token_id) < vocab:
                raise ValueError(
                    f"`{name}`={token_id} is outside the backbone vocabulary (vocab_size={vocab}). Pass the ids of "
                    "your tokenizer, e.g. `MetaStoneConfig.sprm_token_ids_from_tokenizer(tokenizer)`."
                )
        think_ids = {self.think_start_token_id, self.think_end_token_id} - {None}
        if think_ids & set(self.step_token_ids):
            raise ValueError("A step token id may not also be a `<think>`/`</think>` id.")
        if self.prompt_template is not None and (
            not isinstance(self.prompt_template, str) or "{question}" not in self.prompt_template
        ):
            raise ValueError(
                f"`prompt_template` must be a string holding `{{question}}` (e.g. '{{question}}<think>'), "
                f"got {self.prompt_template!r}."
            )
        presets = self.reasoning_effort_presets
        if not isinstance(presets, dict) or not presets:
            raise ValueError(f"`reasoning_effort_presets` must be a non-empty dict name -> N, got {presets!r}.")
        for name, n in presets.items():
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"`reasoning_effort_presets[{name!r}]` must be an int >= 1, got {n!r}.")

    def feature_layer_index(self) -> int:
        """Index into the ``hidden_states`` tuple (0 = embeddings, ``num_hidden_layers`` = final normed state)."""
        n_layers = int(self.text_config.num_hidden_layers)
        index = self.sprm_feature_layer if self.sprm_feature_layer >= 0 else n_layers + 1 + self.sprm_feature_layer
        if not 1 <= index <= n_layers:
            raise ValueError(
                f"`sprm_feature_layer`={self.sprm_feature_layer} does not select a decoder layer of a backbone with "
                f"{n_layers} layers (valid: -{n_layers}..-1 or 1..{n_layers}). The paper's -2 needs at least 2 layers."
            )
        return index

    @staticmethod
    def sprm_token_ids_from_tokenizer(
        tokenizer: Any,
        mode: str = "official",
        step_text: str | list[str] = DEFAULT_STEP_TEXT,
        think_start: str | None = "<think>",
        think_end: str | None = "</think>",
    ) -> dict[str, Any]:
        r"""Read the step and think token ids from a tokenizer; returns kwargs for ``MetaStoneConfig``.

        Args:
            tokenizer: the policy's tokenizer.
            mode: which tokens end a step.

                - ``"official"`` (default): the token(s) each ``step_text`` encodes to, as the official training and
                  scoring code does (``'.\n\n'`` -> ``[382]`` for DeepSeek-R1-Distill-Qwen). Each step text must
                  encode to exactly one token.
                - ``"paper"``: every vocabulary token whose text *contains* a ``step_text``, as the paper words it
                  ("tokens containing '.\n\n'": 46 tokens in the DeepSeek-R1 vocabulary, e.g. ``').\n\n'``).
                - ``"zh"``: the official scorer's Chinese mode: every token whose text is at most 3 characters,
                  contains ``'\n'`` or ``'。'`` and has at most one other character once that one is removed.

                In every mode consecutive step tokens count once (the first of the run), whichever ids they are.
            step_text: the step separator text(s) for ``"official"`` and ``"paper"`` (ignored by ``"zh"``).
            think_start / think_end: the thinking-span tokens. One the tokenizer lacks gets ``None``: the whole
                sequence is then scored.
        """
        if mode not in STEP_TOKEN_MODES:
            raise ValueError(
                f"Unknown step-token mode {mode!r}; choose one of {list(STEP_TOKEN_MODES)} "
                "(pass a step separator text as `step_text=`)."
            )
        texts = [step_text] if isinstance(step_text, str) else list(step_text)
        if mode == "official":
            step_ids = _single_token_ids(tokenizer, texts)
        else:
            token_texts = _vocabulary_texts(tokenizer)
            if mode == "paper":
                step_ids = [i for i, text in token_texts.items() if any(t in text for t in texts)]
            else:
                step_ids = [i for i, text in token_texts.items() if _is_zh_step_text(text)]
        if not step_ids:
            raise ValueError(f"No token of this tokenizer ends a step in mode {mode!r} (step_text={texts!r}).")

        vocab = tokenizer.get_vocab()

        def lookup(token: str | None) -> int | None:
            return None if token is None or token not in vocab else int(vocab[token])

        think_ids = {lookup(think_start), lookup(think_end)} - {None}
        return {
            "step_token_ids": sorted(set(step_ids) - think_ids),
            "think_start_token_id": lookup(think_start),
            "think_end_token_id": lookup(think_end),
        }


def wrap_backbone_config_dict(config_dict: dict[str, Any]) -> dict[str, Any]:
    """A MetaStone config dict as is; a plain decoder config dict as the ``text_config`` of a MetaStone one.

    The step and think token ids then keep their (DeepSeek-R1-Distill-Qwen) defaults; read them from the tokenizer
    with [`MetaStoneConfig.sprm_token_ids_from_tokenizer`] for another tokenizer.
    """
    model_type = config_dict.get("model_type")
    if model_type in (None, MetaStoneConfig.model_type) or "text_config" in config_dict:
        return config_dict
    logger.info("Using the `%s` config as the backbone (`text_config`) of a MetaStone config.", model_type)
    wrapped: dict[str, Any] = {"model_type": MetaStoneConfig.model_type, "text_config": dict(config_dict)}
    for key in ("tie_word_embeddings", "dtype", "torch_dtype", "pad_token_id", "eos_token_id", "bos_token_id"):
        if key in config_dict:
            wrapped[key] = config_dict[key]
    return wrapped


STEP_TOKEN_MODES = ("official", "paper", "zh")
_ZH_STEP_CHARACTERS = ("\n", "。")


def _single_token_ids(tokenizer: Any, texts: list[str]) -> list[int]:
    step_ids = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(
                f"Step text {text!r} encodes to {len(ids)} tokens {ids} with this tokenizer; the official step mask "
                "needs exactly one token per step text. Use `mode='paper'` (every token containing the text), add it "
                "as a token (`tokenizer.add_tokens([...])`) or pass `step_token_ids` yourself."
            )
        step_ids.append(int(ids[0]))
    return step_ids


def _vocabulary_texts(tokenizer: Any) -> dict[int, str]:
    """Decoded text of every token id of the vocabulary (added tokens included)."""
    ids = sorted(set(int(i) for i in tokenizer.get_vocab().values()))
    return dict(zip(ids, tokenizer.batch_decode([[i] for i in ids])))


def _is_zh_step_text(text: str) -> bool:
    return len(text) <= 3 and any(c in text and len(text.replace(c, "")) <= 1 for c in _ZH_STEP_CHARACTERS)


__all__ = ["STEP_TOKEN_MODES", "MetaStoneConfig"]
