"""Shared fixtures: tiny models built from configs and the real tokenizer/data from ../shared."""

from __future__ import annotations

import os
import re
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("METASTONE_SHARED", REPO_ROOT.parent / "shared"))
REAL_TOKENIZER = SHARED / "tokenizers" / "deepseek-r1-distill-qwen-7b"
DATA = SHARED / "data"

# Ids used by the tiny models of `metastone_hf.tiny`.
STEP, THINK, END_THINK = 5, 6, 7


@pytest.fixture(scope="session")
def real_tokenizer():
    if not REAL_TOKENIZER.exists():
        pytest.skip(f"real tokenizer not found at {REAL_TOKENIZER} (set METASTONE_SHARED)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(REAL_TOKENIZER)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.exists():
        pytest.skip(f"shared data not found at {DATA} (set METASTONE_SHARED)")
    return DATA


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Commands under test may set torch's thread count (`--threads`); later tests must not inherit it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def demo_completion_steps(completion: str, step_pattern: re.Pattern) -> list[tuple[str, ...]]:
    """The steps of a well-formed demo completion, each as ``step_pattern``'s groups: split on the step text inside
    the think span by hand, independently of the task's own parser."""
    body = completion.split("<think>", 1)[1].split("</think>", 1)[0]
    pieces = body.split(".\n\n")
    assert pieces[-1] == ""
    steps = []
    for piece in pieces[:-1]:
        match = step_pattern.fullmatch(piece)
        assert match, piece
        steps.append(match.groups())
    return steps
