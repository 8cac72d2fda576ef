"""The offline merge: BASE + delta(ADAPTER) streamed into a merged folder on any machine.

It reads the base safetensors tensor by tensor in row blocks (plain pread, no mmap), adds
delta, and pwrites each block into its planned place in the output files, so its memory
is one block whatever the model size; it needs no GPU. The adapter may be a gpart_ds
adapter, a gpart_ds checkpoint folder, or a reference GPart adapter (source.open_source).
Output goes to a temporary sibling folder renamed into place when complete (folder.py).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from .. import safetensors_io as stio
from ..fileio import named, overlap
from .files import (
    ExportError,
    check_targets_stored,
    copy_side_files,
    merged_checked,
    output_entries,
    parse_dtype,
    read_base,
)
from .folder import check_output, finish_output, output_lock, start_output
from .source import open_source

DEFAULT_BLOCK_BYTES = 64 << 20


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merge", disable=not enabled, dynamic_ncols=True
    )


def merge_offline(
    base_dir,
    adapter_dir,
    out_dir,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    kernel: str = "auto",
    progress: bool | None = None,
) -> dict:
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
        check_output(out, overwrite)  # again, under the lock: an export that ended meanwhile
        return _merge_into(
            out, base_dir, base, src, merger, compute, out_dtype, plans, total, block_bytes, progress, t0
        )


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
                    step = rows * row  # whole rows per block; 4-byte floor covers the fp32 compute copy
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
        copy_side_files(
            base_dir,
            tmp,
            out_dtype,
            {"base": str(base_dir), **src.provenance(), "compute_dtype": str(compute), "dtype": str(out_dtype)},
        )
        bar.close()
        finish_output(tmp, out)
    except OSError as exc:  # a full disk: nothing half-written is left anywhere, the file is named
        shutil.rmtree(tmp, ignore_errors=True)
        raise named(exc, tmp) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written is left anywhere
        raise
    dt = time.perf_counter() - t0
    return {
        "bytes": total,
        "seconds": dt,
        "mb_per_s": total / 1e6 / max(dt, 1e-9),
        "files": len(plans),
        "compute_dtype": str(compute),
        "dtype": str(out_dtype),
    }
