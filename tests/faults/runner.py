"""Client of the fork server, file snapshots and the verdict on one probe.

A probe is judged on what a careful user sees and keeps:
  - the exit status, and whether stderr has an `error:` line naming what and where;
  - whether a Python traceback was printed;
  - whether a file that existed before changed or disappeared although the command's
    purpose was not to change it (snapshots of the probe's folder before and after),
    and whether temporary files were left behind;
  - whether a wrong or non-finite result came with exit 0 (the case's own checks).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.faults.forkserver import REPO, snapshot

TRACEBACK = "Traceback (most recent call last)"
ERROR_LINE = re.compile(r"(^|: )error: ", re.M)
# Names a temporary file or folder of gpart_ds (or of a write it hands to a library) has:
# `.NAME.tmp-PID-RANDOM`, `.NAME.old-PID-RANDOM`, `.NAME.tmp-export-HOST-PID-RANDOM` (unique
# per writer), and an output's lock file (`.gpart.lock` in a folder, `.NAME.gpart.lock`
# beside one), which a command that ended must have given back.
TEMP_NAME = re.compile(
    r"(^|/)\.[^/]*(\.tmp|\.tmp-|\.old-|tmp-export)[^/]*($|/)|(^|/)tmp[^/]*\.(arrow|json)$"
    r"|(^|/)\.[^/]*gpart\.lock/?$"
)


class ForkServer:
    """One warm `python -m tests.faults.forkserver`; restarted if it dies."""

    def __init__(self, log: Path | None = None):
        self.log = log
        self.proc = None
        self.fs_mode = None
        self._start()

    def _start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.setdefault("DS_ACCELERATOR", "cpu")
        err = open(self.log, "a") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.forkserver"],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        hello = self.proc.stdout.readline()
        if not hello:
            raise RuntimeError(f"the fork server did not start (see {self.log})")
        self.fs_mode = json.loads(hello)["fs"]

    def call(self, req: dict) -> dict:
        if self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the fork server died")
        return json.loads(line)

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@dataclass
class Expect:
    """What a careful user should get.

    error=True: exit `code` (2) and an `error:` line matching every regex in `names`
    (what and where) and none in `not_names` (blaming the wrong source).
    error=False: exit `code` (0, or 75 after a stop signal; None: any non-zero status),
    output matching every regex in `says` (e.g. the warning naming a skipped checkpoint).
    """

    error: bool = True
    code: int | None = 2
    names: tuple = ()
    not_names: tuple = ()
    says: tuple = ()


@dataclass
class Call:
    """One command of a probe, prepared by the case's build function."""

    cli: str  # train | export | evaluate | plan | assets | launcher
    argv: list
    may_change: tuple = ()  # globs (relative to the probe folder) the command may change or delete
    # globs that may only grow (earlier content kept): a run's metrics log keeps earlier runs
    append_only: tuple = ("*metrics.jsonl",)
    checks: tuple = ()  # callables (ws, Outcome) -> problem text or None
    fs: dict | None = None  # small file system (see forkserver.setup_small_fs)
    signal: dict | None = None  # {"signum", "when_file", "when_contains", "after_s"}
    timeout: float = 300
    grace_s: float = 1.0  # launcher calls: how long its ranks may outlive a signalled launcher
    env: dict | None = None
    ignore: tuple = ("tokcache/*", "_*")  # not judged (shared caches, the harness's own files)
    # callables () run after the call whatever it did (a process a case started to hold a
    # folder, as a live run would, is ended here)
    cleanup: tuple = ()


@dataclass
class Outcome:
    rc: int | None
    stdout: str
    stderr: str
    seconds: float
    changed: list = field(default_factory=list)  # existed before, differs or is gone
    leftovers: list = field(default_factory=list)  # new temporary files
    timed_out: bool = False
    signal_sent_at: float | None = None
    orphans: int = 0  # processes of a launched job alive after its launcher exited
    ws: Path | None = None
    fs_view: tuple | None = None  # (mount relative to ws, folder holding its copy) for a tmpfs

    def path(self, rel: str) -> Path:
        """Where a file of the probe folder can be read after the call (a private tmpfs is
        gone with the child: its content was copied out)."""
        if self.fs_view and (rel == self.fs_view[0] or rel.startswith(self.fs_view[0] + "/")):
            return Path(self.fs_view[1]) / rel[len(self.fs_view[0]) :].lstrip("/")
        return Path(self.ws) / rel

    @property
    def traceback(self) -> bool:
        return TRACEBACK in self.stderr or TRACEBACK in self.stdout

    @property
    def error_text(self) -> str | None:
        """stderr from the first `error:` line on (None: there is none)."""
        m = ERROR_LINE.search(self.stderr)
        return self.stderr[m.start() :].strip() if m else None


def _judged(files: dict, call: Call) -> dict:
    return {k: v for k, v in files.items() if not any(fnmatch.fnmatch(k, g) for g in call.ignore)}


def diff(before: dict, after: dict, call: Call, grew_only) -> tuple[list, list]:
    """(files that existed and changed or went, against the call's allowances; new
    temporary files). grew_only(path, digest before) says whether a file only grew."""
    changed = []
    for path, digest in before.items():
        if after.get(path) == digest:
            continue
        if any(fnmatch.fnmatch(path, g) for g in call.may_change):
            continue
        if path in after and any(fnmatch.fnmatch(path, g) for g in call.append_only):
            if grew_only(path, digest):
                continue
        changed.append(path + (" (deleted)" if path not in after else " (modified)"))
    new_temp = {p for p in after if p not in before and TEMP_NAME.search(p + "/")}
    # the outermost leftover only: a stale folder, not each file in it
    leftovers = sorted(p for p in new_temp if not any(p.startswith(q + "/") for q in new_temp))
    return changed, leftovers


def run_call(server: ForkServer, ws: Path, call: Call, tag: str = "") -> Outcome:
    """Run one call with `ws` as the working folder; snapshot ws before and after."""
    ws = Path(ws)
    out_dir = ws / f"_{tag or 'call'}"
    out_dir.mkdir(parents=True, exist_ok=True)
    before = _judged(snapshot(ws), call)
    kept = {
        rel: (ws / rel).read_bytes()
        for rel in before
        if before[rel] != "dir" and any(fnmatch.fnmatch(rel, g) for g in call.append_only)
    }
    fs = None
    if call.fs:
        fs = dict(
            call.fs,
            before=str(out_dir / "fs_before.json"),
            after=str(out_dir / "fs_after.json"),
            copy_out=str(out_dir / "fs_copy"),
        )
    req = {
        "cli": call.cli,
        "argv": [str(a) for a in call.argv],
        "cwd": str(ws),
        "stdout": str(out_dir / "stdout.txt"),
        "stderr": str(out_dir / "stderr.txt"),
        "env": call.env or {},
        "timeout": call.timeout,
        "fs": fs,
        "signal": call.signal,
        "grace_s": call.grace_s,
    }
    try:
        if call.cli == "launcher":
            resp = run_launcher(req)
        else:
            resp = server.call(req)
        after = _judged(snapshot(ws), call)
    finally:
        for fn in call.cleanup:
            fn()
    out = Outcome(
        resp.get("rc"),
        _read(out_dir / "stdout.txt"),
        _read(out_dir / "stderr.txt"),
        resp.get("seconds", 0.0),
        timed_out=resp.get("timed_out", False),
        signal_sent_at=resp.get("signal_sent_at"),
        orphans=resp.get("orphans", 0),
        ws=ws,
    )
    if resp.get("error"):
        out.stderr += f"\n[harness] {resp['error']}"
    out.changed, out.leftovers = diff(
        before, after, call, lambda rel, _: rel in kept and (ws / rel).read_bytes().startswith(kept[rel])
    )
    if fs and fs["how"] == "tmpfs":  # the small file system's content, seen from inside
        mnt = Path(fs["mount"]).relative_to(ws)
        out.fs_view = (str(mnt), fs["copy_out"])
        b = _load_json(fs["before"])
        a = _load_json(fs["after"])
        prefixed = lambda d: {f"{mnt}/{k}": v for k, v in d.items()}  # noqa: E731
        if b is not None:
            if a is None:  # the child died before it could look: everything is unknown
                out.changed.append(f"{mnt}/* (the call died before the small file system was read back)")
            else:
                grew = lambda rel, digest: a["prefix"].get(rel[len(str(mnt)) + 1 :]) == digest  # noqa: E731
                c2, l2 = diff(prefixed(b["files"]), prefixed(a["files"]), call, grew)
                out.changed += c2
                out.leftovers += l2
    return out


def _read(p: Path) -> str:
    try:
        return p.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _load_json(p):
    try:
        return json.loads(Path(p).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def run_launcher(req: dict) -> dict:
    """A real multi-rank launch (`deepspeed --num_gpus N launch/train.py ...`) as a plain
    subprocess; argv[0] is the number of ranks. Signals go to the launcher or a rank."""
    import signal as _signal

    from tests.helpers import deepspeed_launcher, free_port, rank_env

    n, *args = req["argv"]
    cmd = [
        deepspeed_launcher(),
        "--num_gpus",
        str(n),
        "--master_port",
        str(free_port()),
        str(REPO / "launch" / "train.py"),
        *args,
    ]
    env = rank_env(req.get("env"))
    t0 = time.monotonic()
    with open(req["stdout"], "wb") as so, open(req["stderr"], "wb") as se:
        fs = req.get("fs") or {}
        limit = None
        if fs.get("how") == "rlimit":  # inherited by the launcher's ranks
            import resource

            def limit():
                resource.setrlimit(resource.RLIMIT_FSIZE, (fs["limit_bytes"], fs["limit_bytes"]))

        # Pipes copied into the files by threads: a per-file size limit must not hit the output.
        proc = subprocess.Popen(
            cmd,
            cwd=req["cwd"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=limit,
        )
        import threading

        copiers = [
            threading.Thread(target=_copy, args=(src, dst), daemon=True)
            for src, dst in ((proc.stdout, so), (proc.stderr, se))
        ]
        for t in copiers:
            t.start()
        sig, sent_at, timed_out = req.get("signal"), None, False
        while proc.poll() is None:
            now = time.monotonic() - t0
            if now > req["timeout"]:
                os.killpg(proc.pid, _signal.SIGKILL)
                timed_out = True
                break
            if sig and sent_at is None and _ready(sig, now):
                rank = sig.get("rank")
                if rank is None:  # the launcher, as `kill PID` or a container runtime does
                    targets = [proc.pid]
                elif rank == "all":  # every rank, as SLURM signals every task
                    targets = [p for p in _job_pids(proc.pid) if _rank_of(p) is not None]
                else:
                    targets = [p for p in _job_pids(proc.pid) if _rank_of(p) == rank]
                for pid in targets:
                    os.kill(pid, sig["signum"])
                sent_at = now if targets else None
            time.sleep(0.05)
        proc.wait()
        seconds = time.monotonic() - t0
        # A launcher killed by a signal may leave its ranks finishing (a stop signal gives
        # them a step and a checkpoint): they get `grace_s` to end before what still runs
        # counts as orphaned (left training and writing into output_dir unseen).
        grace = req.get("grace_s", 1.0) if proc.returncode < 0 else 1.0
        end = time.monotonic() + grace
        while _group_pids(proc.pid) and time.monotonic() < end:
            time.sleep(0.5)
        for t in copiers:
            t.join(timeout=5)
        time.sleep(1.0 if grace <= 1.0 else 0.0)
        left = _group_pids(proc.pid)
        for pid in left:
            try:
                os.kill(pid, _signal.SIGKILL)
            except ProcessLookupError:
                pass
    return {
        "rc": proc.returncode,
        "timed_out": timed_out,
        "seconds": seconds,
        "signal_sent_at": sent_at,
        "orphans": len(left),
    }


def _copy(src, dst) -> None:
    for block in iter(lambda: src.read1(1 << 16), b""):
        dst.write(block)
        dst.flush()


def _ready(sig: dict, elapsed: float) -> bool:
    from tests.faults.forkserver import _ready as ready

    return ready(sig, elapsed)


def _job_pids(launcher_pid: int) -> list[int]:
    """Every descendant of the launcher."""
    todo, seen = [launcher_pid], []
    while todo:
        kids = subprocess.run(["ps", "-o", "pid=", "--ppid", str(todo.pop())], capture_output=True, text=True)
        new = [int(p) for p in kids.stdout.split()]
        seen += new
        todo += new
    return seen


def _group_pids(pgid: int) -> list[int]:
    """Live processes of the launcher's session (it was started in a new one)."""
    out = subprocess.run(["ps", "-o", "pid=,stat=", "-s", str(pgid)], capture_output=True, text=True)
    return [
        int(line.split()[0]) for line in out.stdout.splitlines() if line.split() and not line.split()[1].startswith("Z")
    ]


def _rank_of(pid: int) -> int | None:
    """RANK from a training process's environment (None: not a rank of launch/train.py)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if b"train.py" not in cmdline or b"deepspeed.launcher" in cmdline:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


# ---------------------------------------------------------------- verdict
CATEGORIES = ("clear", "ok", "unclear", "traceback", "loss_or_silent")


@dataclass
class Verdict:
    category: str  # one of CATEGORIES
    problems: list  # what was wrong, in words

    @property
    def passed(self) -> bool:
        return self.category in ("clear", "ok")


def judge(expect: Expect, outs: list[Outcome], problems_from_checks: list[str]) -> Verdict:
    """The verdict on a probe from its last call (earlier calls are set-up) and checks."""
    o = outs[-1]
    problems, lost, silent = [], [], []
    for x in outs:
        if x.changed:
            lost.append(
                "changed what it should not: "
                + ", ".join(x.changed[:6])
                + (f" (+{len(x.changed) - 6} more)" if len(x.changed) > 6 else "")
            )
    silent += problems_from_checks
    if o.timed_out:
        problems.append(f"did not finish within its time limit (hang?) after {o.seconds:.0f} s")
    tb = o.traceback
    err = o.error_text
    if err is not None and o.ws is not None:  # the probe's folder name must not satisfy a regex
        err = err.replace(str(o.ws), "WS")
    if expect.error:
        if o.rc == 0:
            silent.append("accepted (exit 0) what it should have refused")
        else:
            if o.rc != expect.code:
                problems.append(f"exit {o.rc}, expected {expect.code}")
            if err is None:
                problems.append("no `error:` line")
            else:
                first = err.splitlines()[0]
                miss = [n for n in expect.names if not re.search(n, err)]
                if miss:
                    problems.append(f"error does not name {miss}: {first[:300]!r}")
                wrong = [n for n in expect.not_names if re.search(n, err)]
                if wrong:
                    problems.append(f"error blames {wrong}: {first[:300]!r}")
    elif expect.code is None:  # any failure status, as long as it is one
        if o.rc == 0:
            problems.append("exit 0, expected a failure status")
    else:
        if o.rc != expect.code:
            problems.append(
                f"exit {o.rc}, expected {expect.code}" + (f"; error: {err.splitlines()[0][:300]!r}" if err else "")
            )
        miss = [s for s in expect.says if not re.search(s, o.stderr + o.stdout)]
        if miss:
            problems.append(f"output does not say {miss}")
    if o.leftovers:
        problems.append("left temporary files: " + ", ".join(o.leftovers[:5]))
    if o.orphans:
        silent.append(
            f"{o.orphans} process(es) of the job kept running after the launcher exited "
            "(still training and writing into output_dir)"
        )
    if tb:
        problems.append("printed a traceback: " + _last_exception_line(o.stderr))
    if lost or silent:
        cat = "loss_or_silent"
    elif tb:
        cat = "traceback"
    elif problems:
        cat = "unclear"
    else:
        cat = "clear" if expect.error else "ok"
    return Verdict(cat, lost + silent + problems)


def _last_exception_line(text: str) -> str:
    # torch.distributed prefixes a rank's traceback lines with "[rankN]:"
    lines = [re.sub(r"^\[rank\d+\]:", "", ln) for ln in text.splitlines() if ln.strip()]
    i = max(i for i, ln in enumerate(lines) if TRACEBACK in ln)
    for ln in lines[i + 1 :]:
        if not ln.startswith((" ", "\t")) and not ln.startswith("During handling"):
            return ln[:300]
    return lines[-1][:300]
