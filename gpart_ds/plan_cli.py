"""`python -m gpart_ds.plan`: the planner's command line. The memory plan is plan.py's,
time and traffic of a step plan_time.py's (which builds on plan.py): this module reads
both, so that plan.py need not import plan_time."""
from __future__ import annotations

import argparse
import json
import sys

from . import plan_time
from .errors import run_cli
from .plan import (
    PlanError,
    __doc__ as PLAN_DOC,
    arch_for_config,
    check_fit,
    describe_run,
    format_plan,
    human,
    min_nodes,
    plan_for_config,
)


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="python -m gpart_ds.plan", description=PLAN_DOC,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="run YAML, or a name in configs/")
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--gpus-per-node", type=int, required=True)
    ap.add_argument("--gpu-mem-gb", type=float, required=True, help="memory per GPU, GiB")
    ap.add_argument("--model-config", help="a Hugging Face config.json (or folder) with the model's "
                    "shapes; default: model.path, else model.arch_config")
    ap.add_argument("--method", help="estimate another method on the same targets (gpart, lora, vera, full)")
    ap.add_argument("--headroom", type=float, default=0.10, help="fraction of GPU memory kept free")
    ap.add_argument("--overhead-gb", type=float, default=3.0,
                    help="CUDA context + NCCL + allocator allowance per GPU, GiB")
    ap.add_argument("overrides", nargs="*", help="key.sub=value, as for launch/train.py")
    plan_time.add_arguments(ap)   # --cluster, --net-gbps, ..., --json
    return ap.parse_args(argv)


def main(argv=None) -> int:
    return run_cli(lambda: _main(parse(argv)))


def _main(args) -> int:
    from . import methods
    from .config import load_config
    from .runcheck import validate_for_run

    for key in ("nodes", "gpus_per_node"):
        if getattr(args, key) < 1:
            raise PlanError(f"--{key.replace('_', '-')} must be >= 1")
    if not args.gpu_mem_gb > 0 or not 0 <= args.headroom < 1:
        raise PlanError("--gpu-mem-gb must be > 0 and --headroom in [0, 1)")
    if args.method is not None and args.method not in methods.names():
        raise PlanError(f"--method {args.method!r}: choose one of {methods.names()}")
    cfg = load_config(args.config, args.overrides, check_files=False)
    world = args.nodes * args.gpus_per_node
    validate_for_run(cfg, world=world, device_type="cuda", model_config=args.model_config)   # as training would
    arch, source = arch_for_config(cfg, args.model_config)
    kw = dict(method=args.method, overhead_gb=args.overhead_gb)
    group = lambda w: plan_time.config_frozen_group(cfg, args.method, args.gpus_per_node, w)  # noqa: E731
    plan = plan_for_config(cfg, arch, world, frozen_group=group(world), **kw)
    verdict = check_fit(plan, args.gpu_mem_gb, args.headroom)
    show = (lambda *a, **k: None) if args.json else print
    show(f"memory plan: {args.nodes} node(s) x {args.gpus_per_node} GPU(s) = {world} ranks, "
         f"{args.gpu_mem_gb:g} GiB per GPU, method {args.method or cfg.method.name}, frozen partition "
         f"{'the world' if group(world) is None else f'groups of {group(world)} ranks'}")
    show(describe_run(cfg, arch, source, world))
    show(format_plan(plan, verdict))
    if plan.host_total:
        show(f"host memory per node: {args.gpus_per_node} x {human(plan.host_total)} = "
             f"{human(args.gpus_per_node * plan.host_total)} (offloaded state)")
    report = plan_time.cli_report(args, cfg, arch)
    print(json.dumps(report["json"], indent=1) if args.json else "\n" + report["text"])
    if not verdict.fits:
        # Fewest nodes with the frozen weights partitioned over the world; with
        # dist.frozen_partition=node every node holds them whole, so more nodes do not help.
        node_mode = (cfg.dist.frozen_partition == "node"
                     and len(plan_time.modes_of(args.method or cfg.method.name)) > 1)
        need = min_nodes(lambda w: check_fit(plan_for_config(cfg, arch, w, **kw), args.gpu_mem_gb,
                                             args.headroom).fits, args.gpus_per_node)
        hint = (f"at least {need} node(s) x {args.gpus_per_node} GPUs fit this config" if need
                else "no number of nodes fits: the unsharded items alone are too large")
        if node_mode and need:
            hint += (" with dist.frozen_partition=global (dist.frozen_partition=node keeps a whole copy of the "
                     "frozen weights on each node, so more nodes do not help; or raise "
                     "dist.frozen_partition_size)")
        print(f"what to change: {hint}; or CPU offload of the frozen weights (deepspeed: "
              f"ds_zero3_llama70b_offload.json), a smaller train.micro_batch_size or data.max_length, "
              f"model.gradient_checkpointing=true", file=sys.stderr)
        return 1
    return 0
