"""Atomic writes: what a reader (or a crash) sees is the old file or folder, or the new one.

Every file and folder gpart_ds writes for a user goes through here: it is built under a
hidden temporary name beside its final place (same file system, so the rename is
atomic), and renamed into place only when complete. A failure removes the temporary
and leaves whatever was there before untouched.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_sibling(final: str | os.PathLike, tag: str = "tmp") -> Path:
    """The hidden temporary name used while `final` is being built."""
    final = Path(final)
    return final.with_name(f".{final.name}.{tag}")


def writer_tag(kind: str = "tmp") -> str:
    """`kind-PID-RANDOM`: a temporary name no other writer has, even one with the same pid
    on another host sharing the folder (NFS), so one writer never replaces another's."""
    import secrets

    return f"{kind}-{os.getpid()}-{secrets.token_hex(3)}"


def named(exc: BaseException, path: str | os.PathLike) -> BaseException:
    """`exc` with the file it concerns: a failed write() or pwrite() (a full disk) raises
    an OSError without a file name, and libraries (safetensors, pyarrow) raise their own
    types with the OS error in the text; the user must be told which file."""
    from .errors import env_errno

    code = env_errno(exc)
    if code is not None and getattr(exc, "filename", None) is None:
        return OSError(code, os.strerror(code), str(path))
    return exc


def write_atomic(path: str | os.PathLike, content: str | bytes) -> None:
    """Write a whole file through a temporary sibling, then rename it over `path`."""
    path = Path(path)
    tmp = temp_sibling(path, writer_tag())
    try:
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise named(exc, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def folder_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be (or become) a folder this process writes into, or None: a file
    in its place or on its way, or a read-only folder above it. Checked before the work,
    so a long computation does not end in an error about its output."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        return f"{str(path)!r} is a file, not a folder"
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        return f"{str(path)!r} lies under {str(probe)!r}, which is a file"
    if probe.is_dir() and not os.access(probe, os.W_OK | os.X_OK):
        return f"cannot write into {str(probe)!r} (permission denied)"
    return None


def overlap(
    outputs: dict[str, object], inputs: dict[str, object], homes: dict[str, object] | None = None
) -> str | None:
    """Why an output would land on an input, or None. The one rule of every command that
    writes: an output may not equal, contain or lie inside an input (writing would replace
    or corrupt what the command reads), whatever `overwrite` says. `homes` are folders an
    output may lie inside but not equal or contain (a run's own folder: its adapter and
    merged model live in it). Keys name each path where the user gave it (a flag or key)."""

    def real(p):
        return Path(os.path.abspath(os.path.expanduser(str(p)))).resolve()

    for out_name, out in outputs.items():
        if out is None:
            continue
        o = real(out)
        for in_name, inp in inputs.items():
            if inp is None:
                continue
            i = real(inp)
            if o == i:
                return f"{out_name} {str(out)!r} is {in_name} {str(inp)!r}: writing it would replace what is read"
            if i.is_relative_to(o):
                return f"{out_name} {str(out)!r} contains {in_name} {str(inp)!r}: writing it would replace what is read"
            if o.is_relative_to(i):
                return f"{out_name} {str(out)!r} lies inside {in_name} {str(inp)!r}: writing there changes what is read"
        for home_name, home in (homes or {}).items():
            if home is not None and (o == real(home) or real(home).is_relative_to(o)):
                return (
                    f"{out_name} {str(out)!r} {'is' if o == real(home) else 'contains'} {home_name} "
                    f"{str(home)!r}: writing it would replace the run's other results"
                )
    return None


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place; an old one is kept until the new one is in."""
    old = None
    if final.exists():
        old = temp_sibling(final, writer_tag("old"))
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Build a folder: yields a fresh temporary sibling, renamed to `final` on success.

    On an exception the temporary is removed and `final` (if it existed) is unchanged.
    The folder is made world-readable: on a cluster other users' jobs read it.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        replace_dir(tmp, final)
    except Exception as exc:  # a full disk while building it: name the folder
        err = named(exc, final)
        if err is exc:
            raise
        raise err from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> None:
    """A matplotlib figure to PNG, atomically."""
    path = Path(path)
    tmp = temp_sibling(path, writer_tag() + ".png")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def hash_file(h, path: str | os.PathLike) -> None:
    """Feed a file's bytes to the hashlib object `h`, a MiB at a time."""
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)


def sha256_file(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file (manifests, digests, the wheelhouse): the one such helper."""
    h = hashlib.sha256()
    hash_file(h, path)
    return h.hexdigest()


@contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive advisory lock: ranks that start together build a shared file once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def folder_bytes(folder: str | os.PathLike | None) -> int:
    """Total size of the files under a folder (0 when there is none)."""
    if folder is None or not Path(folder).is_dir():
        return 0
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
