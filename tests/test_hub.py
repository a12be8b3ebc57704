"""Complete checkpoints: weights, config with auto_map, code, tokenizer, generation config, model card; push."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from metastone_hf import hub
from metastone_hf.tiny import tiny_metastone


def test_save_checkpoint_contents_and_card(tmp_path, real_tokenizer):
    model = tiny_metastone()
    folder = hub.save_checkpoint(model, tmp_path / "ckpt", real_tokenizer, metrics={"BoN-SPRM@32": 0.5, "AUC": 0.9125})
    files = set(os.listdir(folder))
    assert {
        "model.safetensors",
        "config.json",
        "configuration_metastone.py",
        "modeling_metastone.py",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
    } <= files
    assert {"AutoConfig", "AutoModel", "AutoModelForCausalLM"} <= set(
        json.loads((folder / "config.json").read_text())["auto_map"]
    )
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers" and "metastone" in card.data.tags
    assert "| BoN-SPRM@32 | 0.5 |" in card.text and "| AUC | 0.9125 |" in card.text
    assert "| high | 32 |" in card.text and "trust_remote_code=True" in card.text and "2507.01951" in card.text


def test_save_refuses_existing_folder_without_overwrite(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="overwrite"):
        hub.save_checkpoint(tiny_metastone(), tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "mine.txt").read_text() == "keep"
    hub.save_checkpoint(tiny_metastone(), tmp_path / "ckpt", overwrite=True)
    assert (tmp_path / "ckpt" / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_push_uploads_the_complete_folder(monkeypatch, real_tokenizer):
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create"] = (repo_id, kwargs)

    def upload_folder(self, *, repo_id, folder_path, commit_message, **kwargs):
        calls["files"] = set(os.listdir(folder_path))
        calls["card"] = (Path(folder_path) / "README.md").read_text()
        return "commit-info"

    monkeypatch.setattr("huggingface_hub.HfApi.create_repo", create_repo)
    monkeypatch.setattr("huggingface_hub.HfApi.upload_folder", upload_folder)
    assert hub.push_checkpoint(tiny_metastone(), "me/metastone-tiny", real_tokenizer, private=True) == "commit-info"
    assert calls["create"] == ("me/metastone-tiny", {"private": True, "exist_ok": True})
    assert {"model.safetensors", "modeling_metastone.py", "tokenizer.json", "README.md"} <= calls["files"]
    assert 'from_pretrained("me/metastone-tiny", trust_remote_code=True)' in calls["card"]
