"""Model names to local folders, offline.

`model.path`, `gpart_ds.evaluate --model` and `gpart_ds.export --base` take a local
Hugging Face folder or a hub-style name (`org/name`, optionally `org/name@revision`)
whose snapshot is already in the Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub,
else ~/.cache/huggingface/hub). Nothing is downloaded: training machines are often
offline, and a half-downloaded 70B model should fail here, not on rank 37 mid-load.
Everything downstream then reads one ordinary folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def cache_dir() -> Path:
    """The hub cache, read from the environment at call time (not import time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def looks_like_repo_id(name: str) -> bool:
    return bool(_REPO_ID.match(name)) and not Path(name).exists()


def cached_snapshot(name: str) -> Path | None:
    """The cached snapshot folder of `org/name[@revision]` holding a config.json, or None."""
    if not looks_like_repo_id(name):
        return None
    repo, _, revision = name.partition("@")
    root = cache_dir() / ("models--" + repo.replace("/", "--"))
    ref = root / "refs" / (revision or "main")
    commit = ref.read_text().strip() if ref.is_file() else revision
    if not commit:
        return None
    snap = root / "snapshots" / commit
    return snap if (snap / "config.json").is_file() else None


def resolve(name: str | os.PathLike) -> str:
    """A local model folder for `name`: itself if it is one, else its cached snapshot;
    unchanged when neither exists (the caller reports it with its own context)."""
    s = str(name)
    if (Path(s) / "config.json").is_file():
        return s
    snap = cached_snapshot(s)
    return str(snap) if snap is not None else s


def display_name(path: str | os.PathLike) -> str:
    """`org/name` for a hub-cache snapshot folder, the folder's name for other folders."""
    p = Path(path)
    parts = p.resolve().parts if p.exists() else p.parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--") :].replace("--", "/")
    return p.name if p.exists() else str(path)
