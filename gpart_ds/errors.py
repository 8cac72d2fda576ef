"""User-facing errors, and the one place the command-line tools report them.

A `UserError` is a problem the user can fix: its message says what is wrong and where
(config key with file:line, data file:line, checkpoint or adapter file). Each domain
defines its subclass beside its code (ConfigError in config, DataError in data, ...);
every CLI entry point runs through `run_cli`, which prints `error: <message>` on stderr
and exits with status 2 instead of a traceback. Anything else is a bug and keeps its
traceback.
"""
from __future__ import annotations

import errno
import sys
from typing import Callable

# Exit statuses shared by every command (README "Quick reference").
EXIT_OK = 0
EXIT_CHECK_FAILED = 1     # a check ran and said no: plan does not fit, verify differs
EXIT_USER_ERROR = 2       # bad input: nothing was started or nothing was lost
EXIT_PREEMPTED = 75       # checkpoint written after SIGTERM/SIGUSR1: requeue (EX_TEMPFAIL)

# OS errors that are the user's environment, not a bug: reported like bad input.
_ENV_ERRNOS = {errno.ENOSPC: "no space left on the device",
               errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system",
               errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted",
               errno.EFBIG: "file too large for the file system or the process's limit",
               errno.ENOENT: "no such file or folder"}


class UserError(Exception):
    """Bad input or environment: the message names what and where."""


def describe_os_error(exc: OSError) -> str | None:
    """A one-line message for an environment OSError (disk full, permissions), else None."""
    what = _ENV_ERRNOS.get(exc.errno)
    if what is None:
        return None
    where = exc.filename or "?"
    return f"{where}: {what} ({exc.strerror or exc})"


def run_cli(main: Callable[[], int | None]) -> int:
    """Run a command's body; user errors become `error: ...` and exit status 2."""
    try:
        return int(main() or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except OSError as exc:
        msg = describe_os_error(exc)
        if msg is None:
            raise
        print(f"error: {msg}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
