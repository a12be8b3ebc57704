"""Official release -> metastone-hf conversion: exact scores, safe loading, atomic output, streamed shards."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REAL_TOKENIZER
from reference import reference_official_scores
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, Qwen2ForCausalLM

from metastone_hf.convert import ConversionError, convert_official_checkpoint, main
from metastone_hf.modeling_metastone import MetaStoneForCausalLMWithSPRM
from metastone_hf.tiny import tiny_text_config

HIDDEN = 32


def official_head(hidden: int = HIDDEN, width: int | None = None) -> nn.Sequential:
    width = width or 2 * hidden
    head = nn.Sequential(nn.Linear(hidden, width), nn.ReLU(), nn.Dropout(0.5), nn.Linear(width, 1))
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.5)
    return head.eval()


def save_release(
    folder: Path, tokenizer, *, dtype=torch.float32, tie_word_embeddings=False, max_shard_size=None, seed=0
) -> Path:
    """Write an official-format folder: plain Qwen2 checkpoint + score_module.pt + the real tokenizer."""
    torch.manual_seed(seed)
    text = tiny_text_config(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie_word_embeddings,
    )
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    Qwen2ForCausalLM(text).to(dtype).save_pretrained(folder, **kwargs)
    torch.save(official_head().state_dict(), folder / "score_module.pt")
    for name in os.listdir(REAL_TOKENIZER):
        if name != "PROVENANCE.md":
            shutil.copy(REAL_TOKENIZER / name, folder / name)
    return folder


@pytest.fixture
def official_release(tmp_path, real_tokenizer):
    """A single-file float32 release."""
    return save_release(tmp_path / "MetaStone-S1-tiny", real_tokenizer)


@pytest.fixture
def sharded_bf16_release(tmp_path, real_tokenizer):
    """A bfloat16 release in several safetensors shards with an index, like the 7B/32B downloads."""
    folder = save_release(tmp_path / "MetaStone-S1-sharded", real_tokenizer, dtype=torch.bfloat16, max_shard_size="5MB")
    assert len(shard_names(folder)) >= 2
    return folder


def shard_names(folder: Path) -> list[str]:
    return sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()))


def file_dtypes(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as file:
        names = file.keys()
        return {name: file.get_slice(name).get_dtype() for name in names}


def load_strictly(folder):
    """Load with both entry points; neither may report a missing, unexpected or mismatched tensor."""
    model, info = MetaStoneForCausalLMWithSPRM.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info
    remote, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    assert not any(info.values()), info
    assert type(remote).__name__ == "MetaStoneForCausalLMWithSPRM"
    return model.eval()


def assert_same_weights(converted, release, dtype=None):
    """Backbone tensors equal the release's (cast to ``dtype``), the head equals score_module.pt, in float32."""
    plain = Qwen2ForCausalLM.from_pretrained(release, dtype=dtype or "auto").state_dict()
    state = converted.state_dict()
    assert set(state) - set(plain) == {f"sprm_head.{k}" for k in ("0.weight", "0.bias", "3.weight", "3.bias")}
    for name, tensor in plain.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
    head = torch.load(release / "score_module.pt", weights_only=True)
    for name, tensor in head.items():
        assert state[f"sprm_head.{name}"].dtype == torch.float32
        torch.testing.assert_close(state[f"sprm_head.{name}"], tensor.float(), rtol=0, atol=0)


def assert_official_scores(converted, release, tokenizer, data_dir, dtype=None):
    """Scores of the converted model equal the official scoring of the release (plain Qwen2 + head)."""
    plain = Qwen2ForCausalLM.from_pretrained(release, dtype=dtype or "auto").eval()
    head = official_head()
    head.load_state_dict(torch.load(release / "score_module.pt", weights_only=True))

    traces = json.loads((data_dir / "processbench" / "gsm8k.json").read_text())[:3]
    for trace in traces:
        text = trace["problem"] + "<think>\n" + "\n\n".join(trace["steps"]) + "\n</think>\n\nDone"
        ids = tokenizer.encode(text, add_special_tokens=False)
        expected_score, expected_logits = reference_official_scores(plain, head, ids, [382], 151648, 151649)
        got = converted.score_trajectories(torch.tensor([ids]))
        assert len(expected_logits) > 0
        torch.testing.assert_close(got.step_logits[0], torch.tensor(expected_logits), atol=1e-5, rtol=1e-5)
        assert abs(got.scores[0].item() - expected_score) < 1e-6


def test_converted_scores_equal_official_scoring(official_release, tmp_path, real_tokenizer, data_dir):
    out = convert_official_checkpoint(official_release, tmp_path / "converted")
    files = set(os.listdir(out))
    assert {
        "model.safetensors.index.json",
        "sprm_head.safetensors",
        "config.json",
        "configuration_metastone.py",
        "modeling_metastone.py",
        "generation_metastone.py",
        "tokenizer.json",
        "README.md",
        "generation_config.json",
    } <= files
    assert not any(name.endswith((".pt", ".bin")) for name in files)
    # `from_pretrained` would read a `model.safetensors` and skip the index (and the head shard with it).
    assert "model.safetensors" not in files
    assert shard_names(out) == ["model-00001-of-00001.safetensors", "sprm_head.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["sprm_hidden_multiplier"] == 2 and config["step_token_ids"] == [382]
    assert {"AutoConfig", "AutoModel", "AutoModelForCausalLM"} <= set(config["auto_map"])
    assert config["architectures"] == ["MetaStoneForCausalLMWithSPRM"] and config["dtype"] == "float32"

    load_strictly(out)
    converted = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    assert_same_weights(converted, official_release)
    assert_official_scores(converted, official_release, real_tokenizer, data_dir)


def test_sharded_release_is_hard_linked_with_a_float32_head(sharded_bf16_release, tmp_path):
    release = sharded_bf16_release
    out = convert_official_checkpoint(release, tmp_path / "converted")
    shards = [name for name in shard_names(out) if name != "sprm_head.safetensors"]
    assert shards == shard_names(release)
    for name in shards:  # same file on disk: nothing was read, copied or held in memory
        assert os.stat(out / name).st_ino == os.stat(release / name).st_ino
    assert set(file_dtypes(out / "sprm_head.safetensors").values()) == {"F32"}
    assert set(file_dtypes(out / shards[0]).values()) == {"BF16"}

    index = json.loads((out / "model.safetensors.index.json").read_text())
    release_map = json.loads((release / "model.safetensors.index.json").read_text())["weight_map"]
    head_keys = {f"sprm_head.{k}" for k in ("0.weight", "0.bias", "3.weight", "3.bias")}
    assert index["weight_map"] == {**release_map, **dict.fromkeys(head_keys, "sprm_head.safetensors")}
    on_disk = sum(os.path.getsize(out / name) for name in shard_names(out))
    assert 0 < on_disk - index["metadata"]["total_size"] < 100_000  # the headers are all that is not weights
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    converted = load_strictly(out)
    assert converted.model.embed_tokens.weight.dtype == torch.bfloat16
    assert_same_weights(converted, release)

    same_dtype = convert_official_checkpoint(release, tmp_path / "same-dtype", dtype="bfloat16")
    assert all(os.stat(same_dtype / name).st_ino == os.stat(release / name).st_ino for name in shards)


def test_dtype_change_rewrites_each_shard(sharded_bf16_release, tmp_path, real_tokenizer, data_dir):
    release = sharded_bf16_release
    out = convert_official_checkpoint(release, tmp_path / "converted", dtype="float32")
    assert shard_names(out) == [*shard_names(release), "sprm_head.safetensors"]
    for name in shard_names(release):
        assert os.stat(out / name).st_ino != os.stat(release / name).st_ino
        assert set(file_dtypes(out / name).values()) == {"F32"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    converted = load_strictly(out)
    # bf16 -> float32 is exact: the scores equal the official scoring of the release upcast to float32.
    assert_same_weights(converted, release, dtype=torch.float32)
    assert_official_scores(converted, release, real_tokenizer, data_dir, dtype=torch.float32)

    out16 = convert_official_checkpoint(release, tmp_path / "converted16", dtype=torch.float16)
    assert {dtype for name in shard_names(release) for dtype in file_dtypes(out16 / name).values()} == {"F16"}
    assert set(file_dtypes(out16 / "sprm_head.safetensors").values()) == {"F32"}
    assert_same_weights(load_strictly(out16), release, dtype=torch.float16)


# 100 bytes: every tensor is cast and written in many pieces (rounded down to whole elements of its dtype).
PIECES = pytest.mark.parametrize("chunk_bytes", [None, 100], ids=["whole", "in-pieces"])


@PIECES
def test_shard_of_mixed_dtypes(official_release, tmp_path, monkeypatch, chunk_bytes):
    if chunk_bytes:
        monkeypatch.setattr("metastone_hf.convert.CHUNK_BYTES", chunk_bytes)
    state = load_file(official_release / "model.safetensors")
    norms = [name for name in state if name.endswith("norm.weight")]
    state.update({name: state[name].to(torch.bfloat16) for name in norms})
    save_file(state, official_release / "model.safetensors", metadata={"format": "pt"})

    kept = convert_official_checkpoint(official_release, tmp_path / "kept")
    assert json.loads((kept / "config.json").read_text())["dtype"] == "float32"  # most of the bytes
    assert file_dtypes(kept / "model-00001-of-00001.safetensors") == file_dtypes(official_release / "model.safetensors")

    out = convert_official_checkpoint(official_release, tmp_path / "converted", dtype="bfloat16")
    assert set(file_dtypes(out / "model-00001-of-00001.safetensors").values()) == {"BF16"}
    converted = load_strictly(out)
    for name, tensor in state.items():
        assert torch.equal(converted.state_dict()[name], tensor.to(torch.bfloat16)), name


def test_tied_embedding_release(tmp_path, real_tokenizer):
    release = save_release(tmp_path / "tied", real_tokenizer, dtype=torch.bfloat16, tie_word_embeddings=True)
    assert "lm_head.weight" not in file_dtypes(release / "model.safetensors")
    out = convert_official_checkpoint(release, tmp_path / "converted")
    assert "lm_head.weight" not in json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    converted = load_strictly(out)
    assert converted.config.tie_word_embeddings
    assert converted.lm_head.weight.data_ptr() == converted.model.embed_tokens.weight.data_ptr()
    assert_same_weights(converted, release)


@PIECES
def test_bin_release_is_rewritten_as_safetensors(official_release, tmp_path, monkeypatch, chunk_bytes):
    if chunk_bytes:
        monkeypatch.setattr("metastone_hf.convert.CHUNK_BYTES", chunk_bytes)
    state = load_file(official_release / "model.safetensors")
    (official_release / "model.safetensors").unlink()
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # one storage, as torch.save keeps tied weights
    names = sorted(state)
    weight_map = {}
    for number, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :]), start=1):
        shard = f"pytorch_model-{number:05d}-of-00002.bin"
        torch.save({name: state[name] for name in part}, official_release / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (official_release / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))

    out = convert_official_checkpoint(official_release, tmp_path / "converted", dtype="bfloat16")
    assert not any(name.endswith((".pt", ".bin")) for name in os.listdir(out))
    assert shard_names(out) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "sprm_head.safetensors",
    ]
    assert set(file_dtypes(out / "model-00001-of-00002.safetensors").values()) == {"BF16"}
    assert set(file_dtypes(out / "sprm_head.safetensors").values()) == {"F32"}
    for name, tensor in load_strictly(out).state_dict().items():
        if not name.startswith("sprm_head."):
            assert torch.equal(tensor, state[name].to(torch.bfloat16)), name


@pytest.mark.parametrize("layout", ["zip", "legacy", "transposed"])
@pytest.mark.parametrize("dtype", [None, "float16"])
def test_bin_shard_read_by_plain_file_reads_where_it_can(official_release, tmp_path, monkeypatch, layout, dtype):
    """Zip-format shards are read tensor by tensor from the file (never loaded on the CPU whole); the legacy format
    and a non-contiguous tensor are loaded whole instead. Either way every tensor equals the one saved."""
    import metastone_hf.convert as convert

    monkeypatch.setattr(convert, "CHUNK_BYTES", 96)  # several pieces per tensor, and pieces across tensors
    state = load_file(official_release / "model.safetensors")
    (official_release / "model.safetensors").unlink()
    saved = dict(state)
    if layout == "transposed":  # a view whose bytes are not in order: plain reads cannot serve it
        saved["model.layers.0.mlp.down_proj.weight"] = state["model.layers.0.mlp.down_proj.weight"].t().contiguous().t()
    torch.save(saved, official_release / "pytorch_model.bin", _use_new_zipfile_serialization=layout != "legacy")
    loads = []
    original_load = convert._load_bin_state
    monkeypatch.setattr(convert, "_load_bin_state", lambda *a, **k: loads.append(a[1]) or original_load(*a, **k))

    out = convert_official_checkpoint(official_release, tmp_path / "converted", dtype=dtype)
    assert loads == (["meta"] if layout == "zip" else ["meta", "cpu"])
    converted = load_strictly(out)
    for name, tensor in converted.state_dict().items():
        if not name.startswith("sprm_head."):
            expected = state[name] if dtype is None else state[name].to(getattr(torch, dtype))
            assert tensor.dtype == expected.dtype and torch.equal(tensor, expected), name


def test_shards_are_copied_where_hard_links_fail(official_release, tmp_path, monkeypatch):
    def cross_device(*args, **kwargs):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr("metastone_hf.convert.os.link", cross_device)
    out = convert_official_checkpoint(official_release, tmp_path / "converted")
    copied, original = out / "model-00001-of-00001.safetensors", official_release / "model.safetensors"
    assert os.stat(copied).st_ino != os.stat(original).st_ino
    assert copied.read_bytes() == original.read_bytes()
    load_strictly(out)


def test_missing_backbone_tensor_is_refused(official_release, tmp_path):
    state = load_file(official_release / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, official_release / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"lack 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        convert_official_checkpoint(official_release, tmp_path / "converted")
    assert not (tmp_path / "converted").exists()


def test_step_mode_paper_from_the_command_line(official_release, tmp_path, real_tokenizer):
    out = tmp_path / "converted"
    assert main([str(official_release), str(out), "--step-mode", "paper"]) == 0
    step_ids = json.loads((out / "config.json").read_text())["step_token_ids"]
    assert len(step_ids) == 46 and 382 in step_ids
    assert all(".\n\n" in real_tokenizer.decode([i]) for i in step_ids)
    with pytest.raises(ConversionError, match="Unknown step mode"):
        convert_official_checkpoint(official_release, tmp_path / "other", step_mode="sentences")


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
    assert (target / "model.safetensors.index.json").exists() and not (target / "keep.txt").exists()
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
