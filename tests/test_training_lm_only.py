"""LM-loss-only training of a MetaStone model (SFT) in 2 processes with gradient checkpointing (gloo DDP on CPU).

DDP fails on a trainable parameter that receives no gradient, and the SPRM head receives none from an LM loss: the
head is frozen, then TRL's ``SFTTrainer`` (its fused LM-head path) and transformers' ``Trainer`` (the model's own
loss) both train the policy alone.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from test_training_distributed import _free_port

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
@pytest.mark.parametrize("trainer_kind", ["sft", "trainer"])
def test_lm_only_training_two_processes_with_gradient_checkpointing(tmp_path, trainer_kind):
    import subprocess

    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("accelerate CLI not found")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    config = HERE.parent / "examples" / "accelerate" / "multi_gpu.yaml"
    command = [
        accelerate, "launch", "--config_file", str(config), "--num_processes", "2", "--mixed_precision", "no",
        "--main_process_port", str(_free_port()), str(HERE / "lm_only_worker.py"), str(tmp_path), trainer_kind,
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in ranks:
        assert result["num_processes"] == 2 and result["gradient_checkpointing"]
        assert len(result["losses"]) == 3 and result["losses"][-1] < result["losses"][0]
        assert result["backbone_moved"] > 0  # the policy trained
        assert result["head_unchanged"]  # the head did not
    assert ranks[0]["embed_sample"] == ranks[1]["embed_sample"]  # DDP kept the ranks in step
