"""Worker of tests/test_training_engines.py: runs on every rank under ``accelerate launch`` (2 CPU processes).

Usage: ``accelerate launch --config_file ENGINE.yaml ... training_engines_worker.py SPEC.json``

SPEC.json: ``engine`` (zero2 | zero3 | fsdp2), ``bf16``, ``checkpoint`` (the tiny MetaStone checkpoint to train),
``resume_checkpoint`` (a checkpoint with other weights, which resuming must overwrite), ``output_dir``,
``max_steps``, ``save_steps``, ``sprm_learning_rate``, ``beta`` (optional: the KL coefficient; above 0, TRL builds a
reference model from the checkpoint).

Two phases, each writing ``OUTPUT_DIR/<phase>-rank<R>.json``:

* ``train``: ``max_steps`` steps from ``checkpoint``, a checkpoint every ``save_steps``; then (unless FSDP writes
  sharded state dicts, where ``save_model`` writes nothing) ``save_model`` into ``OUTPUT_DIR/final`` and the trained
  model's step logits on a held-out batch;
* ``resume``: a new trainer on ``resume_checkpoint`` resumes from the first checkpoint of ``train`` and runs to
  ``max_steps``.

Each phase records the logged losses, the learning rates of the head's parameter group and of the policy's, the head's
float32 weights (DeepSpeed's fp32 master copy, or FSDP's fp32 shards gathered) when training starts, at the first
checkpoint and at the end, and the dtypes the engine keeps the head in. Under DeepSpeed it also records, per step,
the per-parameter-group gradient norms the ZeRO optimizer combines and the norm it clips every group with.

What only this CPU test machine needs (not the package): accelerate turns DeepSpeed and FSDP on only with
``use_cpu=False``, which on a machine without GPUs leaves no process-group backend, so the state is built first with
gloo and the Trainer told to use it (``use_configured_state``); accelerate switches FSDP on only for GPU-type states,
so the state is marked multi-GPU (its device stays the CPU); ``TrainingArguments`` refuses ``bf16=True`` without a
bf16-capable GPU, so that check is patched; DeepSpeed gets ``DS_ACCELERATOR=cpu`` from the test.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent


def configure_cpu_distributed_state(engine: str, bf16: bool) -> None:
    """The CPU-only stand-ins described in the module docstring (before every trainer: its state is rebuilt)."""
    import transformers.training_args
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    state = PartialState(backend="gloo")
    if engine == "fsdp2":
        state.distributed_type = DistributedType.MULTI_GPU
    if bf16:
        transformers.training_args.is_torch_bf16_gpu_available = lambda: True


class ZeroClippingProbe:
    """Records what DeepSpeed's ZeRO optimizers clip with: per step, the per-group norms and the norm applied.

    Wraps ``combine_grad_norm_groups`` (per-parameter-group norms -> the global norm) as ZeRO-1/2 and ZeRO-3 import
    it, and ``unscale_and_clip_grads`` (called once per group / sub-group with the norm it clips by).
    """

    def __init__(self) -> None:
        self.combined: list[dict[str, Any]] = []
        self.clipped_with: list[float] = []
        self.clip_grad: float | None = None

    def install(self) -> None:
        from deepspeed.runtime.zero import stage3, stage_1_and_2

        probe = self
        for module in (stage_1_and_2, stage3):
            original_combine = module.combine_grad_norm_groups

            def combine(norm_groups, *args, _original=original_combine, **kwargs):
                norm_groups = list(norm_groups)
                combined = _original(norm_groups, *args, **kwargs)
                probe.combined.append({"groups": [float(n) for n in norm_groups], "combined": float(combined)})
                return combined

            module.combine_grad_norm_groups = combine
        for cls in (stage_1_and_2.DeepSpeedZeroOptimizer, stage3.DeepSpeedZeroOptimizer_Stage3):
            original_clip = cls.unscale_and_clip_grads

            def unscale_and_clip_grads(self, group, total_norm, _original=original_clip):
                probe.clip_grad = float(self.clip_grad)
                probe.clipped_with.append(float(total_norm))
                return _original(self, group, total_norm)

            cls.unscale_and_clip_grads = unscale_and_clip_grads

    def pop_step(self) -> dict[str, Any]:
        """What was recorded since the previous call (one optimizer step)."""
        step = {"combined": self.combined, "clipped_with": self.clipped_with, "clip_grad": self.clip_grad}
        self.combined, self.clipped_with = [], []
        return step


def full_fp32_head(trainer: Any) -> dict[str, list[float]]:
    """The head's float32 weights as the optimizer updates them, whole (a collective: every rank calls it).

    DeepSpeed: the fp32 master copy of its ZeRO optimizer (the module's own parameters are in the training dtype);
    FSDP2: the parameter shards (float32 storage) gathered.
    """
    head = trainer.accelerator.unwrap_model(trainer.model).sprm_head
    weights: dict[str, list[float]] = {}
    for name, param in head.named_parameters():
        value = None
        if trainer.is_deepspeed_enabled:
            from deepspeed.utils import safe_get_full_fp32_param

            value = safe_get_full_fp32_param(param)
        elif hasattr(param, "full_tensor"):
            value = param.detach().full_tensor()
        if value is None:
            value = param.detach()
        weights[name] = value.detach().float().cpu().flatten().tolist()
    return weights


def head_dtypes(trainer: Any) -> dict[str, str]:
    """``param``: the dtype the head's parameters report; ``stored``: the dtype of the values this rank keeps (the
    ZeRO-3 partition, the FSDP shard)."""
    param = next(trainer.accelerator.unwrap_model(trainer.model).sprm_head.parameters())
    if hasattr(param, "ds_tensor"):  # ZeRO-3: `param` is an empty stand-in, the partition holds the values
        stored = param.ds_tensor.dtype
    elif hasattr(param, "to_local"):
        stored = param.to_local().dtype
    else:
        stored = param.dtype
    return {"param": str(param.dtype), "stored": str(stored)}


def live_step_logits(trainer: Any, ids: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """Step logits of the trained (wrapped, possibly sharded) model on a held-out batch, through its own forward.

    The wrapper's forward gathers ZeRO-3 partitions / FSDP shards as in training (a collective: every rank calls it);
    the head runs without dropout.
    """
    wrapped = trainer.model_wrapped
    metastone = trainer.accelerator.unwrap_model(trainer.model)
    wrapped.eval()
    try:
        with torch.no_grad():
            position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
            out = wrapped(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
    finally:
        wrapped.train()
    return out.sprm_logits.float()[metastone.sprm_score_mask(ids, mask)].tolist()


def run_phase(spec: dict[str, Any], phase: str, probe: ZeroClippingProbe | None) -> dict[str, Any]:
    """One trainer (``train`` or ``resume``); returns what this rank records."""
    sys.path.insert(0, str(HERE))
    from test_training_trainer import SyntheticTask
    from transformers import TrainerCallback

    from metastone_hf.training import SPRMGRPOTrainer

    task = SyntheticTask()
    output_dir = Path(spec["output_dir"])
    record: dict[str, Any] = {"lrs": [], "zero_clipping": []}

    class Recorder(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            # After the engine is built and a checkpoint loaded.
            record["start_step"] = state.global_step
            record["head_start"] = full_fp32_head(trainer)

        def on_step_end(self, args, state, control, **kwargs):
            groups = trainer.optimizer.param_groups
            record["lrs"].append(
                {
                    "step": state.global_step,
                    "head": next(g["lr"] for g in groups if g.get("name") == "sprm_head"),
                    "policy": [g["lr"] for g in groups if g.get("name") != "sprm_head"],
                }
            )
            record["group_names"] = [g.get("name") for g in groups]
            if state.global_step == spec["save_steps"]:  # the weights the checkpoint of this step holds
                record["head_at_save"] = full_fp32_head(trainer)
            if probe is not None:
                record["zero_clipping"].append(probe.pop_step())

    checkpoint = spec["checkpoint"] if phase == "train" else spec["resume_checkpoint"]
    args = task.args(
        output_dir / "run",
        use_cpu=False,
        accelerator_config={"use_configured_state": True},
        bf16=spec["bf16"],
        model_init_kwargs={"trust_remote_code": True, "dtype": "bfloat16" if spec["bf16"] else "float32"},
        per_device_train_batch_size=8,
        max_steps=spec["max_steps"],
        save_strategy="steps",
        save_steps=spec["save_steps"],
        sprm_learning_rate=spec["sprm_learning_rate"],
        beta=spec.get("beta", 0.0),
        disable_tqdm=True,
    )
    trainer = SPRMGRPOTrainer(
        model=checkpoint, reward_funcs=task.reward, args=args, train_dataset=task.dataset(), processing_class=task.tok
    )
    trainer.add_callback(Recorder())
    resume_from = str(output_dir / "run" / f"checkpoint-{spec['save_steps']}") if phase == "resume" else None
    trainer.train(resume_from_checkpoint=resume_from)

    state = trainer.accelerator.state
    fsdp_plugin = state.fsdp_plugin if trainer.is_fsdp_enabled else None
    record.update(
        distributed_type=str(state.distributed_type),
        num_processes=state.num_processes,
        zero_stage=state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None,
        fsdp_version=getattr(fsdp_plugin, "fsdp_version", None),
        fsdp_state_dict_type=str(fsdp_plugin.state_dict_type) if fsdp_plugin is not None else None,
        mixed_precision=str(state.mixed_precision),
        head_dtypes=head_dtypes(trainer),
        head_end=full_fp32_head(trainer),
        history=[h for h in trainer.state.log_history if "loss" in h],
    )
    if phase == "train" and not (fsdp_plugin is not None and "SHARDED" in record["fsdp_state_dict_type"]):
        ids, mask, _ = task.heldout(n=16)
        record["step_logits"] = live_step_logits(trainer, ids, mask)
        trainer.save_model(str(output_dir / "final"))
    trainer.accelerator.wait_for_everyone()
    return record


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    import transformers
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    transformers.logging.set_verbosity_error()
    probe = None
    if spec["engine"].startswith("zero"):
        probe = ZeroClippingProbe()
        probe.install()
    for phase in ("train", "resume"):
        configure_cpu_distributed_state(spec["engine"], spec["bf16"])
        record = run_phase(spec, phase, probe)
        rank = PartialState().process_index
        Path(spec["output_dir"], f"{phase}-rank{rank}.json").write_text(json.dumps(record))
        # The next phase builds a new Trainer (and engine) on the same process group.
        AcceleratorState._reset_state(reset_partial_state=False)
    # Both ranks have written their records; end without the interpreter's teardown, where gloo's threads can abort
    # the process ("terminate called without an active exception") after a successful run.
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
