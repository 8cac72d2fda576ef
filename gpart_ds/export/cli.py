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
import sys

from .. import safetensors_io as stio
from ..errors import run_cli
from ..hub import resolve as resolve_model
from .files import ExportError, parse_dtype
from .offline import DEFAULT_BLOCK_BYTES, merge_offline
from .verify import verify


def _merge_cli(argv) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m gpart_ds.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--base",
        required=True,
        help="base Hugging Face model folder (safetensors), or org/name already in the HF cache",
    )
    ap.add_argument("--adapter", required=True, help="adapter, checkpoint or reference adapter folder")
    ap.add_argument("--out", required=True, help="merged model folder to create")
    ap.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: the training dtype)")
    ap.add_argument("--max-shard-size", default="5GB")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument(
        "--block-mb",
        type=float,
        default=DEFAULT_BLOCK_BYTES / 2**20,
        help="rows read and merged at once (memory bound)",
    )
    a = ap.parse_args(argv)
    try:
        stio.parse_size(a.max_shard_size)
    except ValueError as exc:
        raise ExportError(f"--max-shard-size {a.max_shard_size!r}: {exc}") from None
    if not a.block_mb > 0:
        raise ExportError(f"--block-mb {a.block_mb}: must be > 0")
    parse_dtype(a.dtype)
    a.base = resolve_model(a.base)
    stats = merge_offline(
        a.base, a.adapter, a.out, a.dtype, a.max_shard_size, a.overwrite, int(a.block_mb * 2**20), progress=None
    )
    print(
        f"merged {stats['bytes'] / 1e6:.1f} MB into {a.out} in {stats['seconds']:.1f} s "
        f"({stats['mb_per_s']:.1f} MB/s, {stats['files']} file(s), {stats['dtype']})"
    )
    return 0


def _verify_cli(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m gpart_ds.export verify")
    ap.add_argument("--merged", required=True)
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--atol", type=float, default=None)
    a = ap.parse_args(argv)
    r = verify(a.merged, resolve_model(a.base), a.adapter, atol=a.atol)
    if r.get("reason"):  # known to differ without loading either model
        print(f"{r['reason']}: FAILED")
        return 1
    diff = r["max_abs_logit_diff"]
    what = f"max |logit difference| {diff:.3g}" if diff == diff else "non-finite logits (NaN or inf)"
    print(
        f"{what} over {r['prompts']} prompts ({r['dtype']}, tolerance {r['atol']:.3g}): {'OK' if r['ok'] else 'FAILED'}"
    )
    return 0 if r["ok"] else 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "verify":
        return run_cli(lambda: _verify_cli(argv[1:]))
    return run_cli(lambda: _merge_cli(argv))
