"""Complete checkpoints: weights, config with auto_map, code, tokenizer, generation config, model card; push.

The model card's results are checked the way the Hub reads them: the YAML front matter parsed back with
``huggingface_hub`` (``ModelCard.load``, ``metadata_load``) into ``model-index`` entries and ``EvalResult`` objects.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import ModelCard, ModelCardData, metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results

from metastone_hf import cli, hub
from metastone_hf.tiny import tiny_metastone, tiny_metastone_for_tokenizer, tiny_tokenizer


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
    # metrics without a dataset fill the table only: no model-index, and no base model unless given
    assert card.data.eval_results is None and card.data.base_model is None
    assert_clean_markdown((folder / "README.md").read_text(encoding="utf-8"))


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


# ---------------------------------------------------------------------------------------------- model-index
def assert_clean_markdown(text: str) -> None:
    """What the repository's pre-commit checks and the Hub expect of a committed or uploaded card."""
    assert text.endswith("\n") and not text.endswith("\n\n")
    assert not re.search(r"[ \t]+$", text, flags=re.MULTILINE)
    assert "\n\n\n" not in text
    # no link to a repository that does not exist; the official release is linked by its real address
    assert "github.com/metastone-hf" not in text and "https://github.com/MetaStone-AI/MetaStone-S1" in text


def write_eval_report(path: Path, seed: int = 0) -> dict:
    """An ``eval_report.json`` as ``metastone eval`` writes it (real ``summarize`` and ``save_report``)."""
    from metastone_hf.evaluation import EVAL_PROTOCOLS, EvalRecords, save_report, summarize

    rng = np.random.default_rng(seed)
    correct = rng.random((6, 8)) < 0.5
    scores = np.where(correct, 0.7, 0.3) + 0.2 * rng.random((6, 8))
    answers = [["42" if ok else str(7 + j) for j, ok in enumerate(row)] for row in correct]
    records = EvalRecords(correct, scores, answers)
    summary = summarize(records, {"low": 2, "medium": 8}, protocol=EVAL_PROTOCOLS["quick"])
    save_report(summary, records, path)
    return summary


def test_card_carries_model_index_the_hub_can_read(tmp_path):
    summary = write_eval_report(tmp_path / "eval_report.json")
    results = hub.eval_results_from_report(tmp_path / "eval_report.json", "math500")
    folder = hub.save_checkpoint(
        tiny_metastone(),
        tmp_path / "ckpt",
        repo_id="me/metastone-tiny",
        base_model="MetaStoneTec/MetaStone-S1-1.5B",
        eval_results=results,
    )
    path = folder / "README.md"
    card = ModelCard.load(path)
    assert card.data.base_model == "MetaStoneTec/MetaStone-S1-1.5B"
    assert card.data.model_name == "metastone-tiny"
    assert card.data.eval_results == results  # every field round-trips through the YAML front matter

    metadata = metadata_load(path)
    ModelCardData(**metadata)  # strict parse: raises on a malformed model-index
    model_name, parsed = model_index_to_eval_results(metadata["model-index"])
    assert model_name == "metastone-tiny" and parsed == results
    (entry,) = metadata["model-index"][0]["results"]  # one dataset, one entry
    assert entry["task"] == {"type": "text-generation", "name": "Text Generation"}
    assert entry["dataset"] == {"name": "MATH-500", "type": "HuggingFaceH4/MATH-500", "split": "test"}
    metrics = {m["name"]: m for m in entry["metrics"]}
    assert set(metrics) == {*summary["metrics"], "SPRM AUC"}
    for name, measured in summary["metrics"].items():
        assert metrics[name]["type"] == "accuracy" and metrics[name]["config"] == "quick"
        assert metrics[name]["value"] == round(100 * measured["mean"], 2)  # percent
        args = metrics[name]["args"]
        assert args["questions"] == 6 and args["samples_per_question"] == 8
        assert args["confidence_interval"] == [round(100 * measured["ci_low"], 2), round(100 * measured["ci_high"], 2)]
    assert metrics["pass@1"]["args"]["n"] == 1 and "reasoning_effort" not in metrics["pass@1"]["args"]
    assert metrics["bon_sprm@8 (medium)"]["args"]["n"] == 8
    assert metrics["bon_sprm@8 (medium)"]["args"]["reasoning_effort"] == "medium"
    assert metrics["SPRM AUC"]["type"] == "roc_auc" and metrics["SPRM AUC"]["value"] == round(summary["sprm_auc"], 4)

    # the same numbers in the readable table
    bon = metrics["bon_sprm@2 (low)"]
    low, high = bon["args"]["confidence_interval"]
    assert f"| bon_sprm@2 (low) | {bon['value']}% | [{low}, {high}] |" in card.text
    assert "**MATH-500** (`HuggingFaceH4/MATH-500`, split `test`; 6 questions x 8 samples per question" in card.text
    assert "Base model: [MetaStoneTec/MetaStone-S1-1.5B](https://huggingface.co/MetaStoneTec/MetaStone-S1-1.5B)" in (
        card.text
    )
    assert_clean_markdown(path.read_text(encoding="utf-8"))


def test_eval_results_name_their_dataset_and_protocol():
    summary = {
        "questions": 2,
        "samples_per_question": 4,
        "confidence": 0.9,
        "metrics": {"pass@1": {"mean": 0.25, "ci_low": 0.0, "ci_high": 0.5}, "bon_sprm@4": {"mean": 0.5}},
        "sprm_auc": math.nan,  # undefined when every candidate is right (or wrong): left out
        "protocol": {"name": "paper", "overridden": ["max_new_tokens"]},
    }
    with pytest.raises(ValueError, match="does not say which dataset"):
        hub.eval_results_from_report(summary)
    gsm8k = hub.eval_results_from_report({"summary": {**summary, "dataset": "gsm8k"}})
    assert [r.metric_name for r in gsm8k] == ["pass@1", "bon_sprm@4"]
    assert {(r.dataset_type, r.dataset_config, r.dataset_split) for r in gsm8k} == {("openai/gsm8k", "main", "test")}
    assert gsm8k[0].metric_config == "paper (overridden: max_new_tokens)"
    assert gsm8k[0].metric_args == {
        "n": 1,
        "confidence_interval": [0.0, 50.0],
        "confidence": 0.9,
        "questions": 2,
        "samples_per_question": 4,
    }
    assert gsm8k[1].metric_args == {"n": 4, "questions": 2, "samples_per_question": 4}  # no interval recorded
    custom = hub.eval_results_from_report(summary, "data/my_olympiad.jsonl")
    assert (custom[0].dataset_name, custom[0].dataset_type) == ("my_olympiad", "my_olympiad")
    assert custom[0].dataset_split is None
    assert hub.resolve_eval_dataset("aime24") == hub.EvalDataset("AIME 2024", "HuggingFaceH4/aime_2024", split="train")


def test_push_command_publishes_model_index(tmp_path, monkeypatch, capsys):
    uploaded: dict[str, str] = {}
    monkeypatch.setattr("huggingface_hub.HfApi.create_repo", lambda self, repo_id, **kw: None)

    def upload_folder(self, *, repo_id, folder_path, commit_message, **kwargs):
        uploaded["card"] = (Path(folder_path) / "README.md").read_text(encoding="utf-8")
        return "ok"

    monkeypatch.setattr("huggingface_hub.HfApi.upload_folder", upload_folder)
    tokenizer = tiny_tokenizer()
    checkpoint = hub.save_checkpoint(
        tiny_metastone_for_tokenizer(tokenizer), tmp_path / "ckpt", tokenizer, base_model="org/backbone"
    )
    write_eval_report(tmp_path / "math.json", seed=0)
    write_eval_report(tmp_path / "aime.json", seed=1)
    push = ["push", "--model", str(checkpoint), "--repo-id", "me/tiny"]

    assert cli.main([*push, "--metrics", str(tmp_path / "math.json"), str(tmp_path / "aime.json"),
                     "--dataset", "math500", "aime24"]) == 0  # fmt: skip
    card = ModelCard(uploaded["card"])
    assert card.data.base_model == "org/backbone"  # kept from the checkpoint's own card
    assert {r.dataset_name for r in card.data.eval_results} == {"MATH-500", "AIME 2024"}
    assert len(card.data.to_dict()["model-index"][0]["results"]) == 2  # one entry per dataset
    assert "**AIME 2024**" in card.text and "**MATH-500**" in card.text
    assert_clean_markdown(uploaded["card"])

    assert cli.main([*push, "--metrics", str(tmp_path / "math.json"), "--dataset", "math500",
                     "--base-model", "MetaStoneTec/MetaStone-S1-7B"]) == 0  # fmt: skip
    assert ModelCard(uploaded["card"]).data.base_model == "MetaStoneTec/MetaStone-S1-7B"

    capsys.readouterr()
    assert cli.main([*push, "--metrics", str(tmp_path / "math.json"), "--dataset", "math500", "gsm8k"]) == 2
    assert "one per report" in capsys.readouterr().err


@pytest.mark.parametrize("failing_call", [None, "block", 1, 2])
def test_atomic_output_dir_leaves_the_old_or_the_new_folder_at_every_failure_point(tmp_path, monkeypatch, failing_call):
    """Failure inside the block, at the first rename (old folder aside) or the second (new folder in)."""
    import os

    from metastone_hf.atomic_writes import atomic_output_dir

    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "weights").write_text("old")
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == failing_call:
            raise OSError(f"rename {len(calls)} failed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    try:
        with atomic_output_dir(target, overwrite=True) as staging:
            (staging / "weights").write_text("new")
            if failing_call == "block":
                raise RuntimeError("failed while writing")
    except (OSError, RuntimeError):
        pass
    expected = "new" if failing_call is None else "old"
    assert (target / "weights").read_text() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging or backup folder left behind


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_saved_backbone_is_the_plain_causal_lm_without_remote_code(tmp_path, tied):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

    model = tiny_metastone(seed=3, text_overrides={"tie_word_embeddings": tied}).eval()
    out = hub.save_backbone(model, tmp_path / "backbone", tiny_tokenizer())
    names = set()
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as file:
            names |= set(file.keys())
    assert not any(name.startswith("sprm_head.") for name in names)
    assert ("lm_head.weight" in names) != tied
    assert not list(out.glob("*.py"))  # no remote code: what vLLM's own Qwen2 class loads

    plain, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(plain) is Qwen2ForCausalLM and not any(info.values()), info
    ids = torch.randint(0, model.config.text_config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=0, atol=0)
    with pytest.raises(FileExistsError, match="overwrite"):
        hub.save_backbone(model, out)
    with pytest.raises(TypeError, match="MetaStone model"):
        hub.save_backbone(plain, tmp_path / "again")
