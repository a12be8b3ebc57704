"""Converting an official release: peak memory and wall time of the conversion against `cp -r`.

Synthesizes an official-format release (a bf16 Qwen2 checkpoint in several safetensors shards with an index,
``score_module.pt``, a small tokenizer) in a temporary folder, writing one shard at a time, then measures in
fresh subprocesses, interleaved, on the same disk (nothing is dropped from the page cache):

* ``cp -r`` of the release folder;
* the conversion without a dtype change (the default: shards hard-linked);
* the conversion with a dtype change (shards cast and rewritten one tensor at a time).

The conversion runs as ``python -c`` calling ``convert_official_checkpoint``; the child reports how long its
imports (torch, transformers, metastone_hf: a few seconds whatever the release size) and the conversion itself
took. Peak memory is each child's own ``ru_maxrss`` (from ``os.wait4``), interpreter and libraries included.
Linux carries a parent's peak RSS over ``fork`` and ``exec`` into its child's, so this process never imports
torch and the release is written by a child of its own.

The targets (peak RSS <= 1.5x the largest shard, wall time <= 3x ``cp -r``) apply to the default no-change case.

    OMP_NUM_THREADS=1 python benchmarks/bench_convert.py                     # ~1.7 GB release in 2 shards
    OMP_NUM_THREADS=1 python benchmarks/bench_convert.py --layers 40 --shard-mb 2000 --cast-dtype float16
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

GB = 1e9
# The conversion child: times its imports and the conversion itself apart, and reports them on stdout.
CONVERT = """
import json, sys, time
start = time.perf_counter()
from metastone_hf.convert import convert_official_checkpoint
imported = time.perf_counter()
convert_official_checkpoint(sys.argv[1], sys.argv[2], dtype=sys.argv[3] or None)
print(json.dumps({"imports": imported - start, "convert": time.perf_counter() - imported}))
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5504)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000, help="must cover the tiny tokenizer's ids")
    parser.add_argument("--shard-mb", type=int, default=1000, help="largest shard of the synthetic release")
    parser.add_argument(
        "--cast-dtype",
        default=None,
        choices=["float32", "float16", "bfloat16"],
        help="dtype of the cast case (default: float32 for a bf16 release, bfloat16 otherwise)",
    )
    parser.add_argument("--release-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument(
        "--release-format",
        default="safetensors",
        choices=["safetensors", "bin"],
        help="bin: pytorch_model-*.bin shards (rewritten as safetensors by every conversion)",
    )
    parser.add_argument("--tmp-dir", default=tempfile.gettempdir(), help="where the release and outputs go")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each case (medians reported)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--_write-release", dest="write_release", default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def write_release(folder: Path, args: argparse.Namespace) -> None:
    """Write a synthetic official release shard by shard (never more than one shard in memory)."""
    import torch
    from safetensors.torch import save_file
    from torch import nn
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from metastone_hf.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    if args.vocab < len(tokenizer):
        raise SystemExit(f"--vocab {args.vocab} is smaller than the tokenizer ({len(tokenizer)} tokens).")
    config = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        dtype=args.release_dtype,
    )
    dtype = getattr(torch, args.release_dtype)
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id, do_sample=True, temperature=0.6).save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    # Names and shapes from a model on the meta device (nothing allocated), grouped into shards in order.
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in Qwen2ForCausalLM(config).state_dict().items()}
    limit = args.shard_mb * 1_000_000
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = torch.finfo(dtype).bits // 8 * int(torch.Size(shape).numel())
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes

    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for number, names in enumerate(groups, start=1):
        stem, suffix = ("model", "safetensors") if args.release_format == "safetensors" else ("pytorch_model", "bin")
        shard = f"{stem}-{number:05d}-of-{len(groups):05d}.{suffix}"
        tensors = {
            name: torch.empty(shapes[name], dtype=dtype).normal_(0.0, 0.02, generator=generator) for name in names
        }
        if args.release_format == "safetensors":
            save_file(tensors, folder / shard, metadata={"format": "pt"})
        else:
            torch.save(tensors, folder / shard)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
        weight_map.update(dict.fromkeys(names, shard))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    index_name = (
        "model.safetensors.index.json" if args.release_format == "safetensors" else "pytorch_model.bin.index.json"
    )
    (folder / index_name).write_text(json.dumps(index, indent=2))

    width = 2 * args.hidden
    head = nn.Sequential(nn.Linear(args.hidden, width), nn.ReLU(), nn.Dropout(0.5), nn.Linear(width, 1))
    torch.save(head.state_dict(), folder / "score_module.pt")


def measure(command: list[str]) -> tuple[float, int, str]:
    """Run ``command``; returns (wall seconds, peak RSS bytes of that child alone, its stdout)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as errors:  # files: a full pipe would block
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=errors)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        errors.seek(0)
        if process.returncode != 0:
            raise SystemExit(f"{command[:3]} failed ({process.returncode}):\n{errors.read().decode(errors='replace')}")
        return wall, usage.ru_maxrss * 1024, out.read().decode()  # ru_maxrss is in kilobytes on Linux


def tensor_dtypes(path: Path) -> set[str]:
    """Dtype codes of a safetensors file's tensors, from its header (no torch in this process)."""
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
    header.pop("__metadata__", None)
    return {entry["dtype"] for entry in header.values()}


def check_output(out: Path, release: Path, linked: bool) -> str:
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()) - {"sprm_head.safetensors"})
    same_inode = [(release / s).exists() and os.stat(out / s).st_ino == os.stat(release / s).st_ino for s in shards]
    head_dtypes = tensor_dtypes(out / "sprm_head.safetensors")
    if all(same_inode) != linked or head_dtypes != {"F32"}:
        raise SystemExit(f"unexpected output: hard links {same_inode}, head dtypes {head_dtypes}")
    backbone = sorted(set().union(*(tensor_dtypes(out / s) for s in shards)))
    return f"{'hard links' if linked else 'rewritten'}, backbone {backbone}, head ['F32']"


def main() -> None:
    args = parse_args()
    if args.write_release:
        write_release(Path(args.write_release), args)
        return
    print(f"df {args.tmp_dir}: {shutil.disk_usage(args.tmp_dir).free / GB:.1f} GB free")
    root = Path(tempfile.mkdtemp(prefix="bench_convert-", dir=args.tmp_dir))
    try:
        release = root / "MetaStone-S1-synthetic"
        write_wall, _, _ = measure([sys.executable, *sys.argv, "--_write-release", str(release)])
        sizes = [path.stat().st_size for path in sorted(release.glob("*model-*.*")) if path.suffix != ".json"]
        largest = max(sizes)
        print(
            f"release: {sum(sizes) / GB:.2f} GB {args.release_dtype} {args.release_format} in {len(sizes)} shards "
            f"(largest {largest / GB:.2f} GB), "
            f"hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; written in {write_wall:.1f} s"
        )
        needed = 3.5 * sum(sizes)  # a cp -r copy and a float32 rewrite beside the release
        if shutil.disk_usage(root).free < needed:
            raise SystemExit(f"not enough disk space in {root}: about {needed / GB:.1f} GB more needed")

        cast_dtype = args.cast_dtype or ("float32" if args.release_dtype == "bfloat16" else "bfloat16")
        convert = [sys.executable, "-c", CONVERT, str(release)]
        cases = {
            "cp": (["cp", "-r", str(release), str(root / "copy")], root / "copy"),
            "link": ([*convert, str(root / "converted"), ""], root / "converted"),
            "cast": ([*convert, str(root / "converted-cast"), cast_dtype], root / "converted-cast"),
        }
        walls: dict[str, list[float]] = {name: [] for name in cases}
        parts: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
        peaks: dict[str, int] = dict.fromkeys(cases, 0)
        checks: dict[str, str] = {}
        for _ in range(args.repeats):  # interleaved, so a busy moment of the shared machine hits every case
            for name, (command, output) in cases.items():
                wall, rss, printed = measure(command)
                walls[name].append(wall)
                peaks[name] = max(peaks[name], rss)
                if name != "cp":
                    parts[name].append(json.loads(printed.strip().splitlines()[-1]))
                    linked = name == "link" and args.release_format == "safetensors"
                    checks[name] = check_output(output, release, linked=linked)
                shutil.rmtree(output)

        cp_wall = statistics.median(walls["cp"])
        print(f"medians of {args.repeats} interleaved runs; peak RSS: the largest of the runs, interpreter included")
        print(f"cp -r: {cp_wall:.2f} s, peak RSS {peaks['cp'] / GB:.2f} GB")
        for name, label in (("link", "no dtype change (default)"), ("cast", f"--dtype {cast_dtype}")):
            wall = statistics.median(walls[name])
            imports = statistics.median(p["imports"] for p in parts[name])
            work = statistics.median(p["convert"] for p in parts[name])
            print(
                f"convert, {label}: {wall:.2f} s = imports {imports:.2f} s + conversion {work:.2f} s + interpreter "
                f"start/exit {wall - imports - work:.2f} s; peak RSS {peaks[name] / GB:.2f} GB [{checks[name]}]\n"
                f"    peak RSS / largest shard {peaks[name] / largest:.2f}   wall / cp -r {wall / cp_wall:.2f}   "
                f"conversion alone / cp -r {work / cp_wall:.2f}"
            )
        rss_ratio, wall_ratio = peaks["link"] / largest, statistics.median(walls["link"]) / cp_wall
        print(
            "targets (default no-change case only): "
            f"RSS / largest shard {rss_ratio:.2f} <= 1.5 {'met' if rss_ratio <= 1.5 else 'MISSED'}; "
            f"wall / cp -r {wall_ratio:.2f} <= 3 {'met' if wall_ratio <= 3 else 'MISSED'}"
        )
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
