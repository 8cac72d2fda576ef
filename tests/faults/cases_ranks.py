"""Fault probes of kind `ranks`: 2-rank launches through the deepspeed launcher (a refusal
every rank reaches, non-finite values, a full disk on one rank, SIGTERM, a killed rank).
"""

from __future__ import annotations

import shutil
import signal

from tests.faults.cases import (
    APPEND,
    DISK,
    NONFINITE,
    Expect,
    _checkpoint_is,
    _finite_metrics,
    _finite_theta,
    _latest_verifies,
    _preempted,
    case,
    err,
    ok,
)
from tests.faults.runner import Call


# ================================================================ ranks (2-rank launches)
def _launch(ws, fx, changes=None, *overrides, **kw) -> Call:
    cfg = fx.write_config(ws, changes)
    # A hang detector, not a speed limit: on a loaded 2-core machine a 2-rank start alone took 60 s.
    return Call("launcher", [2, "--config", cfg, *overrides], timeout=kw.pop("timeout", 600), **kw)


# Three launches in CI (~20-60 s each): a refusal found by a collective (non-finite), a
# failure on one rank (disk full), and ranks dying with their launcher. A refusal every rank
# reaches alone from the same files (an existing output_dir) is covered in one process.
@case(
    "ranks-new-run-existing",
    "ranks",
    "2 ranks: a new run into an existing output_dir (every rank refuses)",
    err(r"output_dir", r"(?i)exists|already|resume|overwrite"),
    defect="run-replaces-run",
    ci=False,
)
def _(ws, fx):
    fx.copy_run(ws)
    return _launch(ws, fx, {"train": {"max_steps": 2}})


@case(
    "ranks-nonfinite",
    "ranks",
    "2 ranks: train.lr=1e30 (the loss becomes NaN: every rank stops, same error)",
    err(NONFINITE, r"(?i)step"),
    defect="non-finite",
)
def _(ws, fx):
    c = _launch(ws, fx, {"train": {"max_steps": 3, "lr": 1e30, "max_grad_norm": 0.0}})
    c.checks = (_finite_metrics(), _finite_theta("run/adapter"))
    return c


@case(
    "ranks-disk-full-checkpoint",
    "ranks",
    "2 ranks: disk full while writing a checkpoint (no hang, clear error)",
    err(DISK, r"step-000006|checkpoint"),
    defect="traceback",
)
def _(ws, fx):
    # Per-file limit (inherited by the launcher's ranks): the 64 KB state file cannot be written.
    shutil.copytree(fx.base_run, ws / "run")
    cfg = fx.write_config(ws, {"train": {"max_steps": 6, "resume": "auto"}, "checkpoint": {"every_steps": 2}})
    c = Call(
        "launcher",
        [2, "--config", cfg],
        timeout=600,
        fs={"how": "rlimit", "limit_bytes": 32_000},
        may_change=("run/run_config.yaml",),
        append_only=APPEND,
    )
    c.checks = (_checkpoint_is("run/checkpoints/step-000004", 4, fx), _latest_verifies())
    return c


def _sigterm_ranks(rank):
    def build(ws, fx):
        c = _launch(ws, fx, {"train": {"max_steps": 400, "log_every": 50}})
        c.signal = {
            "signum": int(signal.SIGTERM),
            "rank": rank,
            "when_file": str(ws / "run" / "metrics.jsonl"),
            "when_contains": '"step": 2,',
        }
        c.checks = (_latest_verifies(),)
        return c

    return build


case(
    "ranks-sigterm-every-rank",
    "ranks",
    "2 ranks: SIGTERM to every rank mid-run, as SLURM sends it (checkpoint, exit 75)",
    ok(r"stop signal received", code=75),
    ci=False,
)(_sigterm_ranks("all"))


@case(
    "ranks-sigterm-launcher",
    "ranks",
    "2 ranks: SIGTERM to the `deepspeed` command only, as `kill PID` or a "
    "container runtime sends it: the ranks see their launcher die, checkpoint and exit 75 (the command itself "
    "dies of the signal: deepspeed's runner has no handler), no rank left running",
    Expect(error=False, code=None, says=(r"stop signal received",)),
    defect="new",
)
def _(ws, fx):
    c = _sigterm_ranks(None)(ws, fx)
    c.grace_s = 120  # a step and a checkpoint, on a loaded machine
    c.checks = (_latest_verifies(), _preempted())
    return c


@case(
    "ranks-kill-rank",
    "ranks",
    "2 ranks: SIGKILL of rank 1 after step 3 (job ends, checkpoints intact, "
    "rank 0 names the last checkpoint and train.resume=auto)",
    Expect(error=False, code=None, says=(r"error: rank 0: lost contact", r"train\.resume=auto")),
    ci=False,
    defect="new",
)
def _(ws, fx):
    c = _launch(ws, fx, {"train": {"max_steps": 400, "log_every": 50}, "checkpoint": {"every_steps": 2}})
    c.signal = {
        "signum": int(signal.SIGKILL),
        "rank": 1,
        "when_file": str(ws / "run" / "metrics.jsonl"),
        "when_contains": '"step": 3,',
    }
    c.checks = (_latest_verifies(),)
    return c
