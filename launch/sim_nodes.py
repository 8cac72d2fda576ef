#!/usr/bin/env python
"""Simulate several nodes on this machine: one torchrun agent per "node", shared rendezvous.

    python launch/sim_nodes.py --nodes 2 --per-node 2 --config configs/tiny.yaml \
        output_dir=/tmp/sim dist.frozen_partition=node dist.count_comm=true

Each agent is `torchrun --nnodes N --node_rank k --nproc_per_node L` with the same master
address and port (torchrun's static rendezvous), so ranks get RANK = k L + local rank,
LOCAL_WORLD_SIZE = L and GROUP_RANK = k: gpart_ds.topology tells the simulated nodes apart
by GROUP_RANK, exactly as on a real cluster where torchrun runs once per node. CPU ranks
(gloo); every agent's output goes to <output_dir>.node<k>.log. With dist.count_comm the
run writes <output_dir>/comm/comm-rank<r>.json and this prints the bytes per step
(python -m gpart_ds.commcount <output_dir>/comm prints them again).
Exit status: the first non-zero agent status, else 0; 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gpart_ds.distributed import free_port  # noqa: E402
from gpart_ds.errors import UserError, run_cli  # noqa: E402


def _torchrun() -> str:
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if exe is None:
        raise UserError("torchrun not found next to this python or on PATH")
    return exe


def _output_dir(overrides: list[str]) -> Path:
    for o in overrides:
        if o.startswith("output_dir="):
            return Path(o.split("=", 1)[1])
    raise UserError("pass output_dir=PATH (the simulated nodes' logs go next to it)")


def run(nodes: int, per_node: int, config: str, overrides: list[str], script: str = "launch/train.py",
        timeout: float = 1800, env: dict | None = None, nice: int = 0) -> list[subprocess.CompletedProcess]:
    """Start the agents, wait for all of them; returns their completed processes (logs in files)."""
    out = _output_dir(overrides)
    out.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                    **(env or {}))
    full_env.setdefault("DS_ACCELERATOR", "cpu")
    procs, logs = [], []
    for k in range(nodes):
        log = open(f"{out}.node{k}.log", "w")
        logs.append(log)
        cmd = ([*(["nice", "-n", str(nice)] if nice else [])] +
               [_torchrun(), "--nnodes", str(nodes), "--node_rank", str(k), "--nproc_per_node", str(per_node),
                "--master_addr", "127.0.0.1", "--master_port", str(port), script, "--config", config, *overrides])
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT))
    done = []
    try:
        for p in procs:
            p.wait(timeout=timeout)
            done.append(subprocess.CompletedProcess(p.args, p.returncode))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    return done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--per-node", type=int, default=2)
    ap.add_argument("--config", required=True)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--nice", type=int, default=0, help="run the agents under nice -n N")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    def body() -> int:
        if args.nodes < 1 or args.per_node < 1:
            raise UserError("--nodes and --per-node must be >= 1")
        procs = run(args.nodes, args.per_node, args.config, args.overrides, timeout=args.timeout, nice=args.nice)
        out = _output_dir(args.overrides)
        bad = [p.returncode for p in procs if p.returncode]
        if bad:
            print(f"error: an agent exited {bad[0]}; logs: {out}.node*.log", file=sys.stderr)
            return bad[0]
        if (out / "comm").is_dir():
            from gpart_ds import commcount

            print(commcount.report(out / "comm"))
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
