"""Fault probes of kinds `checkpoint` and `output`: damaged, drifted or missing checkpoints
on resume, and output folders that exist, or --export-only without what it needs.
"""

from __future__ import annotations

from tests.faults.cases import (
    APPEND,
    OVERRIDE,
    RESUME_MAY,
    _checkpoint_is,
    _latest_verifies,
    _merged_equals_shared,
    _merged_exists,
    _only_checkpoints,
    _resumed_from,
    case,
    err,
    ok,
    resume,
    train,
)
from tests.faults.fixtures import (
    edit_json,
    flip_last_byte,
    rewrite_manifest,
    truncate,
)


# ================================================================ checkpoints (resume)
def _damage_then_resume(damage, step=4):
    def build(ws, fx):
        run = fx.copy_run(ws)
        damage(run / "checkpoints" / f"step-{step:06d}")
        c = resume(ws, fx)
        c.checks = (_resumed_from(2), _latest_verifies())
        return c

    return build


SKIPPED = r"skipping checkpoint step-000004"
for _id, _title, _damage, _defect, _ci in [
    (
        "ckpt-manifest-empty-object",
        "newest checkpoint's manifest.json is {}",
        lambda c: (c / "manifest.json").write_text("{}"),
        "traceback",
        True,
    ),
    (
        "ckpt-manifest-list",
        "newest checkpoint's manifest.json is []",
        lambda c: (c / "manifest.json").write_text("[]"),
        "traceback",
        False,
    ),
    (
        "ckpt-manifest-no-sha",
        "newest manifest lists files without sha256",
        lambda c: edit_json(c / "manifest.json", lambda m: [v.pop("sha256") for v in m["files"].values()]),
        "traceback",
        False,
    ),
    (
        "ckpt-manifest-garbage",
        "newest manifest.json is not JSON",
        lambda c: (c / "manifest.json").write_text("{{{"),
        "",
        False,
    ),
    (
        "ckpt-state-truncated",
        "newest state.safetensors truncated",
        lambda c: truncate(c / "state.safetensors"),
        "",
        False,
    ),
    (
        "ckpt-state-flipped",
        "a flipped byte in the newest state.safetensors",
        lambda c: flip_last_byte(c / "state.safetensors"),
        "",
        False,
    ),
    (
        "ckpt-rng-missing",
        "newest checkpoint lost its rng-rank0 file",
        lambda c: (c / "rng-rank0.safetensors").unlink(),
        "",
        False,
    ),
]:
    case(_id, "checkpoint", _title + " (resume=auto skips it with a warning)", ok(SKIPPED), defect=_defect, ci=_ci)(
        _damage_then_resume(_damage)
    )


@case(
    "ckpt-verified-but-unreadable",
    "checkpoint",
    "newest checkpoint's state.json is {} with a matching manifest (verifies, cannot be loaded): "
    "resume=auto skips it with a warning",
    ok(SKIPPED + r".*state\.json"),
    defect="traceback",
)
def _(ws, fx):
    run = fx.copy_run(ws)
    ck = run / "checkpoints" / "step-000004"
    (ck / "state.json").write_text("{}\n")
    rewrite_manifest(ck)
    c = resume(ws, fx)
    c.checks = (_resumed_from(2), _latest_verifies())
    return c


@case(
    "ckpt-verified-but-unreadable-explicit",
    "checkpoint",
    "train.resume=<a checkpoint whose state.json is {} with a matching manifest> (refused, nothing written)",
    err(r"train\.resume", r"step-000004", r"state\.json"),
    defect="traceback",
    ci=False,
)
def _(ws, fx):
    run = fx.copy_run(ws)
    ck = run / "checkpoints" / "step-000004"
    (ck / "state.json").write_text("{}\n")
    rewrite_manifest(ck)
    return train(ws, fx, {"train": {"max_steps": 6}}, f"train.resume={ck}")


@case(
    "ckpt-all-corrupt",
    "checkpoint",
    "every checkpoint corrupt, resume=auto (must not start over and overwrite)",
    err(r"checkpoints", r"(?i)step-0000|corrupt|damaged|no usable|truncated"),
    defect="all-checkpoints-corrupt",
)
def _(ws, fx):
    run = fx.copy_run(ws)
    for s in (2, 4):
        truncate(run / "checkpoints" / f"step-{s:06d}" / "state.safetensors")
    c = resume(ws, fx, may_change=())
    return c


@case(
    "ckpt-explicit-corrupt",
    "checkpoint",
    "train.resume=<a truncated checkpoint>",
    err(r"step-000004", r"state\.safetensors"),
    defect="refused-resume-writes",
)
def _(ws, fx):
    run = fx.copy_run(ws)
    ck = run / "checkpoints" / "step-000004"
    truncate(ck / "state.safetensors")
    return train(ws, fx, {"train": {"max_steps": 6}}, f"train.resume={ck}")


for _id, _ov, _key in [
    ("ckpt-drift-seed", "method.seed=1", r"method\.seed"),
    ("ckpt-drift-d", "method.d=2048", r"method\.d"),
    ("ckpt-drift-targets", "method.target_modules=[q_proj]", r"method\.target_modules"),
]:
    case(
        _id,
        "checkpoint",
        f"resume=auto with {_ov} (drift refused, nothing rewritten)",
        err(OVERRIDE, _key),
        defect="refused-resume-writes",
        ci=_id == "ckpt-drift-seed",
    )((lambda ov: lambda ws, fx: (fx.copy_run(ws), resume(ws, fx, None, ov, may_change=()))[1])(_ov))


@case(
    "ckpt-max-steps-below",
    "checkpoint",
    "resume=auto with train.max_steps=2 below the newest checkpoint's step 4",
    err(r"max_steps", r"step.?0*4|step-000004"),
    defect="resume-past-max-steps",
)
def _(ws, fx):
    fx.copy_run(ws)
    c = resume(ws, fx, {"train": {"max_steps": 2}}, may_change=())
    c.checks = (_checkpoint_is("run/checkpoints/step-000002", 2, fx),)
    return c


@case(
    "ckpt-max-steps-equal",
    "checkpoint",
    "resume=auto with train.max_steps equal to the newest step (nothing to do: step-000004 must stay as it is)",
    ok(),
    defect="resume-past-max-steps",
    ci=False,
)
def _(ws, fx):
    fx.copy_run(ws)
    c = resume(ws, fx, {"train": {"max_steps": 4}}, may_change=("run/adapter/*", "run/run_config.yaml"))
    c.checks = (_checkpoint_is("run/checkpoints/step-000004", 4, fx),)
    return c


@case("ckpt-stale-tmp", "checkpoint", "a stale .step-000006.tmp from a killed run (replaced)", ok(), ci=False)
def _(ws, fx):
    run = fx.copy_run(ws)
    tmp = run / "checkpoints" / ".step-000006.tmp"
    tmp.mkdir()
    (tmp / "state.safetensors").write_bytes(b"half written")
    c = resume(ws, fx, may_change=RESUME_MAY + ("run/checkpoints/.step-000006.tmp/*",))
    c.checks = (_resumed_from(4), _latest_verifies())
    return c


@case(
    "ckpt-resume-auto-fresh",
    "checkpoint",
    "resume=auto with no checkpoint yet (starts fresh, says so)",
    ok(r"(?i)starting fresh|no .*checkpoint"),
    ci=False,
)
def _(ws, fx):
    return train(ws, fx, {"train": {"resume": "auto"}})


@case("ckpt-resume-ok", "checkpoint", "resume=auto of an intact run (continues from step 4)", ok(), ci=False)
def _(ws, fx):
    fx.copy_run(ws)
    c = resume(ws, fx)
    c.checks = (_resumed_from(4), _latest_verifies())
    return c


# ================================================================ output folders
@case(
    "output-new-run-existing",
    "output",
    "a new run (no resume) into an existing output_dir",
    err(r"output_dir", r"(?i)exists|already|resume|overwrite"),
    defect="run-replaces-run",
)
def _(ws, fx):
    fx.copy_run(ws)
    return train(ws, fx, {"train": {"max_steps": 2}, "checkpoint": {"every_steps": 2}})


@case(
    "output-new-run-overwrite",
    "output",
    "overwrite_output_dir=true: a new run replaces an earlier run's results, and says so",
    ok(r"(?i)overwrite_output_dir.*removing"),
    ci=False,
)
def _(ws, fx):
    fx.copy_run(ws)
    c = train(ws, fx, {"train": {"max_steps": 2}, "overwrite_output_dir": True}, may_change=("run/*",))
    c.checks = (_only_checkpoints("run/checkpoints", [2]), _latest_verifies())
    return c


@case(
    "output-resume-and-overwrite",
    "output",
    "train.resume=auto together with overwrite_output_dir=true",
    err(r"overwrite_output_dir", r"train\.resume"),
    ci=False,
)
def _(ws, fx):
    fx.copy_run(ws)
    return resume(ws, fx, {"overwrite_output_dir": True}, may_change=())


@case(
    "output-export-exists", "output", "export.merged=true while the export folder exists", err(r"export", r"(?i)exists")
)
def _(ws, fx):
    run = fx.copy_run(ws)
    (run / "merged").mkdir()
    (run / "merged" / "model.safetensors").write_bytes(b"an earlier export")
    return resume(ws, fx, None, "export.merged=true", may_change=())


@case(
    "output-export-only-no-resume",
    "output",
    "--export-only without train.resume",
    err(r"train\.resume"),
    defect="refused-resume-writes",
)
def _(ws, fx):
    fx.copy_run(ws)
    return train(ws, fx, None, argv=("--export-only",))


@case(
    "output-export-only-no-checkpoint",
    "output",
    "--export-only train.resume=auto with no checkpoint",
    err(r"(?i)checkpoint"),
    ci=False,
)
def _(ws, fx):
    return train(ws, fx, {"train": {"resume": "auto"}}, argv=("--export-only",))


@case("output-export-only-ok", "output", "--export-only train.resume=auto on a finished run", ok(), ci=False)
def _(ws, fx):
    fx.copy_run(ws)
    c = train(
        ws,
        fx,
        {"train": {"resume": "auto", "max_steps": 4}},
        argv=("--export-only",),
        may_change=("run/run_config.yaml",),
        append_only=APPEND,
    )
    c.checks = (_merged_exists("run/merged"), _merged_equals_shared(fx, "run/merged"))
    return c
