"""The planner: what a run needs and costs per GPU, from shapes alone (no weight, no GPU),
one job per module, each on the ones before it:

    arch.py     the model's shapes (Arch, from a config.json) and the method planned (spec,
                method_for, checked_method: the method's cost, methods/cost.py)
    memory.py   the per-GPU memory plan under ZeRO-3 (estimate, check_fit, plan_for_config)
    cluster.py  the cluster model: presets, ranks on nodes, the frozen groups (training's rule),
                the bytes a collective moves inside and across nodes (commcount reads with it)
    step.py     FLOPs, collectives and time of one optimizer step per method and frozen partition
    faults.py   what fault tolerance across nodes costs per step and saves per fault (GPU-hours)
    report.py   the tables and lines it prints
    cli.py      python -m gpart_ds.plan [sweep] (__main__.py runs it)

The memory plan's names are importable from `gpart_ds.plan` itself (plan.estimate,
plan.spec, ...); the step model from `gpart_ds.plan.step`.
"""

from .arch import Arch, PlanError, arch_for_config, checked_method, dtype_bytes, method_for, spec
from .memory import (
    GIB,
    Plan,
    PlanContext,
    Row,
    Verdict,
    check_fit,
    compare_methods,
    estimate,
    final_norm_bytes_per_token,
    head_saved_bytes_per_token,
    layer_saved_bytes_per_token,
    min_nodes,
    plan_for_config,
    saved_activation_bytes,
)
from .report import describe_run, format_plan, human
from .step import COMPARED

__all__ = [
    "COMPARED",
    "GIB",
    "Arch",
    "Plan",
    "PlanContext",
    "PlanError",
    "Row",
    "Verdict",
    "arch_for_config",
    "check_fit",
    "checked_method",
    "compare_methods",
    "describe_run",
    "dtype_bytes",
    "estimate",
    "final_norm_bytes_per_token",
    "format_plan",
    "head_saved_bytes_per_token",
    "human",
    "layer_saved_bytes_per_token",
    "method_for",
    "min_nodes",
    "plan_for_config",
    "saved_activation_bytes",
    "spec",
]
