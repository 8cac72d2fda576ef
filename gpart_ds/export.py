"""Merged Hugging Face checkpoints: the offline streaming merge, verification, and the
pieces the ZeRO-3 export shares with it (tensor plan, output folder, side files).

    python -m gpart_ds.export --base BASE_DIR --adapter ADAPTER_DIR --out OUT_DIR \
        [--dtype bf16|fp16|fp32] [--max-shard-size 5GB] [--overwrite]
    python -m gpart_ds.export verify --merged OUT_DIR --base BASE_DIR --adapter ADAPTER_DIR

The offline merge reads the base safetensors tensor by tensor in row blocks (plain
pread, no mmap), adds delta, and pwrites each block into its planned place in the output
files, so its memory is one block whatever the model size; it needs no GPU. ADAPTER_DIR
may be a gpart_ds adapter, a gpart_ds checkpoint folder, or a reference GPart adapter.
Output goes to a temporary sibling folder renamed into place when complete; an existing
OUT_DIR is replaced only with --overwrite.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from . import safetensors_io as stio
from .adapter import AdapterError
from .adapter_sources import MergeSource, check_against_base, open_source
from .merge import Merger
from .hub import resolve as resolve_model

DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
               "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
# Files of a model folder that a merged folder carries over unchanged.
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
              "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
              "vocab.json", "merges.txt")
DEFAULT_BLOCK_BYTES = 64 << 20


class ExportError(ValueError):
    """An export that must not start or cannot finish: says what and where."""


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "auto"):
        return None
    if name not in DTYPE_NAMES:
        raise ExportError(f"unknown dtype {name!r}; use one of bf16, fp16, fp32")
    return DTYPE_NAMES[name]


def output_entries(base: dict[str, stio.StoredTensor], out_dtype: torch.dtype) -> list[stio.TensorEntry]:
    """The merged model's tensors: the base's names, shapes and order; floats in out_dtype."""
    return [stio.TensorEntry(name, out_dtype if st.entry.dtype.is_floating_point else st.entry.dtype,
                             st.entry.shape) for name, st in base.items()]


# ---------------------------------------------------------------- output folder
def temp_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}.tmp-export"


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an existing output folder before any work is done."""
    if out.exists() and not overwrite:
        raise ExportError(f"{out}: already exists; pass --overwrite (export.overwrite: true) to replace it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder")


def start_output(out: Path) -> Path:
    """A fresh temporary folder next to `out` (a stale one from a failed run is removed)."""
    tmp = temp_dir_for(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def finish_output(tmp: Path, out: Path) -> None:
    from .adapter import replace_dir

    os.chmod(tmp, 0o755)
    replace_dir(tmp, out)


def copy_side_files(base_dir: Path, folder: Path, out_dtype: torch.dtype, provenance: dict) -> None:
    """config.json (dtype updated), tokenizer, chat template and generation config."""
    cfg = json.loads((base_dir / "config.json").read_text())
    name = str(out_dtype).removeprefix("torch.")
    cfg["dtype"] = name
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = name
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for f in SIDE_FILES:
        if (base_dir / f).is_file():
            shutil.copy2(base_dir / f, folder / f)
    (folder / "gpart_merge.json").write_text(json.dumps(provenance, indent=2) + "\n")


def provenance(src: MergeSource, base_dir: Path, compute: torch.dtype, out_dtype: torch.dtype) -> dict:
    return {"base": str(base_dir), "adapter": str(src.path), "adapter_kind": src.kind, "d": src.d,
            "seed": src.seed, "targets": len(src.targets), "compute_dtype": str(compute),
            "dtype": str(out_dtype)}


# ---------------------------------------------------------------- offline merge
def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merge",
                disable=not enabled, dynamic_ncols=True)


def merge_offline(base_dir, adapter_dir, out_dir, dtype: str | None = None,
                  max_shard_size: str | int = "5GB", overwrite: bool = False,
                  block_bytes: int = DEFAULT_BLOCK_BYTES, kernel: str = "auto",
                  progress: bool | None = None) -> dict:
    """Stream BASE + delta(ADAPTER) into OUT; returns byte count, seconds and MB/s."""
    from .kernels import get_kernels

    base_dir, out = Path(base_dir), Path(out_dir)
    t0 = time.perf_counter()
    check_output(out, overwrite)
    if not (base_dir / "config.json").is_file():
        raise ExportError(f"{base_dir}: not a Hugging Face model folder (no config.json)")
    base = stio.read_model_header(base_dir)
    src = open_source(adapter_dir, base_dir)
    check_against_base(src, base, base_dir)
    first = base[src.targets[0].name + ".weight"].entry.dtype
    # Round as training did: in the training dtype if the adapter records it, else in
    # the base's dtype (what the reference implementation's merge does).
    compute = src.dtype or first
    out_dtype = parse_dtype(dtype) or compute
    if kernel == "auto":
        kernel = "compiled" if sum(t.shape[0] * t.shape[1] for t in src.targets) >= (1 << 24) else "eager"
    merger = Merger(src.theta, src.seed, src.targets, compute, get_kernels(kernel))
    plans = stio.plan_files(output_entries(base, out_dtype), stio.parse_size(max_shard_size))
    total = sum(p.size for p in plans)

    tmp = start_output(out)
    try:
        stio.create_files(tmp, plans)
        bar = _progress(total, sys.stderr.isatty() if progress is None else progress)
        fds: dict[Path, int] = {}
        with stio.RangeWriter(tmp, plans) as writer:
            try:
                for name, st in base.items():
                    e = st.entry
                    row = max(1, e.numel // e.shape[0]) if e.shape else 1
                    rows = max(1, block_bytes // max(1, row * max(e.itemsize, 4)))
                    step = rows * row   # whole rows per block; 4-byte floor covers the fp32 compute copy
                    fd = fds.get(st.path)
                    if fd is None:
                        fd = fds[st.path] = os.open(st.path, os.O_RDONLY)
                    for first_elem in range(0, e.numel, step):
                        n = min(step, e.numel - first_elem)
                        block = stio.read_elements(st, first_elem, n, fd)
                        if merger.is_target(name):
                            block = merger.merged(name, first_elem, block)
                        writer.write(name, first_elem, block.to(writer.where[name][1].dtype))
                        bar.update(n * writer.where[name][1].itemsize)
                        del block
            finally:
                for fd in fds.values():
                    os.close(fd)
        stio.write_index(tmp, plans)
        copy_side_files(base_dir, tmp, out_dtype, provenance(src, base_dir, compute, out_dtype))
        bar.close()
        finish_output(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)   # nothing half-written is left anywhere
        raise
    dt = time.perf_counter() - t0
    return {"bytes": total, "seconds": dt, "mb_per_s": total / 1e6 / max(dt, 1e-9), "files": len(plans),
            "compute_dtype": str(compute), "dtype": str(out_dtype)}


# ---------------------------------------------------------------- verification
DEFAULT_PROMPTS = ("The capital of France is",
                   "Review: a gorgeous, witty, seductive movie.\nSentiment:",
                   "def fibonacci(n):")


@torch.no_grad()
def verify(merged_dir, base_dir, adapter_dir, prompts=DEFAULT_PROMPTS, atol: float | None = None) -> dict:
    """Max |logit difference| between the merged folder and base + adapter (GPart forward).

    Both load with plain transformers in the merge's compute dtype; a difference above
    atol (default 1e-3 in fp32, 0.1 in 16-bit) fails.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .transform import apply_gpart

    merged_dir, base_dir = Path(merged_dir), Path(base_dir)
    info = json.loads((merged_dir / "gpart_merge.json").read_text()) if (merged_dir / "gpart_merge.json").is_file() else {}
    dtype = parse_dtype(info.get("compute_dtype", "torch.float32").removeprefix("torch.")) or torch.float32
    if atol is None:
        atol = 1e-3 if dtype == torch.float32 else 0.1
    src = open_source(adapter_dir, base_dir)
    check_against_base(src, stio.read_model_header(base_dir), base_dir)
    tok = AutoTokenizer.from_pretrained(base_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=dtype).eval()
    ref = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).eval()
    g = apply_gpart(ref, d=src.d, seed=src.seed, target_modules=[t.name for t in src.targets])
    g.gpart_theta.copy_(src.theta)
    worst = 0.0
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        a = merged(input_ids=ids).logits.float()
        b = g(input_ids=ids).logits.float()
        worst = max(worst, float((a - b).abs().max()))
    return {"max_abs_logit_diff": worst, "atol": atol, "ok": worst <= atol, "prompts": len(prompts),
            "dtype": str(dtype)}


# ---------------------------------------------------------------- CLI
def _merge_cli(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m gpart_ds.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True,
                    help="base Hugging Face model folder (safetensors), or org/name already in the HF cache")
    ap.add_argument("--adapter", required=True, help="adapter, checkpoint or reference adapter folder")
    ap.add_argument("--out", required=True, help="merged model folder to create")
    ap.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: the training dtype)")
    ap.add_argument("--max-shard-size", default="5GB")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--block-mb", type=float, default=DEFAULT_BLOCK_BYTES / 2**20,
                    help="rows read and merged at once (memory bound)")
    a = ap.parse_args(argv)
    a.base = resolve_model(a.base)
    stats = merge_offline(a.base, a.adapter, a.out, a.dtype, a.max_shard_size, a.overwrite,
                          int(a.block_mb * 2**20), progress=None)
    print(f"merged {stats['bytes'] / 1e6:.1f} MB into {a.out} in {stats['seconds']:.1f} s "
          f"({stats['mb_per_s']:.1f} MB/s, {stats['files']} file(s), {stats['dtype']})")
    return 0


def _verify_cli(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m gpart_ds.export verify")
    ap.add_argument("--merged", required=True)
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--atol", type=float, default=None)
    a = ap.parse_args(argv)
    r = verify(a.merged, resolve_model(a.base), a.adapter, atol=a.atol)
    print(f"max |logit difference| {r['max_abs_logit_diff']:.3g} over {r['prompts']} prompts "
          f"({r['dtype']}, tolerance {r['atol']:.3g}): {'OK' if r['ok'] else 'FAILED'}")
    return 0 if r["ok"] else 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] == "verify":
            return _verify_cli(argv[1:])
        return _merge_cli(argv)
    except (ExportError, AdapterError, stio.SafetensorsFormatError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
