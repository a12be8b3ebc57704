"""Official release -> metastone-hf conversion: exact scores, safe loading, atomic output."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch
from conftest import REAL_TOKENIZER
from reference import reference_official_scores
from torch import nn
from transformers import AutoModel, Qwen2ForCausalLM

from metastone_hf.convert import ConversionError, convert_official_checkpoint, main
from metastone_hf.tiny import tiny_text_config

HIDDEN = 32


def official_head(hidden: int = HIDDEN, width: int | None = None) -> nn.Sequential:
    width = width or 2 * hidden
    head = nn.Sequential(nn.Linear(hidden, width), nn.ReLU(), nn.Dropout(0.5), nn.Linear(width, 1))
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.5)
    return head.eval()


@pytest.fixture
def official_release(tmp_path, real_tokenizer):
    """A synthesized official-format folder: plain Qwen2 checkpoint + score_module.pt + the real tokenizer."""
    folder = tmp_path / "MetaStone-S1-tiny"
    torch.manual_seed(0)
    text = tiny_text_config(
        vocab_size=len(real_tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    Qwen2ForCausalLM(text).save_pretrained(folder)
    torch.save(official_head().state_dict(), folder / "score_module.pt")
    for name in os.listdir(REAL_TOKENIZER):
        if name != "PROVENANCE.md":
            shutil.copy(REAL_TOKENIZER / name, folder / name)
    return folder


def test_converted_scores_equal_official_scoring(official_release, tmp_path, real_tokenizer, data_dir):
    out = convert_official_checkpoint(official_release, tmp_path / "converted")
    files = set(os.listdir(out))
    assert {
        "model.safetensors",
        "config.json",
        "configuration_metastone.py",
        "modeling_metastone.py",
        "tokenizer.json",
        "README.md",
        "generation_config.json",
    } <= files
    assert not any(name.endswith((".pt", ".bin")) for name in files)
    config = json.loads((out / "config.json").read_text())
    assert config["sprm_hidden_multiplier"] == 2 and config["step_token_ids"] == [382]
    assert {"AutoConfig", "AutoModel", "AutoModelForCausalLM"} <= set(config["auto_map"])

    converted = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    plain = Qwen2ForCausalLM.from_pretrained(official_release).eval()
    head = official_head()
    head.load_state_dict(torch.load(official_release / "score_module.pt", weights_only=True))

    traces = json.loads((data_dir / "processbench" / "gsm8k.json").read_text())[:3]
    for trace in traces:
        text = trace["problem"] + "<think>\n" + "\n\n".join(trace["steps"]) + "\n</think>\n\nDone"
        ids = real_tokenizer.encode(text, add_special_tokens=False)
        expected_score, expected_logits = reference_official_scores(plain, head, ids, [382], 151648, 151649)
        got = converted.score_trajectories(torch.tensor([ids]))
        assert len(expected_logits) > 0
        torch.testing.assert_close(got.step_logits[0], torch.tensor(expected_logits), atol=1e-5, rtol=1e-5)
        assert abs(got.scores[0].item() - expected_score) < 1e-6


def test_wider_head_is_inferred(official_release, tmp_path):
    torch.save(official_head(width=3 * HIDDEN).state_dict(), official_release / "score_module.pt")
    out = convert_official_checkpoint(official_release, tmp_path / "converted")
    assert json.loads((out / "config.json").read_text())["sprm_hidden_multiplier"] == 3


def test_head_of_another_model_size_is_refused(official_release, tmp_path):
    torch.save(official_head(hidden=48).state_dict(), official_release / "score_module.pt")
    with pytest.raises(ConversionError, match="Head width mismatch.*48.*32"):
        convert_official_checkpoint(official_release, tmp_path / "converted")
    assert not (tmp_path / "converted").exists()


def test_wrong_keys_are_refused(official_release, tmp_path):
    state = official_head().state_dict()
    torch.save(
        {"fc1.weight": state["0.weight"], **{k: v for k, v in state.items() if k != "0.weight"}},
        official_release / "score_module.pt",
    )
    with pytest.raises(ConversionError, match="keys"):
        convert_official_checkpoint(official_release, tmp_path / "converted")


class _Exploit:
    """Unpickling this would run `os.system(...)` and create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_nothing_runs(official_release, tmp_path):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Exploit(control)))  # the payload is real: plain unpickling runs it
    assert control.exists()
    marker = tmp_path / "pwned"
    with open(official_release / "score_module.pt", "wb") as f:
        pickle.dump({"0.weight": _Exploit(marker)}, f)
    with pytest.raises(ConversionError, match="refused without executing"):
        convert_official_checkpoint(official_release, tmp_path / "converted")
    assert not marker.exists()
    assert not (tmp_path / "converted").exists()


def test_missing_score_module_and_missing_config(official_release, tmp_path):
    (official_release / "score_module.pt").unlink()
    with pytest.raises(ConversionError, match="score_module.pt"):
        convert_official_checkpoint(official_release, tmp_path / "converted")
    with pytest.raises(ConversionError, match="no config.json"):
        convert_official_checkpoint(tmp_path / "nowhere", tmp_path / "converted")


def test_existing_output_needs_overwrite_and_is_replaced_whole(official_release, tmp_path, capsys):
    target = tmp_path / "converted"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    assert main([str(official_release), str(target)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (target / "keep.txt").read_text() == "user data"
    assert main([str(official_release), str(target), "--overwrite"]) == 0
    assert (target / "model.safetensors").exists() and not (target / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_failed_conversion_leaves_existing_output_untouched(official_release, tmp_path, monkeypatch):
    target = tmp_path / "converted"
    convert_official_checkpoint(official_release, target)
    before = sorted(os.listdir(target))

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("metastone_hf.convert.write_model_card", explode)
    with pytest.raises(OSError, match="disk full"):
        convert_official_checkpoint(official_release, target, overwrite=True)
    assert sorted(os.listdir(target)) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
