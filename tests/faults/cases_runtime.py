"""Fault probes of kinds `diskfull`, `nonfinite` and `signal`: what happens mid-run: a full
disk at each kind of write, values that turn non-finite, stop signals.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

from tests.faults.cases import (
    DISK,
    GOOD,
    NONFINITE,
    _checkpoint_is,
    _finite_metrics,
    _finite_theta,
    _latest_verifies,
    case,
    err,
    evaluate,
    ok,
    resume,
    train,
)
from tests.faults.runner import Call


# ================================================================ disk full
def _small(ws, fx, how, copy=(), free=0, limit=0, mkdir=()):
    """A small file system at ws/small: tmpfs (copy-in, then `free` bytes left) or RLIMIT_FSIZE."""
    mnt = Path(ws) / "small"
    mnt.mkdir()
    if how == "rlimit":
        for src, rel in copy:
            (shutil.copytree if Path(src).is_dir() else shutil.copy2)(src, mnt / rel)
        for rel in mkdir:
            (mnt / rel).mkdir(parents=True, exist_ok=True)
    return {
        "how": how,
        "mount": str(mnt),
        "copy": [[str(s), r] for s, r in copy],
        "free_bytes": free,
        "limit_bytes": limit,
        "mkdir": list(mkdir),
    }


@case(
    "disk-full-checkpoint",
    "diskfull",
    "disk full while writing a checkpoint (resume 4 -> 6)",
    err(DISK, r"step-000006|checkpoint"),
    defect="traceback",
)
def _(ws, fx):
    fs = _small(ws, fx, fx.server.fs_mode, copy=[(fx.base_run, "run")], free=40_000, limit=32_000)
    cfg = fx.write_config(
        ws,
        {
            "output_dir": str(ws / "small" / "run"),
            "train": {"max_steps": 6, "resume": "auto"},
            "checkpoint": {"every_steps": 2},
        },
    )
    c = Call(
        "train",
        ["--config", cfg],
        fs=fs,
        may_change=("small/run/run_config.yaml",),
        append_only=("small/run/metrics.jsonl",),
    )
    c.checks = (_checkpoint_is("small/run/checkpoints/step-000004", 4, fx), _latest_verifies("small/run/checkpoints"))
    return c


@case(
    "disk-full-adapter",
    "diskfull",
    "disk full while writing the adapter (checkpoints elsewhere)",
    err(DISK, r"adapter"),
    defect="traceback",
    needs="tmpfs",
)
def _(ws, fx):
    shutil.copytree(fx.base_run / "checkpoints", ws / "ckpts")
    run_wo_ckpt = ws / "_src"
    shutil.copytree(fx.base_run, run_wo_ckpt, ignore=shutil.ignore_patterns("checkpoints"))
    fs = _small(ws, fx, "tmpfs", copy=[(run_wo_ckpt, "run")], free=12_000)
    cfg = fx.write_config(
        ws,
        {
            "output_dir": str(ws / "small" / "run"),
            "train": {"max_steps": 6, "resume": "auto"},
            "checkpoint": {"every_steps": 2, "dir": str(ws / "ckpts")},
        },
    )
    c = Call(
        "train",
        ["--config", cfg],
        fs=fs,
        may_change=("small/run/run_config.yaml", "ckpts/*", "small/run/eval_predictions.jsonl"),
        append_only=("small/run/metrics.jsonl",),
    )
    c.checks = (_finite_theta("small/run/adapter"),)
    return c


@case("disk-full-export", "diskfull", "disk full during the offline export", err(DISK, r"merged"), defect="traceback")
def _(ws, fx):
    fs = _small(ws, fx, fx.server.fs_mode, copy=[(fx.base_run / "adapter", "adapter")], free=128_000, limit=256_000)
    return Call(
        "export", ["--base", fx.model, "--adapter", ws / "small" / "adapter", "--out", ws / "small" / "merged"], fs=fs
    )


@case(
    "disk-full-tokcache",
    "diskfull",
    "disk full while building the tokenised-data cache",
    err(DISK, r"small|cache"),
    defect="traceback",
)
def _(ws, fx):
    data = ws / "train.jsonl"
    data.write_text(fx.train.read_text() + json.dumps(GOOD) + "\n")  # a new cache key
    fs = _small(ws, fx, fx.server.fs_mode, free=8_000, limit=8_000, mkdir=("tok",))
    cfg = fx.write_config(ws, {"data": {"train": str(data), "cache_dir": str(ws / "small" / "tok")}})
    return Call("train", ["--config", cfg], fs=fs)


@case(
    "disk-full-evaluate-json",
    "diskfull",
    "disk full writing evaluate --json",
    err(DISK, r"out\.json"),
    defect="traceback",
)
def _(ws, fx):
    filler = ws / "_filler"
    filler.write_bytes(b"\0" * 4096)
    fs = _small(ws, fx, fx.server.fs_mode, copy=[(filler, "filler")], free=0, limit=100)
    return evaluate(ws, fx, None, "--json", ws / "small" / "out.json", fs=fs)


# ================================================================ non-finite values
@case(
    "nonfinite-lr-huge",
    "nonfinite",
    "train.lr=1e30 (finite, but the loss becomes NaN)",
    err(NONFINITE, r"(?i)step"),
    defect="non-finite",
)
def _(ws, fx):
    c = train(ws, fx, {"train": {"max_steps": 3, "lr": 1e30, "max_grad_norm": 0.0}})
    c.checks = (_finite_metrics(), _finite_theta("run/adapter"))
    return c


@case(
    "nonfinite-keeps-last-checkpoint",
    "nonfinite",
    "resume at step 4 with train.lr=1e30: the loss turns NaN two steps later; step-000004 stays the last one",
    err(NONFINITE, r"step 6", r"step-000004"),
    defect="non-finite",
)
def _(ws, fx):
    fx.copy_run(ws)
    return resume(
        ws,
        fx,
        {"train": {"max_steps": 8, "lr": 1e30, "max_grad_norm": 0.0, "warmup_ratio": 0.0}},
        may_change=("run/run_config.yaml",),
    )


# ================================================================ signals
def _signal_run(signum):
    def build(ws, fx):
        c = train(ws, fx, {"train": {"max_steps": 400, "log_every": 50}})
        c.signal = {
            "signum": int(signum),
            "when_file": str(ws / "run" / "metrics.jsonl"),
            "when_contains": '"step": 2,',
        }
        c.checks = (_latest_verifies(),)
        return c

    return build


case("signal-sigterm", "signal", "SIGTERM mid-run (checkpoint, exit 75)", ok(r"stop signal received", code=75))(
    _signal_run(signal.SIGTERM)
)
case(
    "signal-sigusr1", "signal", "SIGUSR1 mid-run (checkpoint, exit 75)", ok(r"stop signal received", code=75), ci=False
)(_signal_run(signal.SIGUSR1))


@case(
    "signal-sigint",
    "signal",
    "Ctrl-C (SIGINT) mid-run: no traceback, nothing half-written",
    ok(r"(?i)interrupt", code=130),
    defect="traceback",
)
def _(ws, fx):
    c = train(ws, fx, {"train": {"max_steps": 400, "log_every": 50}})
    c.signal = {
        "signum": int(signal.SIGINT),
        "when_file": str(ws / "run" / "metrics.jsonl"),
        "when_contains": '"step": 2,',
    }
    return c
