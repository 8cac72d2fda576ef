"""What a delta is and what it applies to: the base model's identity and the delta's digest.

A trained delta (GPart's theta, LoRA's factors, a checkpoint's trainable state) means
something only together with the base weights it was trained on and the settings that map
it onto them (method, d, seed, hash, layout, targets, dtype). Two records tie them together:

- the **base identity** of a model folder: its tensor names and shapes, and a fingerprint of
  its weights, computed from the safetensors files on disk without loading the model;
- the **digest** of a delta's definition: a SHA-256 of those settings (the base identity and
  the weights' own SHA-256 among them), plus one short hash per field, so that a reader
  names the field that was edited after the adapter or checkpoint was written.

The fingerprint is a sample, not a checksum: it reads a few fixed windows of each tensor
(at 0, 1/3, 2/3 and the end of its data, `WINDOW` elements each; at most `MAX_WINDOWS_PER_FILE`
windows per file, so at most 512 KiB per file: a 140 GB 70B checkpoint costs well under a
second of reads). It tells another model of the same shapes (a base and its instruct
version, a merged model, a retrained or rescaled copy) from the one recorded; an edit of a
few weights that no window covers goes unseen.

The values are compared as bfloat16 (rounded to nearest even, as torch's `.to` does): a copy
of the base converted to bf16 or to fp32 (`save_pretrained(torch_dtype=...)`) has the same
identity, since it holds the same model at the precision training and evaluation commonly
use; a copy converted to fp16 generally does not (fp16's rounding and range differ).

The digest is a checksum against mistakes (a hand-edited seed, a swapped weights file),
not a signature: whoever recomputes it can forge it.

Knows nothing of DeepSpeed, of any method or of the adapter formats; `adapter.py`
(GPart), `peft_common.py` (LoRA, VeRA) and `checkpoint.py` say which fields define their
delta.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from functools import lru_cache
from pathlib import Path

import torch

from . import safetensors_io as stio
from .errors import UserError

log = logging.getLogger(__name__)

FORMAT = "gpart_ds.base_identity"
VERSION = 1
WINDOW = 32  # elements per sampled window
POSITIONS = (0.0, 1 / 3, 2 / 3, 1.0)  # where in a tensor's data the windows start (1.0: the last window)
MAX_WINDOWS_PER_FILE = 2048  # x WINDOW x at most 8 bytes: 512 KiB read per file at most
# The provenance file a merged export writes (export.files.copy_side_files): a folder that has it
# already holds an adapter's delta.
MERGE_RECORD = "gpart_merge.json"
DIGEST_VERSION = 1


class IdentityError(UserError):
    """A delta applied to a base other than its own, or a record edited after it was written."""


# ---------------------------------------------------------------- base identity
def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _windows(numel: int) -> list[int]:
    w = min(WINDOW, numel)
    starts = sorted({min(numel - w, int(p * numel)) if p < 1 else numel - w for p in POSITIONS})
    return [s for s in starts if numel]


def _canonical(vals: torch.Tensor) -> bytes:
    """Sampled values as bytes that do not depend on the float dtype they are stored in."""
    if vals.is_floating_point():
        vals = vals.float().to(torch.bfloat16).view(torch.int16)
    return vals.contiguous().view(torch.uint8).numpy().tobytes() if vals.numel() else b""


def _file_key(folder: Path) -> tuple:
    files = stio.model_files(folder)
    return tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)


def identity(model_dir: str | Path) -> dict:
    """The identity of a Hugging Face model folder's safetensors weights (module doc)."""
    model_dir = Path(model_dir)
    return dict(_identity(str(model_dir.resolve()), _file_key(model_dir)))


@lru_cache(maxsize=8)
def _identity(model_dir: str, key: tuple) -> tuple:
    # Cached by the files' paths, sizes and mtimes: a run asks for it at start-up, at every
    # checkpoint and for the adapter; a file rewritten in place gets a new mtime.
    tensors = stio.read_model_header(Path(model_dir))
    shapes = sorted((name, list(st.entry.shape)) for name, st in tensors.items())
    h = hashlib.sha256()
    by_file: dict[Path, list[stio.StoredTensor]] = {}
    for name in sorted(tensors):
        by_file.setdefault(tensors[name].path, []).append(tensors[name])
    for path in sorted(by_file, key=lambda p: p.name):
        sts = by_file[path]
        # A file of very many small tensors: every k-th tensor (by name) is sampled, so the
        # bytes read per file stay bounded whatever the file holds.
        k = max(1, math.ceil(len(sts) * len(POSITIONS) / MAX_WINDOWS_PER_FILE))
        fd = os.open(path, os.O_RDONLY)
        try:
            for st in sts[::k]:
                h.update(st.entry.name.encode() + b"\0")
                for first in _windows(st.entry.numel):
                    n = min(WINDOW, st.entry.numel - first)
                    h.update(_canonical(stio.read_elements(st, first, n, fd)))
        finally:
            os.close(fd)
    counts: dict[str, int] = {}
    for st in tensors.values():
        if st.entry.dtype.is_floating_point:
            counts[str(st.entry.dtype).removeprefix("torch.")] = (
                counts.get(str(st.entry.dtype).removeprefix("torch."), 0) + st.entry.numel
            )
    return tuple(
        {
            "format": FORMAT,
            "version": VERSION,
            "tensors": len(tensors),
            "elements": sum(st.entry.numel for st in tensors.values()),
            "shapes_sha256": _sha(shapes),
            "weights_sha256": h.hexdigest(),
            # informational (not compared): the float dtype most weights are stored in
            "dtype": max(counts, key=counts.get) if counts else None,
        }.items()
    )


def is_identity(rec) -> bool:
    return isinstance(rec, dict) and rec.get("format") == FORMAT and isinstance(rec.get("version"), int)


def differs(recorded: dict, current: dict) -> str | None:
    """Why two identities are not the same base (None: the same)."""
    if recorded.get("version") != current.get("version"):
        return None  # another fingerprint version: not comparable (an older or newer gpart_ds)
    if recorded.get("shapes_sha256") != current.get("shapes_sha256"):
        return (
            f"its tensor names or shapes differ ({recorded.get('tensors')} tensors, {recorded.get('elements'):,} "
            f"weights recorded; {current.get('tensors')} tensors, {current.get('elements'):,} weights here)"
            if isinstance(recorded.get("elements"), int)
            else "its tensor names or shapes differ"
        )
    if recorded.get("weights_sha256") != current.get("weights_sha256"):
        return (
            "same tensor names and shapes, other weight values (another checkpoint of this architecture, "
            "a fine-tuned, merged or edited copy)"
        )
    return None


def merge_record(folder: str | Path) -> dict | None:
    """The provenance a merged export left in `folder` (None: not a merged folder)."""
    p = Path(folder) / MERGE_RECORD
    if not p.is_file():
        return None
    try:
        rec = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        rec = None
    return rec if isinstance(rec, dict) else {}


def merged_what(rec: dict) -> str:
    """The delta a merged folder holds, in words, from its provenance."""
    what = rec.get("adapter") or rec.get("run")
    kind = rec.get("adapter_kind")
    method = rec.get("method") or "?"
    if what:
        return f"the {method} adapter {what}" + (f" ({kind})" if kind and kind != "gpart_ds" else "")
    return f"a {method} run's delta (written by {kind or 'a training run'})"


def check_base(base_dir: str | Path, recorded: dict | None, where, label: str, trained_on=None) -> None:
    """Refuse to apply a delta recorded as trained on `recorded` (a base identity, or None
    for an adapter of an earlier version) to the model folder `base_dir`.

    `where`: the file that recorded it (named first in the error); `label`: how the user
    gave the base (`--base`, `--model`, `model.path`); `trained_on`: the recorded base's
    name or path, for the message.
    """
    base_dir = Path(base_dir)
    merged = merge_record(base_dir)
    have = recorded if is_identity(recorded) else None
    if merged is not None:
        # A merged folder is a valid base only for a delta trained on it (a second adapter
        # trained on top of a merged model): its recorded identity says so. Without one,
        # the recorded path must be this very folder.
        same = (
            differs(have, identity(base_dir)) is None
            if have is not None
            else trained_on is not None and _same_path(trained_on, base_dir)
        )
        if not same:
            src = merged.get("base")
            raise IdentityError(
                f"{where}: {label} {base_dir} is a merged model ({MERGE_RECORD}): it already holds the delta of "
                f"{merged_what(merged)}; applying this one to it would add a delta on top of another. "
                f"Give the base model it was merged from{f' ({src})' if src else ''}"
            )
    if have is None:
        return
    why = differs(have, identity(base_dir))
    if why:
        raise IdentityError(
            f"{where}: this delta was trained on the base model {trained_on or '(name not recorded)'}, "
            f"but {label} {base_dir} is another model: {why}. Apply it to the model it was trained on"
        )


def _same_path(a, b) -> bool:
    try:
        return Path(str(a)).resolve() == Path(b).resolve()
    except (OSError, RuntimeError):
        return False


# ---------------------------------------------------------------- digest of a delta's definition
def digest(fields: dict) -> dict:
    """The record a writer stores beside its delta: SHA-256 over every field, and a short
    hash per field (to name the edited one)."""
    return {
        "version": DIGEST_VERSION,
        "sha256": _sha(fields),
        "fields": {k: _sha({k: v})[:16] for k, v in fields.items()},
    }


def check_digest(recorded, fields: dict, where, missing_ok: bool, what: str = "adapter") -> None:
    """Refuse a record whose fields differ from those its digest was computed over, naming
    the file and the field. `missing_ok`: a record of an earlier version, written before
    digests existed (accepted with a warning by the caller's decision)."""
    if recorded is None:
        if missing_ok:
            log.warning(
                "%s: no digest (a %s written by an earlier gpart_ds): its settings cannot be checked "
                "against what it was trained with",
                where,
                what,
            )
            return
        raise IdentityError(
            f"{where}: 'digest' is missing: this {what} format records one, so it was removed "
            "by hand; the file was edited after it was written"
        )
    if (
        not isinstance(recorded, dict)
        or recorded.get("version") != DIGEST_VERSION
        or not isinstance(recorded.get("fields"), dict)
        or not isinstance(recorded.get("sha256"), str)
    ):
        raise IdentityError(
            f"{where}: 'digest' is not a digest this version writes ({str(recorded)[:80]}); "
            "the file was edited after it was written"
        )
    now = digest(fields)
    edited = [k for k in fields if recorded["fields"].get(k) != now["fields"][k]]
    if edited:
        shown = ", ".join(f"{k!r} (now {_short(fields[k])})" for k in edited[:4])
        raise IdentityError(
            f"{where}: {shown} {'differs' if len(edited) == 1 else 'differ'} "
            f"from the value{'s' if len(edited) > 1 else ''} "
            f"the {what} was written with (its digest): the file was edited after it was written, and its "
            f"weights belong to the original settings. Restore the original file, or train again with the "
            f"settings wanted"
        )
    if recorded["sha256"] != now["sha256"]:
        raise IdentityError(
            f"{where}: 'digest' does not match the {what}'s settings (the digest itself was "
            "edited): the file was changed after it was written"
        )


def _short(v) -> str:
    s = json.dumps(v)
    return s if len(s) <= 60 else s[:57] + "..."
