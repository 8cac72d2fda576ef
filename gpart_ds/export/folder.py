"""The output folder's life: refused when it exists (without overwrite) or cannot be
created, locked from the last check to the rename, built in a temporary sibling unique
to its writer, renamed into place when complete. An earlier writer's temporary folder
(killed mid-export) is removed, with a warning, by the next writer under the lock."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..fileio import folder_problem, replace_dir
from .files import ExportError

TEMP_TAG = ".tmp-export-"


def temp_dir_for(out: Path, writer: str | None = None) -> Path:
    """The temporary folder one writer builds `out` in: unique per writer (host, pid and a
    random part), so no writer can ever remove or fill another one's."""
    import secrets
    import socket

    writer = writer or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
    return out.parent / f".{out.name}{TEMP_TAG}{writer}"


def stale_temps(out: Path) -> list[Path]:
    """Temporary folders of earlier writers of `out` (and the fixed name older versions used)."""
    if not out.parent.is_dir():
        return []
    return sorted(
        p
        for p in out.parent.iterdir()
        if p.name.startswith(f".{out.name}{TEMP_TAG}") or p.name == f".{out.name}.tmp-export"
    )


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an existing output folder, or one that cannot be created, before any work."""
    if out.exists() and not overwrite:
        raise ExportError(f"{out}: already exists; pass --overwrite (export.overwrite: true) to replace it")
    problem = folder_problem(out)
    if problem:
        raise ExportError(f"output folder: {problem}")


def output_lock(out: Path, key: str = "--out"):
    """The lock one export of `out` holds from its last check to the rename (ownership):
    a second export to the same folder is refused naming the first, never interleaved."""
    from ..ownership import FolderLock

    return FolderLock.beside(out, key)


def start_output(out: Path) -> Path:
    """A fresh temporary folder next to `out`, named for this writer. Called under
    output_lock: any other temporary of `out` is then an earlier writer's that died
    (killed mid-export), removed with a warning naming it."""
    import logging

    for old in stale_temps(out):
        logging.getLogger("gpart_ds").warning(
            "%s: removing the temporary folder %s left by an earlier export that did not finish", out, old
        )
        shutil.rmtree(old, ignore_errors=True)
    tmp = temp_dir_for(out)
    tmp.mkdir(parents=True)
    return tmp


def finish_output(tmp: Path, out: Path) -> None:
    os.chmod(tmp, 0o755)
    replace_dir(tmp, out)
