"""User-facing errors, and the one place the command-line tools report them.

A `UserError` is a problem the user can fix: its message says what is wrong and where
(config key with file:line, data file:line, checkpoint or adapter file). Each domain
defines its subclass beside its code (ConfigError in config, DataError in data, ...);
every CLI entry point runs through `run_cli`, which prints `error: <message>` on stderr
and exits with the error's status (2 for bad input) instead of a traceback. The
environment's own failures are reported the same way: a full disk, a quota, a read-only
or unreadable path (exit 2, naming the file), Ctrl-C (`error: interrupted`, 130).
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from collections.abc import Callable

# Exit statuses shared by every command (docs/failures.md; README "When things go wrong").
EXIT_OK = 0
EXIT_CHECK_FAILED = 1  # a check ran and said no: plan does not fit, verify differs; a rank was lost
EXIT_USER_ERROR = 2  # bad input or environment: nothing was started or nothing was lost
EXIT_PREEMPTED = 75  # checkpoint written after SIGTERM/SIGUSR1: requeue (EX_TEMPFAIL)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as a shell reports it

# OS errors that are the user's environment, not a bug: reported like bad input.
_ENV_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "file too large for the file system or the process's limit",
    errno.ENOENT: "no such file or folder",
    errno.ENOTDIR: "a path component is a file, not a folder",
}
# Rust and C++ libraries (safetensors, pyarrow) report the errno inside their message.
_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]")


class UserError(Exception):
    """Bad input or environment: the message names what and where."""

    exit_code = EXIT_USER_ERROR


class RunFailed(UserError):
    """A run that cannot go on for a reason outside its input (a rank was lost): the
    message says what was kept and how to continue; exit 1."""

    exit_code = EXIT_CHECK_FAILED


class Stopped(BaseException):
    """A stop signal (SIGTERM, SIGUSR1) before a run could checkpoint: its start-up (config,
    model, data, process group, engine) was abandoned, nothing of it kept; exit 75 so that
    a scheduler requeues it (slurm/gpart.sh). A BaseException, like KeyboardInterrupt: no
    `except Exception` on the way out may swallow it, every `finally` still runs."""

    exit_code = EXIT_PREEMPTED


def env_errno(exc: BaseException) -> int | None:
    """The errno of an environment failure (disk full, permissions, ...) behind `exc`:
    an OSError's own, or one a library wrote into its message; None for anything else."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None:
        m = _OS_ERROR_IN_TEXT.search(str(exc))
        code = int(m.group(1) or m.group(2)) if m else None
    return code if code in _ENV_ERRNOS else None


def describe_os_error(exc: BaseException, path: str | os.PathLike | None = None) -> str | None:
    """'FILE: no space left on the device (...)' for an environment failure, else None.
    `path`: the file being written, where the exception does not name one."""
    code = env_errno(exc)
    if code is None:
        return None
    where = getattr(exc, "filename", None) or path or "?"
    detail = getattr(exc, "strerror", None) or os.strerror(code)
    return f"{where}: {_ENV_ERRNOS[code]} ({detail})"


def describe_failure(exc: BaseException, path: str | os.PathLike | None = None) -> str:
    """One line for any failure while writing `path`: the environment's words if it is one."""
    return describe_os_error(exc, path) or f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def run_cli(main: Callable[[], int | None]) -> int:
    """Run a command's body; user errors become `error: ...` and their exit status."""
    try:
        ret = main()  # an int is the exit status; anything else (None, a result dict) is success
        return ret if isinstance(ret, int) and not isinstance(ret, bool) else EXIT_OK
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except Stopped as exc:
        print(f"stopped: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print(
            "error: interrupted (Ctrl-C); files being written were left as they were before (temporary files removed)",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_INTERRUPTED
    except Exception as exc:
        # OSError, and library errors (safetensors, pyarrow) that carry an OS error in their text
        msg = describe_os_error(exc)
        if msg is None:
            raise
        print(f"error: {msg}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
