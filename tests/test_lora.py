"""PEFT: LoRA on the backbone with the head fully trained; adapter save/reload and merge keep identical scores."""

from __future__ import annotations

import torch
from conftest import END_THINK, STEP, THINK
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from metastone_hf.lora import metastone_lora_config
from metastone_hf.tiny import tiny_metastone

IDS = torch.tensor(
    [
        [1, THINK, 9, 33, STEP, 40, 41, STEP, 50, STEP, END_THINK, 60],
        [1, THINK, 70, STEP, 71, 72, 73, STEP, 74, 75, END_THINK, 61],
    ]
)


def lora_modules(model):
    return {name for name, module in model.named_modules() if hasattr(module, "lora_A")}


def test_all_linear_pitfall_and_our_config():
    naive = get_peft_model(tiny_metastone(seed=1), LoraConfig(target_modules="all-linear", r=4))
    assert any("sprm_head" in name for name in lora_modules(naive))  # the pitfall this helper exists for
    ours = get_peft_model(tiny_metastone(seed=1), metastone_lora_config(r=4))
    adapted = lora_modules(ours)
    assert adapted and not any("sprm_head" in n or "lm_head" in n for n in adapted)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert any("sprm_head" in n and "modules_to_save" in n for n in trainable)
    assert all("lora_" in n or "sprm_head" in n for n in trainable)


def test_adapter_round_trip_and_merge_keep_scores(tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_metastone(seed=2).save_pretrained(base_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), metastone_lora_config(r=4, lora_dropout=0.0))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(5):  # move the LoRA weights and the head away from their initial values
        out = model(input_ids=IDS, labels=IDS)
        loss = out.loss + torch.sigmoid(out.sprm_logits).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    trained = model.score_trajectories(IDS).scores
    fresh = AutoModelForCausalLM.from_pretrained(base_dir).score_trajectories(IDS).scores
    assert (trained - fresh).abs().max() > 1e-3  # training changed the scores, so the checks below can fail

    model.save_pretrained(adapter_dir)
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any("sprm_head" in k for k in keys) and any("lora_A" in k for k in keys)

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    torch.testing.assert_close(reloaded.score_trajectories(IDS).scores, trained, atol=1e-6, rtol=1e-6)
    auto = AutoPeftModelForCausalLM.from_pretrained(adapter_dir).eval()
    torch.testing.assert_close(auto.score_trajectories(IDS).scores, trained, atol=1e-6, rtol=1e-6)
    merged = reloaded.merge_and_unload().eval()
    assert not lora_modules(merged)
    torch.testing.assert_close(merged.score_trajectories(IDS).scores, trained, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, reloaded(input_ids=IDS).logits, atol=1e-5, rtol=1e-5)
