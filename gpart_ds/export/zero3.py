"""Merged export from a ZeRO-3 run: the two ways a rank can contribute to the files.

`export_sharded`: no rank gathers a parameter. A ZeRO-3 shard is a contiguous flat range
of its row-major tensor and a safetensors tensor is one contiguous byte range, so every
rank writes `merge(shard)` straight into its place in the final file (docs/deepspeed.md).
GPart uses it: its merged value of any element depends only on W0 at that element and
the replicated theta. Peak extra memory per rank: one shard of the largest parameter.
With the frozen base partitioned within groups of ranks (dist.frozen_partition=node)
each shard has one copy per group, and each copy writes its own part of it
(`shard_replica`): every byte is still written once.

`export_run` asks the method which of the two (Method.shard_merger).

`export_gathered`: tensor by tensor every rank gathers what the merged value needs (the
base weight and, for PEFT layers, its factors) and rank 0 merges and writes it; the
baselines use it (what their users have today).

Both derive the same file plan from the base folder's safetensors header on every rank;
rank 0 creates the files, every rank writes its ranges, then rank 0 adds the index,
config and tokenizer and renames the folder into place. The output folder must be on a
file system every rank sees. A failure on any rank fails every rank and removes the
temporary folder; an existing export is never touched unless replaced at the very end.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import Protocol

import torch

from .. import comm, safetensors_io as stio
from ..errors import UserError
from ..targets import full_shape
from ..zero3 import gathered, group_ranks, is_partitioned, local_shard, shard_range
from . import files, folder

log = logging.getLogger(__name__)


class ShardMerger(Protocol):
    def is_target(self, tensor_name: str) -> bool: ...
    def merged(self, tensor_name: str, first: int, w0_flat: torch.Tensor) -> torch.Tensor: ...


def _create_output(out: Path, plans, overwrite: bool):
    """Rank 0 takes the export's lock, checks the folder again under it, and creates this
    export's own temporary folder and the sized files every rank writes into; every rank
    learns the folder's name (unique per writer) or the refusal through one collective.
    Returns (temporary folder, the lock rank 0 holds or None)."""
    lock, tmp, verdict = None, None, None
    if comm.rank() == 0:
        try:
            lock = folder.output_lock(out, "export.dir").acquire()
            folder.check_output(out, overwrite)
            tmp = folder.start_output(out)
            stio.create_files(tmp, plans)
        except Exception as exc:  # every rank refuses with rank 0's words, nobody waits
            verdict = (
                str(exc)
                if isinstance(exc, UserError)
                else f"merged export to {out}: {_failure(exc)}; nothing was written there"
            )
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if lock is not None:
                lock.release()
            lock = None
    verdict, tmp = comm.gather_objects((verdict, None if tmp is None else str(tmp)))[0]
    if verdict is not None:
        raise files.ExportError(verdict)
    return Path(tmp), lock


@contextlib.contextmanager
def _abandoned_on_interrupt(tmp: Path, lock):
    """Ctrl-C or a stop signal while the ranks write: the temporary folder and the lock go
    (an Exception is collected and agreed on in _complete_output instead)."""
    try:
        yield
    except BaseException as exc:
        if not isinstance(exc, Exception):
            if comm.rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            if lock is not None:
                lock.release()
        raise


def _complete_output(
    error: str | None, tmp: Path, out: Path, plans, base_dir: Path, out_dtype, prov: dict, device, lock=None
) -> None:
    """Collective: fail everywhere if any rank failed; else rank 0 adds the index, config
    and tokenizer and renames the folder into place. Rank 0 gives the lock back either way."""
    try:
        if not comm.all_agree(error is None, device):
            if comm.rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            comm.barrier()
            raise files.ExportError(
                f"merged export to {out} failed ({error or 'on another rank'}); nothing was written there"
            )
        if comm.rank() == 0:
            try:
                stio.write_index(tmp, plans)
                files.copy_side_files(base_dir, tmp, out_dtype, prov)
                folder.finish_output(tmp, out)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        comm.barrier()
    finally:
        if lock is not None:
            lock.release()


def _failure(exc: BaseException) -> str:
    from ..errors import describe_os_error

    if isinstance(exc, OSError) and describe_os_error(exc):
        return describe_os_error(exc)
    return f"{type(exc).__name__}: {exc}"


def replica_part(n: int, index: int, count: int) -> tuple[int, int]:
    """[lo, hi) of the index-th of `count` near-equal contiguous parts of range(n)."""
    return n * index // count, n * (index + 1) // count


def shard_replica(params) -> tuple[int, int]:
    """Collective: (index, count) of this rank among the ranks that hold the same shards.

    With the frozen base partitioned within groups of ranks (dist.frozen_partition=node),
    the rank at the same place in each of the `count` groups holds the same shard of
    every parameter; replica `index` writes the index-th part of it (`replica_part`), so
    each byte of the output is written once and no rank gathers. (0, 1) when every
    parameter is partitioned over the world. The groups come from the parameters
    themselves, so the answer cannot disagree with what each rank holds.
    """
    world = comm.world()
    if world == 1:
        return 0, 1
    mine = min((group_ranks(p) for p in params if is_partitioned(p)), key=len, default=tuple(range(world)))
    groups = sorted(set(comm.gather_objects(mine)))
    if sorted(r for g in groups for r in g) != list(range(world)):
        raise RuntimeError(f"the parameters' process groups {groups} do not partition the {world} ranks")
    return groups.index(mine), len(groups)


def _output_plan(base_dir, out_dir, compute_dtype, out_dtype, max_shard_size, overwrite, device):
    """What both exports settle before any collective: the folders, the dtype and device,
    the base's tensors and the output files they go to (refusing an output that exists)."""
    base_dir, out = Path(base_dir), Path(out_dir)
    out_dtype = out_dtype or compute_dtype
    folder.check_output(out, overwrite)
    base = stio.read_model_header(base_dir)
    plans = stio.plan_files(files.output_entries(base, out_dtype), stio.parse_size(max_shard_size))
    return base_dir, out, out_dtype, device or torch.device("cpu"), base, plans


def export_sharded(
    model: torch.nn.Module,
    merger: ShardMerger,
    base_dir: str | Path,
    out_dir: str | Path,
    compute_dtype: torch.dtype,
    out_dtype: torch.dtype | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    device=None,
    provenance: dict | None = None,
) -> Path:
    """Collective: every rank writes merger.merged(its shard) of every tensor of `model`."""
    base_dir, out, out_dtype, device, base, plans = _output_plan(
        base_dir, out_dir, compute_dtype, out_dtype, max_shard_size, overwrite, device
    )
    params = dict(model.named_parameters(remove_duplicate=False))
    files.check_targets_stored(merger, base, base_dir)
    for name, st in base.items():  # every check before the first write
        p = params.get(name)
        if p is not None and tuple(full_shape(p)) != tuple(st.entry.shape):
            raise files.ExportError(
                f"{name}: shape {list(full_shape(p))} in the model but {list(st.entry.shape)} in {st.path}"
            )
    replica = shard_replica(params.values())
    tmp, lock = _create_output(out, plans, overwrite)
    error = None
    try:
        with _abandoned_on_interrupt(tmp, lock), torch.no_grad(), stio.RangeWriter(tmp, plans) as writer:
            for name, st in base.items():
                entry = writer.where[name][1]
                p = params.get(name)
                if p is None or not is_partitioned(p):
                    # Not a parameter (a stored buffer) or a replicated one: rank 0 writes it whole.
                    if comm.rank() == 0:
                        w0 = p.detach().reshape(-1) if p is not None else stio.read_elements(st, 0, st.entry.numel)
                        vals = files.merged_checked(merger, name, 0, w0) if merger.is_target(name) else w0
                        writer.write(name, 0, vals.to("cpu", entry.dtype))
                    continue
                start, valid = shard_range(p)
                shard = local_shard(p)
                if len(group_ranks(p)) < comm.world():
                    # One copy of this shard per group: this rank writes its part of it.
                    lo, hi = replica_part(valid, *replica)
                    start, valid, shard = start + lo, hi - lo, shard[lo:hi]
                if valid == 0:
                    continue  # a tensor smaller than its group: this rank holds only padding
                vals = files.merged_checked(merger, name, start, shard) if merger.is_target(name) else shard
                writer.write(name, start, vals.to("cpu", entry.dtype))
                del vals
    except Exception as exc:
        log.error("rank %d: writing the merged export failed: %s", comm.rank(), _failure(exc))
        error = _failure(exc)
    prov = {
        "base": str(base_dir),
        "compute_dtype": str(compute_dtype),
        "dtype": str(out_dtype),
        "ranks": comm.world(),
        **(provenance or {}),
    }
    _complete_output(error, tmp, out, plans, base_dir, out_dtype, prov, device, lock)
    return out


def export_gathered(
    method,
    base_dir: str | Path,
    out_dir: str | Path,
    compute_dtype: torch.dtype,
    out_dtype: torch.dtype | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    device=None,
) -> Path:
    """Collective: tensor by tensor, gather what `method.merge_source(name)` needs; rank 0
    merges and writes. The peak is one gathered tensor, but all of it goes through rank 0."""
    base_dir, out, out_dtype, device, base, plans = _output_plan(
        base_dir, out_dir, compute_dtype, out_dtype, max_shard_size, overwrite, device
    )
    # Every check before the first gather: a rank that raised inside the loop would
    # leave the others waiting in the next collective.
    sources = {name: method.merge_source(name) for name in base}
    for name, src in sources.items():
        if src is not None and tuple(full_shape(src[0][0])) != tuple(base[name].entry.shape):
            raise files.ExportError(
                f"{name}: shape {list(full_shape(src[0][0]))} in the model but "
                f"{list(base[name].entry.shape)} in {base[name].path}"
            )
    tmp, lock = _create_output(out, plans, overwrite)
    error = None
    rank0 = comm.rank() == 0
    try:
        with (
            _abandoned_on_interrupt(tmp, lock),
            stio.RangeWriter(tmp, plans) if rank0 else contextlib.nullcontext() as writer,
            torch.no_grad(),
        ):
            for name, st in base.items():
                if sources[name] is None:
                    if rank0:
                        vals = stio.read_elements(st, 0, st.entry.numel)
                        writer.write(name, 0, vals.to(writer.where[name][1].dtype))
                    continue
                params, merged = sources[name]
                with gathered(params):
                    if rank0:
                        vals = merged().reshape(-1)
                        files.check_finite(name, vals)
                        writer.write(name, 0, vals.to("cpu", writer.where[name][1].dtype))
    except Exception as exc:
        log.error("rank %d: writing the merged export failed: %s", comm.rank(), _failure(exc))
        error = _failure(exc)
    prov = {
        "base": str(base_dir),
        "adapter_kind": f"zero3-run-{method.name}",
        "dtype": str(out_dtype),
        "ranks": comm.world(),
    }
    _complete_output(error, tmp, out, plans, base_dir, out_dtype, prov, device, lock)
    return out


def export_run(
    method,
    base_dir: str | Path,
    out_dir: str | Path,
    compute_dtype: torch.dtype,
    out_dtype: torch.dtype | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    device=None,
) -> Path:
    """Collective: a run's merged Hugging Face folder, the way its method asks for
    (Method.shard_merger): every rank writes its own shards, or gathered through rank 0."""
    sharded = method.shard_merger(compute_dtype, device)
    if sharded is None:
        return export_gathered(method, base_dir, out_dir, compute_dtype, out_dtype, max_shard_size, overwrite, device)
    merger, provenance = sharded
    return export_sharded(
        method.model, merger, base_dir, out_dir, compute_dtype, out_dtype, max_shard_size, overwrite, device, provenance
    )
