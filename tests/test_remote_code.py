"""A saved checkpoint loads with `trust_remote_code=True` in a process where `metastone_hf` cannot be imported."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from conftest import END_THINK, THINK

import metastone_hf
from metastone_hf.tiny import tiny_metastone

# The files copied into every checkpoint, each importing (relatively) only files before it.
REMOTE_CODE_SET = (
    "configuration_metastone.py",
    "scoring_metastone.py",
    "sampling_metastone.py",
    "selection_metastone.py",
    "search_rows_metastone.py",
    "pruning_metastone.py",
    "adaptive_metastone.py",
    "search_output_metastone.py",
    "search_tree_metastone.py",
    "generation_metastone.py",
    "modeling_metastone.py",
)

CLEAN_LOADER = textwrap.dedent(
    """
    import importlib.abc, json, sys
    # Make `metastone_hf` unimportable, whatever path finder the editable install registered.
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "metastone_hf" or name.startswith("metastone_hf."):
                raise ImportError("metastone_hf is blocked in this test")
    sys.meta_path.insert(0, Block())
    sys.path = [p for p in sys.path if not p.rstrip("/").endswith("src")]
    try:
        import metastone_hf  # noqa: F401
        raise SystemExit("metastone_hf is importable: the test would prove nothing")
    except ImportError:
        pass
    import torch
    from transformers import AutoModel, AutoModelForCausalLM
    folder, ids = sys.argv[1], json.loads(sys.argv[2])
    out = {}
    for name, auto in (("auto_model", AutoModel), ("auto_causal_lm", AutoModelForCausalLM)):
        model = auto.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            result = model(torch.tensor(ids))
            scores = model.score_trajectories(torch.tensor(ids))
        out[name] = {
            "class": type(model).__name__,
            "module": type(model).__module__,
            "logits": result.logits.tolist(),
            "scores": scores.scores.tolist(),
            "step_logits": [s.tolist() for s in scores.step_logits],
        }
    print(json.dumps(out))
    """
)


def run_without_package(script: str, tmp_path, *args: str) -> dict:
    """Run ``script`` (which blocks ``metastone_hf``) in a fresh interpreter; return its last stdout line as JSON."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HOME"] = str(tmp_path / "hf_home")  # remote-code module cache of its own
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_remote_code_load_without_the_package(tmp_path):
    model = tiny_metastone(seed=21)
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert set(config["auto_map"]) >= {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    assert (folder / "configuration_metastone.py").exists() and (folder / "modeling_metastone.py").exists()
    assert (folder / "model.safetensors").exists()

    ids = [[1, THINK, 9, 5, 33, 44, 5, 5, 12, 5, END_THINK, 70], [1, THINK, 90, 91, 5, 92, 93, 94, 5, 8, END_THINK, 71]]
    loaded = run_without_package(CLEAN_LOADER, tmp_path, str(folder), json.dumps(ids))

    with torch.no_grad():
        expected_logits = model(torch.tensor(ids)).logits
        expected = model.score_trajectories(torch.tensor(ids))
    for name in ("auto_model", "auto_causal_lm"):
        got = loaded[name]
        assert got["class"] == "MetaStoneForCausalLMWithSPRM"
        assert got["module"].startswith("transformers_modules"), got["module"]  # the checkpoint's own code
        torch.testing.assert_close(torch.tensor(got["logits"]), expected_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.tensor(got["scores"]), expected.scores, atol=1e-6, rtol=1e-5)
        for a, b in zip(got["step_logits"], expected.step_logits):
            torch.testing.assert_close(torch.tensor(a), b, atol=1e-5, rtol=1e-5)


HALF_PRECISION_LOADER = CLEAN_LOADER.split("folder, ids = ")[0] + textwrap.dedent(
    """
    folder, ids = sys.argv[1], json.loads(sys.argv[2])
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16).eval()
    scores = model.score_trajectories(torch.tensor(ids))
    print(json.dumps({
        "module": type(model).__module__,
        "backbone": str(model.model.embed_tokens.weight.dtype),
        "head": sorted({str(p.dtype) for p in model.sprm_head.parameters()}),
        "scores": scores.scores.tolist(),
    }))
    """
)


def test_remote_code_keeps_the_head_in_float32_under_bf16(tmp_path):
    model = tiny_metastone(seed=22)
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    ids = [[1, THINK, 9, 5, 33, 44, 5, 5, 12, 5, END_THINK, 70]]
    loaded = run_without_package(HALF_PRECISION_LOADER, tmp_path, str(folder), json.dumps(ids))
    assert loaded["module"].startswith("transformers_modules"), loaded["module"]
    assert loaded["backbone"] == "torch.bfloat16" and loaded["head"] == ["torch.float32"]
    expected = model.score_trajectories(torch.tensor(ids)).scores
    torch.testing.assert_close(torch.tensor(loaded["scores"]), expected, atol=0.02, rtol=0.05)


def test_the_remote_code_set_is_saved_whole_and_imports_in_one_direction(tmp_path):
    package = Path(metastone_hf.__file__).parent
    assert sorted(p.name for p in package.glob("*_metastone.py")) == sorted(REMOTE_CODE_SET)
    folder = tmp_path / "ckpt"
    tiny_metastone(seed=23).save_pretrained(folder)
    for position, name in enumerate(REMOTE_CODE_SET):
        assert (folder / name).exists(), name
        source = (package / name).read_text(encoding="utf-8")
        siblings = re.findall(r"^from \.(\w+) import", source, flags=re.MULTILINE)
        assert all(f"{s}.py" in REMOTE_CODE_SET[:position] for s in siblings), (name, siblings)
        modules = re.findall(r"^(?:from|import) (\w+)", source, flags=re.MULTILINE)
        assert set(modules) <= {"__future__", "array", "collections", "contextlib", "copy", "dataclasses", "inspect",
                                "math", "re", "typing", "torch", "transformers"}, (name, modules)  # fmt: skip
