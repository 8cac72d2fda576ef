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
OUT_DIR is replaced only with --overwrite. Every merged tensor is checked finite before
it is written, and every target of the adapter must be stored in the base files.
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
from .errors import UserError, run_cli
from .fileio import folder_problem, named, overlap, replace_dir
from .hub import resolve as resolve_model

DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
               "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
# Files of a model folder that a merged folder carries over unchanged.
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
              "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
              "vocab.json", "merges.txt")
DEFAULT_BLOCK_BYTES = 64 << 20


class ExportError(UserError):
    """An export that must not start or cannot finish: says what and where."""


def check_finite(name: str, vals: torch.Tensor) -> None:
    """Refuse to write a merged tensor with NaN or inf (a diverged adapter)."""
    if vals.is_floating_point() and not bool(torch.isfinite(vals).all()):
        bad = int((~torch.isfinite(vals)).sum())
        raise ExportError(f"{name}: the merged values have {bad} non-finite entries (NaN or inf); "
                          "the adapter diverged: nothing was written")


def merged_checked(merger, name: str, first: int, w0_flat: torch.Tensor) -> torch.Tensor:
    vals = merger.merged(name, first, w0_flat)
    check_finite(name, vals)
    return vals


def check_targets_stored(merger, base: dict[str, stio.StoredTensor], base_dir: Path) -> None:
    """Every tensor the merge adapts is in the base files: a renamed key would otherwise
    be written unmerged, silently."""
    missing = [n for n in getattr(merger, "targets", {}) if n not in base]
    if missing:
        raise ExportError(f"{base_dir}: {len(missing)} adapted tensor(s) are not in the base model's "
                          f"safetensors files (first: {missing[0]}); renamed or missing keys")


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
TEMP_TAG = ".tmp-export-"


def temp_dir_for(out: Path, writer: str | None = None) -> Path:
    """The temporary folder one writer builds `out` in: unique per writer (host, pid and a
    random part), so no writer can ever remove or fill another one's."""
    import secrets
    import socket

    writer = writer or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
    return out.parent / f".{out.name}{TEMP_TAG}{writer}"


def stale_temps(out: Path) -> list[Path]:
    """Temporary folders of earlier writers of `out` (and the fixed name older versions used)."""
    if not out.parent.is_dir():
        return []
    return sorted(p for p in out.parent.iterdir()
                  if p.name.startswith(f".{out.name}{TEMP_TAG}") or p.name == f".{out.name}.tmp-export")


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an existing output folder, or one that cannot be created, before any work."""
    if out.exists() and not overwrite:
        raise ExportError(f"{out}: already exists; pass --overwrite (export.overwrite: true) to replace it")
    problem = folder_problem(out)
    if problem:
        raise ExportError(f"output folder: {problem}")


def output_lock(out: Path, key: str = "--out"):
    """The lock one export of `out` holds from its last check to the rename (ownership):
    a second export to the same folder is refused naming the first, never interleaved."""
    from .ownership import FolderLock

    return FolderLock.beside(out, key)


def start_output(out: Path) -> Path:
    """A fresh temporary folder next to `out`, named for this writer. Called under
    output_lock: any other temporary of `out` is then an earlier writer's that died
    (killed mid-export), removed with a warning naming it."""
    import logging

    for old in stale_temps(out):
        logging.getLogger("gpart_ds").warning("%s: removing the temporary folder %s left by an earlier export "
                                              "that did not finish", out, old)
        shutil.rmtree(old, ignore_errors=True)
    tmp = temp_dir_for(out)
    tmp.mkdir(parents=True)
    return tmp


def finish_output(tmp: Path, out: Path) -> None:
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
    # The provenance: what this folder holds (identity.merge_record reads it, and refuses the
    # folder as a base for another merge); base_identity: the weights the delta went into.
    from .identity import MERGE_RECORD, identity

    provenance = {**provenance, "base_identity": identity(base_dir)}
    (folder / MERGE_RECORD).write_text(json.dumps(provenance, indent=2) + "\n")


def read_base(base_dir: Path) -> dict[str, stio.StoredTensor]:
    """The base model folder's tensors (header only), or a clear error."""
    if not (base_dir / "config.json").is_file():
        raise ExportError(f"{base_dir}: not a Hugging Face model folder (no config.json)")
    return stio.read_model_header(base_dir)


# ---------------------------------------------------------------- offline merge
def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merge",
                disable=not enabled, dynamic_ncols=True)


def open_source(path: Path, base_dir: Path):
    """An adapter or checkpoint folder as a merge source: a checkpoint is read (and
    verified) here and handed to the method that ran it; an adapter folder to whichever
    method reads it (GPart: its own adapters and the reference implementation's)."""
    from . import checkpoint, methods

    path = Path(path)
    if path.is_dir() and checkpoint.looks_like_checkpoint(path):
        return methods.open_checkpoint(checkpoint.read(path), Path(base_dir))
    return methods.open_adapter(path, Path(base_dir))


def merge_offline(base_dir, adapter_dir, out_dir, dtype: str | None = None,
                  max_shard_size: str | int = "5GB", overwrite: bool = False,
                  block_bytes: int = DEFAULT_BLOCK_BYTES, kernel: str = "auto",
                  progress: bool | None = None) -> dict:
    """Stream BASE + delta(ADAPTER) into OUT; returns byte count, seconds and MB/s."""
    base_dir, out = Path(base_dir), Path(out_dir)
    t0 = time.perf_counter()
    landing = overlap({"--out": out}, {"--base": base_dir, "--adapter": adapter_dir})
    if landing:
        raise ExportError(landing)
    check_output(out, overwrite)
    base = read_base(base_dir)
    src = open_source(Path(adapter_dir), base_dir)
    src.check(base, base_dir)
    compute = src.compute_dtype(base)
    out_dtype = parse_dtype(dtype) or compute
    merger = src.merger(compute, kernel)
    check_targets_stored(merger, base, base_dir)
    plans = stio.plan_files(output_entries(base, out_dtype), stio.parse_size(max_shard_size))
    total = sum(p.size for p in plans)

    with output_lock(out):
        check_output(out, overwrite)   # again, under the lock: an export that ended meanwhile
        return _merge_into(out, base_dir, base, src, merger, compute, out_dtype, plans, total, block_bytes,
                           progress, t0)


def _merge_into(out, base_dir, base, src, merger, compute, out_dtype, plans, total, block_bytes, progress, t0):
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
                            block = merged_checked(merger, name, first_elem, block)
                        writer.write(name, first_elem, block.to(writer.where[name][1].dtype))
                        bar.update(n * writer.where[name][1].itemsize)
                        del block
            finally:
                for fd in fds.values():
                    os.close(fd)
        stio.write_index(tmp, plans)
        copy_side_files(base_dir, tmp, out_dtype, {"base": str(base_dir), **src.provenance(),
                                                   "compute_dtype": str(compute), "dtype": str(out_dtype)})
        bar.close()
        finish_output(tmp, out)
    except OSError as exc:   # a full disk: nothing half-written is left anywhere, the file is named
        shutil.rmtree(tmp, ignore_errors=True)
        raise named(exc, tmp) from None
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

    from .model import check_weights

    merged_dir, base_dir = Path(merged_dir), Path(base_dir)
    for what, folder in (("--merged", merged_dir), ("--base", base_dir)):
        if not (folder / "config.json").is_file():
            raise ExportError(f"{what} {folder}: not a model folder (no config.json"
                              f"{'' if folder.is_dir() else '; no such folder'})")
    info_path = merged_dir / "gpart_merge.json"
    try:
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        compute = str(info.get("compute_dtype", "torch.float32")).removeprefix("torch.")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise ExportError(f"{info_path}: not the merge record gpart_ds writes ({exc})") from None
    dtype = DTYPE_NAMES.get(compute, torch.float32)
    if atol is None:
        atol = 1e-3 if dtype == torch.float32 else 0.1
    src = open_source(Path(adapter_dir), base_dir)
    src.check(read_base(base_dir), base_dir)
    # Merged from another adapter of the same kind (a checkpoint and the adapter of its step
    # hold the same delta under other digests): say so, rather than a bare FAILED.
    made_from = info.get("adapter_digest") if isinstance(info, dict) else None
    if made_from and getattr(src, "digest", None) and made_from != src.digest and \
            info.get("adapter_kind") == getattr(src, "kind", None):
        return {"max_abs_logit_diff": None, "atol": atol, "ok": False, "prompts": 0, "dtype": str(dtype),
                "reason": f"--merged {merged_dir}: its {info_path.name} says it was merged from another adapter "
                          f"({info.get('adapter')}, digest {made_from[:12]}) than --adapter {adapter_dir} "
                          f"(digest {src.digest[:12]})"}
    check_weights(merged_dir)   # a missing key would load as random values and "differ" for no reason
    tok = AutoTokenizer.from_pretrained(base_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=dtype).eval()
    ref = src.attach(AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).eval())
    worst = 0.0
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        a = merged(input_ids=ids).logits.float()
        b = ref(input_ids=ids).logits.float()
        if not bool(torch.isfinite(a).all() and torch.isfinite(b).all()):
            worst = float("nan")   # max(0.0, nan) would report 0.0
            break
        worst = max(worst, float((a - b).abs().max()))
    ok = worst <= atol   # False for NaN
    return {"max_abs_logit_diff": worst, "atol": atol, "ok": ok, "prompts": len(prompts),
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
    try:
        stio.parse_size(a.max_shard_size)
    except ValueError as exc:
        raise ExportError(f"--max-shard-size {a.max_shard_size!r}: {exc}") from None
    if not a.block_mb > 0:
        raise ExportError(f"--block-mb {a.block_mb}: must be > 0")
    parse_dtype(a.dtype)
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
    if r.get("reason"):   # known to differ without loading either model
        print(f"{r['reason']}: FAILED")
        return 1
    diff = r["max_abs_logit_diff"]
    what = (f"max |logit difference| {diff:.3g}" if diff == diff else "non-finite logits (NaN or inf)")
    print(f"{what} over {r['prompts']} prompts ({r['dtype']}, tolerance {r['atol']:.3g}): "
          f"{'OK' if r['ok'] else 'FAILED'}")
    return 0 if r["ok"] else 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "verify":
        return run_cli(lambda: _verify_cli(argv[1:]))
    return run_cli(lambda: _merge_cli(argv))


if __name__ == "__main__":
    sys.exit(main())
