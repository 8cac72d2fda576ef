"""Merged export from a ZeRO-3 run, written shard by shard: no rank gathers a parameter.

A ZeRO-3 shard is a contiguous flat range of its row-major tensor and a safetensors
tensor is one contiguous byte range, so every rank writes W0_shard + delta(global
offsets of the shard) straight into its place in the final file (see
docs: deepspeed-zero3.md). All ranks derive the same file plan from the base folder's
safetensors header; rank 0 creates the files, then every rank pwrites its ranges, and
rank 0 adds the index, config and tokenizer and renames the folder into place. The
output folder must be on a filesystem every rank sees (the shared output directory of a
multi-node job).

Peak extra memory per rank: one shard of the largest parameter in the export dtype.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from . import export, safetensors_io as stio
from .merge import Merger, MergeTarget
from .transform import full_shape
from .zero3 import gathered, is_partitioned, local_shard, shard_range

log = logging.getLogger(__name__)


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _agree(ok: bool, world: int, device) -> bool:
    """True on every rank only if it is true on every rank (a failed write is not hidden)."""
    if world == 1:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0.0


def _create_output(out: Path, plans, rank: int, world: int) -> Path:
    """Rank 0 creates the temporary folder and the sized files every rank writes into."""
    tmp = export.temp_dir_for(out)
    if rank == 0:
        export.start_output(out)
        stio.create_files(tmp, plans)
    _barrier(world)
    return tmp


def _complete_output(ok: bool, tmp: Path, out: Path, plans, base_dir: Path, out_dtype, prov: dict,
                     rank: int, world: int, device) -> None:
    """Collective: fail everywhere if any rank failed; else rank 0 adds the index, config
    and tokenizer and renames the folder into place."""
    if not _agree(ok, world, device):
        raise export.ExportError(f"merged export failed on at least one rank; partial output left in {tmp}")
    if rank == 0:
        try:
            stio.write_index(tmp, plans)
            export.copy_side_files(base_dir, tmp, out_dtype, prov)
            export.finish_output(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _barrier(world)


def replica_part(n: int, index: int, count: int) -> tuple[int, int]:
    """[lo, hi) of the index-th of `count` near-equal contiguous parts of range(n)."""
    return n * index // count, n * (index + 1) // count


def export_merged(gmodel, base_dir: str | Path, out_dir: str | Path, compute_dtype: torch.dtype,
                  out_dtype: torch.dtype | None = None, max_shard_size: str | int = "5GB",
                  overwrite: bool = False, device=None, extra_provenance: dict | None = None,
                  replica: tuple[int, int] = (0, 1)) -> Path:
    """Collective: every rank calls it with its GPartModel (ZeRO-3 partitioned or plain).

    `replica` (index, count): with the frozen base partitioned within groups of ranks
    (dist.frozen_partition=node), `count` ranks hold each shard; replica i writes the
    i-th of `count` equal parts of it, so each byte is written once (scale, issue 16).
    """
    base_dir, out = Path(base_dir), Path(out_dir)
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    device = device or torch.device("cpu")
    out_dtype = out_dtype or compute_dtype
    export.check_output(out, overwrite)

    base = stio.read_model_header(base_dir)
    plans = stio.plan_files(export.output_entries(base, out_dtype), stio.parse_size(max_shard_size))
    targets = [MergeTarget(t.name, tuple(t.shape), t.offset) for t in gmodel.layout.targets]
    with torch.no_grad(), gathered([gmodel.gpart_theta]):
        theta_full = gmodel.gpart_theta.detach().float().clone()
    merger = Merger(theta_full, gmodel.seed, targets, compute_dtype, gmodel.gpart_ctx.op.kernels,
                    scales=gmodel.scales, device=device)
    params = dict(gmodel.base_model.named_parameters(remove_duplicate=False))

    tmp = _create_output(out, plans, rank, world)

    ok = True
    try:
        with stio.RangeWriter(tmp, plans) as writer:
            for name, st in base.items():
                entry = writer.where[name][1]
                p = params.get(name)
                if p is None or not is_partitioned(p):
                    # Not a parameter (a stored buffer) or a replicated one: rank 0 writes it whole.
                    if rank == 0:
                        w0 = p.detach().reshape(-1) if p is not None else stio.read_elements(st, 0, st.entry.numel)
                        vals = merger.merged(name, 0, w0) if merger.is_target(name) else w0
                        writer.write(name, 0, vals.to("cpu", entry.dtype))
                    continue
                if tuple(p.ds_shape) != tuple(st.entry.shape):
                    raise export.ExportError(f"{name}: shape {list(p.ds_shape)} in the model but "
                                             f"{list(st.entry.shape)} in {st.path}")
                start, valid = shard_range(p)
                shard = local_shard(p)
                if replica[1] > 1 and dist.get_world_size(group=p.ds_process_group) < world:   # scale (issue 16)
                    lo, hi = replica_part(valid, *replica)
                    start, valid, shard = start + lo, hi - lo, shard[lo:hi]
                if valid == 0:
                    continue   # a tensor smaller than the world: this rank holds only padding
                vals = merger.merged(name, start, shard) if merger.is_target(name) else shard
                writer.write(name, start, vals.to("cpu", entry.dtype))
                del vals
    except Exception:
        log.exception("rank %d: writing the merged export failed", rank)
        ok = False
    prov = {"base": str(base_dir), "adapter_kind": "zero3-run", "d": merger.d, "seed": merger.seed,
            "targets": len(targets), "compute_dtype": str(compute_dtype), "dtype": str(out_dtype),
            "ranks": world, **(extra_provenance or {})}
    _complete_output(ok, tmp, out, plans, base_dir, out_dtype, prov, rank, world, device)
    return out


def export_gathered(method, base_dir: str | Path, out_dir: str | Path, compute_dtype: torch.dtype,
                    out_dtype: torch.dtype | None = None, max_shard_size: str | int = "5GB",
                    overwrite: bool = False, device=None) -> Path:
    """Merged export of a baseline run (LoRA, VeRA, full fine-tuning); collective.

    Tensor by tensor in file order, every rank gathers what the merged value needs (the
    base weight and, for PEFT layers, its adapter factors) and rank 0 merges and writes
    it: the peak is one gathered tensor, but all of it goes through rank 0. GPart does
    better (export_merged: no rank gathers anything); this is the path the baselines'
    users have today, kept for like-for-like comparisons and for serving them.
    """
    base_dir, out = Path(base_dir), Path(out_dir)
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    device = device or torch.device("cpu")
    out_dtype = out_dtype or compute_dtype
    export.check_output(out, overwrite)
    base = stio.read_model_header(base_dir)
    plans = stio.plan_files(export.output_entries(base, out_dtype), stio.parse_size(max_shard_size))
    # Every check before the first gather: a rank that raised inside the loop would
    # leave the others waiting in the next collective.
    sources = {name: method.merge_source(name) for name in base}
    for name, src in sources.items():
        if src is not None and tuple(full_shape(src[0][0])) != tuple(base[name].entry.shape):
            raise export.ExportError(f"{name}: shape {list(full_shape(src[0][0]))} in the model but "
                                     f"{list(base[name].entry.shape)} in {base[name].path}")
    tmp = _create_output(out, plans, rank, world)
    ok = True
    try:
        with (stio.RangeWriter(tmp, plans) if rank == 0 else contextlib.nullcontext()) as writer, torch.no_grad():
            for name, st in base.items():
                if sources[name] is None:
                    if rank == 0:
                        vals = stio.read_elements(st, 0, st.entry.numel)
                        writer.write(name, 0, vals.to(writer.where[name][1].dtype))
                    continue
                params, merged = sources[name]
                with gathered(params):
                    if rank == 0:
                        writer.write(name, 0, merged().reshape(-1).to("cpu", writer.where[name][1].dtype))
    except Exception:
        log.exception("rank %d: writing the merged export failed", rank)
        ok = False
    prov = {"base": str(base_dir), "adapter_kind": f"zero3-run-{method.name}", "dtype": str(out_dtype),
            "ranks": world}
    _complete_output(ok, tmp, out, plans, base_dir, out_dtype, prov, rank, world, device)
    return out
