"""What the planner prints: the memory plan as a table, the run in a few lines, the time and
traffic rows as a Markdown table, the node-vs-global sweep."""

from __future__ import annotations

from .arch import Arch, PlanError, dtype_bytes
from .cluster import Cluster
from .memory import GIB, Plan, Verdict
from .step import StepEstimate, estimate_rows, modes_of, recommend


def human(nbytes: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes:.0f} B"


def format_plan(plan: Plan, verdict: Verdict | None = None) -> str:
    width = max(len(r.label) for r in plan.rows) + 2
    big = max(plan.gpu_total, plan.host_total)
    unit, size = next(((u, s) for u, s in (("GiB", GIB), ("MiB", 1 << 20)) if big >= s), ("KiB", 1 << 10))
    lines = [f"  {f'per rank ({unit})':<{width}}{'device':>8}" + (f"{'host':>8}" if plan.host_total else "")]
    for r in plan.rows:
        host = f"{r.host / size:8.2f}" if plan.host_total else ""
        lines.append(f"  {r.label:<{width}}{r.gpu / size:8.2f}{host}")
    total_host = f"{plan.host_total / size:8.2f}" if plan.host_total else ""
    lines.append(f"  {'total':<{width}}{plan.gpu_total / size:8.2f}{total_host}")
    lines += [f"  note: {n}" for n in plan.notes]
    if verdict is not None:
        lines.append(("OK " if verdict.fits else "REFUSED ") + verdict.message)
    return "\n".join(lines)


def describe_run(cfg, arch: Arch, source: str, world: int) -> str:
    import os

    from .. import methods
    from ..config import auto_lr_caveat, resolved_lr, unread_method_keys

    m, t = cfg.method, cfg.train
    shown = os.path.relpath(source) if not os.path.relpath(source).startswith("..") else source
    n = arch.n_params
    params = f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n:,}"
    unread = unread_method_keys(m)
    return "\n".join(
        [
            f"model: {shown}: {params} parameters, {arch.layers} blocks, hidden "
            f"{arch.hidden}, vocab {arch.vocab:,}; training dtype "
            f"{'fp32' if dtype_bytes(cfg.model.precision) == 4 else 'bf16'}",
            methods.cost(m).summary(arch),
            *([f"not read by {m.name} (ignored): {', '.join(unread)}"] if unread else []),
            f"learning rate {resolved_lr(cfg, arch.D):.3g}" + (" (train.lr: auto)" if t.lr == "auto" else ""),
            *([f"  {c}"] if (c := auto_lr_caveat(cfg, arch.D)) else []),
            f"batch: micro-batch {t.micro_batch_size} x {cfg.data.max_length} tokens, grad_accum {t.grad_accum}, "
            f"{world} ranks -> global batch {t.micro_batch_size * t.grad_accum * world} sequences; "
            f"activation checkpointing {'on' if cfg.model.gradient_checkpointing else 'off'}",
        ]
    )


def _fmt_bytes(x: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if x >= size:
            return f"{x / size:.3g} {unit}"
    return f"{x:.0f} B"


def format_table(rows: list[StepEstimate], cluster: Cluster, nodes: int, gpus_per_node: int, method: str) -> str:
    """The rows as a Markdown table, and the frozen partition recommended for `method`."""
    lines = [
        f"time and traffic per optimizer step, per GPU: {nodes} node(s) x {gpus_per_node} GPU(s) of {cluster.name}",
        f"  assumed per GPU: {cluster.gpu_mem_gb:g} GiB, {cluster.peak_tflops:g} TFLOPS bf16 peak x "
        f"{cluster.gemm_efficiency:.2f} achieved, "
        f"NVLink {cluster.nvlink_gbps:g} GB/s, network {cluster.net_gbps:g} GB/s per GPU "
        f"(x {cluster.link_efficiency:.2f} achieved), HBM {cluster.hbm_gbps:g} GB/s, "
        f"generated weights (GPart's W0 + delta) {cluster.delta_build_per_s:.3g} / "
        f"{cluster.delta_backward_per_s:.3g} elem/s (build / backward)",
        "| method | frozen partition | PFLOP/step | inter-node bytes | intra-node bytes | compute s | delta s "
        "| comm s | step s (overlap) | step s (no overlap) | GiB/GPU | fits |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r.times
        lines.append(
            f"| {r.label or r.method} | {r.mode} | {r.flops['total'] / 1e15:.3g} | "
            f"{_fmt_bytes(r.inter_bytes)} | {_fmt_bytes(r.intra_bytes)} | {t['compute_s']:.3g} | "
            f"{t['delta_s']:.3g} | "
            f"{t['comm_overlappable_s'] + t['comm_exposed_s']:.3g} | {t['step_overlap_s']:.3g} | "
            f"{t['step_serial_s']:.3g} | {r.memory_gib:.1f} | {'yes' if r.fits else 'NO'} |"
        )
    best = recommend(rows, method)
    if best is not None and len(modes_of(method)) > 1:
        other = next((r for r in rows if r.method == best.method and r.mode != best.mode), None)
        vs = ""
        if other is not None:
            vs = (
                f"; vs {other.mode}: {other.times['step_overlap_s'] / best.times['step_overlap_s']:.2f}x "
                f"(overlap), {other.times['step_serial_s'] / best.times['step_serial_s']:.2f}x (no overlap), "
                f"{other.inter_bytes / max(best.inter_bytes, 1):.3g}x the inter-node bytes"
            )
        lines.append(f"recommended for {method}: dist.frozen_partition={best.mode}{vs}")
    return "\n".join(lines)


def sweep(
    cfg, arch: Arch, nodes: int, gpus_per_node: int, cluster: Cluster, nets: list[float], micro_batches: list[int]
) -> str:
    """The run's method, node vs global: predicted step time ratio over network
    bandwidths and micro-batches."""
    name = cfg.method.name
    if len(modes_of(name)) == 1:
        raise PlanError(f"method {name} trains the base weights: there is no frozen partition to compare")
    lines = [
        "| micro-batch | network GB/s per GPU | node s (overlap / none) | global s (overlap / none) "
        "| global / node (overlap) | global / node (no overlap) |",
        "|---|---|---|---|---|---|",
    ]
    for mb in micro_batches:
        c = cfg.copy()
        c.train.micro_batch_size = mb
        for net in nets:
            rows = {
                r.mode: r
                for r in estimate_rows(c, arch, nodes, gpus_per_node, cluster.with_(net_gbps=net), names=(name,))
            }
            n, g = rows["node"].times, rows["global"].times
            lines.append(
                f"| {mb} | {net:g} | {n['step_overlap_s']:.2f} / {n['step_serial_s']:.2f} | "
                f"{g['step_overlap_s']:.2f} / {g['step_serial_s']:.2f} | "
                f"{g['step_overlap_s'] / n['step_overlap_s']:.2f}x | "
                f"{g['step_serial_s'] / n['step_serial_s']:.2f}x |"
            )
    return "\n".join(lines)
