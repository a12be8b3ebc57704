"""`SPRMGRPOTrainer` under DeepSpeed ZeRO-2, ZeRO-3 and FSDP2: 2 CPU processes (gloo), the shipped accelerate configs.

Each run launches tests/training_engines_worker.py with one of examples/accelerate/*.yaml, overridden to 2 processes,
in float32 (``--mixed_precision no``, a float32 checkpoint) or bf16 mixed precision (a bf16 checkpoint whose head is
float32, as every MetaStone loading path keeps it). The worker trains 4 steps with a checkpoint at step 2, saves the
model, then resumes from that checkpoint in a new trainer and runs to step 4 again. The references the tests compare
against are independent of the engine's own bookkeeping: the other rank, the float32 run, the uninterrupted run, a
fresh process loading the saved folder, and the ZeRO optimizer's per-group norms recomputed.

On this machine the runs need what only a CPU-only machine needs (see the worker's docstring); DeepSpeed itself is
installed by scripts/setup.sh (``--no-deps``, so that pip keeps the CPU torch).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parent / "examples" / "accelerate"
WORKER = HERE / "training_engines_worker.py"
MAX_STEPS, SAVE_STEPS = 4, 2
HEAD_LR, POLICY_LR = 1e-5, 1e-6  # the official learning rates; at 1e-5 a bf16-stored head would barely move
HEAD_WEIGHTS = ("0.weight", "3.weight")
LAUNCH_TIMEOUT_S = 300

ENGINE_CONFIGS = {"zero2": "deepspeed_zero2.yaml", "zero3": "deepspeed_zero3.yaml", "fsdp2": "fsdp2.yaml"}
# (engine, precision, FSDP state-dict type override): the shipped configs in float32 and bf16, plus FSDP2 writing
# sharded (torch.distributed.checkpoint) state dicts, the setting for models too large to gather on one process.
RUNS = [(engine, precision, None) for engine in ENGINE_CONFIGS for precision in ("fp32", "bf16")]
SHARDED_FSDP = ("fsdp2", "bf16", "SHARDED_STATE_DICT")
# The dtype each engine keeps the head's parameters in under bf16 mixed precision (all three update it in fp32).
BF16_HEAD_STORAGE = {"zero2": "torch.bfloat16", "zero3": "torch.bfloat16", "fsdp2": "torch.float32"}

pytestmark = [pytest.mark.slow, pytest.mark.engines]


def _run_id(run: tuple) -> str:
    engine, precision, state_dict_type, *beta = run
    return f"{engine}-{precision}" + ("-sharded" if state_dict_type else "") + (f"-beta{beta[0]}" if any(beta) else "")


def _require_engine(engine: str) -> None:
    if engine.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        message = "deepspeed is not installed (scripts/setup.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI must run these tests, never skip them
        pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny MetaStone checkpoints of the synthetic task: the one trained (seed 0) and one with other weights (seed 7),
    which a resumed run starts from and must overwrite; each in float32 and in bf16 (head float32)."""
    from test_training_trainer import SyntheticTask

    from metastone_hf import MetaStoneForCausalLMWithSPRM

    task = SyntheticTask()
    root = tmp_path_factory.mktemp("engine-checkpoints")
    paths: dict[str, Path] = {}
    for name, seed in (("train", 0), ("other", 7)):
        fp32, bf16 = root / f"{name}-fp32", root / f"{name}-bf16"
        task.model(seed=seed).save_pretrained(fp32)
        MetaStoneForCausalLMWithSPRM.from_pretrained(fp32, dtype=torch.bfloat16).save_pretrained(bf16)
        for folder in (fp32, bf16):
            task.tok.save_pretrained(folder)
        paths[f"{name}-fp32"], paths[f"{name}-bf16"] = fp32, bf16
    saved = load_file(str(paths["train-bf16"] / "model.safetensors"))
    assert saved["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 for k, v in saved.items() if k.startswith("sprm_head."))
    return paths


class EngineRuns:
    """Launches each run once (on first use) and keeps its records."""

    def __init__(self, checkpoints: dict[str, Path], root: Path) -> None:
        self.checkpoints, self.root = checkpoints, root
        self.results: dict[tuple[str, str, str | None, float], dict[str, Any]] = {}
        self.failed: dict[tuple[str, str, str | None, float], str] = {}

    def __call__(
        self, engine: str, precision: str, state_dict_type: str | None = None, beta: float = 0.0
    ) -> dict[str, Any]:
        _require_engine(engine)
        key = (engine, precision, state_dict_type, beta)
        if key in self.failed:
            # The first test that launched this run reported its error; the others say only that it failed.
            pytest.fail(f"the {_run_id(key)} run failed earlier: {self.failed[key]}", pytrace=False)
        if key not in self.results:
            try:
                self.results[key] = self._launch(*key)
            except BaseException as error:
                self.failed[key] = f"{type(error).__name__} (its output is in the first test that launched it)"
                raise
        return self.results[key]

    def _launch(self, engine: str, precision: str, state_dict_type: str | None, beta: float) -> dict[str, Any]:
        accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
        assert accelerate is not None, "accelerate CLI not found"
        out = self.root / _run_id((engine, precision, state_dict_type, beta))
        out.mkdir(parents=True)
        spec = {
            "engine": engine,
            "bf16": precision == "bf16",
            "checkpoint": str(self.checkpoints[f"train-{precision}"]),
            "resume_checkpoint": str(self.checkpoints[f"other-{precision}"]),
            "output_dir": str(out),
            "max_steps": MAX_STEPS,
            "save_steps": SAVE_STEPS,
            "sprm_learning_rate": HEAD_LR,
            "beta": beta,
        }
        (out / "spec.json").write_text(json.dumps(spec))
        command = [
            accelerate, "launch", "--config_file", str(CONFIGS / ENGINE_CONFIGS[engine]), "--num_processes", "2",
            "--mixed_precision", "bf16" if precision == "bf16" else "no", "--main_process_port", str(_free_port()),
        ]  # fmt: skip
        if state_dict_type is not None:
            command += ["--fsdp_state_dict_type", state_dict_type]
        command += [str(WORKER), str(out / "spec.json")]
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "DS_ACCELERATOR": "cpu",
        }
        env.pop("CUDA_VISIBLE_DEVICES", None)
        start = time.monotonic()
        # Own session: on a timeout the launcher and both ranks are killed together.
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        try:
            output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            pytest.fail(f"{command} timed out after {LAUNCH_TIMEOUT_S}s:\n{output[-5000:]}")
        wall = time.monotonic() - start
        assert proc.returncode == 0, output[-8000:]
        records = {
            (phase, rank): json.loads((out / f"{phase}-rank{rank}.json").read_text())
            for phase in ("train", "resume")
            for rank in (0, 1)
        }
        return {"dir": out, "wall_s": wall, "records": records}


@pytest.fixture(scope="module")
def engine_runs(checkpoints, tmp_path_factory) -> EngineRuns:
    return EngineRuns(checkpoints, tmp_path_factory.mktemp("engine-runs"))


def _losses(record: dict[str, Any], key: str) -> dict[int, float]:
    return {h["step"]: h[key] for h in record["history"] if key in h}


def _mean_abs_update(start: dict[str, list[float]], end: dict[str, list[float]]) -> float:
    """Mean absolute change of the head's weight matrices."""
    deltas = torch.cat([torch.tensor(end[k]) - torch.tensor(start[k]) for k in HEAD_WEIGHTS])
    return deltas.abs().mean().item()


def _head_tensors(record_head: dict[str, list[float]]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v) for k, v in record_head.items()}


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("run", RUNS, ids=_run_id)
def test_trains_the_head_on_both_ranks(engine_runs, run):
    engine, precision, _ = run
    result = engine_runs(*run)
    rank0, rank1 = result["records"][("train", 0)], result["records"][("train", 1)]
    if engine == "fsdp2":
        assert rank0["distributed_type"] == "DistributedType.FSDP" and rank0["fsdp_version"] == 2
    else:
        assert rank0["distributed_type"] == "DistributedType.DEEPSPEED"
        assert rank0["zero_stage"] == int(engine[-1])
    assert rank0["num_processes"] == 2
    assert rank0["mixed_precision"] == ("bf16" if precision == "bf16" else "no")

    # The SPR loss is computed at every step.
    sprm_losses = _losses(rank0, "sprm/loss")
    assert sorted(sprm_losses) == list(range(1, MAX_STEPS + 1))
    assert all(0.0 < loss < 10.0 for loss in sprm_losses.values()), sprm_losses
    assert all(h["sprm/steps"] > 0 for h in rank0["history"])

    # The head moves by AdamW steps (about the learning rate per step), not only by weight decay (~1e-9 per step).
    update = _mean_abs_update(rank0["head_start"], rank0["head_end"])
    assert update > 0.25 * HEAD_LR * MAX_STEPS, update
    # Both ranks hold the same head, at the checkpoint and at the end.
    for key in ("head_start", "head_at_save", "head_end"):
        assert rank0[key] == rank1[key], key

    # The head's own parameter group keeps its constant learning rate; the policy's decays linearly.
    assert rank0["group_names"].count("sprm_head") == 1
    for entry in rank0["lrs"]:
        assert entry["head"] == pytest.approx(HEAD_LR, rel=1e-9)
        expected_policy = POLICY_LR * (1 - entry["step"] / MAX_STEPS)
        assert entry["policy"] == [pytest.approx(expected_policy, abs=1e-15)] * len(entry["policy"])

    # Where the head's values live: DeepSpeed casts the module to bf16 (fp32 master copy in its optimizer),
    # FSDP2 keeps float32 shards and computes in bf16.
    stored = BF16_HEAD_STORAGE[engine] if precision == "bf16" else "torch.float32"
    assert rank0["head_dtypes"]["stored"] == stored


@pytest.mark.parametrize("run", RUNS, ids=_run_id)
def test_gradient_clipping_of_the_head(engine_runs, run):
    """FSDP2 clips the head on its own (`sprm_max_grad_norm`); DeepSpeed clips every parameter group, the head's
    included, with one global norm (its `gradient_clipping`), and the trainer leaves the head's clipping to it."""
    engine, _, _ = run
    record = engine_runs(*run)["records"][("train", 0)]
    if engine == "fsdp2":
        assert all(h["sprm/grad_norm"] > 0 for h in record["history"])
        return
    assert not any("sprm/grad_norm" in h for h in record["history"])
    head_group = record["group_names"].index("sprm_head")
    assert len(record["zero_clipping"]) == MAX_STEPS
    for step, history in zip(record["zero_clipping"], record["history"]):
        assert step["clip_grad"] == pytest.approx(1.0)  # "auto" -> max_grad_norm
        (norms,) = [c for c in step["combined"] if len(c["groups"]) == len(record["group_names"])]
        assert norms["groups"][head_group] > 0  # the head's gradient is in the global norm...
        assert norms["combined"] == pytest.approx(math.sqrt(sum(n * n for n in norms["groups"])), rel=1e-5)
        # ... and every group, the head's included, is clipped with that one norm.
        assert step["clipped_with"] == [pytest.approx(norms["combined"], rel=1e-6)] * len(norms["groups"])
        assert history["grad_norm"] == pytest.approx(norms["combined"], rel=1e-4)


@pytest.mark.parametrize("engine", list(ENGINE_CONFIGS))
def test_bf16_head_updates_happen_in_fp32(engine_runs, engine):
    """With bf16 mixed precision the head moves as much as in float32 at lr 1e-5 (a bf16-stored head would not)."""
    fp32 = engine_runs(engine, "fp32")["records"][("train", 0)]
    bf16 = engine_runs(engine, "bf16")["records"][("train", 0)]
    ratio = _mean_abs_update(bf16["head_start"], bf16["head_end"]) / _mean_abs_update(
        fp32["head_start"], fp32["head_end"]
    )
    assert 0.8 < ratio < 1.25, ratio

    # The threshold tells the two apart: the same AdamW steps on a bf16-stored head move it about 5x less.
    start = torch.tensor(bf16["head_start"]["0.weight"])
    moved = {}
    for dtype in (torch.float32, torch.bfloat16):
        weight = torch.nn.Parameter(start.clone().to(dtype))
        optimizer = torch.optim.AdamW([weight], lr=HEAD_LR, weight_decay=0.01)
        generator = torch.Generator().manual_seed(0)
        for _ in range(MAX_STEPS):
            weight.grad = torch.randn(weight.shape, generator=generator).to(dtype)
            optimizer.step()
        moved[dtype] = (weight.detach().float() - start.to(dtype).float()).abs().mean().item()
    assert moved[torch.float32] > 0.5 * HEAD_LR * MAX_STEPS
    assert moved[torch.bfloat16] / moved[torch.float32] < 0.5, moved


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("run", [*RUNS, SHARDED_FSDP], ids=_run_id)
def test_resume_continues_the_run(engine_runs, run):
    """A new trainer on other weights resumes from the step-2 checkpoint: same head, same losses, same end."""
    engine, _, state_dict_type = run
    result = engine_runs(*run)
    records = result["records"]
    train, resumed = records[("train", 0)], records[("resume", 0)]
    assert resumed["start_step"] == SAVE_STEPS
    assert resumed["head_start"] == train["head_at_save"]  # the fp32 head (master weights) restored exactly
    assert resumed["head_start"] != train["head_start"]
    assert records[("resume", 1)]["head_end"] == resumed["head_end"]

    for key in ("loss", "sprm/loss"):
        uninterrupted, continued = _losses(train, key), _losses(resumed, key)
        for step in range(SAVE_STEPS + 1, MAX_STEPS + 1):
            assert continued[step] == pytest.approx(uninterrupted[step], rel=1e-6, abs=1e-9), (key, step)
    assert [e["step"] for e in resumed["lrs"]] == list(range(SAVE_STEPS + 1, MAX_STEPS + 1))
    assert resumed["lrs"] == train["lrs"][SAVE_STEPS:]  # both schedules continue where they were
    for key, value in _head_tensors(resumed["head_end"]).items():
        torch.testing.assert_close(value, torch.tensor(train["head_end"][key]), rtol=0, atol=1e-7)

    # The checkpoint holds the engine's own (sharded) state and the head.
    checkpoint = result["dir"] / "run" / f"checkpoint-{SAVE_STEPS}"
    files = {p.name for p in checkpoint.iterdir()}
    if engine.startswith("zero"):
        shards = {p.name for p in (checkpoint / f"global_step{SAVE_STEPS}").iterdir()}
        for rank in (0, 1):
            # e.g. bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt: this rank's partition of the fp32 optimizer state
            assert any(f"zero_pp_rank_{rank}_" in name and "optim_states" in name for name in shards)
    elif state_dict_type == "SHARDED_STATE_DICT":
        from torch.distributed.checkpoint import FileSystemReader

        assert {"pytorch_model_fsdp_0", "optimizer_0"} <= files
        model_keys = FileSystemReader(str(checkpoint / "pytorch_model_fsdp_0")).read_metadata().state_dict_metadata
        assert {f"model.sprm_head.{k}" for k in ("0.weight", "0.bias", "3.weight", "3.bias")} <= set(model_keys)
        optimizer_keys = FileSystemReader(str(checkpoint / "optimizer_0")).read_metadata().state_dict_metadata
        assert {"optimizer.state.sprm_head.0.weight.exp_avg", "optimizer.state.sprm_head.0.weight.exp_avg_sq"} <= set(
            optimizer_keys
        )
        return  # sharded checkpoints hold no `model.safetensors`
    else:
        assert {"pytorch_model_fsdp.bin", "optimizer.bin"} <= files
    saved = load_file(str(checkpoint / "model.safetensors"))
    for key, value in _head_tensors(train["head_at_save"]).items():
        assert saved[f"sprm_head.{key}"].dtype == torch.float32
        torch.testing.assert_close(saved[f"sprm_head.{key}"].flatten(), value, rtol=0, atol=0)


@pytest.mark.parametrize("run", RUNS, ids=_run_id)
def test_saved_model_loads_with_remote_code_and_scores_like_the_trained_model(engine_runs, checkpoints, run):
    from test_training_trainer import SyntheticTask
    from transformers import AutoModelForCausalLM

    _, precision, _ = run
    result = engine_runs(*run)
    train = result["records"][("train", 0)]
    saved = result["dir"] / "final"
    config = json.loads((saved / "config.json").read_text())
    assert set(config["auto_map"].values()) <= {
        "configuration_metastone.MetaStoneConfig",
        "modeling_metastone.MetaStoneForCausalLMWithSPRM",
    }
    assert not any(p.name.startswith("_fsdp") for p in saved.iterdir())  # no torch files taken for remote code

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(saved, trust_remote_code=True, dtype=dtype).eval()
    assert type(model).__name__ == "MetaStoneForCausalLMWithSPRM"
    assert model.model.embed_tokens.weight.dtype == dtype
    # The saved head is the float32 head training updated (DeepSpeed's master weights, FSDP's fp32 shards).
    for key, value in _head_tensors(train["head_end"]).items():
        parameter = model.sprm_head.get_parameter(key)
        assert parameter.dtype == torch.float32
        torch.testing.assert_close(parameter.detach().flatten(), value, rtol=0, atol=0)

    ids, mask, _ = SyntheticTask().heldout(n=16)
    live = torch.tensor(train["step_logits"])
    reloaded = torch.cat(model.score_trajectories(ids, mask).step_logits)
    untrained = AutoModelForCausalLM.from_pretrained(
        checkpoints[f"train-{precision}"], trust_remote_code=True, dtype=dtype
    )
    before_training = torch.cat(untrained.eval().score_trajectories(ids, mask).step_logits)
    assert reloaded.shape == live.shape and live.numel() > 16
    # float32: the same computation. bf16: the engines compute the head in bf16 (DeepSpeed: bf16 parameters, FSDP2:
    # bf16 compute), the reloaded model in float32, so the logits agree to a fraction of their spread.
    tolerance = (0.01 if precision == "fp32" else 0.2) * live.std().item()
    assert (reloaded - live).abs().max().item() < tolerance
    assert (before_training - live).abs().max().item() > tolerance  # the comparison tells trained from untrained


# ---------------------------------------------------------------------------------------------- KL to a reference
def test_grpo_with_a_reference_model_under_zero3(engine_runs):
    """With ``beta > 0`` TRL builds a reference model from the checkpoint (with remote code) after the policy, under
    the same ZeRO-3 ``zero.Init``: it must run its forward, at training and again when a new trainer resumes."""
    records = engine_runs("zero3", "fp32", beta=0.04)["records"]
    for phase in ("train", "resume"):
        rank0, rank1 = records[(phase, 0)], records[(phase, 1)]
        kls = _losses(rank0, "kl")  # a resumed trainer's history starts with the checkpoint's steps
        assert sorted(kls) == list(range(1, MAX_STEPS + 1)), phase
        assert all(math.isfinite(kl) and kl >= 0 for kl in kls.values()), kls
        assert rank0["head_end"] == rank1["head_end"]
    assert records[("resume", 0)]["start_step"] == SAVE_STEPS
