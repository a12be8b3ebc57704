"""Convert an official MetaStone-S1 release into a metastone-hf checkpoint.

An official release folder is a plain Qwen2 Hugging Face checkpoint plus ``score_module.pt``: a pickled
state dict of ``nn.Sequential(Linear(d, w), ReLU, Dropout, Linear(w, 1))`` with keys ``0.weight``,
``0.bias``, ``3.weight``, ``3.bias`` (the width ``w`` is not recorded anywhere else).

The output folder holds safetensors weights, a ``MetaStoneConfig`` with ``auto_map``, the remote-code
files, the tokenizer, the generation config and a model card. It is written to a temporary sibling folder
and renamed into place only when complete, so a failed conversion leaves nothing half-written.

Usage::

    metastone-convert path/to/MetaStone-S1-7B path/to/metastone-s1-7b-hf [--dtype bfloat16] [--overwrite]
"""

from __future__ import annotations

import argparse
import logging
import pickle
import sys
from pathlib import Path
from typing import Any

import torch

from .configuration_metastone import MetaStoneConfig
from .hub import atomic_output_dir, write_model_card
from .modeling_metastone import MetaStoneForCausalLMWithSPRM

logger = logging.getLogger(__name__)

SCORE_MODULE_FILE = "score_module.pt"
OFFICIAL_HEAD_KEYS = ("0.weight", "0.bias", "3.weight", "3.bias")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


class ConversionError(ValueError):
    """The input is not a convertible official MetaStone-S1 release; the message says why and how to fix it."""


def load_official_head(path: str | Path) -> dict[str, torch.Tensor]:
    """Load ``score_module.pt`` safely (``weights_only=True``: a pickle that would run code is refused)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(
            f"{path} not found: an official MetaStone-S1 release ships its SPRM head as {SCORE_MODULE_FILE}."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError, ValueError) as error:
        raise ConversionError(
            f"{path} is not a plain tensor state dict and was refused without executing it "
            f"(loaded with weights_only=True): {str(error).splitlines()[0]}. Re-export the head with "
            "`torch.save(score_module.state_dict(), path)` from a trusted source."
        ) from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path} must hold a dict of tensors (a state dict), got {type(state).__name__}.")
    keys = sorted(state)
    if keys != sorted(OFFICIAL_HEAD_KEYS):
        raise ConversionError(
            f"{path} has keys {keys}; the official score module has exactly {list(OFFICIAL_HEAD_KEYS)} "
            "(Linear -> ReLU -> Dropout -> Linear in an nn.Sequential)."
        )
    return state


def infer_head_shape(state: dict[str, torch.Tensor], hidden_size: int) -> int:
    """Return the width multiplier ``w / d`` after checking every tensor's shape against the backbone."""
    w1, b1, w2, b2 = (state[k] for k in OFFICIAL_HEAD_KEYS)
    if w1.ndim != 2:
        raise ConversionError(f"`0.weight` must be 2-D [width, hidden], got shape {tuple(w1.shape)}.")
    width, features = w1.shape
    if features != hidden_size:
        raise ConversionError(
            f"Head width mismatch: `0.weight` reads {features} features but the backbone's hidden_size is "
            f"{hidden_size}. This score_module.pt belongs to another model size."
        )
    if width % hidden_size:
        raise ConversionError(f"Head hidden width {width} is not a multiple of hidden_size {hidden_size}.")
    expected = {"0.bias": (width,), "3.weight": (1, width), "3.bias": (1,)}
    for key, tensor in (("0.bias", b1), ("3.weight", w2), ("3.bias", b2)):
        if tuple(tensor.shape) != expected[key]:
            raise ConversionError(
                f"`{key}` has shape {tuple(tensor.shape)}, expected {expected[key]} for width {width}."
            )
    return width // hidden_size


def convert_official_checkpoint(
    official_dir: str | Path,
    output_dir: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    step_text: str = ".\n\n",
) -> Path:
    """Convert an official release folder into a metastone-hf checkpoint folder; returns the output path.

    Args:
        official_dir: folder with ``config.json`` (Qwen2), the weights and ``score_module.pt``.
        output_dir: where to write the converted checkpoint. Refused if it exists unless ``overwrite``.
        dtype: dtype of the saved weights (e.g. ``"bfloat16"``); default keeps the checkpoint's.
        overwrite: replace an existing ``output_dir`` (only once the new folder is complete).
        step_text: text of the step separator, read from the release's tokenizer when it has one.
    """
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    official_dir, output_dir = Path(official_dir), Path(output_dir)
    if not (official_dir / "config.json").is_file():
        raise ConversionError(
            f"{official_dir} has no config.json: pass the folder of an official MetaStone-S1 release."
        )
    if output_dir.resolve() == official_dir.resolve():
        raise ConversionError("The output folder must differ from the official release folder.")
    head_state = load_official_head(official_dir / SCORE_MODULE_FILE)
    text_config = AutoConfig.from_pretrained(official_dir)
    if isinstance(text_config, MetaStoneConfig):
        raise ConversionError(f"{official_dir} is already a metastone-hf checkpoint; nothing to convert.")
    multiplier = infer_head_shape(head_state, int(text_config.hidden_size))

    tokenizer = None
    if any((official_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(official_dir)
    token_ids: dict[str, Any] = {}
    if tokenizer is not None:
        token_ids = MetaStoneConfig.sprm_token_ids_from_tokenizer(tokenizer, step_text=step_text)
    else:
        logger.warning("No tokenizer in %s: using the Qwen2 defaults for the step and think token ids.", official_dir)
    config = MetaStoneConfig(text_config=text_config.to_dict(), sprm_hidden_multiplier=multiplier, **token_ids)

    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = MetaStoneForCausalLMWithSPRM.from_pretrained(
        official_dir, config=config, dtype=torch_dtype or "auto", sprm_head_may_be_missing=True
    )
    head_dtype = next(model.sprm_head.parameters()).dtype
    model.sprm_head.load_state_dict({k: v.to(head_dtype) for k, v in head_state.items()}, strict=True)
    if (official_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(official_dir)

    with atomic_output_dir(output_dir, overwrite=overwrite) as staging:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        write_model_card(
            model, staging, base_model=None, notes=f"Converted from the official release `{official_dir.name}`."
        )
    return output_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="metastone-convert",
        description="Convert an official MetaStone-S1 release (Qwen2 checkpoint + score_module.pt) into a "
        "metastone-hf checkpoint loadable with AutoModel.from_pretrained(..., trust_remote_code=True).",
    )
    add_convert_arguments(parser)
    return run_convert(parser.parse_args(argv))


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("official_dir", help="folder of the official release")
    parser.add_argument("output_dir", help="folder to write (refused if it exists, unless --overwrite)")
    parser.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="dtype of saved weights"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder once done")


def run_convert(args: argparse.Namespace) -> int:
    try:
        path = convert_official_checkpoint(
            args.official_dir, args.output_dir, dtype=args.dtype, overwrite=args.overwrite
        )
    except (ConversionError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Converted checkpoint written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
