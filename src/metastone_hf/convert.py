"""Convert an official MetaStone-S1 release into a metastone-hf checkpoint.

An official release folder is a plain Qwen2 Hugging Face checkpoint plus ``score_module.pt``: a pickled
state dict of ``nn.Sequential(Linear(d, w), ReLU, Dropout, Linear(w, 1))`` with keys ``0.weight``,
``0.bias``, ``3.weight``, ``3.bias`` (the width ``w`` is not recorded anywhere else).

The output folder holds the backbone's safetensors shards under their original tensor names (the metastone
model is flat, so they equal ``Qwen2ForCausalLM``'s), the head as its own float32 shard
``sprm_head.safetensors``, a ``model.safetensors.index.json`` over both, a ``MetaStoneConfig`` with
``auto_map``, the remote-code files, the tokenizer, the generation config and a model card.

The conversion streams: the backbone is never loaded as a model. Without a dtype change its shards are
hard-linked into the output (copied where the two folders are on different filesystems), so converting a
65 GB release takes seconds and no more memory than the interpreter; with a dtype change
each shard is rewritten one tensor at a time, so memory holds one tensor, never a shard. ``pytorch_model*.bin``
releases are rewritten as safetensors the same way (read with ``weights_only=True``). The output is written to
a temporary sibling folder and renamed into place only when complete, so a failed conversion leaves nothing
half-written.

Usage::

    metastone-convert path/to/MetaStone-S1-7B path/to/metastone-s1-7b-hf [--dtype bfloat16] [--overwrite]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pickle
import shutil
import struct
import sys
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from .atomic_writes import atomic_output_dir
from .configuration_metastone import STEP_TOKEN_MODES, MetaStoneConfig
from .hub import write_model_card
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
HEAD_SHARD_FILE = "sprm_head.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS_FILE = "model.safetensors"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"
BIN_FILE = "pytorch_model.bin"
# Weight dtypes a conversion may cast between; other tensors (integer buffers, fp8 with scales) are kept as they are.
CASTABLE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# The torch dtype and the bytes per element of each safetensors dtype code.
SAFETENSORS_DTYPES = {
    **CASTABLE_DTYPES, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
SAFETENSORS_ITEM_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
OUTPUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STEP_MODE_HELP = (
    "which tokens end a reasoning step: 'official' (default) = the single token of the step text '.\\n\\n', as the "
    "official training and scoring code; 'paper' = every vocabulary token containing it, as the paper words it "
    "(46 tokens for DeepSeek-R1-Distill-Qwen); 'zh' = the official scorer's Chinese mode (short tokens made of "
    "'\\n' or '。' plus at most one character)"
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
    step_mode: str = "official",
) -> Path:
    """Convert an official release folder into a metastone-hf checkpoint folder; returns the output path.

    The backbone is never loaded whole. Without a dtype change its shards are hard-linked (copied across
    filesystems): the output then shares their disk blocks with the release, so deleting either folder leaves
    the other intact but a shard edited in place changes in both. With one, each shard is cast and rewritten a
    tensor at a time.

    Args:
        official_dir: folder with ``config.json`` (Qwen2), the weights (safetensors, or ``pytorch_model*.bin``)
            and ``score_module.pt``.
        output_dir: where to write the converted checkpoint. Refused if it exists unless ``overwrite``.
        dtype: dtype of the saved backbone weights (``"float32"``, ``"bfloat16"``, ``"float16"``); default keeps
            the shards' own. The SPRM head is always saved in float32.
        overwrite: replace an existing ``output_dir`` (only once the new folder is complete).
        step_text: text of the step separator, read from the release's tokenizer when it has one.
        step_mode: which tokens end a step: ``"official"`` (the token ``step_text`` encodes to), ``"paper"``
            (every token containing it) or ``"zh"``; see ``MetaStoneConfig.sprm_token_ids_from_tokenizer``.
    """
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    from transformers.dynamic_module_utils import custom_object_save

    official_dir, output_dir = Path(official_dir), Path(output_dir)
    if not (official_dir / "config.json").is_file():
        raise ConversionError(
            f"{official_dir} has no config.json: pass the folder of an official MetaStone-S1 release."
        )
    if output_dir.resolve() == official_dir.resolve():
        raise ConversionError("The output folder must differ from the official release folder.")
    if step_mode not in STEP_TOKEN_MODES:
        raise ConversionError(f"Unknown step mode {step_mode!r}; choose one of {list(STEP_TOKEN_MODES)}.")
    target_dtype = _output_dtype(dtype)
    head_state = load_official_head(official_dir / SCORE_MODULE_FILE)
    text_config = AutoConfig.from_pretrained(official_dir)
    if isinstance(text_config, MetaStoneConfig):
        raise ConversionError(f"{official_dir} is already a metastone-hf checkpoint; nothing to convert.")
    multiplier = infer_head_shape(head_state, int(text_config.hidden_size))
    weight_files, weight_format = release_weight_files(official_dir)

    tokenizer = None
    if any((official_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(official_dir)
    token_ids: dict[str, Any] = {}
    if tokenizer is not None:
        try:
            token_ids = MetaStoneConfig.sprm_token_ids_from_tokenizer(tokenizer, mode=step_mode, step_text=step_text)
        except ValueError as error:
            raise ConversionError(f"Cannot read the step tokens from the release's tokenizer: {error}") from error
    elif step_mode != "official":
        raise ConversionError(
            f"Step mode {step_mode!r} reads the step tokens from the tokenizer, but {official_dir} has none."
        )
    else:
        logger.warning("No tokenizer in %s: using the Qwen2 defaults for the step and think token ids.", official_dir)
    config = MetaStoneConfig(text_config=text_config.to_dict(), sprm_hidden_multiplier=multiplier, **token_ids)
    # A model on the meta device allocates nothing: it gives the expected tensor names, the remote-code
    # files and the model card's parameter counts without loading the backbone.
    with torch.device("meta"):
        skeleton = MetaStoneForCausalLMWithSPRM(config)
    config = skeleton.config
    expected_names = {name for name in skeleton.state_dict() if not name.startswith("sprm_head.")}
    optional_names = {"lm_head.weight"} if config.tie_word_embeddings else set()

    headers: dict[Path, dict[str, Any]] = {}
    if weight_format == "safetensors":
        headers = {path: read_safetensors_header(path) for path in weight_files}
        _check_backbone_names(
            [name for header in headers.values() for name in header], expected_names, optional_names, official_dir
        )

    generation_config = skeleton.generation_config
    if (official_dir / "generation_config.json").is_file():
        generation_config = GenerationConfig.from_pretrained(official_dir)

    with atomic_output_dir(output_dir, overwrite=overwrite) as staging:
        backbone_names: list[str] = []
        weight_map: dict[str, str] = {}
        sizes: Counter[str] = Counter()  # bytes of the weights per safetensors dtype code
        for source in weight_files:
            name = _output_shard_name(source.name)
            if weight_format == "safetensors":
                header = headers[source]
                if _needs_cast(header, target_dtype):
                    tensors = _rewrite_safetensors_shard(source, header, staging / name, target_dtype)
                else:
                    _link_or_copy(source, staging / name)
                    tensors = {key: (code, _nbytes(code, shape)) for key, (code, shape) in header.items()}
            else:
                tensors = _rewrite_bin_shard(source, staging / name, target_dtype)
            for key, (code, nbytes) in tensors.items():
                backbone_names.append(key)
                weight_map[key] = name
                sizes[code] += nbytes
        if weight_format == "bin":
            _check_backbone_names(backbone_names, expected_names, optional_names, official_dir)
        backbone_dtype = _dtype_name(target_dtype) if target_dtype is not None else _dominant_dtype(sizes)

        head = {f"sprm_head.{key}": value.to(torch.float32).contiguous() for key, value in head_state.items()}
        for key, (code, nbytes) in _save_safetensors(head, staging / HEAD_SHARD_FILE).items():
            weight_map[key] = HEAD_SHARD_FILE
            sizes[code] += nbytes
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(weight_map.items()))}
        (staging / SAFETENSORS_INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

        # What `save_pretrained` records: the weights' dtype, the architecture and the auto classes, whose
        # files (modeling, configuration and their relative imports) are copied beside the weights.
        config.dtype = backbone_dtype
        config.text_config.dtype = backbone_dtype
        config.architectures = [type(skeleton).__name__]
        custom_object_save(skeleton, staging, config=config)
        config.save_pretrained(staging)
        generation_config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        write_model_card(
            skeleton, staging, base_model=None, notes=f"Converted from the official release `{official_dir.name}`."
        )
    return output_dir


def release_weight_files(official_dir: Path) -> tuple[list[Path], str]:
    """The release's weight files in order and their format (``"safetensors"`` or ``"bin"``).

    Safetensors win when both are present. A sharded release is read through its index; every file it names
    must exist.
    """
    for index_name, single_name, weight_format in (
        (SAFETENSORS_INDEX_FILE, SAFETENSORS_FILE, "safetensors"),
        (BIN_INDEX_FILE, BIN_FILE, "bin"),
    ):
        index_path = official_dir / index_name
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ConversionError(f"{index_path} is not a weight index (no `weight_map`): {error}") from error
            files = [official_dir / name for name in dict.fromkeys(weight_map.values())]
            absent = [path.name for path in files if not path.is_file()]
            if absent:
                raise ConversionError(
                    f"{index_path.name} names shard(s) {absent} that are not in {official_dir}: the download is "
                    "incomplete."
                )
            return files, weight_format
        if (official_dir / single_name).is_file():
            return [official_dir / single_name], weight_format
    raise ConversionError(
        f"{official_dir} has no weights: expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX_FILE} with its shards, "
        f"{BIN_FILE} or {BIN_INDEX_FILE} with its shards."
    )


def read_safetensors_header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """Name -> (safetensors dtype code, shape) of every tensor of a safetensors file, read without its data."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            slices = {name: file.get_slice(name) for name in file.keys()}  # noqa: SIM118 (not a dict)
            return {name: (piece.get_dtype(), list(piece.get_shape())) for name, piece in slices.items()}
    except (SafetensorError, OSError) as error:
        raise ConversionError(f"{path} is not a readable safetensors file: {error}") from error


def _output_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    resolved = OUTPUT_DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if resolved not in OUTPUT_DTYPES.values():
        raise ConversionError(f"dtype {dtype!r} is not supported; choose one of {list(OUTPUT_DTYPES)} or None.")
    return resolved


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dominant_dtype(sizes: Counter[str]) -> str | None:
    """Name of the floating dtype holding most of the backbone's bytes (the checkpoint's dtype)."""
    floating = [(nbytes, code) for code, nbytes in sizes.items() if code in CASTABLE_DTYPES]
    return _dtype_name(CASTABLE_DTYPES[max(floating)[1]]) if floating else None


def _nbytes(code: str, shape: list[int]) -> int:
    return math.prod(shape) * SAFETENSORS_ITEM_BYTES[code]


def _needs_cast(header: dict[str, tuple[str, list[int]]], target: torch.dtype | None) -> bool:
    return target is not None and any(
        code in CASTABLE_DTYPES and CASTABLE_DTYPES[code] != target for code, _ in header.values()
    )


def _link_or_copy(source: Path, destination: Path) -> None:
    """Hard-link ``source`` (resolving symlinks, as in a Hub cache snapshot); copy it where links are impossible."""
    try:
        os.link(source.resolve(), destination)
    except OSError as error:
        logger.info("Copying %s (no hard link possible: %s).", source.name, error)
        shutil.copyfile(source, destination)


def _cast(tensor: torch.Tensor, target: torch.dtype | None) -> torch.Tensor:
    """``target`` for floating weights, their own dtype otherwise (or without a target)."""
    if target is not None and tensor.dtype in CASTABLE_DTYPES.values() and tensor.dtype != target:
        return tensor.to(target)
    return tensor


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, tuple[str, int]]:
    """Write ``tensors`` (small: the head) as one safetensors file; returns name -> (dtype code, bytes)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    return {
        name: (read_code, _nbytes(read_code, shape))
        for name, (read_code, shape) in read_safetensors_header(path).items()
    }


def _tensor_offsets(path: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    """Where each tensor's bytes lie in a safetensors file: (data start, name -> (begin, end) from there).

    The format is an 8-byte little-endian header length, a JSON header, then the data. Reading the data with plain
    file reads (not a memory map, whose touched pages stay in this process's memory) keeps a rewrite at one tensor.
    """
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
    header.pop("__metadata__", None)
    return 8 + length, {name: tuple(entry["data_offsets"]) for name, entry in header.items()}


# A rewrite holds at most this many bytes of a tensor at once (read, and cast): the largest tensor of a release (the
# embedding: 151936 x 1024 float32 is 622 MB, a whole shard) is streamed in pieces, not held twice.
CHUNK_BYTES = 64 * 2**20


def _tensor_pieces(tensor: torch.Tensor, target: torch.dtype | None) -> Iterator[torch.Tensor]:
    """``tensor``'s elements in order, cast to ``target`` (:func:`_cast`), at most :data:`CHUNK_BYTES` at a time."""
    flat = tensor.reshape(-1)
    step = max(1, CHUNK_BYTES // max(1, flat.element_size()))
    for start in range(0, flat.numel(), step):
        yield _cast(flat[start : start + step], target)


def _write_safetensors(
    destination: Path, layout: dict[str, tuple[str, list[int]]], data: Iterator[Iterator[Any]]
) -> None:
    """Write a safetensors file whose tensors (name -> dtype code, shape) are known before their data.

    ``data`` yields, for each tensor in ``layout`` order, an iterator over its bytes in pieces (tensors or buffers),
    consumed one piece at a time: ``safetensors.torch.save_file`` would need the whole shard in memory at once. The
    result is read back with ``safetensors.safe_open`` by the conversion's own checks and by ``from_pretrained``.
    """
    header: dict[str, Any] = {}
    offset = 0
    for name, (code, shape) in layout.items():
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + _nbytes(code, shape)]}
        offset += _nbytes(code, shape)
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    if sys.byteorder != "little":
        raise ConversionError("Rewriting shards needs a little-endian machine (safetensors data is little-endian).")
    with open(destination, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for (name, (code, shape)), pieces in zip(layout.items(), data, strict=True):
            written = 0
            for piece in pieces:
                buffer = memoryview(
                    piece.contiguous().reshape(-1).view(torch.uint8).numpy()
                    if isinstance(piece, torch.Tensor)
                    else piece
                )
                file.write(buffer)
                written += buffer.nbytes
            if written != _nbytes(code, shape):
                raise ConversionError(
                    f"Tensor {name}: {written} bytes of data, its header says {_nbytes(code, shape)}."
                )


def _target_code(code: str, target: torch.dtype | None) -> str:
    """The dtype code a weight is written in: ``target`` for floating weights, its own otherwise."""
    if target is None or code not in CASTABLE_DTYPES:
        return code
    return next(c for c, dtype in CASTABLE_DTYPES.items() if dtype == target)


def _file_pieces(
    file: Any, source: Path, name: str, start: int, nbytes: int, dtype: torch.dtype, target: torch.dtype
) -> Iterator[Any]:
    """The ``nbytes`` of tensor ``name`` at ``start`` in ``file``, read in pieces of at most :data:`CHUNK_BYTES`.

    Plain file reads, not a memory map: a map's touched pages stay in this process's memory until the whole shard
    is done, reads hold one piece. Pieces are cast to ``target`` when it differs from ``dtype``.
    """
    step = CHUNK_BYTES - CHUNK_BYTES % dtype.itemsize
    cast = target != dtype
    file.seek(start)
    remaining = nbytes
    while remaining:
        raw = bytearray(min(step, remaining))
        if file.readinto(raw) != len(raw):
            raise ConversionError(f"{source} is truncated: tensor {name} lies past its end.")
        remaining -= len(raw)
        yield torch.frombuffer(raw, dtype=dtype).to(target) if cast else raw


def _rewrite_safetensors_shard(
    source: Path, header: dict[str, tuple[str, list[int]]], destination: Path, target: torch.dtype | None
) -> dict[str, tuple[str, int]]:
    """Cast one safetensors shard (its ``read_safetensors_header``) into ``destination`` a tensor at a time.

    Returns name -> (dtype code, bytes).
    """
    data_start, offsets = _tensor_offsets(source)
    names = sorted(header, key=lambda name: offsets[name][0])
    layout = {name: (_target_code(header[name][0], target), header[name][1]) for name in names}

    def pieces(file: Any, name: str) -> Iterator[Any]:
        begin, end = offsets[name]
        dtype, to_dtype = SAFETENSORS_DTYPES[header[name][0]], SAFETENSORS_DTYPES[layout[name][0]]
        yield from _file_pieces(file, source, name, data_start + begin, end - begin, dtype, to_dtype)

    with open(source, "rb") as file:  # each tensor's pieces are consumed before the next tensor's start
        _write_safetensors(destination, layout, (pieces(file, name) for name in names))
    return {name: (code, _nbytes(code, shape)) for name, (code, shape) in layout.items()}


def _load_bin_state(source: Path, map_location: str, mmap: bool) -> dict[str, torch.Tensor]:
    """``torch.load`` of a ``.bin`` shard with ``weights_only=True``; anything else is refused with a clear error."""
    try:
        state = torch.load(source, map_location=map_location, weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError, ValueError) as error:
        raise ConversionError(
            f"{source} is not a plain tensor state dict and was refused without executing it "
            f"(loaded with weights_only=True): {str(error).splitlines()[0]}."
        ) from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{source} must hold a dict of tensors (a state dict), got {type(state).__name__}.")
    return state


def _bin_data_offsets(source: Path, state: dict[str, torch.Tensor]) -> dict[str, int] | None:
    """Where each tensor's bytes start in a zip-format ``.bin`` loaded on the meta device; ``None`` if unknown.

    ``torch.load(map_location="meta")`` records each storage's offset in the file (``_checkpoint_offset``); a
    contiguous tensor's bytes then lie at that offset plus its own. ``None`` for what plain reads cannot serve: a
    non-contiguous tensor, or data in the other byte order.
    """
    if not zipfile.is_zipfile(source):
        return None
    with zipfile.ZipFile(source) as archive:
        order = [n for n in archive.namelist() if n.endswith("/byteorder") or n == "byteorder"]
        if order and archive.read(order[0]).decode().strip() != sys.byteorder:
            return None
    offsets = {}
    for name, tensor in state.items():
        base = getattr(tensor.untyped_storage(), "_checkpoint_offset", None)
        if base is None or not tensor.is_contiguous():
            return None
        offsets[name] = base + tensor.storage_offset() * tensor.element_size()
    return offsets


def _rewrite_bin_shard(source: Path, destination: Path, target: torch.dtype | None) -> dict[str, tuple[str, int]]:
    """Rewrite one ``pytorch_model*.bin`` shard as safetensors (cast when asked); returns name -> (code, bytes).

    The zip format (every ``torch.save`` since 1.6) is read tensor by tensor with plain file reads, so memory holds
    one piece of one tensor; a zip shard plain reads cannot serve (non-contiguous tensors, big-endian data) is
    memory-mapped, the legacy format loaded whole.
    """
    try:
        state = _load_bin_state(source, "meta", mmap=False)
        offsets = _bin_data_offsets(source, state)
    except ConversionError:
        state, offsets = None, None
    if offsets is None:
        state = _load_bin_state(source, "cpu", mmap=zipfile.is_zipfile(source))  # torch maps the zip format only
    codes = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
    for name, tensor in state.items():
        if tensor.dtype not in codes:
            raise ConversionError(f"Tensor {name} of {source} has dtype {tensor.dtype}, which safetensors cannot hold.")
    layout = {name: (_target_code(codes[t.dtype], target), list(t.shape)) for name, t in state.items()}
    # Each tensor is written as its own bytes, so tied weights stored as views of one storage are no obstacle.
    if offsets is None:
        _write_safetensors(destination, layout, (_tensor_pieces(state[name], target) for name in layout))
    else:
        to_dtype = {name: SAFETENSORS_DTYPES[code] for name, (code, _) in layout.items()}
        with open(source, "rb") as file:
            pieces = (
                _file_pieces(file, source, name, offsets[name], state[name].nbytes, state[name].dtype, to_dtype[name])
                for name in layout
            )
            _write_safetensors(destination, layout, pieces)
    return {name: (code, _nbytes(code, shape)) for name, (code, shape) in layout.items()}


def _output_shard_name(name: str) -> str:
    """Name of a release weight file in the output: always a shard, never ``model.safetensors``.

    ``from_pretrained`` reads a folder's ``model.safetensors`` in preference to its index, so a single-file
    release must be renamed for the index (and with it the head shard) to be read. ``.bin`` shards become
    safetensors shards of the same number: ``pytorch_model-00001-of-00002.bin`` ->
    ``model-00001-of-00002.safetensors``.
    """
    if name in (SAFETENSORS_FILE, BIN_FILE):
        return "model-00001-of-00001.safetensors"
    if name.endswith(".bin"):
        name = name.removeprefix("pytorch_").removesuffix(".bin") + ".safetensors"
    if name == HEAD_SHARD_FILE:
        raise ConversionError(f"A release weight file is named {HEAD_SHARD_FILE}, the name of the head's shard.")
    return name


def _check_backbone_names(names: Iterable[str], expected: set[str], optional: set[str], official_dir: Path) -> None:
    """Refuse weights that miss a backbone tensor or already hold a head; warn about tensors the model ignores."""
    seen: set[str] = set()
    duplicates = set()
    for name in names:
        (duplicates if name in seen else seen).add(name)
    if duplicates:
        raise ConversionError(f"Tensor(s) {sorted(duplicates)[:5]} appear in more than one shard of {official_dir}.")
    if any(name.startswith("sprm_head.") for name in seen):
        raise ConversionError(f"{official_dir} already holds `sprm_head.*` weights: it is not an official release.")
    missing = sorted(expected - optional - seen)
    if missing:
        raise ConversionError(
            f"The weights of {official_dir} lack {len(missing)} tensor(s) the config.json architecture needs, e.g. "
            f"{missing[:5]}: the shards are incomplete or belong to another model."
        )
    unexpected = sorted(seen - expected)
    if unexpected:
        logger.warning(
            "%d tensor(s) of %s are not used by the model and will be ignored when loading, e.g. %s.",
            len(unexpected),
            official_dir,
            unexpected[:5],
        )


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
        "--dtype",
        default=None,
        choices=list(OUTPUT_DTYPES),
        help="dtype of the saved backbone weights (default: the release's, hard-linked; the SPRM head stays float32)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder once done")
    parser.add_argument("--step-mode", default="official", choices=list(STEP_TOKEN_MODES), help=STEP_MODE_HELP)


def run_convert(args: argparse.Namespace) -> int:
    try:
        path = convert_official_checkpoint(
            args.official_dir,
            args.output_dir,
            dtype=args.dtype,
            overwrite=args.overwrite,
            step_mode=args.step_mode,
        )
    except (ConversionError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Converted checkpoint written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
