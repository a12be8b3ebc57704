"""Worker of ``test_modeling_parallel.py``: load a checkpoint with transformers' tensor parallelism, run a forward.

Run under ``torchrun --nproc_per_node 2``; rank 0 writes what it saw to the JSON file given as second argument.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig


def placement(parameter: torch.Tensor) -> str:
    return str(parameter.placements[0]) if isinstance(parameter, DTensor) else "plain"


def main(folder: str, out_path: str, ids: list[list[int]]) -> None:
    dist.init_process_group("gloo")
    model = AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=True, distributed_config=DistributedConfig(tp_size=2)
    ).eval()
    with torch.no_grad():
        out = model(torch.tensor(ids))
    report = {
        "lm_head": placement(model.lm_head.weight),
        "embed_tokens": placement(model.model.embed_tokens.weight),
        "q_proj": placement(model.model.layers[0].self_attn.q_proj.weight),
        "sprm_head": sorted({placement(p) for p in model.sprm_head.parameters()}),
        "head_dtype": sorted({str(p.dtype) for p in model.sprm_head.parameters()}),
        "logits": out.logits.tolist(),
        "sprm_logits": out.sprm_logits.tolist(),
    }
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, report["sprm_logits"])
    report["ranks_agree"] = all(g == gathered[0] for g in gathered)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
