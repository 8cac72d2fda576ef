"""`launch/train.py --dry-run`: what a run would do, decided before any weight is read.

Builds the model on the meta device (shapes from model.path's config.json, model.arch_config
or --model-config), applies the method's targeting, and reports what the method says of
itself (GPart: D, d, the group sizes n_g), each rank's ZeRO-3 partition and the memory
plan; then exits without a process group or data.
Exit status 1 when the plan does not fit the GPU memory given (or found), else 0.
"""

from __future__ import annotations

import os
from collections import Counter

from . import methods, plan


def _world_from_env() -> int:
    for key in ("WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 1


def _gpu_mem_gb() -> float | None:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / plan.GIB
    return None


def targets_summary(arch: plan.Arch) -> str:
    """ "q_proj x80 (8192x8192), ..." in first-seen order."""
    names = arch.target_names
    kinds = Counter(n.rsplit(".", 1)[-1] for n in names)
    shapes = {}
    for n, s in zip(names, arch.targets):
        shapes.setdefault(n.rsplit(".", 1)[-1], s)
    return ", ".join(f"{k} x{kinds[k]} ({shapes[k][0]}x{shapes[k][1]})" for k in kinds)


def run(
    cfg,
    *,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    gpu_mem_gb: float | None = None,
    model_config: str | None = None,
    headroom: float = 0.10,
    overhead_gb: float = 3.0,
) -> int:
    from .distributed import check_launch_env
    from .runcheck import validate_for_run

    check_launch_env()  # the launch variables a run would read, as training checks them
    world = nodes * gpus_per_node if nodes and gpus_per_node else _world_from_env()
    # What training would refuse, a dry run refuses: the same checks, bar the weights. A
    # plan for GPUs (--gpus-per-node, --gpu-mem-gb, or a GPU here) is checked for CUDA.
    on_gpus = bool(gpu_mem_gb or gpus_per_node or _gpu_mem_gb())
    validate_for_run(cfg, world=world, device_type="cuda" if on_gpus else "cpu", model_config=model_config)
    if os.environ.get("RANK", "0") != "0":  # under a launcher: one report is enough
        return 0
    arch, source = plan.arch_for_config(cfg, model_config)
    m = cfg.method
    per_rank = sum(-(-n // world) for _, n in arch.params)
    b = plan.dtype_bytes(cfg.model.precision)
    print("dry run: model built on the meta device, no weights read, no process group, no data")
    print(plan.describe_run(cfg, arch, source, world))
    print(f"targets ({m.target_modules}): {targets_summary(arch)}")
    for line in methods.cost(m).dry_run_lines(arch):
        print(line)
    print(
        f"ZeRO-3 on {world} ranks: each holds ceil(n/{world}) elements of each of "
        f"{len(arch.params)} tensors = {per_rank:,} elements ({plan.human(per_rank * b)})"
    )
    mem = gpu_mem_gb if gpu_mem_gb is not None else _gpu_mem_gb()
    from .plan import report, step
    from .plan.cluster import PRESETS

    # The frozen partition's group (dist.frozen_partition) needs the ranks per node.
    per_node = gpus_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0) or world
    group = step.config_frozen_group(cfg, None, per_node, world)
    # The CUDA allowance only applies when planning for GPUs.
    p = plan.plan_for_config(cfg, arch, world, overhead_gb=overhead_gb if mem else 0.0, frozen_group=group)
    verdict = plan.check_fit(p, mem, headroom) if mem else None
    print(
        f"frozen base partitioned over {'the world' if group is None else f'groups of {group} ranks'} "
        f"(dist.frozen_partition={cfg.dist.frozen_partition})"
    )
    print(plan.format_plan(p, verdict))
    if verdict is None:
        print("(no GPU here and no --gpu-mem-gb: the plan is not checked against a memory size)")
    if world % per_node == 0:  # time and traffic per step, with the H100 preset's figures
        cluster = PRESETS["h100"].with_(gpu_mem_gb=mem)
        rows = step.estimate_rows(
            cfg, arch, world // per_node, per_node, cluster, headroom=headroom, overhead_gb=overhead_gb
        )
        print(report.format_table(rows, cluster, world // per_node, per_node, m.name))
        print("(python -m gpart_ds.plan ... --cluster h200 --net-gbps N [--json] for other clusters)")
    return 0 if verdict is None or verdict.fits else 1
