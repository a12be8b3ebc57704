"""Bad inputs to the core get a clear error or a documented, tested behaviour (see docs/bad_inputs.md)."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from conftest import END_THINK, STEP, THINK
from transformers import AutoModel, Qwen2ForCausalLM

from metastone_hf import MetaStoneConfig, MetaStoneForCausalLMWithSPRM
from metastone_hf.tiny import tiny_metastone, tiny_text_config


def test_empty_or_malformed_trajectories_are_refused():
    model = tiny_metastone()
    with pytest.raises(ValueError, match="non-empty"):
        model.score_trajectories(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="non-empty"):
        model.score_trajectories(torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="differs from `input_ids` shape"):
        model.score_trajectories(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 4))


def test_trajectory_longer_than_context_window_is_refused():
    model = tiny_metastone(text_overrides={"max_position_embeddings": 32})
    with pytest.raises(ValueError, match="exceed the backbone's context window"):
        model.score_trajectories(torch.ones(1, 40, dtype=torch.long))


def test_trajectory_without_steps_scores_zero():
    model = tiny_metastone()
    result = model.score_trajectories(torch.tensor([[1, THINK, 9, 10, END_THINK, 11], [1, THINK, 9, STEP, 10, 12]]))
    assert result.num_steps.tolist() == [0, 1]
    assert result.scores[0].item() == 0.0 and result.log_scores[0].item() == float("-inf")
    assert result.step_scores[0].numel() == 0 and result.scores[1].item() > 0


def test_nan_features_give_nan_score_and_a_warning(caplog):
    model = tiny_metastone()
    with torch.no_grad():
        model.model.embed_tokens.weight[99] = float("nan")  # token 99 poisons every later position
    ids = torch.tensor([[1, THINK, 9, STEP, 99, 10, STEP], [1, THINK, 9, STEP, 11, 10, STEP]])
    with caplog.at_level(logging.WARNING):
        result = model.score_trajectories(ids)
    assert math.isnan(result.scores[0].item()) and not math.isnan(result.scores[1].item())
    assert "Non-finite SPRM logits" in caplog.text and "[0]" in caplog.text


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_two_thousand_steps_in_half_precision_do_not_underflow(dtype):
    model = tiny_metastone(seed=3, text_overrides={"max_position_embeddings": 8192})
    body = [9, 10, STEP] * 2000
    ids = torch.tensor([[1, THINK, *body, END_THINK]])
    reference = model.score_trajectories(ids)
    half = model.to(dtype).score_trajectories(ids)
    assert half.num_steps.item() == 2000
    assert half.scores.item() > 0 and abs(half.scores.item() - reference.scores.item()) < 0.05
    # the literal product of 2000 step scores would underflow to exactly 0 in any float type
    assert torch.prod(reference.step_scores[0].to(dtype)).item() == 0.0


def test_head_width_mismatch_on_load_is_an_error(tmp_path):
    tiny_metastone().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["sprm_hidden_multiplier"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModel.from_pretrained(tmp_path)


def test_checkpoint_without_head_is_refused_by_from_pretrained(tmp_path):
    backbone = Qwen2ForCausalLM(tiny_text_config())
    backbone.save_pretrained(tmp_path)
    config = MetaStoneConfig(
        text_config=tiny_text_config(), step_token_ids=[STEP], think_start_token_id=THINK, think_end_token_id=END_THINK
    )
    with pytest.raises(ValueError, match="no SPRM head weights.*from_backbone"):
        MetaStoneForCausalLMWithSPRM.from_pretrained(tmp_path, config=config)
    model = MetaStoneForCausalLMWithSPRM.from_backbone(
        str(tmp_path), step_token_ids=[STEP], think_start_token_id=THINK, think_end_token_id=END_THINK
    )
    assert isinstance(model, MetaStoneForCausalLMWithSPRM)


def test_tokenizer_without_think_tokens_scores_the_whole_sequence(real_tokenizer):
    ids = MetaStoneConfig.sprm_token_ids_from_tokenizer(real_tokenizer, think_start="<nothink>", think_end="</nothink>")
    assert ids["think_start_token_id"] is None and ids["think_end_token_id"] is None
    model = tiny_metastone(
        text_overrides={
            "vocab_size": len(real_tokenizer),
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
        },
        **ids,
    )
    text = "First we add.\n\nThen we carry.\n\nSo the answer is 4."
    tokens = torch.tensor([real_tokenizer.encode(text, add_special_tokens=False)])
    assert model.score_trajectories(tokens).num_steps.item() == 2


def test_backbone_that_is_not_a_causal_lm_is_refused():
    with pytest.raises(TypeError, match="path/Hub id or a loaded causal LM"):
        MetaStoneForCausalLMWithSPRM.from_backbone(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="already a MetaStone model"):
        MetaStoneForCausalLMWithSPRM.from_backbone(tiny_metastone())


@pytest.mark.parametrize(
    ("ids", "mask", "error", "message"),
    [
        ([[1, 2, 3]], None, TypeError, "must be a torch tensor"),
        (torch.ones(1, 3), None, TypeError, "integer token ids"),
        (
            torch.tensor([[1, 2, 512]]),
            None,
            ValueError,
            r"token id 512, outside the model's vocabulary \(vocab_size=512\)",
        ),
        (torch.tensor([[1, -1, 3]]), None, ValueError, "token id -1, outside"),
        (torch.ones(2, 3, dtype=torch.long), torch.tensor([[1, 1, 2], [1, 1, 1]]), ValueError, "0 \\(padding\\) and 1"),
        (torch.ones(2, 3, dtype=torch.long), torch.tensor([[0, 0, 0], [1, 1, 1]]), ValueError, "all padding"),
        (torch.ones(2, 3, dtype=torch.long), [[1, 1, 1], [1, 1, 1]], TypeError, "`attention_mask` must be a torch"),
    ],
)
def test_token_batches_are_checked_before_any_work(ids, mask, error, message):
    model = tiny_metastone()
    with pytest.raises(error, match=message):
        model.score_trajectories(ids, mask)
    with pytest.raises(error, match=message):
        model.generate(ids, attention_mask=mask, num_candidates=2, max_new_tokens=2, progress_bar=False)


def test_score_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="`batch_size` must be an int >= 1"):
        tiny_metastone().score_trajectories(torch.ones(2, 3, dtype=torch.long), batch_size=0)
