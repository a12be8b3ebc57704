"""Parallel plans: consistent with the backbone's own causal-LM classes, and tensor parallelism running for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import END_THINK, THINK
from transformers import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

from metastone_hf.tiny import tiny_metastone

STOCK = {"qwen2": Qwen2ForCausalLM, "qwen3": Qwen3ForCausalLM, "llama": LlamaForCausalLM}


@pytest.mark.parametrize("architecture", sorted(STOCK))
def test_plans_equal_the_stock_causal_lm_plans(architecture):
    model = tiny_metastone(architecture)
    stock = STOCK[architecture](model.config.text_config)
    for plan in ("tp_plan", "pp_plan", "fsdp_plan"):
        ours, theirs = getattr(model, plan), getattr(stock, plan)
        assert ours == theirs, plan  # same keys (lm_head and the backbone's `model.*`), same styles
    # Every planned name matches a module of the model (what transformers' plan validation requires).
    modules = {name for name, _ in model.named_modules()}
    for plan in (model.tp_plan, model.pp_plan):
        for key in plan:
            pattern = key.replace("*", "0")
            assert pattern in modules, key
    assert not any(key.startswith("sprm_head") for key in model.tp_plan)  # the head is replicated


@pytest.mark.parametrize("tied", [True, False])
def test_tensor_parallel_forward_on_two_cpu_processes(tmp_path, tied):
    model = tiny_metastone(seed=23, text_overrides={"tie_word_embeddings": tied})
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    ids = [[1, THINK, 9, 5, 33, 44, 5, 5, 12, 5, END_THINK, 70]]
    with torch.no_grad():
        expected = model(torch.tensor(ids))
    out = tmp_path / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(Path(__file__).with_name("tensor_parallel_child.py")), str(folder), str(out), json.dumps(ids),
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["embed_tokens"] == "S(0)" and report["q_proj"] == "S(0)"  # sharded on dim 0
    assert report["lm_head"] == "S(0)"  # sharded like the embeddings, tied or not
    assert report["sprm_head"] == ["plain"] and report["head_dtype"] == ["torch.float32"]
    assert report["ranks_agree"]
    torch.testing.assert_close(torch.tensor(report["logits"]), expected.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(report["sprm_logits"]), expected.sprm_logits, atol=1e-5, rtol=1e-4)
