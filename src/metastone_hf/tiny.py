"""Tiny backbones built from configs, for tests, benchmarks and CPU demos (nothing is downloaded)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import LlamaConfig, PreTrainedConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen3Config

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


# Words of the tiny tokenizer besides single characters: enough for synthetic tasks and GSM8K-style prompts.
_TINY_WORDS = (
    "the a an of to and or in is are was be it that this for on with as at by from not no yes so then "
    "if we he she they you I how many much what which who when where why total each per every all some "
    "more less than left after before has have had make makes made get gets got give gives gave buy buys "
    "bought sell sells sold pay pays paid cost costs spend spends spent day days week weeks month months year "
    "years hour hours minute minutes dollar dollars cent cents money price times half twice number numbers "
    "answer question step steps first second third next last final therefore thus let us find compute add "
    "subtract multiply divide sum difference product plus minus equals equal result people person friends "
    "apples eggs books students boxes cars miles feet water cups pages games sum correct wrong true false "
    "Question Answer User Assistant System Please reason put your within boxed think So Then First Next "
    "Therefore Let The We If"
)


def tiny_tokenizer(extra_words: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """A small in-memory ``PreTrainedTokenizerFast`` for tests, benchmarks and CPU demos (nothing is downloaded).

    Model: WordPiece over single characters (ASCII letters, digits, punctuation, space, newline) plus a few
    hundred common words and ``extra_words``; a word outside the vocabulary falls back to its characters, so
    any ASCII text round-trips through ``encode``/``decode``. Added tokens: ``<think>`` and ``</think>``
    (not special, so they survive ``skip_special_tokens=True`` like in the DeepSeek-R1 tokenizers), the step
    text ``".\\n\\n"`` (exactly one token) and the special ``<pad>``, ``<eos>``, ``<unk>``. Left padding. The
    chat template renders ``Role: content`` lines and, with ``add_generation_prompt``, ``Assistant: <think>\\n``.

    Use ``MetaStoneConfig.sprm_token_ids_from_tokenizer(tok)`` and ``vocab_size=len(tok)`` to build a matching
    model, e.g. with [`tiny_metastone_for_tokenizer`].
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<eos>", "<unk>"]
    chars = [chr(c) for c in range(33, 127)] + [" ", "\n"]
    words = [w for w in dict.fromkeys([*_TINY_WORDS.split(), *extra_words]) if len(w) > 1]
    vocab: dict[str, int] = {}
    for token in [*specials, *chars, *words]:
        vocab.setdefault(token, len(vocab))
    model = models.WordPiece(vocab=vocab, unk_token="<unk>", continuing_subword_prefix="", max_input_chars_per_word=64)
    backend = Tokenizer(model)
    # Letter runs stay whole (looked up as words, else split into characters); everything else is one char each.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[A-Za-z]+|[^A-Za-z]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
        chat_template=_TINY_CHAT_TEMPLATE,
    )
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in ("<think>", "</think>", ".\n\n")])
    return tokenizer


_TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant: <think>\n{% endif %}"
)


def tiny_metastone_for_tokenizer(
    tokenizer: Any,
    architecture: str = "qwen2",
    seed: int = 0,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    text_overrides: dict[str, Any] | None = None,
    **sprm_kwargs: Any,
) -> MetaStoneForCausalLMWithSPRM:
    """A tiny MetaStone model (default init, head *not* rescaled) whose vocab, step and think ids match ``tokenizer``.

    ``text_overrides`` replace any backbone config field (heads, widths, ``tie_word_embeddings``, ...). The
    generation config gets the tokenizer's eos/pad ids. Returned in train mode, ready for a trainer.
    """
    for key, value in MetaStoneConfig.sprm_token_ids_from_tokenizer(tokenizer).items():
        sprm_kwargs.setdefault(key, value)
    fields: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        **({"head_dim": hidden_size // 4} if architecture == "qwen3" else {}),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        **(text_overrides or {}),
    }
    text = tiny_text_config(architecture, **fields)
    config = MetaStoneConfig(text_config=text, **sprm_kwargs)
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = MetaStoneForCausalLMWithSPRM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.train()


def save_tiny_checkpoint(path: str, seed: int = 0, **model_kwargs: Any) -> str:
    """Save a tiny random MetaStone model plus :func:`tiny_tokenizer` to ``path`` (a loadable checkpoint).

    The checkpoint carries the remote code (``auto_map``), so ``trust_remote_code=True`` loads it without
    ``metastone_hf`` installed, e.g. ``trl grpo --model_name_or_path PATH --trust_remote_code``. Returns ``path``.
    ``model_kwargs`` go to :func:`tiny_metastone_for_tokenizer` (``hidden_size``, ``num_hidden_layers``, ...).
    """
    tokenizer = tiny_tokenizer()
    model = tiny_metastone_for_tokenizer(tokenizer, seed=seed, **model_kwargs)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
