"""ZeRO-3 glue: shard geometry, the DeepSpeed config GPart needs, gathering theta.

Facts used here are DeepSpeed's (checked against 0.19; see docs in the README):
W = size of p.ds_process_group, part = ceil(ds_numel / W), rank r holds flat elements
[r * part, r * part + valid) of the row-major tensor in p.ds_tensor[:valid]; the tail of
ds_tensor is uninitialised padding. Knows nothing of data or training loops.
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.distributed as dist


def is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def shard_range(p: torch.Tensor) -> tuple[int, int]:
    """(first flat index, number of valid elements) this rank holds of parameter p."""
    if not is_partitioned(p):
        return 0, p.numel()
    group = p.ds_process_group
    world, rank = dist.get_world_size(group=group), dist.get_rank(group=group)
    part = -(-p.ds_numel // world)
    start = rank * part
    return start, max(0, min(part, p.ds_numel - start))


def group_ranks(p: torch.Tensor) -> tuple[int, ...]:
    """Global ranks of the group p is partitioned over (the world for a plain tensor)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if not is_partitioned(p) or world == 1:
        return tuple(range(world))
    return tuple(dist.get_process_group_ranks(p.ds_process_group))


def local_shard(p: torch.Tensor) -> torch.Tensor:
    """This rank's valid elements of p, flat (a view; padding cut off)."""
    if not is_partitioned(p):
        return p.data.reshape(-1)
    _, valid = shard_range(p)
    return p.ds_tensor.data.reshape(-1)[:valid]


def unsupported_variant(p: torch.Tensor) -> str | None:
    """Partitioning variants whose shard layout we do not handle."""
    if getattr(p, "ds_secondary_tensor", None) is not None:
        return "hpZ secondary partitions (zero_hpz_partition_size > 1)"
    if hasattr(p, "ds_tensor") and p.ds_tensor is not None and p.ds_tensor.dtype in (torch.int8, torch.uint8):
        return "quantized frozen weights"
    if getattr(p, "nvme_swapper", None) is not None:
        return "NVMe parameter offload"
    return None


def gathered(params):
    """Context in which the listed ZeRO-3 parameters hold their full data."""
    parts = [p for p in params if is_partitioned(p)]
    if not parts:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(parts, modifier_rank=None)


def engine_config(ds_config: dict, *, micro_batch: int, grad_accum: int, world: int,
                  max_grad_norm: float, dtype: torch.dtype) -> dict:
    """Fill what the run config owns into the DeepSpeed config; refuse contradictions."""
    ds = copy.deepcopy(ds_config)
    owned = {"train_micro_batch_size_per_gpu": micro_batch,
             "gradient_accumulation_steps": grad_accum,
             "train_batch_size": micro_batch * grad_accum * world,
             "gradient_clipping": max_grad_norm}
    for key, value in owned.items():
        given = ds.get(key, "auto")
        if given not in ("auto", value):
            raise ValueError(f"DeepSpeed config sets {key}={given!r} but the run config implies "
                             f"{value!r}; remove it or set it to \"auto\" (train.* owns it)")
        ds[key] = value
    bf16 = dtype == torch.bfloat16
    if ds.get("fp16", {}).get("enabled") is True:
        raise ValueError("DeepSpeed fp16 is not supported for GPart: use bf16 (model.precision)")
    ds.setdefault("bf16", {})["enabled"] = bf16
    zero = ds.setdefault("zero_optimization", {})
    zero.setdefault("stage", 3)
    if zero.get("offload_param", {}).get("device") == "nvme":
        raise ValueError("NVMe parameter offload is not supported: GPart reads frozen shards "
                         "directly; use offload_param device cpu or none")
    ds.setdefault("steps_per_print", 10**9)  # the trainer logs; silence DeepSpeed's own
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def persist(param: torch.nn.Parameter) -> None:
    """Keep theta resident after initialize (no re-gather per forward): it is d floats."""
    if is_partitioned(param):
        param.ds_persist = True


def model_state_bytes(engine) -> dict[str, int]:
    """This rank's bytes of training state beside the model weights, read off the ZeRO-3
    optimizer: fp32 master partitions, optimizer moments, gradient partitions.

    What separates methods at scale: full fine-tuning pays it for every weight, LoRA and
    GPart only for their few trainable parameters.
    """
    opt = getattr(engine, "optimizer", None)

    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))

    master = nbytes(getattr(opt, "fp32_partitioned_groups_flat", []) or [])
    inner = getattr(opt, "optimizer", None)
    moments = 0
    if inner is not None:
        for st in inner.state.values():
            moments += nbytes(v for k, v in st.items() if k != "step")
    grads = 0
    flat = getattr(opt, "grad_partitions_flat_buffer", None)
    if torch.is_tensor(flat):
        grads = flat.numel() * flat.element_size()
    return {"master": master, "optimizer": moments, "gradients": grads,
            "total": master + moments + grads}
