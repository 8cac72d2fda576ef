"""Time lost per fault: fault-tolerant replica groups against requeue-and-resume, side by side
(docs/fault_tolerance.md).

    python -m experiments.ft_cost [--nodes 3 --per-node 2 --steps 120 --kill-at 30 --every 20] [--out DIR]

Four runs of the tiny config on simulated nodes, one after the other:

    ft        dist.fault_tolerance=nodes, no fault
    ft-kill   the same, kill -9 of every process of the last node at step --kill-at, restarted
              at once (it heals from the live nodes while they train on)
    plain     one world over every node (launch/sim_nodes.py), no fault
    requeue   the same, kill -9 of the last node at --kill-at: the job dies (the others lose
              their peer), and is started again whole with train.resume=auto, from the last
              checkpoint (checkpoint.every_steps=--every), as slurm/gpart.sh's requeue does

Time lost per fault = wall time with the fault - wall time without. Prints a table and
writes DIR/ft_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "launch"))
import sim_nodes  # noqa: E402

CONFIG = "configs/tiny.yaml"


def _common(steps: int, every: int) -> list[str]:
    return [
        f"train.max_steps={steps}",
        "train.log_every=20",
        "train.eval_examples=8",
        f"checkpoint.every_steps={every}",
        "train.eval_generate=never",
    ]


def _plain(nodes, per, overrides, kill_at=None) -> dict:
    """One world over the simulated nodes; with kill_at, kill -9 of the last node there."""
    out = sim_nodes._output_dir(overrides)
    cmd = [
        sys.executable,
        str(REPO / "launch/sim_nodes.py"),
        "--nodes",
        str(nodes),
        "--per-node",
        str(per),
        "--config",
        CONFIG,
        *overrides,
    ]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = None
    try:
        while proc.poll() is None:
            if kill_at is not None and killed is None and sim_nodes._committed_steps(out, -1) >= kill_at:
                agents = [
                    p
                    for p in sim_nodes._descendants(proc.pid)
                    if b"--node_rank\0" + str(nodes - 1).encode() in _cmdline(p) and b"torchrun" in _cmdline(p)
                ]
                for a in agents:
                    for pid in sim_nodes._descendants(a):
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                killed = time.time() - t0
            time.sleep(0.2)
    finally:
        if proc.poll() is None:  # interrupted: sim_nodes ends its nodes on SIGTERM
            proc.terminate()
            proc.wait()
    return {"wall_s": time.time() - t0, "code": proc.returncode, "killed_at_s": killed}


def _succeeded(name: str, codes: dict, root: Path) -> None:
    """A time lost to a run that failed is no measurement: stop with its logs named."""
    from gpart_ds.errors import RunFailed

    if any(codes.values()):
        raise RunFailed(f"the {name} run failed (exit statuses by node {codes}); logs: {root}/{name.split()[0]}*.log")


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m experiments.ft_cost", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--per-node", type=int, default=2)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--kill-at", type=int, default=30)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--out", default="/tmp/ft_cost")
    args = ap.parse_args(argv)
    from gpart_ds.errors import UserError, run_cli

    def body() -> int:
        if args.nodes < 2 or args.per_node < 1:
            raise UserError("--nodes must be >= 2 (one node is killed, the others train on) and --per-node >= 1")
        if args.every < 1 or args.steps < 1 or not 0 < args.kill_at < args.steps:
            raise UserError(
                f"--steps and --every must be >= 1 and --kill-at in (0, --steps={args.steps}), "
                f"got --steps {args.steps} --every {args.every} --kill-at {args.kill_at}"
            )
        sim_nodes.end_like_ctrl_c_on_sigterm()  # _plain's sim_nodes children end their nodes too
        return _measure(args)

    return run_cli(body)


def _measure(args) -> int:
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    common = _common(args.steps, args.every)
    n, per, k = args.nodes, args.per_node, args.nodes - 1
    res = {}
    t0 = time.time()
    r = sim_nodes.run_ft(n, per, CONFIG, [*common, f"output_dir={root / 'ft'}"], say=lambda *a, **kw: None)
    res["ft"] = {"wall_s": time.time() - t0, "codes": r["codes"]}
    _succeeded("ft", r["codes"], root)
    t0 = time.time()
    r = sim_nodes.run_ft(
        n,
        per,
        CONFIG,
        [*common, f"output_dir={root / 'ft-kill'}"],
        kill_node=k,
        kill_at=args.kill_at,
        restart_at=args.kill_at,
        say=lambda *a, **kw: None,
    )
    res["ft-kill"] = {
        "wall_s": time.time() - t0,
        "codes": r["codes"],
        "killed_at": r["killed_at"],
        "restarted_at": r["restarted_at"],
    }
    _succeeded("ft-kill", r["codes"], root)
    recs = [json.loads(x) for x in (root / "ft-kill" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in recs if "loss" in x and "event" not in x and x["replica"] == 0]
    res["ft-kill"]["slowest_steps_s"] = sorted(round(x["step_time_s"] + x["quorum_s"], 2) for x in steps)[-3:]
    res["ft-kill"]["rejoined_at_step"] = next(
        (x["step"] for x in recs if x.get("event") == "quorum" and x["replica"] == k and x["healed"] and x["step"] > 1),
        None,
    )
    res["plain"] = _plain(n, per, [*common, f"output_dir={root / 'plain'}"])
    _succeeded("plain", {0: res["plain"]["code"]}, root)
    first = _plain(n, per, [*common, f"output_dir={root / 'requeue'}"], kill_at=args.kill_at)
    again = _plain(n, per, [*common, f"output_dir={root / 'requeue'}", "train.resume=auto"])
    _succeeded("requeue (resumed)", {0: again["code"]}, root)
    res["requeue"] = {"wall_s": first["wall_s"] + again["wall_s"], "first": first, "again": again}
    lost_ft = res["ft-kill"]["wall_s"] - res["ft"]["wall_s"]
    lost_rq = res["requeue"]["wall_s"] - res["plain"]["wall_s"]
    res["lost_per_fault_s"] = {"fault_tolerant": lost_ft, "requeue_and_resume": lost_rq}
    (root / "ft_cost.json").write_text(json.dumps(res, indent=1))
    print(
        f"| run | wall s | lost to the fault s |\n|---|---|---|\n"
        f"| ft, no fault | {res['ft']['wall_s']:.1f} | |\n"
        f"| ft, node {k} killed at step {args.kill_at} and restarted | {res['ft-kill']['wall_s']:.1f} | "
        f"{lost_ft:.1f} |\n"
        f"| plain, no fault | {res['plain']['wall_s']:.1f} | |\n"
        f"| plain, node {k} killed at step {args.kill_at}, whole job resumed | {res['requeue']['wall_s']:.1f} | "
        f"{lost_rq:.1f} |"
    )
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
