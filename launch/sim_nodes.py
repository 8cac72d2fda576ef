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

With --ft (dist.fault_tolerance=nodes, docs/fault_tolerance.md) every simulated node is its
own world instead (`torchrun --nnodes 1`, its own master port), a `torchft_lighthouse` runs
beside them, and --kill-node K --kill-at S [--restart-at R] kill -9 every process of node K
once the others logged step S, and start it again at step R; it rejoins and heals:

    python launch/sim_nodes.py --ft --nodes 3 --per-node 2 --config configs/tiny.yaml \
        output_dir=/tmp/ft --kill-node 2 --kill-at 5 --restart-at 8

The lighthouse logs to <output_dir>.lighthouse.log, a restarted node to
<output_dir>.node<k>.restart.log. Exit status: the first non-zero status of a node that
was not killed on purpose (its restart counts), else 0.

Ctrl-C or SIGTERM to this launcher kills every process it started (agents, ranks, the
lighthouse) and exits 130.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
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


def run(
    nodes: int,
    per_node: int,
    config: str,
    overrides: list[str],
    script: str = "launch/train.py",
    timeout: float = 1800,
    env: dict | None = None,
    nice: int = 0,
) -> list[subprocess.CompletedProcess]:
    """Start the agents, wait for all of them; returns their completed processes (logs in files)."""
    out = _output_dir(overrides)
    out.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    full_env = dict(
        os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})
    )
    full_env.setdefault("DS_ACCELERATOR", "cpu")
    procs, logs = [], []
    for k in range(nodes):
        log = open(f"{out}.node{k}.log", "w")
        logs.append(log)
        cmd = [*(["nice", "-n", str(nice)] if nice else [])] + [
            _torchrun(),
            "--nnodes",
            str(nodes),
            "--node_rank",
            str(k),
            "--nproc_per_node",
            str(per_node),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            script,
            "--config",
            config,
            *overrides,
        ]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT))
    done = []
    try:
        for p in procs:
            p.wait(timeout=timeout)
            done.append(subprocess.CompletedProcess(p.args, p.returncode))
    finally:
        for p in procs:
            if p.poll() is None:
                kill_node_procs(p)  # the agent and its ranks: killing torchrun alone orphans them
        for log in logs:
            log.close()
    return done


def _lighthouse() -> str:
    name = "torchft_lighthouse"
    exe = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if exe is None:
        raise UserError("torchft_lighthouse not found next to this python or on PATH: pip install 'gpart_ds[ft]'")
    return exe


def lighthouse_cmd(port: int, join_timeout_ms: int = 60000, heartbeat_timeout_ms: int = 2000) -> list[str]:
    """The lighthouse: a quorum as soon as one replica group asks (--min_replicas 1); at the
    start it waits up to join_timeout_ms for every group that heartbeats (their start-up
    differs), and a group whose heartbeats stop for heartbeat_timeout_ms drops out."""
    return [
        _lighthouse(),
        "--min_replicas",
        "1",
        "--bind",
        f"[::]:{port}",
        "--join_timeout_ms",
        str(join_timeout_ms),
        "--heartbeat_timeout_ms",
        str(heartbeat_timeout_ms),
    ]


def _descendants(pid: int) -> list[int]:
    """pid and every process below it (from /proc), parents first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def kill_node_procs(proc: subprocess.Popen) -> int:
    """kill -9 of every process of a simulated node: torchrun's agent and its ranks (the ranks
    run in sessions of their own), all at once; returns how many."""
    pids = _descendants(proc.pid)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    return len(pids)


def _committed_steps(out: Path, skip: int | None) -> int:
    """The last step a replica group other than `skip` logged in <output_dir>/metrics.jsonl."""
    last = 0
    try:
        lines = (out / "metrics.jsonl").read_text(errors="replace").splitlines()
    except OSError:
        return 0
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "loss" in rec and "event" not in rec and rec.get("replica") != skip and rec.get("committed", True):
            last = max(last, int(rec["step"]))
    return last


def run_ft(
    nodes: int,
    per_node: int,
    config: str,
    overrides: list[str],
    script: str = "launch/train.py",
    timeout: float = 1800,
    env: dict | None = None,
    nice: int = 0,
    kill_node: int | None = None,
    kill_at: int = 0,
    restart_at: int | None = None,
    say=print,
    kill_when=None,
) -> dict:
    """Fault-tolerant simulated nodes (module doc). Returns {"codes": {node: status of its last
    start}, "killed_at", "restarted_at": (seconds since start, step), "wall_s"}. `kill_when`: a
    function of no argument; when given, node `kill_node` is killed once it returns true (instead
    of at step `kill_at`)."""
    out = _output_dir(overrides)
    out.parent.mkdir(parents=True, exist_ok=True)
    lh_port = free_port()
    base_env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        **(env or {}),
        "TORCHFT_LIGHTHOUSE": f"http://127.0.0.1:{lh_port}",
        "GPART_FT_REPLICAS": str(nodes),
    }
    base_env.setdefault("DS_ACCELERATOR", "cpu")
    base_env.setdefault("RUST_LOG", "warn")  # torchft's manager: lines per rank and step at info
    pre = ["nice", "-n", str(nice)] if nice else []
    files = [open(f"{out}.lighthouse.log", "w")]
    lighthouse = subprocess.Popen(
        pre + lighthouse_cmd(lh_port), cwd=REPO, stdout=files[0], stderr=subprocess.STDOUT, start_new_session=True
    )
    overrides = [*overrides, "dist.fault_tolerance=nodes"]

    def start(k: int, tag: str = "") -> subprocess.Popen:
        log = open(f"{out}.node{k}{tag}.log", "w")
        files.append(log)
        cmd = pre + [
            _torchrun(),
            "--nnodes",
            "1",
            "--nproc_per_node",
            str(per_node),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            script,
            "--config",
            config,
            *overrides,
        ]
        # its own session, apart from this script's
        return subprocess.Popen(
            cmd,
            cwd=REPO,
            env=dict(base_env, GPART_FT_REPLICA=str(k)),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    t0 = time.time()
    procs = {k: start(k) for k in range(nodes)}
    result = {"killed_at": None, "restarted_at": None}
    try:
        while time.time() - t0 < timeout:
            if kill_node is not None:
                step = _committed_steps(out, kill_node)
                if result["killed_at"] is None and (kill_when() if kill_when is not None else step >= kill_at):
                    n = kill_node_procs(procs[kill_node])
                    result["killed_at"] = (time.time() - t0, step)
                    say(
                        f"{time.time() - t0:.1f} s: kill -9 of the {n} processes of node {kill_node} (the others at "
                        f"step {step})",
                        flush=True,
                    )
                elif (
                    result["killed_at"] is not None
                    and restart_at is not None
                    and result["restarted_at"] is None
                    and step >= restart_at
                ):
                    procs[kill_node] = start(kill_node, ".restart")
                    result["restarted_at"] = (time.time() - t0, step)
                    say(
                        f"{time.time() - t0:.1f} s: node {kill_node} started again (the others at step {step})",
                        flush=True,
                    )
            if all(p.poll() is not None for p in procs.values()):
                break
            time.sleep(0.2)
    finally:
        for p in procs.values():
            if p.poll() is None:
                kill_node_procs(p)
        lighthouse.terminate()
        try:
            lighthouse.wait(timeout=10)
        except subprocess.TimeoutExpired:
            lighthouse.kill()
        for f in files:
            f.close()
    codes = {k: p.returncode for k, p in procs.items()}
    if result["killed_at"] is not None and result["restarted_at"] is None:
        codes.pop(kill_node)  # killed on purpose and not started again: no status of its own
    result.update(codes=codes, wall_s=time.time() - t0)
    return result


def end_like_ctrl_c_on_sigterm() -> None:
    """SIGTERM (kill, timeout, a scheduler) ends this process like Ctrl-C, so that the
    finally blocks of run() and run_ft() end every node's processes: the ranks of --ft nodes
    run in sessions of their own and would otherwise train on, orphaned."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--per-node", type=int, default=2)
    ap.add_argument("--config", required=True)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--nice", type=int, default=0, help="run the agents under nice -n N")
    ap.add_argument(
        "--ft",
        action="store_true",
        help="fault-tolerant replica groups: one world per node and a torchft lighthouse (dist.fault_tolerance=nodes)",
    )
    ap.add_argument("--kill-node", type=int, help="--ft: kill -9 every process of this node ...")
    ap.add_argument("--kill-at", type=int, default=5, help="... once the other nodes logged this step")
    ap.add_argument("--restart-at", type=int, help="--ft: start the killed node again at this step")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    def body() -> int:
        if args.nodes < 1 or args.per_node < 1:
            raise UserError("--nodes and --per-node must be >= 1")
        if args.kill_at < 0:
            raise UserError(f"--kill-at must be >= 0, got {args.kill_at}")
        if args.restart_at is not None and args.kill_node is None:
            raise UserError("--restart-at needs --kill-node (the node to start again)")
        if args.ft:
            if args.kill_node is not None and not 0 <= args.kill_node < args.nodes:
                raise UserError(f"--kill-node must be in 0..{args.nodes - 1}")
            if args.kill_node is not None and args.nodes < 2:
                raise UserError("--kill-node needs --nodes >= 2 (a node must survive)")
        elif args.kill_node is not None or args.restart_at is not None:
            raise UserError("--kill-node and --restart-at need --ft")
        end_like_ctrl_c_on_sigterm()
        if args.ft:
            res = run_ft(
                args.nodes,
                args.per_node,
                args.config,
                args.overrides,
                timeout=args.timeout,
                nice=args.nice,
                kill_node=args.kill_node,
                kill_at=args.kill_at,
                restart_at=args.restart_at,
            )
            out = _output_dir(args.overrides)
            bad = {k: c for k, c in res["codes"].items() if c}
            print(f"nodes exited {res['codes']} in {res['wall_s']:.1f} s", flush=True)
            if bad:
                print(f"error: node {min(bad)} exited {bad[min(bad)]}; logs: {out}.node*.log", file=sys.stderr)
                return bad[min(bad)]
            return 0
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
