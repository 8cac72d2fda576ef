"""Runs each CLI call of the fault probes in a fresh fork of one warm process.

A user runs `python launch/train.py ...` in a new interpreter; starting one per probe
costs ~5 s of imports (torch, deepspeed, transformers) on the 2-core CI machine. This
server imports them once and forks a child per call: the child has a fresh process
state (no process group, no DeepSpeed engine, no signal handlers from an earlier call),
its own stdout/stderr files, a real exit status and a real pid to signal, exactly what
the command-line entry point would have. The parent computes nothing before forking, so
no thread pool exists to be broken by the fork.

    python -m tests.faults.forkserver     # speaks JSON lines on stdin/stdout (tests.faults.runner)

A child's exit status follows the interpreter's rules: main()'s return value, SystemExit's
code, or 1 with the traceback printed to stderr for an uncaught exception (130 for
KeyboardInterrupt), so "printed a traceback" and "exit status" mean what they mean for
the real command.

Small file systems (disk full): a child can get a private mount namespace with a tmpfs
of a given size at a given folder (as root, or in a user namespace where the kernel
allows it), pre-filled by copying folders in; or, where no namespace can be made (or
FAULTS_FS=rlimit), a per-file size limit (RLIMIT_FSIZE: writes beyond it fail with
EFBIG, Python ignores SIGXFSZ). The hello line says which one is used.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import importlib
import importlib.util
import json
import os
import resource
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# CLI name -> (module or file, function): the entry points a user runs.
CLIS = {
    "train": (str(REPO / "launch" / "train.py"), "main"),
    "export": ("gpart_ds.export.cli", "main"),
    "evaluate": ("gpart_ds.evaluate", "main"),
    "plan": ("gpart_ds.plan.cli", "main"),
    "assets": ("gpart_ds.assets", "main"),
    "preflight": ("gpart_ds.preflight", "main"),
    "study": ("experiments.study", "cli"),
    "bench": ("experiments.bench.compare", "cli"),
}

CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000
MS_REMOUNT, MS_REC, MS_PRIVATE = 32, 1 << 14, 1 << 18
PAGE = 4096


def load_cli(name: str):
    where, fn = CLIS[name]
    if where.endswith(".py"):
        spec = importlib.util.spec_from_file_location(f"_cli_{name}", where)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    else:
        mod = importlib.import_module(where)
    return getattr(mod, fn)


def preload() -> None:
    """Import what every call needs, so a child starts in milliseconds."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
    import datasets  # noqa: F401
    import deepspeed  # noqa: F401
    import safetensors.torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: F401

    for mod in (
        "gpart_ds.trainer",
        "gpart_ds.export.cli",
        "gpart_ds.evaluate",
        "gpart_ds.plan.cli",
        "gpart_ds.dryrun",
        "gpart_ds.export.zero3",
        "gpart_ds.preflight",
        "gpart_ds.assets",
        "experiments.study",
        "experiments.bench.compare",
    ):
        importlib.import_module(mod)
    for name in CLIS:
        load_cli(name)


# ---------------------------------------------------------------- small file systems
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def private_tmpfs(mount: str, size_bytes: int) -> None:
    """This process (a fresh child) gets its own mount namespace with a tmpfs at `mount`."""
    libc = _libc()
    uid, gid = os.getuid(), os.getgid()
    user_ns = os.geteuid() != 0
    _check(libc.unshare(CLONE_NEWNS | (CLONE_NEWUSER if user_ns else 0)), "unshare")
    if user_ns:
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
        Path("/proc/self/gid_map").write_text(f"0 {gid} 1")
    # Mounts made here must not propagate back to the machine's namespace.
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    _check(libc.mount(b"tmpfs", mount.encode(), b"tmpfs", 0, f"size={size_bytes}".encode()), "mount tmpfs")


def resize_tmpfs(mount: str, size_bytes: int) -> None:
    _check(
        _libc().mount(b"tmpfs", mount.encode(), b"tmpfs", MS_REMOUNT, f"size={size_bytes}".encode()), "remount tmpfs"
    )


def used_bytes(mount: str) -> int:
    st = os.statvfs(mount)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> SHA-256 of every file under root; folders as "dir", symlinks by target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = "link:" + os.readlink(p) if p.is_symlink() else "dir"
        for name in filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
                continue
            h = hashlib.sha256()
            with open(p, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            out[rel] = h.hexdigest()
    return out


def setup_small_fs(fs: dict) -> None:
    """fs: {"how": "tmpfs"|"rlimit", "mount", "copy": [[src, rel_dst], ...], "free_bytes",
    "limit_bytes", "before": json path}."""
    if fs["how"] == "rlimit":
        resource.setrlimit(resource.RLIMIT_FSIZE, (fs["limit_bytes"], fs["limit_bytes"]))
        return
    mount = fs["mount"]
    private_tmpfs(mount, 256 << 20)
    for src, rel in fs.get("copy", []):
        dst = Path(mount) / rel
        if Path(src).is_dir():
            shutil.copytree(src, dst, symlinks=True)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    for rel in fs.get("mkdir", []):
        (Path(mount) / rel).mkdir(parents=True, exist_ok=True)
    want = used_bytes(mount) + fs["free_bytes"]
    resize_tmpfs(mount, -(-want // PAGE) * PAGE)
    sizes = {str(p.relative_to(mount)): p.stat().st_size for p in Path(mount).rglob("*") if p.is_file()}
    Path(fs["before"]).write_text(json.dumps({"files": snapshot(Path(mount)), "sizes": sizes}))


def finish_small_fs(fs: dict) -> None:
    """What the tmpfs holds after the call, for the harness outside the namespace."""
    if fs["how"] != "tmpfs":
        return
    mount = Path(fs["mount"])
    before = json.loads(Path(fs["before"]).read_text())
    prefix = {}  # digest of each earlier file's first (earlier size) bytes: did it only grow?
    for rel, size in before["sizes"].items():
        p = mount / rel
        if p.is_file() and p.stat().st_size >= size:
            with open(p, "rb") as fh:
                prefix[rel] = hashlib.sha256(fh.read(size)).hexdigest()
    Path(fs["after"]).write_text(json.dumps({"files": snapshot(mount), "prefix": prefix}))
    if fs.get("copy_out"):
        shutil.copytree(mount, fs["copy_out"], symlinks=True, dirs_exist_ok=True)


def probe_tmpfs() -> str:
    """'tmpfs' if a child can mount a private tmpfs here, else 'rlimit'."""
    import tempfile

    d = tempfile.mkdtemp(prefix="gpart-faults-fs-")
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
            private_tmpfs(d, 64 * 1024)
            with open(Path(d) / "x", "wb") as fh:
                try:
                    fh.write(b"\0" * 128 * 1024)
                    fh.flush()
                except OSError as exc:
                    os._exit(0 if exc.errno == errno.ENOSPC else 1)
            os._exit(1)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    shutil.rmtree(d, ignore_errors=True)
    return "tmpfs" if os.waitstatus_to_exitcode(status) == 0 else "rlimit"


# ---------------------------------------------------------------- one call
def _exit_code(exc: SystemExit) -> int:
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def child(req: dict, pipes) -> None:
    """In the forked child: run one CLI call as `python -m ...` would, then exit."""
    rc = 1
    try:
        os.setpgid(0, 0)  # its own process group: a timeout kills what it started too
        fd_in = os.open(os.devnull, os.O_RDONLY)
        os.dup2(fd_in, 0)
        # Pipes, not files: a per-file size limit (disk-full probes) must not hit the output.
        os.dup2(pipes[0][1], 1)
        os.dup2(pipes[1][1], 2)
        for r, w in pipes:
            os.close(r)
            os.close(w)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        os.chdir(req["cwd"])
        os.environ.update(req.get("env") or {})
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
        if os.environ.get("FAULTS_STACKS_EVERY"):  # debugging a slow or hung call
            import faulthandler

            faulthandler.dump_traceback_later(
                float(os.environ["FAULTS_STACKS_EVERY"]), repeat=True, file=open(req["stderr"] + ".stacks", "w")
            )
        fs = req.get("fs")
        if fs:
            setup_small_fs(fs)
        main = load_cli(req["cli"])
        sys.argv = [req["cli"], *req["argv"]]
        try:
            ret = main(list(req["argv"]))
            rc = 0 if ret is None else (ret & 0xFF if isinstance(ret, int) else 0)
        except SystemExit as exc:
            rc = _exit_code(exc)
        except KeyboardInterrupt:
            traceback.print_exc()
            rc = 130
        except BaseException:
            sys.excepthook(*sys.exc_info())  # what the interpreter prints
            rc = 1
        if fs:
            finish_small_fs(fs)
    except BaseException:
        traceback.print_exc()
        rc = 99  # the harness itself failed: never mistaken for the CLI's answer
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(rc)


class _Drain:
    """Copies the child's stdout/stderr pipes into the request's files."""

    def __init__(self, pipes, paths):
        self.files = {r: open(p, "wb") for (r, _), p in zip(pipes, paths)}

    def poll(self, timeout: float) -> None:
        import select

        if not self.files:
            time.sleep(timeout)
            return
        ready, _, _ = select.select(list(self.files), [], [], timeout)
        for fd in ready:
            data = os.read(fd, 1 << 16)
            if data:
                self.files[fd].write(data)
                self.files[fd].flush()
            else:
                self.files.pop(fd).close()
                os.close(fd)

    def finish(self, limit_s: float = 5.0) -> None:
        end = time.monotonic() + limit_s  # a grandchild may still hold a pipe: do not wait forever
        while self.files and time.monotonic() < end:
            self.poll(0.05)
        for fd, fh in self.files.items():
            fh.close()
            os.close(fd)
        self.files = {}


def serve_one(req: dict) -> dict:
    t0 = time.monotonic()
    pipes = [os.pipe(), os.pipe()]
    pid = os.fork()
    if pid == 0:
        child(req, pipes)
    for _, w in pipes:
        os.close(w)
    drain = _Drain(pipes, (req["stdout"], req["stderr"]))
    sig = req.get("signal")  # {"signum", "when_file", "when_contains", "after_s"}
    sent_at, status, timed_out = None, None, False
    deadline = t0 + req.get("timeout", 600)
    while True:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
            drain.finish()
            break
        now = time.monotonic()
        if now > deadline:
            timed_out = True
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, status = os.waitpid(pid, 0)
            drain.finish()
            break
        if sig and sent_at is None and _ready(sig, now - t0):
            os.kill(pid, sig["signum"])
            sent_at = now - t0
        drain.poll(0.02)
    code = os.waitstatus_to_exitcode(status)
    return {"rc": code, "timed_out": timed_out, "seconds": time.monotonic() - t0, "signal_sent_at": sent_at}


def _ready(sig: dict, elapsed: float) -> bool:
    if sig.get("after_s") is not None and elapsed >= sig["after_s"]:
        return True
    f = sig.get("when_file")
    if f and os.path.isfile(f):
        try:
            return sig.get("when_contains", "") in Path(f).read_text()
        except OSError:
            return False
    return False


def main() -> None:
    out = sys.stdout
    sys.stdout = sys.stderr  # library prints during import must not corrupt the protocol
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(REPO))
    preload()
    # FAULTS_FS=rlimit forces the fallback (to check it where a tmpfs is also possible).
    fs_mode = os.environ.get("FAULTS_FS") or probe_tmpfs()
    out.write(json.dumps({"hello": True, "fs": fs_mode, "pid": os.getpid()}) + "\n")
    out.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            resp = serve_one(req)
        except Exception as exc:  # a harness bug: report it, keep serving
            resp = {"rc": None, "error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(resp) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
