"""What a merge starts from: an adapter or a checkpoint folder, handed to the method that
reads it (the offline merge, verify and evaluate all open their --adapter here)."""

from __future__ import annotations

from pathlib import Path


def open_source(path: Path, base_dir: Path):
    """An adapter or checkpoint folder as a merge source: a checkpoint is read (and
    verified) here and handed to the method that ran it; an adapter folder to whichever
    method reads it (GPart: its own adapters and the reference implementation's)."""
    from .. import checkpoint, methods

    path = Path(path)
    if path.is_dir() and checkpoint.looks_like_checkpoint(path):
        return methods.open_checkpoint(checkpoint.read(path), Path(base_dir))
    return methods.open_adapter(path, Path(base_dir))
