"""Child of tests/test_modeling_metastone.py: builds a MetaStone model under DeepSpeed ZeRO-3 in a fresh interpreter.

Usage: ``python zero_init_child.py CHECKPOINT {from_config|from_pretrained}``

One process (world size 1, gloo), so no launcher is needed. The backbone's modeling module has not been imported yet
when the model is built, as in a training script that only names a checkpoint. The script wraps ``deepspeed.zero.Init``
(transformers looks it up at call time) to record the modules imported while it is active, builds the model the way
the CHECKPOINT is named, leaves ZeRO-3, builds a second backbone of the same family without DeepSpeed (what a resumed
trainer or GRPO's reference model does) and runs a forward through it.

Prints one JSON line: ``imported_inside`` (modules that define ``nn.Module`` classes, imported inside ``zero.Init``),
``backbone_module``, ``zero_init_entered`` and ``forward_error`` (``None`` when the second forward ran).
"""

from __future__ import annotations

import inspect
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")

import deepspeed
import torch
from transformers import AutoModel
from transformers.integrations import HfDeepSpeedConfig
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from metastone_hf import MetaStoneConfig, MetaStoneForCausalLMWithSPRM


def module_classes(module_name: str) -> bool:
    module = sys.modules.get(module_name)
    return module is not None and any(
        inspect.isclass(v) and issubclass(v, torch.nn.Module) and v.__module__ == module_name
        for v in vars(module).values()
    )


def main(checkpoint: str, how: str) -> None:
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    record: dict = {"zero_init_entered": 0}

    class RecordingInit(deepspeed.zero.Init):
        def __enter__(self):
            record["zero_init_entered"] += 1
            self._modules_before = set(sys.modules)
            return super().__enter__()

        def __exit__(self, *exc):
            result = super().__exit__(*exc)
            record.setdefault("imported_inside", []).extend(
                sorted(m for m in set(sys.modules) - self._modules_before if module_classes(m))
            )
            return result

    deepspeed.zero.Init = RecordingInit
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3},
    }
    hf_ds_config = HfDeepSpeedConfig(ds_config)  # ZeRO-3 is "enabled" while this object lives
    config = MetaStoneConfig.from_pretrained(checkpoint)
    if how == "from_config":
        MetaStoneForCausalLMWithSPRM._from_config(config)
    else:
        MetaStoneForCausalLMWithSPRM.from_pretrained(checkpoint)
    del hf_ds_config
    unset_hf_deepspeed_config()

    record["backbone_module"] = type(AutoModel.from_config(config.text_config)).__module__
    second = MetaStoneForCausalLMWithSPRM(config).eval()
    try:
        with torch.no_grad():
            second(input_ids=torch.tensor([[1, 2, 3, 4]]))
        record["forward_error"] = None
    except Exception as error:  # the record says what failed; the test asserts on it
        record["forward_error"] = f"{type(error).__name__}: {error}"
    print(json.dumps(record))
    sys.stdout.flush()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
