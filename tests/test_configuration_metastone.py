"""MetaStoneConfig: defaults, round trip, and clear errors for bad values."""

from __future__ import annotations

import pytest
from transformers import AutoConfig, T5Config

from metastone_hf import MetaStoneConfig
from metastone_hf.tiny import tiny_text_config

IDS = {"step_token_ids": [5], "think_start_token_id": 6, "think_end_token_id": 7}


def test_defaults_are_the_papers():
    config = MetaStoneConfig()
    assert config.text_config.model_type == "qwen2"
    assert config.step_token_ids == [382]
    assert (config.think_start_token_id, config.think_end_token_id) == (151648, 151649)
    assert config.sprm_feature_layer == -2 and config.sprm_hidden_multiplier == 2 and config.sprm_dropout == 0.5
    assert config.reasoning_effort_presets == {"low": 2, "medium": 8, "high": 32}


def test_round_trip_through_json(tmp_path):
    config = MetaStoneConfig(text_config=tiny_text_config("llama"), sprm_dropout=0.1, **IDS)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, MetaStoneConfig)
    assert loaded.text_config.model_type == "llama"
    assert {k: v for k, v in loaded.to_dict().items() if k != "_name_or_path"} == {
        k: v for k, v in config.to_dict().items() if k != "_name_or_path"
    }


def test_token_ids_from_tokenizer(real_tokenizer):
    ids = MetaStoneConfig.sprm_token_ids_from_tokenizer(real_tokenizer)
    assert ids == {"step_token_ids": [382], "think_start_token_id": 151648, "think_end_token_id": 151649}
    with pytest.raises(ValueError, match=r"encodes to \d+ tokens"):
        MetaStoneConfig.sprm_token_ids_from_tokenizer(real_tokenizer, step_text="Step one:")
    assert (
        MetaStoneConfig.sprm_token_ids_from_tokenizer(real_tokenizer, think_start="<nope>")["think_start_token_id"]
        is None
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sprm_feature_layer": -5}, "does not select a decoder layer"),
        ({"sprm_feature_layer": 9}, "does not select a decoder layer"),
        ({"sprm_hidden_multiplier": 0}, "positive int"),
        ({"sprm_dropout": 1.0}, r"\[0, 1\)"),
        ({"step_token_ids": []}, "empty"),
        ({"step_token_ids": [100000]}, "outside the backbone vocabulary"),
        ({"think_start_token_id": 5}, "may not also be"),
        ({"reasoning_effort_presets": {"low": 0}}, ">= 1"),
        ({"text_config": 3}, "must be a dict or a `PreTrainedConfig`"),
    ],
)
def test_bad_values_are_refused_with_a_clear_message(kwargs, message):
    fields = {"text_config": tiny_text_config(), **IDS, **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):
        MetaStoneConfig(**fields)


def test_encoder_decoder_backbone_is_refused():
    with pytest.raises(ValueError, match="decoder-only"):
        MetaStoneConfig(text_config=T5Config(), **IDS)


def test_one_layer_backbone_cannot_feed_layer_minus_two():
    with pytest.raises(ValueError, match="needs at least 2 layers"):
        MetaStoneConfig(text_config=tiny_text_config(num_hidden_layers=1), **IDS)


def test_paper_mode_takes_every_token_containing_the_step_text(real_tokenizer):
    ids = MetaStoneConfig.sprm_token_ids_from_tokenizer(real_tokenizer, mode="paper")
    # Independent of decoding: in the byte-level vocabulary '\n' is spelled 'Ċ'.
    expected = sorted(i for token, i in real_tokenizer.get_vocab().items() if ".ĊĊ" in token)
    assert ids["step_token_ids"] == expected
    assert len(expected) == 46 and 382 in expected
    assert real_tokenizer.convert_tokens_to_ids(").ĊĊ") in expected
    assert (ids["think_start_token_id"], ids["think_end_token_id"]) == (151648, 151649)


def test_zh_mode_equals_the_official_scorers_chinese_tokens(real_tokenizer):
    # The official scoring server's loop, as written there.
    official = []
    for token in real_tokenizer.get_vocab():
        token_id = real_tokenizer.convert_tokens_to_ids([token])[0]
        decoded = real_tokenizer.decode([token_id])
        for char in ["\n", "。"]:
            if char in decoded and len(decoded.replace(char, "")) <= 1 and len(decoded) <= 3:
                official.append(token_id)
                break
    ids = MetaStoneConfig.sprm_token_ids_from_tokenizer(real_tokenizer, mode="zh")
    assert ids["step_token_ids"] == sorted(official)
    assert 382 in official and real_tokenizer.convert_tokens_to_ids("ãĢĤ") in official  # '.\n\n' and '。'


def test_unknown_step_mode_is_refused(real_tokenizer):
    with pytest.raises(ValueError, match="Unknown step-token mode"):
        MetaStoneConfig.sprm_token_ids_from_tokenizer(real_tokenizer, ".\n\n")
    with pytest.raises(ValueError, match="No token of this tokenizer"):
        MetaStoneConfig.sprm_token_ids_from_tokenizer(real_tokenizer, mode="paper", step_text="§§§never§§§")
