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


# Top-level DeepSpeed keys gpart_ds passes through: what the trainer fills in (batch sizes,
# clipping, bf16), ZeRO-3 itself, and settings that change nothing gpart_ds relies on.
PASSED_KEYS = {
    "zero_optimization",
    "bf16",
    "fp16",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "train_batch_size",
    "gradient_clipping",
    "zero_force_ds_cpu_optimizer",
    "zero_allow_untested_optimizer",
    "steps_per_print",
    "wall_clock_breakdown",
    "memory_breakdown",
    "dump_state",
    "prescale_gradients",
    "gradient_predivide_factor",
    "communication_data_type",
    "seq_parallel_communication_data_type",
    "disable_allgather",
    "sparse_gradients",
    "timers",
    "comms_logger",
    "flops_profiler",
    "data_types",
    "log_level",
    "disable_python_gc",
    "graph_harvesting",
    "zero_optimization_stage_3_leaf_modules",
}
# Keys DeepSpeed reads that gpart_ds cannot honour: said up front instead of trained
# past (or ignored) in silence. Each reason names what to use instead.
REFUSED_KEYS = {
    "optimizer": "the trainer builds its own AdamW from train.lr, train.betas, train.adam_eps and "
    "train.weight_decay; DeepSpeed would ignore this section (a client optimizer wins)",
    "scheduler": "the trainer's schedule is train.schedule, train.warmup_ratio and train.min_lr_ratio; "
    "DeepSpeed would ignore this section (a client scheduler wins)",
    "bfloat16": "gpart_ds sets bf16 from model.precision and DeepSpeed reads bfloat16 only where bf16 is "
    'absent, so it would be ignored: remove it (bf16: {"enabled": "auto"} is the form to use)',
    "amp": "Apex AMP does not run with ZeRO; the training dtype is model.precision",
    "torch_autocast": "autocast would compute in another dtype than model.precision says (and the "
    "checkpoints record); the training dtype is model.precision",
    "activation_checkpointing": "DeepSpeed's activation checkpointing applies only to models written for it, "
    "so it would be ignored: use model.gradient_checkpointing",
    "checkpoint": "gpart_ds writes its own checkpoints (checkpoint.*), not DeepSpeed's: ignored",
    "tensorboard": "DeepSpeed's monitor would write outside output_dir: use log.tensorboard",
    "wandb": "DeepSpeed's monitor would open its own W&B run: use log.wandb",
    "csv_monitor": "DeepSpeed's monitor would write outside output_dir; metrics.jsonl has every step",
    "comet": "DeepSpeed's monitor is not wired to gpart_ds's logs; metrics.jsonl has every step",
    "pipeline": "pipeline parallelism is not supported (ZeRO-3 data parallelism only)",
    "tensor_parallel": "tensor parallelism is not supported (ZeRO-3 data parallelism only)",
    "sequence_parallel_size": "sequence parallelism is not supported (ZeRO-3 data parallelism only)",
    "expert_parallel": "expert parallelism is not supported (ZeRO-3 data parallelism only)",
    "elasticity": "elastic training changes the batch size that train.* fixes",
    "autotuning": "the autotuner launches its own experiments; use python -m gpart_ds.plan",
    "compression_training": "DeepSpeed's compression rewrites the model's layers, which the method adapts",
    "data_efficiency": "gpart_ds orders and samples the data itself (data.*)",
    "curriculum_learning": "gpart_ds orders and samples the data itself (data.*)",
    "progressive_layer_drop": "it changes the model's forward, which the method adapts",
    "sparse_attention": "it changes the model's attention, which the method adapts",
    "weight_quantization": "quantized weights change the shard layout gpart_ds reads (zero3.unsupported_variant)",
    "hybrid_engine": "the hybrid (RLHF) engine is not supported",
    "compile": "DeepSpeed's compile path is not supported; the method chooses its kernels (method.kernel)",
}
# zero_optimization settings that change how ZeRO-3 partitions or stores the weights and the
# optimizer state, which gpart_ds reads and writes itself (shards, checkpoints, exports).
_ZERO_REFUSED = {
    "zero_hpz_partition_size": (
        lambda v: v not in (None, 0, 1),
        "hpZ secondary partitions change the shard "
        "layout gpart_ds reads; dist.frozen_partition=node keeps the frozen weights within "
        "a node instead (docs/scale.md)",
    ),
    "zero_quantized_weights": (bool, "quantized weights change the shard layout gpart_ds reads"),
    "zero_quantized_nontrainable_weights": (
        bool,
        "quantized frozen weights change the shard layout gpart_ds reads (and have no CPU kernel)",
    ),
    "mics_shard_size": (
        lambda v: isinstance(v, int) and v > 0,
        "MiCS partitions over its own groups; "
        "dist.frozen_partition chooses the groups the frozen base is partitioned over",
    ),
}
_DTYPE_SECTIONS = ("bf16", "fp16")


def _zero_problems(zero) -> str | None:
    """What DeepSpeed's own schema says of the zero_optimization section (unknown keys,
    wrong types), as `zero_optimization.KEY: reason`; None when it parses."""
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
        from pydantic import ValidationError
    except ImportError:  # the planner on a machine without DeepSpeed: its own checks only
        return None
    try:
        DeepSpeedZeroConfig(**zero)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(x) for x in ("zero_optimization", *first.get("loc", ())))
        more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        return f"{key}: {first.get('msg', exc)}{more}"
    except (TypeError, ValueError) as exc:  # a deprecated alias DeepSpeed converts and rejects
        return f"zero_optimization: {exc}"
    return None


def check_settings(ds, dtype: torch.dtype | None = None, warn=None) -> None:
    """Refuse a DeepSpeed config gpart_ds cannot run as written: ValueError('KEY: why').

    Settings that would crash later (ZeRO stage 2: trains, then fails at the first
    checkpoint; CPU optimizer offload without zero_force_ds_cpu_optimizer false: fails in
    deepspeed.initialize after the model is loaded; hpZ, quantized or NVMe-offloaded
    weights: the shard layout), or that DeepSpeed would silently ignore beside what the run
    config owns (an optimizer or scheduler section, a bf16 flag that contradicts
    model.precision, a misspelt key). `dtype`: the training dtype, where it is known.
    `warn(text)`: told of keys neither known nor near a known one.
    """
    import difflib

    if not isinstance(ds, dict):
        raise ValueError(f"the top level must be a JSON object of settings, got a {type(ds).__name__}")
    known = PASSED_KEYS | set(REFUSED_KEYS)
    for key in ds:
        if not isinstance(key, str) or key.startswith(("_", "//", "comment")):
            continue  # a comment by convention
        if key == "sequence_parallel_size" and ds[key] in (None, 1):
            continue  # 1: none
        if key in REFUSED_KEYS:
            raise ValueError(f"{key}: not supported: {REFUSED_KEYS[key]}")
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
            if close:
                raise ValueError(
                    f"{key}: not a DeepSpeed setting (DeepSpeed would ignore it without a word); "
                    f"did you mean {close[0]!r}?"
                )
            if warn:
                warn(f"{key}: not a setting gpart_ds knows; passed to DeepSpeed as it is")
    for name in _DTYPE_SECTIONS:
        sec = ds.get(name)
        if sec is not None and not isinstance(sec, dict):
            raise ValueError(f'{name}: must be an object such as {{"enabled": "auto"}}, got {sec!r}')
        enabled = (sec or {}).get("enabled", "auto" if name == "bf16" else False)
        if enabled not in (True, False, "auto"):
            raise ValueError(f'{name}.enabled: must be true, false or "auto", got {enabled!r}')
    if (ds.get("fp16") or {}).get("enabled") is True:
        both = (
            " (together with bf16: DeepSpeed allows one of them)"
            if (ds.get("bf16") or {}).get("enabled") is True
            else ""
        )
        raise ValueError(f"fp16.enabled: DeepSpeed fp16 is not supported for GPart{both}: use bf16 (model.precision)")
    bf16 = (ds.get("bf16") or {}).get("enabled", "auto")
    if dtype is not None and bf16 != "auto" and bf16 != (dtype == torch.bfloat16):
        raise ValueError(
            f"bf16.enabled: {str(bf16).lower()}, but model.precision makes this run train in "
            f"{'bf16' if dtype == torch.bfloat16 else 'fp32'}; model.precision owns the dtype: set "
            'bf16.enabled to "auto" (or remove it) and choose model.precision'
        )
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ValueError(f'zero_optimization: must be an object such as {{"stage": 3}}, got {zero!r}')
    stage = zero.get("stage", 3)
    if isinstance(stage, bool) or str(stage).strip() != "3":
        raise ValueError(
            f"zero_optimization.stage: {stage!r}: gpart_ds runs ZeRO stage 3 only (it reads and "
            "writes the weights as ZeRO-3 partitions them; stage 2 trains, then fails at the first "
            "checkpoint): set it to 3"
        )
    problem = _zero_problems(zero)
    if problem:
        raise ValueError(problem)
    for key, (bad, why) in _ZERO_REFUSED.items():
        if key in zero and bad(zero[key]):
            raise ValueError(f"zero_optimization.{key}: {zero[key]!r} is not supported: {why}")
    for which in ("offload_param", "offload_optimizer"):
        off = zero.get(which) or {}
        if off.get("device") == "nvme":
            raise ValueError(
                f"zero_optimization.{which}.device: NVMe offload is not supported: "
                + (
                    "GPart reads frozen shards directly"
                    if which == "offload_param"
                    else "checkpoints gather the optimizer state whole, which NVMe offload swaps out"
                )
                + "; use device cpu or none"
            )
    if (zero.get("offload_optimizer") or {}).get("device") == "cpu" and ds.get(
        "zero_force_ds_cpu_optimizer", True
    ) is not False:
        raise ValueError(
            "zero_optimization.offload_optimizer.device: cpu offload of the optimizer needs "
            '"zero_force_ds_cpu_optimizer": false beside it: the trainer builds its own AdamW, which '
            "DeepSpeed refuses under offload otherwise (after the model is loaded)"
        )


def engine_config(
    ds_config: dict,
    *,
    micro_batch: int,
    grad_accum: int,
    world: int,
    max_grad_norm: float,
    dtype: torch.dtype | None,
    warn=None,
) -> dict:
    """Fill what the run config owns into the DeepSpeed config; refuse contradictions and
    settings gpart_ds cannot run (check_settings). dtype None: not known yet (a plan for
    other machines with model.precision auto): bf16 is left as given."""
    check_settings(ds_config, dtype, warn)
    ds = copy.deepcopy(ds_config)
    owned = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world,
        "gradient_clipping": max_grad_norm,
    }
    for key, value in owned.items():
        given = ds.get(key, "auto")
        if given not in ("auto", value) or isinstance(given, bool):
            raise ValueError(
                f"{key}={given!r} but the run config implies {value!r} "
                f'({_OWNER[key]}); remove it or set it to "auto" (train.* owns it)'
            )
        ds[key] = value
    if dtype is not None:
        ds.setdefault("bf16", {})["enabled"] = dtype == torch.bfloat16
    if "fp16" in ds:
        ds["fp16"]["enabled"] = False  # "auto": the trainer decides, and never trains in fp16
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = 3
    ds.setdefault("steps_per_print", 10**9)  # the trainer logs; silence DeepSpeed's own
    ds.setdefault("wall_clock_breakdown", False)
    return ds


_OWNER = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "train_batch_size": "train.micro_batch_size x train.grad_accum x the number of ranks",
    "gradient_clipping": "train.max_grad_norm",
}


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
    return {"master": master, "optimizer": moments, "gradients": grads, "total": master + moments + grads}
