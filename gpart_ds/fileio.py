"""Small file helpers shared by the reports and CLIs."""
from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a hidden temporary file beside `path`, then rename it over `path`:
    a reader (or a crash) never sees half a file, and an earlier file survives a failure."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
