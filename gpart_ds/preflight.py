"""Fail-fast checks a multi-node job runs once per node before it starts the ranks.

    srun --ntasks-per-node=1 python -m gpart_ds.preflight --nodes N --tasks-per-node G \\
        --device cuda --config configs/llama70b.yaml [key=value ...]

Seconds here save a queue wait and a 70B start-up that would fail anyway: the Python and
packages on every node, the GPUs each node shows, the config (and, unless a `prepare`
recipe creates them, the model and data files as every node sees them), that the head node
resolves, that output_dir is writable and shared by all nodes, and, on GPUs, that the
memory plan fits; and the checks the trainer makes before it writes anything (the config
against the model and DeepSpeed, the output folder and the resume target: runcheck).
Exit status 0 when all pass; otherwise every failure is printed and the status is 3
(2 for a bad config: `error: ...`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import time
from pathlib import Path

MIN_PYTHON = (3, 10)


def parse(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m gpart_ds.preflight", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", required=True)
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--tasks-per-node", type=int, required=True, help="ranks (GPUs) per node")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument(
        "--tag",
        default=os.environ.get("SLURM_JOB_ID", "manual"),
        help="names this run's shared-folder probe (default: the SLURM job id)",
    )
    ap.add_argument(
        "--wait-s", type=float, default=120.0, help="how long to wait for every node's probe file to become visible"
    )
    ap.add_argument("overrides", nargs="*")
    return ap.parse_args(argv)


def check_gpus(device: str, need: int) -> str | None:
    import torch

    if device == "cpu":
        return None
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n < need:
        return (
            f"{n} CUDA device(s) visible, {need} ranks per node need {need} (submit with "
            f"--gpus-per-node={need}; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
        )
    return None


def check_shared_output(out: Path, tag: str, nodes: int, wait_s: float) -> str | None:
    """Write this node's probe into output_dir and wait for every node's to appear."""
    probe_dir = out / ".preflight" / tag
    try:
        if os.environ.get("SLURM_NODEID", "0") == "0":  # keep only this job's probes
            for old in (out / ".preflight").glob("*"):
                if old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)
        probe_dir.mkdir(parents=True, exist_ok=True)
        (probe_dir / socket.gethostname()).write_text(f"{os.getpid()}\n")
    except OSError as exc:
        return f"output_dir {str(out)!r} is not writable from {socket.gethostname()}: {exc}"
    deadline = time.monotonic() + wait_s
    while True:
        seen = sorted(p.name for p in probe_dir.iterdir())
        if len(seen) >= nodes:
            return None
        if time.monotonic() > deadline:
            return (
                f"output_dir {str(out)!r} is not shared: after {wait_s:.0f} s this node sees the "
                f"probes of {len(seen)} of {nodes} nodes ({', '.join(seen)}); put output_dir (and "
                "checkpoint.dir, data.cache_dir) on a file system every node mounts"
            )
        time.sleep(1.0)


def check_memory(cfg, world: int) -> str | None:
    import torch

    from . import plan

    arch, _ = plan.arch_for_config(cfg)
    mem_gb = torch.cuda.get_device_properties(0).total_memory / plan.GIB
    p = plan.plan_for_config(cfg, arch, world)
    verdict = plan.check_fit(p, mem_gb)
    print(plan.format_plan(p, verdict), flush=True)
    return None if verdict.fits else f"memory plan on {world} ranks: {verdict.message}"


def main(argv=None) -> int:
    from .errors import run_cli

    return run_cli(lambda: _main(parse(argv)))


def _main(args) -> int:
    host = socket.gethostname()
    failures = []
    if sys.version_info < MIN_PYTHON:
        failures.append(
            f"Python {sys.version.split()[0]} at {sys.executable}; need >= {'.'.join(map(str, MIN_PYTHON))}"
        )
    try:
        import deepspeed  # noqa: F401  (the ranks need it; a broken install fails here, cheaply)
        import torch  # noqa: F401
    except Exception as exc:  # ImportError, or a CUDA/ABI mismatch raised at import
        failures.append(f"{sys.executable} cannot import torch/deepspeed: {exc}")
        return _report(host, failures)
    from .config import ConfigError, check_paths, load_config
    from .plan import PlanError
    from .runcheck import resolve_outputs, validate_for_run

    # A bad config is an `error:` line and exit 2 (errors.run_cli), as for the trainer:
    # the same checks the trainer makes before it writes anything (runcheck).
    cfg = load_config(args.config, args.overrides, check_files=False)
    from .assets import check_recipes, made_by_recipes

    check_recipes(cfg)
    check_paths(cfg, skip=made_by_recipes(cfg))  # files a recipe creates are made at start-up
    if not cfg.prepare:
        # On the node the ranks start on: what this machine offers (backend, accelerator) too.
        validate_for_run(cfg, world=args.nodes * args.tasks_per_node, device_type=args.device, environment=True)
    from .ownership import FolderLock, peek

    # Another live run that owns output_dir (not this job's earlier allocation): refused
    # here, naming it, before the ranks start; the ranks' rank 0 takes the lock itself.
    lock = FolderLock.for_folder(cfg.output_dir, "output_dir")
    peek(lock.path, lock.what, lock.key)
    if os.environ.get("SLURM_NODEID", "0") == "0":  # one node reads the checkpoints
        resolve_outputs(cfg)
    failures += [f for f in (check_gpus(args.device, args.tasks_per_node),) if f]
    master = os.environ.get("MASTER_ADDR")
    if master:
        try:
            socket.getaddrinfo(master, None)
        except OSError as exc:
            failures.append(f"head node MASTER_ADDR={master!r} does not resolve here: {exc}")
    failure = check_shared_output(Path(cfg.output_dir), args.tag, args.nodes, args.wait_s)
    if failure:
        failures.append(failure)
    if args.device == "cuda" and not failures and os.environ.get("SLURM_NODEID", "0") == "0":
        try:
            failure = check_memory(cfg, args.nodes * args.tasks_per_node)
        except (ConfigError, PlanError) as exc:
            failure = f"memory plan: {exc}"
        if failure:
            failures.append(failure)
    return _report(host, failures)


def _report(host: str, failures: list[str]) -> int:
    for f in failures:
        print(f"preflight FAILED on {host}: {f}", file=sys.stderr, flush=True)
    if not failures:
        print(f"preflight ok on {host} ({sys.executable})", flush=True)
    return 3 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
