"""Fault probes of kind `cli`: the other entry points (plan, assets, preflight, study,
bench) and a stale DeepSpeed build lock.
"""

from __future__ import annotations

import shutil

from tests.faults.cases import (
    CFG_LINE,
    case,
    err,
    ok,
    train,
)
from tests.faults.runner import Call


# ================================================================ other CLIs
@case(
    "plan-regex-invalid",
    "cli",
    "python -m gpart_ds.plan on a config with an invalid target regex",
    err(CFG_LINE, "target_modules"),
    defect="traceback",
)
def _(ws, fx):
    cfg = fx.write_config(ws, {"method": {"target_modules": "(q_proj"}})
    return Call("plan", ["--config", cfg, "--nodes", "1", "--gpus-per-node", "1", "--gpu-mem-gb", "80"])


@case("assets-unknown", "cli", "python -m gpart_ds.assets nope", err(r"nope"), ci=False)
def _(ws, fx):
    return Call("assets", ["nope"])


@case("preflight-bad-config", "cli", "python -m gpart_ds.preflight with method.d=0", err(r"method\.d"))
def _(ws, fx):
    cfg = fx.write_config(ws)
    return Call(
        "preflight", ["--config", cfg, "--nodes", "1", "--tasks-per-node", "1", "--device", "cpu", "method.d=0"]
    )


@case(
    "preflight-existing-output",
    "cli",
    "python -m gpart_ds.preflight: a new run into another run's output_dir",
    err(r"output_dir", r"(?i)already holds"),
    ci=False,
)
def _(ws, fx):
    fx.copy_run(ws)
    cfg = fx.write_config(ws)
    return Call(
        "preflight",
        ["--config", cfg, "--nodes", "1", "--tasks-per-node", "1", "--device", "cpu", "--wait-s", "5"],
        may_change=("run/.preflight/*",),
    )


@case("study-config-missing", "cli", "python -m experiments.study --config naming nothing", err(r"nope"), ci=False)
def _(ws, fx):
    return Call("study", ["--config", ws / "nope.yaml", "--out", ws / "study"])


@case("bench-unknown-method", "cli", "python -m experiments.bench --methods gpart,nope", err(r"nope"), ci=False)
def _(ws, fx):
    return Call("bench", ["--methods", "gpart,nope", "--out", ws / "bench"])


@case(
    "stale-build-lock",
    "cli",
    "a build lock left in TORCH_EXTENSIONS_DIR by a killed DeepSpeed build "
    "(every later CPU run waited on it forever): removed with a warning, the run trains",
    ok(r"(?i)stale build lock"),
    defect="new",
    ci=False,
)
def _(ws, fx):
    import os
    import time

    from gpart_ds.distributed import extension_dir

    fx.base_run  # noqa: B018 - the op is built (or loaded) by then
    built = extension_dir("deepspeed_shm_comm")
    ext = ws / "_ext"
    shutil.copytree(built, ext / built.name, ignore=shutil.ignore_patterns("lock"))
    lock = ext / built.name / "lock"
    lock.write_text("")
    old = time.time() - 900
    os.utime(lock, (old, old))
    return train(ws, fx, {"train": {"max_steps": 1}}, env={"TORCH_EXTENSIONS_DIR": str(ext)}, timeout=300)
