"""One writer per output folder: a lock file its owner holds while it writes there.

    with FolderLock.for_folder(run_dir, "output_dir"):      # RUN/.gpart.lock
        ...train, write checkpoints, the adapter...
    with FolderLock.beside(out, "--out"):                   # .OUT.gpart.lock next to OUT
        ...build OUT under a temporary name, rename it in...

The lock file is JSON naming its holder (host, pid, start time, SLURM job id and restart
count, the command) and is held with fcntl.flock for as long as the holder runs: the
kernel releases the flock when the holder dies, however it dies (kill -9, out of memory),
so a dead holder on the same host never blocks anyone. The file is removed when the
holder ends normally; one left behind is *stale* when
  - it names this host and nobody holds its flock (the holder died), or
  - it names the same SLURM job with another restart count (the job was requeued; SLURM
    never runs two allocations of one job at once, so the earlier one is gone),
and a stale lock is named in a warning and taken over. A lock written on another host
cannot be judged from here (flock over NFS may not reach that host), so it is refused,
naming it and how to remove it if that run is really gone. A lock whose flock is held is
refused naming the holder. Where flock is not supported at all (some network file
systems), the holder's pid decides on its own host.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from .errors import UserError, describe_os_error

log = logging.getLogger("gpart_ds")

LOCK_NAME = ".gpart.lock"
# A process that only looks (peek) holds a shared flock for microseconds: the taker tries
# again for this long before it calls the folder busy.
_RETRY_S = 1.0
# Locks this process holds, by resolved path: taking one again (a run that holds its
# export folder, then exports) nests instead of refusing itself (flock is per open file).
_HELD: dict[Path, int] = {}


class FolderBusy(UserError):
    """Another live writer owns the folder (or may: a lock from another host)."""


class FolderUnwritable(UserError):
    """The output cannot be created where it is asked for (no such place, read-only, ...)."""


def _host() -> str:
    return socket.gethostname()


def me(command: str | None = None) -> dict:
    """What a lock file says about its holder: this process."""
    now = time.time()
    return {
        "host": _host(),
        "pid": os.getpid(),
        "started": now,
        "since": datetime.datetime.fromtimestamp(now).isoformat(timespec="seconds"),
        "slurm_job": os.environ.get("SLURM_JOB_ID") or None,
        "slurm_restart": os.environ.get("SLURM_RESTART_COUNT") or None,
        "command": command or " ".join([Path(sys.argv[0]).name if sys.argv else "python", *sys.argv[1:]])[:300],
    }


def describe(holder: dict | None) -> str:
    """'pid 123 on host gpu7 since 2026-12-07T10:02:11 (SLURM job 55)' from a lock's content."""
    if not holder:
        return "a process that had not yet written its name"
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    cmd = f": {holder['command']}" if holder.get("command") else ""
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {holder.get('since', '?')}{job}{cmd}"


def read_holder(path: Path) -> dict | None:
    """The lock file's content (None: absent, empty or not a lock written here)."""
    try:
        data = json.loads(Path(path).read_text() or "null")
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # another user's live process (or a value we cannot judge: assume alive)
    return True


def _same_job_requeued(holder: dict) -> bool:
    mine = os.environ.get("SLURM_JOB_ID")
    return (
        bool(mine)
        and str(holder.get("slurm_job")) == mine
        and str(holder.get("slurm_restart")) != str(os.environ.get("SLURM_RESTART_COUNT") or None)
    )


class FolderLock:
    """The lock of one output (module doc). `what` names the output in messages
    ("output_dir 'runs/a'", "--out 'merged'"); `key` is what the user changes to go
    elsewhere (output_dir, --out)."""

    def __init__(self, path: str | os.PathLike, what: str, key: str):
        self.path = Path(path)
        self.what, self.key = what, key
        self.fd: int | None = None
        self.took_over: dict | None = None  # the stale holder replaced, if any
        self._made: list[Path] = []  # folders created to hold the lock (removed if left empty)

    @classmethod
    def for_folder(cls, folder: str | os.PathLike, key: str) -> FolderLock:
        return cls(Path(folder) / LOCK_NAME, f"{key} {str(folder)!r}", key)

    @classmethod
    def beside(cls, out: str | os.PathLike, key: str) -> FolderLock:
        """For an output that is replaced as a whole (renamed into place): the lock lives
        next to it, where the rename does not touch it."""
        out = Path(out)
        return cls(out.parent / f".{out.name}{LOCK_NAME}", f"{key} {str(out)!r}", key)

    # ------------------------------------------------------------ verdicts in words
    def _busy(self, holder: dict | None) -> FolderBusy:
        return FolderBusy(
            f"{self.what} is being written by another run: {describe(holder)} (lock file "
            f"{self.path}). One writer per folder: wait for it to finish, stop it, or choose "
            f"another {self.key}"
        )

    def _elsewhere(self, holder: dict) -> FolderBusy:
        return FolderBusy(
            f"{self.what} is owned by a run on another host: {describe(holder)} (lock file "
            f"{self.path}); from here it cannot be told whether that run still writes there. "
            f"If it is really gone (check with `ps -p {holder.get('pid')}` on "
            f"{holder.get('host')}, or squeue), remove {self.path} and start again; otherwise "
            f"wait for it or choose another {self.key}"
        )

    def _unwritable(self, exc: OSError) -> UserError | OSError:
        """The lock (so the output) cannot be created here: said naming the output and the
        key to change, before anything is written; an error that is not the environment's
        stays itself."""
        why = describe_os_error(exc, self.path)
        if why is None:
            return exc
        return FolderUnwritable(f"{self.what} cannot be created: {why}; choose another {self.key}")

    def _stale(self, holder: dict | None, why: str) -> None:
        log.warning("%s: a stale lock %s (%s; %s) is taken over", self.what, self.path, describe(holder), why)
        self.took_over = holder or {}

    # ------------------------------------------------------------ taking and giving back
    def _make_parent(self) -> None:
        missing, p = [], self.path.parent
        while not p.exists() and p.parent != p:
            missing.append(p)
            p = p.parent
        if not p.is_dir():  # a file where a folder must go: mkdir would only say "exists"
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(p))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._made = missing  # deepest first

    def _key(self) -> Path:
        return Path(os.path.abspath(self.path.parent)).resolve() / self.path.name

    def acquire(self) -> FolderLock:
        """Take the lock or raise FolderBusy naming the holder; a stale lock is taken over
        with a warning (module doc)."""
        # a stop signal meanwhile waits for the end (defer_stop)
        with _stop_deferred():
            return self._acquire()

    def _acquire(self) -> FolderLock:
        if self.path.parent.exists() and self._key() in _HELD:
            _HELD[self._key()] += 1
            self.fd = -1  # nested: the outer holder gives it back
            return self
        try:
            self._make_parent()
        except OSError as exc:
            raise self._unwritable(exc) from None
        deadline = time.monotonic() + _RETRY_S
        fd, held = None, False
        try:
            while True:
                existed = self.path.exists()
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                except IsADirectoryError:
                    raise FolderBusy(
                        f"{self.what}: {self.path} is a folder, where gpart_ds keeps the lock file of "
                        "the run that writes there; remove it (nothing of gpart_ds lives in it)"
                    ) from None
                except OSError as exc:
                    raise self._unwritable(exc) from None
                flocked = True
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    fd = None
                    if time.monotonic() < deadline:  # a peek, or a holder writing its name
                        time.sleep(0.05)
                        continue
                    raise self._busy(read_holder(self.path)) from None
                except OSError as exc:
                    if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    flocked = False  # no flock on this file system: the pid decides below
                try:  # the holder may have removed the file between our open and our flock
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    fd = None
                    continue
                break
            holder = read_holder(self.path)
            if existed or os.fstat(fd).st_size:  # a file someone left: whose, and is it theirs still
                self._judge(holder, flocked)  # a refusal leaves the file to its owner
            held = True
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me(), indent=1) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            if fd is not None:
                if held:  # ours (or a stale one we were taking over): nobody else's file goes
                    self._unlink_if(fd)
                os.close(fd)
            self._cleanup_dirs()
            raise
        self.fd = fd
        _HELD[self._key()] = 1
        return self

    def _unlink_if(self, fd: int) -> None:
        """Remove the lock file if it is still the one open as `fd`."""
        try:
            if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()
        except OSError:
            pass

    def _judge(self, holder: dict | None, flocked: bool) -> None:
        """A lock file was there and (with flock) nobody holds it: take it over or refuse."""
        if holder is None:
            if flocked:
                self._stale(None, "its holder died before it wrote its name")
                return
            raise self._busy(None)
        if holder.get("host") == _host():
            if flocked:
                self._stale(holder, "that process is gone")
            elif _pid_alive(holder.get("pid")) and holder.get("pid") != os.getpid():
                raise self._busy(holder)
            else:
                self._stale(holder, "that process is gone")
            return
        if _same_job_requeued(holder):
            self._stale(holder, f"SLURM job {holder.get('slurm_job')} was requeued: its earlier allocation is gone")
            return
        raise self._elsewhere(holder)

    def release(self) -> None:
        """Give the lock back: the file goes first, then the flock (a taker that opened the
        old file sees it gone and opens the new path)."""
        with _stop_deferred():
            self._release()

    def _release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        key = self._key()
        if _HELD.get(key, 0) > 1 or fd == -1:
            _HELD[key] = max(0, _HELD.get(key, 1) - 1)
            return
        _HELD.pop(key, None)
        try:
            self._unlink_if(fd)
        finally:
            os.close(fd)
        self._cleanup_dirs()

    def _cleanup_dirs(self) -> None:
        for p in self._made:  # a refused or failed start leaves no empty folder behind
            try:
                p.rmdir()
            except OSError:
                break
        self._made = []

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# A stop signal during start-up raises an exception from its handler (launch/train.py).
# Raised between creating a lock file and owning it, or while giving it back, it would leave
# a file (and the folder made for it) that nobody removes; blocking the signal cannot help
# (another thread of the process receives it, and Python runs the handler here anyway). So
# the handler asks `defer_stop` first: inside these sections the exception waits for the
# section's end.
_sections = {"depth": 0, "pending": None}


def defer_stop(exc: BaseException) -> bool:
    """True if a lock is being taken or given back: `exc` is raised when that ends."""
    if _sections["depth"]:
        _sections["pending"] = exc
        return True
    return False


@contextlib.contextmanager
def _stop_deferred():
    _sections["depth"] += 1
    try:
        yield
    finally:
        _sections["depth"] -= 1
        pending = _sections["pending"] if _sections["depth"] == 0 else None
        _sections["pending"] = None if pending is not None else _sections["pending"]
    if pending is not None:
        raise pending


def peek(path: str | os.PathLike, what: str, key: str) -> None:
    """Raise FolderBusy if a live writer holds the lock at `path` (or one on another host
    may), without taking it: every rank of a job (and the SLURM preflight) can ask this
    before any process group exists and reach the same verdict from the same file. A shared
    flock held for microseconds never blocks another looker; a taker retries past it."""
    lock = FolderLock(path, what, key)
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    except OSError:
        return  # unreadable: the taker will say so
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise lock._busy(read_holder(path)) from None
        except OSError:
            pass
        holder = read_holder(path)
        if holder is None:
            return
        if holder.get("host") == _host():
            return  # the flock was free: its holder is gone (a taker will say so)
        if not _same_job_requeued(holder):
            raise lock._elsewhere(holder)
    finally:
        os.close(fd)
