"""MetaStoneForCausalLMWithSPRM: same-forward SPRM logits, exact scoring, backbones, dtypes, batching."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from conftest import END_THINK, STEP, THINK
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_official_scores
from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

from metastone_hf import MetaStoneConfig, MetaStoneForCausalLMWithSPRM, MetaStoneSPRMHead
from metastone_hf.tiny import tiny_metastone, tiny_text_config

ARCHITECTURES = ["qwen2", "qwen3", "llama"]


def random_trajectories(n: int, seed: int = 0, vocab: int = 512, min_len: int = 6, max_len: int = 30):
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=generator))
        body = torch.randint(8, vocab, (length,), generator=generator)
        body[torch.rand(length, generator=generator) < 0.25] = STEP
        rows.append([1, THINK, *body.tolist(), END_THINK, 9, 10])
    return rows


def pad(rows, side: str, pad_id: int = 0):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row)
        mask[i, span] = 1
    return ids, mask


def plain_twin(model: MetaStoneForCausalLMWithSPRM):
    """The backbone as a stock transformers causal LM, loaded from our state dict (names must match)."""
    twin = AutoModelForCausalLM.from_config(model.config.text_config)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("sprm_head.")}
    loaded = twin.load_state_dict(state, strict=False)
    # Every backbone tensor name is Qwen2ForCausalLM's own (the flat layout): nothing missing, nothing left over.
    assert not loaded.missing_keys and not loaded.unexpected_keys, (loaded.missing_keys, loaded.unexpected_keys)
    return twin.eval()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_forward_matches_stock_model_and_official_head_path(architecture):
    model = tiny_metastone(architecture)
    twin = plain_twin(model)
    ids = torch.tensor(random_trajectories(2, seed=1, min_len=20, max_len=20))
    with torch.no_grad():
        ours = model(ids)
        stock = twin(ids, output_hidden_states=True)
    torch.testing.assert_close(ours.logits, stock.logits)
    # the same logits through the slow path: keep every hidden state, take [-2], run the head
    expected = model.sprm_head(stock.hidden_states[-2])
    torch.testing.assert_close(ours.sprm_logits, expected)
    assert ours.sprm_score_mask.shape == ids.shape


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_score_trajectories_equals_official_scoring(architecture):
    model = tiny_metastone(architecture, seed=3)
    twin = plain_twin(model)
    rows = random_trajectories(4, seed=2)
    for row in rows:
        result = model.score_trajectories(torch.tensor(row))
        expected_score, expected_logits = reference_official_scores(
            twin, model.sprm_head, row, [STEP], THINK, END_THINK
        )
        torch.testing.assert_close(result.step_logits[0], torch.tensor(expected_logits), atol=1e-5, rtol=1e-5)
        assert abs(result.scores[0].item() - expected_score) < 1e-5
        assert result.num_steps[0].item() == len(expected_logits)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_equals_one_by_one(architecture, side, dtype):
    model = tiny_metastone(architecture, seed=4).to(dtype)
    rows = random_trajectories(5, seed=5)
    ids, mask = pad(rows, side)
    batched = model.score_trajectories(ids, mask)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    for i, row in enumerate(rows):
        single = model.score_trajectories(torch.tensor([row]))
        assert batched.num_steps[i] == single.num_steps[0]
        torch.testing.assert_close(batched.step_logits[i], single.step_logits[0], atol=tolerance * 5, rtol=tolerance)
        assert abs(batched.scores[i].item() - single.scores[0].item()) < tolerance
        offset = ids.shape[1] - len(row) if side == "left" else 0
        assert (batched.step_positions[i] - offset).tolist() == single.step_positions[0].tolist()
    assert batched.scores.dtype == torch.float32


def test_chunked_scoring_equals_one_batch():
    model = tiny_metastone(seed=6)
    ids, mask = pad(random_trajectories(7, seed=7), "left")
    whole = model.score_trajectories(ids, mask)
    chunked = model.score_trajectories(ids, mask, batch_size=3)
    torch.testing.assert_close(whole.scores, chunked.scores)


def test_scoring_ignores_dropout_even_in_train_mode():
    model = tiny_metastone(seed=8)
    ids = torch.tensor(random_trajectories(1, seed=9))
    eval_scores = model.score_trajectories(ids).scores
    model.train()
    torch.testing.assert_close(model.score_trajectories(ids).scores, eval_scores)
    assert model.training  # mode restored


@pytest.mark.parametrize(("hidden", "expected"), [(1536, 4_724_737), (3584, 25_704_449), (5120, 52_449_281)])
def test_head_parameter_count_on_meta_device(hidden, expected):
    with torch.device("meta"):
        head = MetaStoneSPRMHead(hidden)
    assert sum(p.numel() for p in head.parameters()) == expected == 2 * hidden**2 + 4 * hidden + 1
    assert [name for name, _ in head.named_parameters()] == ["0.weight", "0.bias", "3.weight", "3.bias"]


def test_full_size_model_head_on_meta_device():
    text = tiny_text_config(
        hidden_size=5120,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=40,
        num_key_value_heads=8,
        vocab_size=1000,
    )
    with torch.device("meta"):
        model = MetaStoneForCausalLMWithSPRM(
            MetaStoneConfig(text_config=text, step_token_ids=[5], think_start_token_id=6, think_end_token_id=7)
        )
    assert sum(p.numel() for p in model.sprm_head.parameters()) == 52_449_281


def test_backbone_tensor_names_equal_qwen2():
    model = tiny_metastone()
    stock = Qwen2ForCausalLM(model.config.text_config)
    ours = {k for k in model.state_dict() if not k.startswith("sprm_head.")}
    assert ours == set(stock.state_dict())


@pytest.mark.parametrize("layer", [-1, -3, 1])
def test_other_feature_layers(layer):
    model = tiny_metastone(sprm_feature_layer=layer)
    twin = plain_twin(model)
    ids = torch.tensor(random_trajectories(1, seed=10))
    with torch.no_grad():
        stock = twin(ids, output_hidden_states=True)
    torch.testing.assert_close(model(ids).sprm_logits, model.sprm_head(stock.hidden_states[layer]))


def test_from_backbone_model_keeps_weights_and_adds_head():
    torch.manual_seed(0)
    backbone = Qwen2ForCausalLM(tiny_text_config()).eval()
    ids = torch.tensor(random_trajectories(2, seed=11, min_len=12, max_len=12))
    with torch.no_grad():
        expected = backbone(ids).logits
    model = MetaStoneForCausalLMWithSPRM.from_backbone(
        backbone, step_token_ids=[STEP], think_start_token_id=THINK, think_end_token_id=END_THINK
    ).eval()
    assert model.model is backbone.model
    assert not any(p.is_meta for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected)
    assert model.config.text_config is not backbone.config


def test_from_backbone_path(tmp_path):
    torch.manual_seed(0)
    backbone = Qwen2ForCausalLM(tiny_text_config()).eval()
    backbone.save_pretrained(tmp_path)
    ids = torch.tensor(random_trajectories(1, seed=12))
    model = MetaStoneForCausalLMWithSPRM.from_backbone(
        str(tmp_path), step_token_ids=[STEP], think_start_token_id=THINK, think_end_token_id=END_THINK
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, backbone(ids).logits)
    assert model.sprm_head[0].weight.abs().sum() > 0  # initialised, not left empty


def test_tied_embeddings_follow_config():
    model = tiny_metastone(text_overrides={"tie_word_embeddings": True})
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    untied = tiny_metastone()
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()


def test_config_deep_copies_backbone_config():
    text = tiny_text_config()
    config = MetaStoneConfig(text_config=text, step_token_ids=[5], think_start_token_id=6, think_end_token_id=7)
    assert config.text_config is not text
    config.text_config.rms_norm_eps = 0.125
    assert text.rms_norm_eps != 0.125


def test_plain_generate_is_unchanged():
    model = tiny_metastone(seed=13)
    twin = plain_twin(model)
    ids = torch.tensor([[1, THINK, 9, 10]])
    torch.manual_seed(0)
    ours = model.generate(ids, max_new_tokens=12, do_sample=True, top_k=0, pad_token_id=0)
    torch.manual_seed(0)
    stock = twin.generate(ids, max_new_tokens=12, do_sample=True, top_k=0, pad_token_id=0)
    assert torch.equal(ours, stock)


# ---------------------------------------------------------------- fuzz: random ids, random think/step placements
@functools.lru_cache(maxsize=1)
def _fuzz_model():
    model = tiny_metastone(seed=31)
    return model, plain_twin(model)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(
        st.lists(
            st.one_of(st.integers(8, 511), st.sampled_from([STEP, STEP, THINK, END_THINK])), min_size=1, max_size=40
        ),
        min_size=1,
        max_size=4,
    ),
    side=st.sampled_from(["left", "right"]),
)
def test_fuzz_score_trajectories_against_the_official_path(rows, side):
    model, twin = _fuzz_model()
    ids, mask = pad(rows, side)
    result = model.score_trajectories(ids, mask)
    for i, row in enumerate(rows):
        expected_score, expected_logits = reference_official_scores(
            twin, model.sprm_head, row, [STEP], THINK, END_THINK
        )
        assert result.num_steps[i].item() == len(expected_logits)
        torch.testing.assert_close(result.step_logits[i], torch.tensor(expected_logits), atol=1e-4, rtol=1e-4)
        assert abs(result.scores[i].item() - expected_score) < 1e-4


# ---------------------------------------------------------------------------------------------- head precision
SPRM_IDS = {"step_token_ids": [STEP], "think_start_token_id": THINK, "think_end_token_id": END_THINK}


def _saved(model, folder):
    model.save_pretrained(folder)
    return str(folder)


def _load_paths(tmp_path, dtype):
    """Every way a user gets a MetaStone model in half precision, each as (name, builder)."""
    fp32 = tiny_metastone(seed=3)
    half_saved = MetaStoneForCausalLMWithSPRM.from_pretrained(_saved(fp32, tmp_path / "fp32"), dtype=dtype)
    half_folder = _saved(half_saved, tmp_path / "half")  # a half-precision checkpoint, as releases are
    torch.manual_seed(0)
    backbone = Qwen2ForCausalLM(tiny_text_config()).to(dtype)
    backbone_folder = _saved(backbone, tmp_path / "backbone")
    return {
        "from_pretrained(dtype)": lambda: MetaStoneForCausalLMWithSPRM.from_pretrained(tmp_path / "fp32", dtype=dtype),
        "AutoModelForCausalLM(auto) of a half checkpoint": lambda: AutoModelForCausalLM.from_pretrained(
            half_folder, dtype="auto"
        ),
        "from_config(dtype)": lambda: AutoModelForCausalLM.from_config(fp32.config, dtype=dtype),
        "from_backbone(path, dtype)": lambda: MetaStoneForCausalLMWithSPRM.from_backbone(
            backbone_folder, dtype=dtype, **SPRM_IDS
        ),
        "from_backbone(path, auto)": lambda: MetaStoneForCausalLMWithSPRM.from_backbone(
            backbone_folder, dtype="auto", **SPRM_IDS
        ),
        "from_backbone(model)": lambda: MetaStoneForCausalLMWithSPRM.from_backbone(backbone, **SPRM_IDS),
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_head_stays_float32_on_every_load_path(tmp_path, dtype):
    for name, build in _load_paths(tmp_path, dtype).items():
        model = build()
        assert model.model.embed_tokens.weight.dtype == dtype, name  # the policy keeps the user's precision
        assert {p.dtype for p in model.sprm_head.parameters()} == {torch.float32}, name


def test_half_checkpoint_saves_its_head_in_float32(tmp_path):
    from safetensors import safe_open

    model = MetaStoneForCausalLMWithSPRM.from_pretrained(_saved(tiny_metastone(), tmp_path / "a"), dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "b")
    with safe_open(str(tmp_path / "b" / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (not a dict)
    assert {v for k, v in dtypes.items() if k.startswith("sprm_head.")} == {"F32"}
    assert dtypes["model.embed_tokens.weight"] == "BF16"


def test_peft_modules_to_save_keeps_a_float32_head(tmp_path):
    from peft import AutoPeftModelForCausalLM, get_peft_model

    from metastone_hf.lora import metastone_lora_config

    folder = _saved(tiny_metastone(), tmp_path / "base")
    model = MetaStoneForCausalLMWithSPRM.from_pretrained(folder, dtype=torch.bfloat16)
    peft_model = get_peft_model(model, metastone_lora_config(r=2))
    head = peft_model.get_base_model().sprm_head
    assert {p.dtype for p in head.modules_to_save["default"].parameters()} == {torch.float32}
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"), dtype=torch.bfloat16)
    assert {p.dtype for p in reloaded.get_base_model().sprm_head.parameters()} == {torch.float32}


def test_half_precision_scores_use_the_float32_head_and_agree_with_float32(tmp_path):
    fp32 = tiny_metastone(seed=4)
    bf16 = MetaStoneForCausalLMWithSPRM.from_pretrained(_saved(fp32, tmp_path), dtype=torch.bfloat16).eval()
    rows = random_trajectories(4, seed=5, min_len=20, max_len=40)
    ids, mask = pad(rows, "left")
    got = bf16.score_trajectories(ids, mask)
    # Official path on the bf16 backbone: all hidden states, [-2] at the score positions, the float32 head.
    twin = plain_twin(bf16)
    for row, step_logits in zip(rows, got.step_logits):
        _, expected = reference_official_scores(
            twin, lambda f: bf16.sprm_head(f.float()), row, [STEP], THINK, END_THINK
        )
        # bf16 attention over a padded batch differs from the unpadded single forward by a few bf16 ulps.
        torch.testing.assert_close(step_logits, torch.tensor(expected), atol=2e-3, rtol=1e-2)
    reference = fp32.score_trajectories(ids, mask)
    torch.testing.assert_close(got.scores, reference.scores, atol=0.02, rtol=0.05)


# ---------------------------------------------------------------------------------------------- transformers conformance
def test_config_from_a_plain_causal_lm_checkpoint_wraps_its_sizes(tmp_path):
    Qwen2ForCausalLM(tiny_text_config(vocab_size=151936, hidden_size=16, intermediate_size=32)).save_pretrained(
        tmp_path
    )
    config = MetaStoneConfig.from_pretrained(tmp_path)
    assert config.model_type == "metastone" and config.text_config.model_type == "qwen2"
    text = config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size) == (16, 4, 151936)
    assert not hasattr(config, "hidden_size") or config.hidden_size != 4096  # no default-sized backbone invented


def test_model_from_a_plain_causal_lm_checkpoint_fails_before_allocating(tmp_path, monkeypatch):
    Qwen2ForCausalLM(tiny_text_config()).save_pretrained(tmp_path)
    built = []
    monkeypatch.setattr(MetaStoneForCausalLMWithSPRM, "__init__", lambda self, config: built.append(config))
    with pytest.raises(ValueError, match=r"plain `qwen2` checkpoint.*from_backbone"):
        MetaStoneForCausalLMWithSPRM.from_pretrained(tmp_path)
    assert not built  # refused from config.json alone


def test_plain_causal_lm_checkpoint_loads_with_a_fresh_head_when_asked(tmp_path):
    backbone = Qwen2ForCausalLM(tiny_text_config(vocab_size=151936, hidden_size=16, intermediate_size=32)).eval()
    backbone.save_pretrained(tmp_path)
    model = MetaStoneForCausalLMWithSPRM.from_pretrained(tmp_path, sprm_head_may_be_missing=True).eval()
    assert model.config.text_config.hidden_size == 16
    ids = torch.tensor([[1, 151648, 9, 382, 33, 151649]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, backbone(ids).logits)


def test_return_dict_false_returns_a_tuple_like_qwen2():
    model = tiny_metastone()
    twin = plain_twin(model)
    ids = torch.tensor(random_trajectories(1, seed=2, min_len=10, max_len=10))
    with torch.no_grad():
        ours = model(ids, return_dict=False)
        stock = twin(ids, return_dict=False)
        as_dict = model(ids)
    assert isinstance(ours, tuple) and isinstance(stock, tuple)
    torch.testing.assert_close(ours[0], stock[0])  # logits first, as in Qwen2ForCausalLM
    torch.testing.assert_close(ours[-1], as_dict.sprm_score_mask)
    assert any(torch.equal(t, as_dict.sprm_logits) for t in ours if isinstance(t, torch.Tensor))


def test_tuple_and_dict_outputs_are_equivalent_by_subtraction():
    """transformers' `test_model_outputs_equivalence`: every tensor output of the tuple and the dict form subtract."""
    model = tiny_metastone()
    ids = torch.tensor(random_trajectories(2, seed=4, min_len=12, max_len=12))
    ids[:, 3], ids[:, 7] = 6, 5  # a think token, then a step: the score mask is not all zeros
    with torch.no_grad():
        for kwargs in ({}, {"output_hidden_states": True}, {"output_attentions": True}):
            as_tuple = model(ids, return_dict=False, **kwargs)
            as_dict = model(ids, return_dict=True, **kwargs).to_tuple()

            def check(a, b):
                if isinstance(a, (tuple, list)):
                    assert len(a) == len(b)
                    for x, y in zip(a, b):
                        check(x, y)
                elif isinstance(a, torch.Tensor):
                    assert a.dtype != torch.bool, "a bool output cannot be subtracted"
                    assert float((a - b).abs().max()) == 0.0

            check(as_tuple, as_dict)
    assert as_dict[-1].dtype == torch.long and int(as_dict[-1].sum()) == 2


def test_past_key_values_warns_like_stock_models():
    from transformers import DynamicCache

    model = tiny_metastone()
    ids = torch.tensor(random_trajectories(1, seed=3, min_len=10, max_len=10))
    with torch.no_grad():
        first = model(ids[:, :-1], use_cache=True)
        with pytest.warns(FutureWarning, match="past_key_values"):
            old_name = model(ids[:, -1:], past_key_values=first.cache, use_cache=True)
        again = model(ids[:, :-1], use_cache=True, cache=DynamicCache(config=model.config.text_config))
        new_name = model(ids[:, -1:], cache=again.cache, use_cache=True)
    torch.testing.assert_close(old_name.logits, new_name.logits)


def test_lm_loss_is_the_plain_models_and_never_reaches_the_head():
    model = tiny_metastone().train()
    twin = plain_twin(model).train()
    ids = torch.tensor(random_trajectories(2, seed=6, min_len=12, max_len=12))
    torch.manual_seed(0)
    loss = model(ids, labels=ids).loss
    torch.manual_seed(0)
    torch.testing.assert_close(loss, twin(ids, labels=ids).loss)
    loss.backward()
    assert all(parameter.grad is None for parameter in model.sprm_head.parameters())
    with torch.no_grad():
        model.sprm_head[3].bias.fill_(float("nan"))  # a broken head must not poison the LM loss
    assert torch.isfinite(model(ids, labels=ids).loss)


def test_plain_decoding_compiles_as_one_full_graph():
    import torch._dynamo
    from transformers import CompileConfig

    model = tiny_metastone(seed=1)
    ids = torch.tensor(random_trajectories(2, seed=7, min_len=16, max_len=16))
    settings = {"max_new_tokens": 12, "do_sample": False, "cache_implementation": "static", "pad_token_id": 0}
    eager = model.generate(ids, **settings, disable_compile=True)
    # `fullgraph=True` raises on any graph break; the eager backend traces with dynamo without compiling kernels.
    config = CompileConfig(fullgraph=True, backend="eager", mode=None)
    config._compile_all_devices = True  # generate only auto-compiles on accelerators otherwise
    torch._dynamo.reset()
    compiled = model.generate(ids, **settings, compile_config=config)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the decode step really went through dynamo
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


@pytest.mark.parametrize("reentrant", [True, False])
def test_feature_hook_fires_once_per_forward_under_gradient_checkpointing(reentrant):
    model = tiny_metastone().train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ids = torch.tensor(random_trajectories(2, seed=5, min_len=10, max_len=10))
    with model.capture_sprm_features() as captured:
        model(ids, labels=ids).loss.backward()  # the recompute in backward must not add features
    assert len(captured) == 1 and captured[0].shape[:2] == ids.shape
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


# ---------------------------------------------------------------------------------------------- DeepSpeed ZeRO-3
@pytest.mark.parametrize("how", ["from_config", "from_pretrained"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_zero3_init_builds_the_backbone_like_the_plain_causal_lm(tmp_path, architecture, how):
    """Under ``zero.Init`` the backbone's modeling module is imported before the context, as
    ``AutoModelForCausalLM`` does, so the ``__init__`` that ``zero.Init`` restores on exit is the decorated one and a
    backbone built afterwards (a resumed trainer, GRPO's reference model) runs its forward."""
    import importlib.util
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("deepspeed") is None:
        if os.environ.get("CI"):
            pytest.fail("deepspeed is not installed (scripts/setup.sh installs it)")
        pytest.skip("deepspeed is not installed (scripts/setup.sh installs it)")
    tiny_metastone(architecture).save_pretrained(tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    child = Path(__file__).with_name("zero_init_child.py")
    result = subprocess.run(
        [sys.executable, str(child), str(tmp_path), how], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["zero_init_entered"] >= 1
    assert record["backbone_module"] == f"transformers.models.{architecture}.modeling_{architecture}"
    assert record["imported_inside"] == [], record  # no module class is created inside zero.Init
    assert record["forward_error"] is None, record["forward_error"]


# ---------------------------------------------------------------------------------------------- quantized loading
def _torchao_int8_config():
    torchao = pytest.importorskip("torchao", reason="torchao (the `dev` extra) quantizes on the CPU")
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    assert torchao is not None
    return TorchAoConfig(Int8WeightOnlyConfig())


def test_quantized_loading_keeps_the_head_float32_and_scores_close(tmp_path):
    """A transformers quantizer converts the backbone's linears, never the head; scores stay near the float32 model's."""
    config = _torchao_int8_config()
    reference = tiny_metastone()
    reference.save_pretrained(tmp_path)
    quantized = MetaStoneForCausalLMWithSPRM.from_pretrained(tmp_path, quantization_config=config).eval()
    assert type(quantized.model.layers[0].self_attn.q_proj.weight.data).__name__ == "Int8Tensor"  # it did quantize
    for name, parameter in quantized.sprm_head.named_parameters():
        assert type(parameter.data) is torch.Tensor and parameter.dtype == torch.float32, name
        torch.testing.assert_close(parameter.data, reference.sprm_head.get_parameter(name).data, rtol=0, atol=0)
    assert quantized.quantized_sprm_head_parameters() == []
    ids, mask = pad(random_trajectories(6, seed=3), "left")
    expected = reference.score_trajectories(ids, mask)
    got = quantized.score_trajectories(ids, mask)
    assert got.num_steps.tolist() == expected.num_steps.tolist()
    assert [p.tolist() for p in got.step_positions] == [p.tolist() for p in expected.step_positions]
    # int8 weights (per-channel) perturb the features a little; the head itself is exact.
    torch.testing.assert_close(torch.cat(got.step_scores), torch.cat(expected.step_scores), rtol=0, atol=0.01)
    torch.testing.assert_close(got.scores, expected.scores, rtol=0, atol=0.01)


def test_a_forced_quantization_of_the_head_is_reported(tmp_path, monkeypatch, caplog):
    import logging

    config = _torchao_int8_config()
    tiny_metastone().save_pretrained(tmp_path)
    # What a quantizer that ignores the model's declaration does: here, the declaration taken away.
    monkeypatch.setattr(MetaStoneForCausalLMWithSPRM, "_keep_in_fp32_modules", None)
    with caplog.at_level(logging.WARNING):
        model = MetaStoneForCausalLMWithSPRM.from_pretrained(tmp_path, quantization_config=config)
    assert model.quantized_sprm_head_parameters() == ["0.weight", "3.weight"]
    assert "The SPRM head was quantized (0.weight, 3.weight)" in caplog.text


# ---------------------------------------------------------------------------------------------- offloaded loading
@pytest.mark.parametrize("placement", ["disk", "cpu+disk", "auto"])
def test_offloaded_model_scores_and_searches_like_the_model_in_memory(tmp_path, placement):
    """Under accelerate's dispatch with weights on disk (parameters on ``meta``), scoring, Best-of-N and beam search
    give what the model in memory gives."""
    reference = tiny_metastone()
    reference.save_pretrained(tmp_path / "model")
    device_map: Any = {"": "disk"}
    if placement == "cpu+disk":
        device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                      "model.layers.2": "disk", "model.layers.3": "disk", "model.norm": "disk", "model.rotary_emb": "cpu",
                      "lm_head": "disk", "sprm_head": "cpu"}  # fmt: skip
    memory = None
    if placement == "auto":  # what a user types: accelerate plans the placement, and no memory is left but disk
        device_map, memory = "auto", {"cpu": 1}
    offloaded = MetaStoneForCausalLMWithSPRM.from_pretrained(
        tmp_path / "model", device_map=device_map, max_memory=memory, offload_folder=str(tmp_path / "offload")
    ).eval()
    if placement == "auto":
        assert set(offloaded.hf_device_map.values()) == {"disk"}
    assert offloaded.model.layers[3].self_attn.q_proj.weight.device.type == "meta"  # really offloaded

    ids, mask = pad(random_trajectories(4, seed=5), "left")
    expected, got = reference.score_trajectories(ids, mask), offloaded.score_trajectories(ids, mask)
    torch.testing.assert_close(got.scores, expected.scores)
    assert got.num_steps.tolist() == expected.num_steps.tolist()

    prompt = torch.tensor([[1, THINK, 11, 12, 13]])
    for search in ({}, {"search": "beam", "beam_width": 2}, {"search": "dvts", "beam_width": 2}):
        kwargs = dict(max_new_tokens=12, num_candidates=4, do_sample=True, seed=3, **search)
        want, have = reference.generate(prompt, **kwargs), offloaded.generate(prompt, **kwargs)
        assert torch.equal(have.sequences, want.sequences), search
        torch.testing.assert_close(have.scores, want.scores)
