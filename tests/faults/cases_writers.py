"""Fault probes, round two (output ownership, identity, up-front refusals), kind `writers`:
Output ownership: one writer per folder (a lock with host and pid, stale locks named), unique
temporary names per writer, concurrent exports refused, preemption at any moment of start-up.

A live writer is another process a case starts before its call: either one that holds a
folder's lock as a run does from its start (gpart_ds.ownership, nothing else), or a real
`launch/train.py` / export stopped (SIGSTOP) in the middle of its work, so that it writes
nothing while the probed command runs. Either is ended by the call's cleanup.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.faults.cases import APPEND, RESUME_MAY, case, err, export, ok, resume, train  # noqa: F401
from tests.faults.forkserver import REPO
from tests.faults.runner import Call, Expect

LOCK = ".gpart.lock"
HOST = socket.gethostname()
RUN_LOCK = ("run/.gpart.lock",)
_HOLD = (
    "import sys, time; sys.path.insert(0, {repo!r}); from gpart_ds.ownership import FolderLock; "
    "FolderLock.{how}({path!r}, 'x').acquire(); print('held', flush=True); time.sleep(900)"
)


def _env() -> dict:
    return dict(
        os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"
    )


def _ender(proc: subprocess.Popen):
    def end():
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
            except ProcessLookupError:
                pass
        proc.wait()

    return end


def hold(path: Path, how: str = "for_folder") -> tuple[int, callable]:
    """Another process holds the lock of `path` (a folder, or an output locked beside
    itself) as a live run does; (its pid, the cleanup that ends it)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD.format(repo=str(REPO), path=str(path), how=how)],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    if proc.stdout.readline().strip() != "held":
        raise RuntimeError("the lock holder did not start")
    return proc.pid, _ender(proc)


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def stale(folder: Path, name: str = LOCK, **holder) -> Path:
    """A lock file left by a writer that is gone (or, with another host, may be)."""
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_text(
        json.dumps(
            {
                "host": HOST,
                "pid": dead_pid(),
                "since": "2026-12-01T10:00:00",
                "command": "train.py --config cfg.yaml",
                **holder,
            }
        )
    )
    return p


def live_training(ws: Path, fx, *overrides) -> tuple[int, callable]:
    """A real `python launch/train.py` into ws/run, stopped once it has trained a step."""
    cfg = fx.write_config(ws, {"train": {"max_steps": 400, "log_every": 50}}, name="live.yaml")
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(cfg), *overrides],
        cwd=ws,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = ws / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and '"step": 1,' in metrics.read_text():
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGSTOP)
    if proc.poll() is not None:
        raise RuntimeError(f"the live run ended (exit {proc.returncode}) before it could be held")
    return proc.pid, _ender(proc)


def live_export(ws: Path, fx, out: Path) -> tuple[int, callable]:
    """A real offline export to `out`, slowed down (tiny blocks) and stopped mid-write."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpart_ds.export",
            "--base",
            str(fx.model),
            "--adapter",
            str(fx.base_run / "adapter"),
            "--out",
            str(out),
            "--block-mb",
            "0.0005",
        ],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while (
        proc.poll() is None
        and time.monotonic() < deadline
        and not any(p.name.startswith(f".{out.name}.tmp-export") for p in out.parent.iterdir())
    ):
        time.sleep(0.01)
    proc.send_signal(signal.SIGSTOP)
    if proc.poll() is not None:
        raise RuntimeError("the live export ended before it could be held")
    return proc.pid, _ender(proc)


def held_by(pid: int) -> Expect:
    return err(rf"pid {pid}\b", rf"host {HOST}", r"(?i)another run|being written")


def _no_run_dir(ws, out):
    return f"{ws / 'run'} was left behind by a start that was stopped" if (ws / "run").exists() else None


def _no_lock_left(rel):
    def check(ws, out):
        return f"{rel} left behind" if out.path(rel).exists() else None

    return check


# ================================================================ a live run owns its folder
def case_expect_pid(call: Call, pid: int) -> None:
    """The holder's pid, known only once it runs: held_case adds it to what the error must name."""
    call.expect_pid = pid


def held_case(id, title, *names, ci=True):
    """A case refused because another live writer holds the output: the error must name
    what (`names`) and the holder (its pid and host)."""
    expect = err(*names)
    base = expect.names

    def deco(fn):
        def build(ws, fx):
            c = fn(ws, fx)
            pid = getattr(c, "expect_pid", None)
            expect.names = base + ((rf"pid {pid}\b", rf"host {re.escape(HOST)}") if pid else ())
            return c

        case(id, "writers", title, expect, defect="one-writer", ci=ci)(build)
        return fn

    return deco


@held_case(
    "writers-train-into-held-folder",
    "a new run into an output_dir another live run holds (it has "
    "not written anything yet): refused naming that run's pid, host and start",
    r"output_dir",
)
def _(ws, fx):
    pid, end = hold(ws / "run")
    c = train(ws, fx, cleanup=(end,))
    case_expect_pid(c, pid)
    return c


@held_case(
    "writers-resume-into-held-folder",
    "train.resume=auto into a run folder another live job holds "
    "(the same sbatch submitted twice): refused naming it, nothing of the run touched",
    r"output_dir",
)
def _(ws, fx):
    fx.copy_run(ws)
    pid, end = hold(ws / "run")
    c = resume(ws, fx, cleanup=(end,))
    case_expect_pid(c, pid)
    return c


@held_case(
    "writers-export-only-into-held-folder",
    "--export-only train.resume=auto while another run holds the folder",
    r"output_dir",
)
def _(ws, fx):
    fx.copy_run(ws)
    pid, end = hold(ws / "run")
    c = train(ws, fx, {"train": {"resume": "auto", "max_steps": 4}}, argv=("--export-only",), cleanup=(end,))
    case_expect_pid(c, pid)
    return c


@held_case(
    "writers-overwrite-held-folder",
    "overwrite_output_dir=true into a folder a live run holds: refused before anything is removed",
    r"output_dir",
)
def _(ws, fx):
    fx.copy_run(ws)
    pid, end = hold(ws / "run")
    c = train(ws, fx, {"overwrite_output_dir": True}, cleanup=(end,))
    case_expect_pid(c, pid)
    return c


@held_case(
    "writers-live-training-second-run",
    "a real training run is at step 1; a second `launch/train.py` "
    "with the same config: refused naming the first (it used to interleave metrics and replace the adapter)",
    r"output_dir",
)
def _(ws, fx):
    pid, end = live_training(ws, fx)
    c = train(ws, fx, cleanup=(end,))
    case_expect_pid(c, pid)
    return c


@held_case(
    "writers-live-training-second-resume",
    "a real training run is at step 1; the same job again with train.resume=auto (as slurm/gpart.sh passes it)",
    r"output_dir",
    ci=False,
)
def _(ws, fx):
    pid, end = live_training(ws, fx)
    c = train(ws, fx, {"train": {"resume": "auto"}}, cleanup=(end,))
    case_expect_pid(c, pid)
    return c


@held_case("writers-held-symlinked-folder", "output_dir is a symlink to a folder a live run holds", r"output_dir")
def _(ws, fx):
    pid, end = hold(ws / "real")
    os.symlink(ws / "real", ws / "run")
    c = train(ws, fx, cleanup=(end,))
    case_expect_pid(c, pid)
    return c


@held_case(
    "writers-held-checkpoint-dir",
    "checkpoint.dir outside output_dir, held by a live run (two runs sharing a checkpoint folder)",
    r"checkpoint\.dir",
)
def _(ws, fx):
    pid, end = hold(ws / "ckpts")
    c = train(ws, fx, {"checkpoint": {"dir": str(ws / "ckpts")}}, cleanup=(end,))
    case_expect_pid(c, pid)
    return c


@held_case(
    "writers-held-export-dir",
    "export.merged with export.dir outside output_dir while an export "
    "to it runs: refused at the start, not after training",
    r"export\.dir",
)
def _(ws, fx):
    pid, end = hold(ws / "merged", how="beside")
    c = train(ws, fx, {"export": {"merged": True, "dir": str(ws / "merged")}}, cleanup=(end,))
    case_expect_pid(c, pid)
    return c


@held_case(
    "writers-preflight-held-folder",
    "the SLURM preflight of a job whose output_dir another live run holds: refused before the ranks start",
    r"output_dir",
)
def _(ws, fx):
    pid, end = hold(ws / "run")
    cfg = fx.write_config(ws)
    c = Call(
        "preflight",
        [
            "--config",
            cfg,
            "--nodes",
            "1",
            "--tasks-per-node",
            "1",
            "--device",
            "cpu",
            "--wait-s",
            "5",
            "train.resume=auto",
        ],
        cleanup=(end,),
    )
    case_expect_pid(c, pid)
    return c


@case(
    "writers-dry-run-held-folder",
    "writers",
    "--dry-run of a config whose output_dir a live run holds: a dry run writes nothing, so it is not refused",
    ok(),
    defect="one-writer",
)
def _(ws, fx):
    _, end = hold(ws / "run")
    return train(
        ws, fx, argv=("--dry-run", "--nodes", "1", "--gpus-per-node", "1", "--gpu-mem-gb", "80"), cleanup=(end,)
    )


# ================================================================ stale and foreign locks
@case(
    "writers-stale-lock-dead-pid",
    "writers",
    "resume=auto over a lock left by a run killed with -9 on this host: "
    "named in a warning and taken over, the run resumes",
    ok(r"(?i)stale lock", r"is gone"),
    defect="one-writer",
)
def _(ws, fx):
    fx.copy_run(ws)
    stale(ws / "run")
    return resume(ws, fx, may_change=RESUME_MAY + RUN_LOCK)


@case(
    "writers-stale-lock-empty",
    "writers",
    "an empty lock file (its writer died before it wrote its name) in a new folder: taken over with a warning",
    ok(r"(?i)stale lock"),
    defect="one-writer",
)
def _(ws, fx):
    (ws / "run").mkdir()
    (ws / "run" / LOCK).write_text("")
    return train(ws, fx, {"train": {"max_steps": 1}}, may_change=RUN_LOCK)


@case(
    "writers-stale-lock-garbage",
    "writers",
    "a lock file holding garbage (a half-written or edited file): taken over with a warning, no traceback",
    ok(r"(?i)stale lock"),
    defect="one-writer",
)
def _(ws, fx):
    (ws / "run").mkdir()
    (ws / "run" / LOCK).write_bytes(b"\x00\xff{not json")
    return train(ws, fx, {"train": {"max_steps": 1}}, may_change=RUN_LOCK)


@case(
    "writers-stale-lock-pid-reused",
    "writers",
    "a stale lock naming a pid that now belongs to another live "
    "process (pid reuse): nobody holds the lock, so it is stale",
    ok(r"(?i)stale lock"),
    defect="one-writer",
)
def _(ws, fx):
    stale(ws / "run", pid=os.getpid())
    return train(ws, fx, {"train": {"max_steps": 1}}, may_change=RUN_LOCK)


@case(
    "writers-lock-other-host",
    "writers",
    "a lock written by a run on another host: refused naming that host and "
    "pid and how to remove the lock if that run is gone",
    err(r"gpu-node-7", r"pid 4242", r"(?i)remove .*gpart\.lock"),
    defect="one-writer",
)
def _(ws, fx):
    stale(ws / "run", host="gpu-node-7", pid=4242)
    return train(ws, fx)


@case(
    "writers-lock-other-host-resume",
    "writers",
    "resume=auto of a finished run folder whose lock names another host",
    err(r"gpu-node-7", r"(?i)remove"),
    defect="one-writer",
)
def _(ws, fx):
    fx.copy_run(ws)
    stale(ws / "run", host="gpu-node-7", pid=4242)
    return resume(ws, fx)


@case(
    "writers-lock-is-a-folder",
    "writers",
    "a folder named .gpart.lock in output_dir: refused naming it, no traceback",
    err(r"\.gpart\.lock", r"(?i)folder"),
    defect="one-writer",
)
def _(ws, fx):
    (ws / "run" / LOCK).mkdir(parents=True)
    return train(ws, fx)


# ================================================================ SLURM requeues
SLURM = {"SLURM_JOB_ID": "7001", "SLURM_RESTART_COUNT": "1"}


@case(
    "writers-requeue-other-node",
    "writers",
    "a requeued SLURM job (restart 1) lands on another node; its earlier "
    "allocation's lock names the old node: taken over with a warning, the run resumes",
    ok(r"(?i)stale lock", r"requeued"),
    defect="one-writer",
)
def _(ws, fx):
    fx.copy_run(ws)
    stale(ws / "run", host="gpu-node-7", pid=4242, slurm_job="7001", slurm_restart="0")
    return resume(ws, fx, env=SLURM, may_change=RESUME_MAY + RUN_LOCK)


@case(
    "writers-requeue-same-node",
    "writers",
    "a requeued SLURM job on the same node: the lock of its killed processes is stale",
    ok(r"(?i)stale lock"),
    defect="one-writer",
)
def _(ws, fx):
    fx.copy_run(ws)
    stale(ws / "run", slurm_job="7001", slurm_restart="0")
    return resume(ws, fx, env=SLURM, may_change=RESUME_MAY + RUN_LOCK)


@case(
    "writers-requeue-preempted-while-loading",
    "writers",
    "a SLURM job preempted while loading (only its lock "
    "in output_dir) is requeued: resume=auto starts fresh in its own folder",
    ok(r"(?i)stale lock"),
    defect="one-writer",
)
def _(ws, fx):
    stale(ws / "run", host="gpu-node-7", pid=4242, slurm_job="7001", slurm_restart="0")
    return train(ws, fx, {"train": {"resume": "auto", "max_steps": 1}}, env=SLURM, may_change=RUN_LOCK)


@case(
    "writers-other-job-lock",
    "writers",
    "another SLURM job's lock from another node: refused, naming the job",
    err(r"SLURM job 6999", r"gpu-node-7"),
    defect="one-writer",
)
def _(ws, fx):
    fx.copy_run(ws)
    stale(ws / "run", host="gpu-node-7", pid=4242, slurm_job="6999", slurm_restart="0")
    return resume(ws, fx, env=SLURM)


@case(
    "writers-same-job-two-steps",
    "writers",
    "the same SLURM job and restart holds the folder from another node (two job steps into one folder): refused",
    err(r"gpu-node-7"),
    defect="one-writer",
)
def _(ws, fx):
    fx.copy_run(ws)
    stale(ws / "run", host="gpu-node-7", pid=4242, slurm_job="7001", slurm_restart="1")
    return resume(ws, fx, env=SLURM)


# ================================================================ exports
@held_case("writers-export-held-out", "python -m gpart_ds.export --out a folder another export is writing", r"--out")
def _(ws, fx):
    pid, end = hold(ws / "merged", how="beside")
    c = export(ws, fx, fx.base_run / "adapter", cleanup=(end,))
    case_expect_pid(c, pid)
    return c


@held_case(
    "writers-export-held-out-overwrite",
    "export --overwrite onto an existing merged folder while another export to it runs: refused, the folder untouched",
    r"--out",
)
def _(ws, fx):
    shutil.copytree(fx.merged, ws / "merged")
    pid, end = hold(ws / "merged", how="beside")
    c = export(ws, fx, fx.base_run / "adapter", None, None, "--overwrite", cleanup=(end,))
    case_expect_pid(c, pid)
    return c


@held_case(
    "writers-export-live-temp-kept",
    "a second export while the first is writing its temporary folder "
    "(the fixed name was removed under it, and a folder mixed both adapters): refused, the first's folder intact",
    r"--out",
)
def _(ws, fx):
    pid, end = hold(ws / "merged", how="beside")
    tmp = ws / ".merged.tmp-export"  # the name every export used, as the first export has it
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"\0" * 4096)
    c = export(ws, fx, fx.base_run / "adapter", None, None, "--overwrite", cleanup=(end,))
    case_expect_pid(c, pid)
    return c


@held_case(
    "writers-export-concurrent-real",
    "two real exports to one --out: the second starts while the first writes; refused naming the first",
    r"--out",
)
def _(ws, fx):
    pid, end = live_export(ws, fx, ws / "merged")
    c = export(ws, fx, fx.base_run / "adapter", None, None, "--overwrite", cleanup=(end,))
    case_expect_pid(c, pid)
    return c


@case(
    "writers-export-other-out-same-parent",
    "writers",
    "an export to merged_b while another writes merged_a in the same folder: not refused (one lock per output)",
    ok(r"merged"),
    defect="one-writer",
)
def _(ws, fx):
    _, end = hold(ws / "merged_a", how="beside")
    return export(ws, fx, fx.base_run / "adapter", None, ws / "merged_b", cleanup=(end,))


@case(
    "writers-export-stale-temp-legacy",
    "writers",
    "a temporary folder left by a killed export (the old fixed "
    "name): removed with a warning naming it, the export completes",
    ok(r"(?i)removing the temporary folder"),
    defect="one-writer",
)
def _(ws, fx):
    (ws / ".merged.tmp-export").mkdir()
    (ws / ".merged.tmp-export" / "model.safetensors").write_bytes(b"\0" * 100)
    return export(ws, fx, fx.base_run / "adapter", may_change=(".merged.tmp-export", ".merged.tmp-export/*"))


@case(
    "writers-export-stale-temp-and-lock",
    "writers",
    "an export killed with -9 left its own temporary folder and lock: both named in warnings and replaced",
    ok(r"(?i)stale lock", r"(?i)removing the temporary folder"),
    defect="one-writer",
)
def _(ws, fx):
    stale(ws, ".merged.gpart.lock", command="python -m gpart_ds.export")
    t = ws / f".merged.tmp-export-{HOST}-{dead_pid()}-0a0b0c"
    t.mkdir()
    (t / "config.json").write_text("{}")
    return export(
        ws,
        fx,
        fx.base_run / "adapter",
        may_change=(".merged.gpart.lock", ".merged.tmp-export-*", ".merged.tmp-export-*/*"),
    )


@case(
    "writers-export-lock-other-host",
    "writers",
    "an export lock beside --out written on another host",
    err(r"gpu-node-7", r"(?i)remove"),
    defect="one-writer",
)
def _(ws, fx):
    stale(ws, ".merged.gpart.lock", host="gpu-node-7", pid=4242)
    return export(ws, fx, fx.base_run / "adapter")


@case(
    "writers-export-done-no-leftovers",
    "writers",
    "a plain export: no lock file or temporary folder left beside --out",
    ok(),
    defect="one-writer",
)
def _(ws, fx):
    return export(ws, fx, fx.base_run / "adapter")


@case(
    "writers-train-done-no-leftovers",
    "writers",
    "a plain 1-step run: its lock file is gone at the end",
    ok(),
    defect="one-writer",
)
def _(ws, fx):
    c = train(ws, fx, {"train": {"max_steps": 1}})
    c.checks = (_no_lock_left("run/.gpart.lock"),)
    return c


# ================================================================ stop signals during start-up
def _startup_signal(signum, when="lock"):
    """A stop signal once the run holds its folder (model load, process group, engine):
    start-up, before training's own handler exists."""

    def build(ws, fx):
        c = train(ws, fx, {"train": {"max_steps": 2}})
        c.signal = (
            {"signum": int(signum), "when_file": str(ws / "run" / LOCK), "when_contains": ""}
            if when == "lock"
            else {"signum": int(signum), "after_s": when}
        )
        c.checks = (_no_run_dir,)
        return c

    return build


STOPPED = ok(r"stopped: SIG(TERM|USR1) while the run was starting", r"train\.resume=auto", code=75)
case(
    "writers-sigterm-while-loading",
    "writers",
    "SIGTERM while the run loads the model and builds the engine: "
    "exit 75 and one line (was: 143, nothing said, not requeued)",
    STOPPED,
    defect="one-writer",
)(_startup_signal(signal.SIGTERM))
case(
    "writers-sigusr1-while-loading",
    "writers",
    "SIGUSR1 (SLURM's warning before the time limit) while loading",
    STOPPED,
    defect="one-writer",
)(_startup_signal(signal.SIGUSR1))
case(
    "writers-sigterm-at-once",
    "writers",
    "SIGTERM 0.2 s after the start (reading the config)",
    STOPPED,
    defect="one-writer",
)(_startup_signal(signal.SIGTERM, when=0.2))


@case(
    "writers-sigterm-resume-loading",
    "writers",
    "SIGTERM while a resume=auto loads: exit 75, the run's checkpoints and adapter untouched",
    STOPPED,
    defect="one-writer",
)
def _(ws, fx):
    fx.copy_run(ws)
    c = resume(ws, fx)
    c.signal = {"signum": int(signal.SIGTERM), "when_file": str(ws / "run" / LOCK), "when_contains": ""}
    return c


@case(
    "writers-sigterm-export-only",
    "writers",
    "SIGTERM during --export-only: exit 75, no merged folder, no temporary folder or lock left",
    ok(r"stopped: SIGTERM", code=75),
    defect="one-writer",
)
def _(ws, fx):
    fx.copy_run(ws)
    c = train(ws, fx, {"train": {"resume": "auto", "max_steps": 4}}, argv=("--export-only",))
    c.signal = {"signum": int(signal.SIGTERM), "when_file": str(ws / "run" / LOCK), "when_contains": ""}
    c.checks = (lambda ws_, out: "run/merged was written" if (ws_ / "run" / "merged").exists() else None,)
    return c


@case(
    "writers-sigint-while-loading",
    "writers",
    "Ctrl-C while loading: exit 130, nothing left behind",
    ok(r"(?i)interrupt", code=130),
    defect="one-writer",
)
def _(ws, fx):
    c = train(ws, fx, {"train": {"max_steps": 2}})
    c.signal = {"signum": int(signal.SIGINT), "when_file": str(ws / "run" / LOCK), "when_contains": ""}
    return c


@case(
    "writers-requeue-after-startup-stop",
    "writers",
    "preempted while loading (exit 75), then requeued with train.resume=auto: starts in its own folder and finishes",
    ok(),
    defect="one-writer",
)
def _(ws, fx):
    first = train(ws, fx, {"train": {"max_steps": 2, "resume": "auto"}})
    first.signal = {"signum": int(signal.SIGTERM), "when_file": str(ws / "run" / LOCK), "when_contains": ""}
    return [first, train(ws, fx, {"train": {"max_steps": 2, "resume": "auto"}})]


@case(
    "writers-killed-while-loading-then-requeued",
    "writers",
    "kill -9 while loading (its lock is left), then "
    "requeued with train.resume=auto: the stale lock is named and taken over",
    ok(r"(?i)stale lock"),
    defect="one-writer",
)
def _(ws, fx):
    first = train(ws, fx, {"train": {"max_steps": 2, "resume": "auto"}})
    first.signal = {"signum": int(signal.SIGKILL), "when_file": str(ws / "run" / LOCK), "when_contains": ""}
    return [first, train(ws, fx, {"train": {"max_steps": 2, "resume": "auto"}}, may_change=RUN_LOCK)]


@case(
    "writers-killed-training-then-resumed",
    "writers",
    "kill -9 at step 3 (checkpoint at 2, lock left), then resume=auto: stale lock taken over, resumes from step 2",
    ok(r"(?i)stale lock", r"resumed from"),
    defect="one-writer",
    ci=False,
)
def _(ws, fx):
    first = train(ws, fx, {"train": {"max_steps": 400, "log_every": 50}, "checkpoint": {"every_steps": 2}})
    first.signal = {
        "signum": int(signal.SIGKILL),
        "when_file": str(ws / "run" / "metrics.jsonl"),
        "when_contains": '"step": 3,',
    }
    second = train(
        ws,
        fx,
        {"train": {"max_steps": 4, "log_every": 50, "resume": "auto"}, "checkpoint": {"every_steps": 2}},
        may_change=RUN_LOCK + ("run/checkpoints/*", "run/run_config.yaml", "run/.*"),
        append_only=APPEND,
    )
    return [first, second]
