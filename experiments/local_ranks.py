"""Start n ranks of a command on this machine with the variables torchrun sets.

For benchmarks and tests only. The deepspeed launcher adds two Python processes (its
runner and its per-node launcher: ~5 s of imports on 2 CPU cores) and polls its ranks once
a second, a third of a tiny 2-rank run's wall time. The ranks find who they are from
RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT
(gpart_ds.distributed.discover, "torch-style variables") exactly as under torchrun.
Users launch with `deepspeed`, `srun` or `mpirun`, and the tests of those launchers use
them (tests/integration/test_launch.py, test_slurm.py, test_mpi.py, the fault probes).

Like a launcher, the first rank to fail ends the others (SIGTERM, then SIGKILL) and its
exit status is the result; and a SIGTERM to this process (`kill`, `timeout`, a scheduler)
ends the ranks before it ends (errors.Stopped: "stopped: ...", exit 75), where the
signal's default action would leave them training on, orphaned.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from gpart_ds.distributed import free_port

GRACE_S = 10.0  # after SIGTERM, before SIGKILL: a rank may be writing a checkpoint


def rank_env(rank: int, world: int, port: int, base: dict | None = None) -> dict:
    """The variables torchrun gives rank `rank` of a one-node world."""
    env = dict(os.environ if base is None else base)
    env.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        PYTHONUNBUFFERED="1",
    )
    return env


def _end(procs: list[subprocess.Popen]) -> None:
    live = [p for p in procs if p.poll() is None]
    for p in live:
        p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    for p in live:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run(
    n: int,
    argv: list[str],
    *,
    cwd=None,
    env: dict | None = None,
    timeout: float | None = None,
    stdout=None,
    stderr=None,
) -> int:
    """Run `argv` as ranks 0..n-1 and wait; returns 0 or the first failing rank's status.

    stdout / stderr: open files shared by every rank (as a launcher's inherited streams),
    or None for this process's own. On `timeout` every rank is ended and
    subprocess.TimeoutExpired raised.
    """
    port = free_port()
    previous = _stop_on_sigterm(n, argv)
    procs = [
        subprocess.Popen(argv, cwd=cwd, env=rank_env(r, n, port, env), stdout=stdout, stderr=stderr) for r in range(n)
    ]
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                return failed[0]  # the others are ended below
            if all(c == 0 for c in codes):
                return 0
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(argv, timeout)
            time.sleep(0.05)
    finally:
        _end(procs)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _stop_on_sigterm(n: int, argv: list[str]):
    """While the ranks run, SIGTERM raises errors.Stopped here, so that run()'s `finally`
    ends them; returns the handler to restore (None off the main thread, where Python
    allows no handler: there the caller's own process handles its signals)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    from gpart_ds.errors import Stopped

    what = " ".join(Path(a).name if "/" in a else a for a in argv[:3])

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the ending short
        raise Stopped(
            f"{signal.Signals(signum).name}: the {n} rank(s) of `{what} ...` were ended first (SIGTERM, then "
            f"SIGKILL after {GRACE_S:.0f} s); what had finished is kept"
        )

    return signal.signal(signal.SIGTERM, stop)
