"""`python -m gpart_ds.plan`: the planner's command line, the memory plan and the time and
traffic of a step together; `python -m gpart_ds.plan sweep`: the run's method, frozen base
within a node vs over the world, over networks and micro-batches."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import asdict

from ..errors import run_cli
from . import memory
from .arch import Arch, PlanError, arch_for_config
from .cluster import PRESETS, Cluster
from .faults import FaultParams, estimate_faults, format_faults
from .memory import check_fit, min_nodes, plan_for_config
from .report import describe_run, format_plan, format_table, human, sweep
from .step import config_frozen_group, estimate_rows, modes_of, recommend


def parse(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m gpart_ds.plan", description=memory.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", required=True, help="run YAML, or a name in configs/")
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--gpus-per-node", type=int, required=True)
    ap.add_argument("--gpu-mem-gb", type=float, required=True, help="memory per GPU, GiB")
    ap.add_argument(
        "--model-config",
        help="a Hugging Face config.json (or folder) with the model's "
        "shapes; default: model.path, else model.arch_config",
    )
    ap.add_argument("--method", help="estimate another method on the same targets (gpart, lora, vera, full)")
    ap.add_argument("--headroom", type=float, default=0.10, help="fraction of GPU memory kept free")
    ap.add_argument(
        "--overhead-gb", type=float, default=3.0, help="CUDA context + NCCL + allocator allowance per GPU, GiB"
    )
    ap.add_argument("overrides", nargs="*", help="key.sub=value, as for launch/train.py")
    add_arguments(ap)  # --cluster, --net-gbps, ..., --json
    return ap.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sweep"]:
        return sweep_main(argv[1:])
    return run_cli(lambda: _main(parse(argv)))


def _main(args) -> int:
    # With --json, stdout carries the JSON alone: libraries print while they load (DeepSpeed's
    # accelerator warning goes to a handler that binds sys.stdout when deepspeed is imported),
    # so everything before the JSON goes to stderr.
    out = sys.stdout
    if not args.json:
        return _plan(args, out)
    with contextlib.redirect_stdout(sys.stderr):
        return _plan(args, out)


def _plan(args, out) -> int:
    from .. import methods
    from ..config import load_config
    from ..runcheck import validate_for_run

    for key in ("nodes", "gpus_per_node"):
        if getattr(args, key) < 1:
            raise PlanError(f"--{key.replace('_', '-')} must be >= 1")
    if not args.gpu_mem_gb > 0 or not 0 <= args.headroom < 1:
        raise PlanError("--gpu-mem-gb must be > 0 and --headroom in [0, 1)")
    if args.method is not None and args.method not in methods.names():
        raise PlanError(f"--method {args.method!r}: choose one of {methods.names()}")
    cluster_from_args(args)  # the time and fault flags checked before anything is printed
    fault_params_from_args(args)
    cfg = load_config(args.config, args.overrides, check_files=False)
    world = args.nodes * args.gpus_per_node
    validate_for_run(cfg, world=world, device_type="cuda", model_config=args.model_config)  # as training would
    arch, source = arch_for_config(cfg, args.model_config)
    kw = dict(method=args.method, overhead_gb=args.overhead_gb)
    group = lambda w: config_frozen_group(cfg, args.method, args.gpus_per_node, w)  # noqa: E731
    plan = plan_for_config(cfg, arch, world, frozen_group=group(world), **kw)
    verdict = check_fit(plan, args.gpu_mem_gb, args.headroom)
    show = (lambda *a, **k: None) if args.json else print
    show(
        f"memory plan: {args.nodes} node(s) x {args.gpus_per_node} GPU(s) = {world} ranks, "
        f"{args.gpu_mem_gb:g} GiB per GPU, method {args.method or cfg.method.name}, frozen partition "
        f"{'the world' if group(world) is None else f'groups of {group(world)} ranks'}"
    )
    show(describe_run(cfg, arch, source, world))
    show(format_plan(plan, verdict))
    if plan.host_total:
        show(
            f"host memory per node: {args.gpus_per_node} x {human(plan.host_total)} = "
            f"{human(args.gpus_per_node * plan.host_total)} (offloaded state)"
        )
    report = cli_report(args, cfg, arch)
    print(json.dumps(report["json"], indent=1) if args.json else "\n" + report["text"], file=out)
    if not verdict.fits:
        # Fewest nodes with the frozen weights partitioned over the world; with
        # dist.frozen_partition=node every node holds them whole, so more nodes do not help.
        node_mode = cfg.dist.frozen_partition == "node" and len(modes_of(args.method or cfg.method.name)) > 1
        need = min_nodes(
            lambda w: check_fit(plan_for_config(cfg, arch, w, **kw), args.gpu_mem_gb, args.headroom).fits,
            args.gpus_per_node,
        )
        hint = (
            f"at least {need} node(s) x {args.gpus_per_node} GPUs fit this config"
            if need
            else "no number of nodes fits: the unsharded items alone are too large"
        )
        if node_mode and need:
            hint += (
                " with dist.frozen_partition=global (dist.frozen_partition=node keeps a whole copy of the "
                "frozen weights on each node, so more nodes do not help; or raise "
                "dist.frozen_partition_size)"
            )
        print(
            f"what to change: {hint}; or CPU offload of the frozen weights (deepspeed: "
            f"ds_zero3_llama70b_offload.json), a smaller train.micro_batch_size or data.max_length, "
            f"model.gradient_checkpointing=true",
            file=sys.stderr,
        )
        return 1
    return 0


def add_arguments(ap) -> None:
    g = ap.add_argument_group("time and traffic (gpart_ds/plan/step.py)")
    g.add_argument(
        "--cluster",
        choices=sorted(PRESETS),
        default="h100",
        help="per-GPU figures of the nodes (default h100); the options below override them",
    )
    g.add_argument("--net-gbps", type=float, help="network bandwidth per GPU, GB/s (presets: 50)")
    g.add_argument("--nvlink-gbps", type=float, help="intra-node bandwidth per GPU and direction, GB/s")
    g.add_argument("--tflops", type=float, help="dense bf16 peak per GPU, TFLOPS")
    g.add_argument("--gemm-efficiency", type=float, help="achieved fraction of the peak (default 0.80)")
    f = ap.add_argument_group("fault tolerance across nodes (gpart_ds/plan/faults.py)")
    d = FaultParams()
    f.add_argument(
        "--ft-quorum-s",
        type=float,
        default=d.quorum_s,
        help=f"torchft quorum per step, s (default {d.quorum_s:g}: the measured median, docs/fault_tolerance.md)",
    )
    f.add_argument(
        "--ft-heartbeat-s",
        type=float,
        default=d.heartbeat_s,
        help=f"lighthouse heartbeat timeout, s (default {d.heartbeat_s:g}, as slurm/gpart.sh)",
    )
    f.add_argument(
        "--ft-load-gbps",
        type=float,
        default=d.load_gbps,
        help=f"GB/s at which a node reads the frozen base at start-up (default {d.load_gbps:g}, assumed)",
    )
    f.add_argument(
        "--ft-startup-s",
        type=float,
        default=d.startup_s,
        help=f"start-up of a node's processes before the base is read, s (default {d.startup_s:g}, assumed)",
    )
    g.add_argument(
        "--json", action="store_true", help="print the time/traffic rows (and each row's memory per GPU) as JSON only"
    )


def cluster_from_args(args) -> Cluster:
    base = PRESETS[args.cluster]
    for key in ("net_gbps", "nvlink_gbps", "tflops", "gemm_efficiency"):
        v = getattr(args, key)
        if v is not None and not v > 0:
            raise PlanError(f"--{key.replace('_', '-')} must be > 0, got {v}")
    return base.with_(
        net_gbps=args.net_gbps,
        nvlink_gbps=args.nvlink_gbps,
        peak_tflops=args.tflops,
        gemm_efficiency=args.gemm_efficiency,
        gpu_mem_gb=args.gpu_mem_gb,
    )


def cli_report(args, cfg, arch: Arch) -> dict:
    """{"text": the table, "json": the rows}, for python -m gpart_ds.plan."""
    cluster = cluster_from_args(args)
    method = args.method or cfg.method.name
    rows = estimate_rows(
        cfg, arch, args.nodes, args.gpus_per_node, cluster, headroom=args.headroom, overhead_gb=args.overhead_gb
    )
    best = recommend(rows, method)
    js = {
        "nodes": args.nodes,
        "gpus_per_node": args.gpus_per_node,
        "cluster": asdict(cluster),
        "config": cfg.config_file,
        "recommended": {method: best.mode if best else None},
        "methods": {f"{r.method}/{r.mode}": r.to_json() for r in rows},
    }
    text = format_table(rows, cluster, args.nodes, args.gpus_per_node, method)
    ft = fault_report(args, cfg, arch, rows, cluster, method)
    if ft is not None:
        js["fault_tolerance"] = ft["json"]
        text += "\n\n" + ft["text"]
    return {"text": text, "json": js}


def fault_params_from_args(args) -> FaultParams:
    """The --ft-* flags, checked (PlanError naming the flag)."""
    return FaultParams(
        quorum_s=args.ft_quorum_s,
        heartbeat_s=args.ft_heartbeat_s,
        load_gbps=args.ft_load_gbps,
        startup_s=args.ft_startup_s,
    ).check()


def fault_report(args, cfg, arch: Arch, rows, cluster: Cluster, method: str) -> dict | None:
    """The cost and saving of dist.fault_tolerance=nodes for the method with the frozen base
    within each node (None: the method has no such row, e.g. full fine-tuning)."""
    from .arch import checked_method, dtype_bytes, method_for

    row = next((r for r in rows if r.method == method and r.mode == "node"), None)
    if row is None:
        return None
    params = fault_params_from_args(args)
    every = cfg.checkpoint.every_steps or cfg.train.max_steps  # no checkpoint: the whole run again
    est = estimate_faults(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        step_s=row.times["step_overlap_s"],
        base_bytes_per_node=arch.n_params * dtype_bytes(cfg.model.precision),
        every_steps=every,
        trainables=checked_method(method_for(cfg, method)).trainable_count(arch),
        net_gbps=cluster.net_gbps * cluster.link_efficiency,
        params=params,
    )
    enabled = cfg.dist.get("fault_tolerance", "none") == "nodes"
    js = {"enabled": enabled, "method": method, **est.to_json()}
    return {"text": format_faults(est, row.label or method, enabled), "json": js}


def _numbers(text: str, kind, flag: str) -> list:
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PlanError(f"{flag} {text!r}: expected comma-separated numbers") from None
    if any(not v > 0 for v in values):
        raise PlanError(f"{flag} {text!r}: every value must be > 0")
    return values


def sweep_main(argv=None) -> int:
    """python -m gpart_ds.plan sweep --config C --nodes N --gpus-per-node G [--cluster h100]
    [--net 50,25,12.5] [--micro-batch 1,2]: the run's method with the frozen base within a
    node vs over the world, over networks and micro-batches."""
    from ..config import load_config

    ap = argparse.ArgumentParser(prog="python -m gpart_ds.plan sweep", description=sweep_main.__doc__)
    ap.add_argument("--config", required=True)
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--gpus-per-node", type=int, required=True)
    ap.add_argument("--cluster", choices=sorted(PRESETS), default="h100")
    ap.add_argument("--net", default="50,25,12.5,6.25,3.125", help="network GB/s per GPU, comma-separated")
    ap.add_argument("--micro-batch", default="", help="train.micro_batch_size values (default: the config's)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    def body() -> int:
        if args.nodes < 1 or args.gpus_per_node < 1:
            raise PlanError("--nodes and --gpus-per-node must be >= 1")
        cfg = load_config(args.config, args.overrides, check_files=False)
        arch, _ = arch_for_config(cfg)
        nets = _numbers(args.net, float, "--net")
        mbs = _numbers(args.micro_batch, int, "--micro-batch") or [cfg.train.micro_batch_size]
        table = sweep(cfg, arch, args.nodes, args.gpus_per_node, PRESETS[args.cluster], nets, mbs)
        print(
            f"{cfg.method.name} step time, frozen base within a node vs over the world: {args.nodes} x "
            f"{args.gpus_per_node} GPUs, {PRESETS[args.cluster].name}, {cfg.data.max_length} tokens per sequence"
        )
        print(table)
        return 0

    return run_cli(body)
