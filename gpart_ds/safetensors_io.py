"""Safetensors files planned ahead and written in place, by byte range.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and [begin, end) byte range in the data section, then the data.
Once the header is fixed, any process can fill any tensor, or any contiguous slice of
one, with `os.pwrite`. That is what lets every ZeRO-3 rank write its own shard of every
merged tensor straight into the final file, and lets the offline merge stream a model
through one block of memory. Reading uses plain `pread` into a fresh buffer (no mmap),
so what a reader holds is exactly the block it asked for.

Knows nothing of GPart or DeepSpeed.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError
from .fileio import named

DTYPES = {  # safetensors name <-> torch dtype
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit


class SafetensorsFormatError(UserError):
    """A file that is not a well-formed safetensors file: names the file and the problem."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


@dataclass
class FilePlan:
    """One output file: its name, header bytes and each tensor's absolute byte offset."""

    filename: str
    entries: list[TensorEntry]
    header: bytes = b""
    offsets: dict[str, int] = field(default_factory=dict)  # name -> first byte in the file
    size: int = 0

    def __post_init__(self):
        ranges, pos = {}, 0
        for e in self.entries:
            ranges[e.name] = {"dtype": NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [pos, pos + e.nbytes]}
            pos += e.nbytes
        ranges["__metadata__"] = {"format": "pt"}
        raw = json.dumps(ranges, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self.header = struct.pack("<Q", len(raw)) + raw
        start = len(self.header)
        self.offsets = {
            e.name: start + r["data_offsets"][0] for e, r in zip(self.entries, (ranges[e.name] for e in self.entries))
        }
        self.size = start + pos


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes (decimal units as in transformers)."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper()
    units = {
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "B": 1,
    }
    for u, mult in units.items():  # noqa: B007  (mult is read after the break)
        if s.endswith(u):
            num = s[: -len(u)].strip()
            break
    else:
        num, mult = s, 1
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 5GB, 500MB or a byte count)") from None
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return int(value * mult)


def plan_files(entries: list[TensorEntry], max_shard_bytes: int) -> list[FilePlan]:
    """Split tensors (in the given order) into files of at most max_shard_bytes of data.

    A tensor larger than the limit gets a file of its own, as transformers does. One
    file is named model.safetensors; several are model-0000i-of-0000n.safetensors.
    """
    groups: list[list[TensorEntry]] = [[]]
    size = 0
    for e in entries:
        if groups[-1] and size + e.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(e)
        size += e.nbytes
    n = len(groups)
    names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return [FilePlan(name, g) for name, g in zip(names, groups)]


def index_json(plans: list[FilePlan]) -> dict:
    total = sum(e.nbytes for p in plans for e in p.entries)
    return {"metadata": {"total_size": total}, "weight_map": {e.name: p.filename for p in plans for e in p.entries}}


def create_files(folder: Path, plans: list[FilePlan]) -> None:
    """Write every header and size every file (data still zero): done by one process."""
    for p in plans:
        try:
            with open(folder / p.filename, "wb") as fh:
                fh.write(p.header)
                fh.truncate(p.size)
        except OSError as exc:
            raise named(exc, folder / p.filename) from None


def write_index(folder: Path, plans: list[FilePlan]) -> None:
    if len(plans) > 1:
        (folder / INDEX_NAME).write_text(json.dumps(index_json(plans), indent=2) + "\n")


class RangeWriter:
    """pwrite of tensor slices into planned files; one open descriptor per file."""

    def __init__(self, folder: Path, plans: list[FilePlan]):
        self.folder = Path(folder)
        self.where = {e.name: (p, e) for p in plans for e in p.entries}
        self.fds = {p.filename: os.open(folder / p.filename, os.O_WRONLY) for p in plans}

    def write(self, name: str, first_elem: int, values: torch.Tensor) -> None:
        """values (flat, the entry's dtype) into elements [first_elem, first_elem + n)."""
        plan, entry = self.where[name]
        if values.dtype != entry.dtype:
            raise TypeError(f"{name}: writing {values.dtype} into a {entry.dtype} tensor")
        n = values.numel()
        if first_elem < 0 or first_elem + n > entry.numel:
            raise IndexError(f"{name}: elements [{first_elem}, {first_elem + n}) outside {entry.numel}")
        data = memoryview(values.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        pos = plan.offsets[name] + first_elem * entry.itemsize
        fd = self.fds[plan.filename]
        try:
            while data:  # pwrite may write less than asked
                done = os.pwrite(fd, data, pos)
                data, pos = data[done:], pos + done
        except OSError as exc:  # a full disk: name the file
            raise named(exc, self.folder / plan.filename) from None

    def close(self, sync: bool = True) -> None:
        fds, self.fds = self.fds, {}
        try:
            for name, fd in fds.items():
                if sync:
                    try:
                        os.fsync(fd)
                    except OSError as exc:
                        raise named(exc, self.folder / name) from None
        finally:
            for fd in fds.values():
                os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close(sync=exc[0] is None)


# ---------------------------------------------------------------- reading
@dataclass(frozen=True)
class StoredTensor:
    entry: TensorEntry
    path: Path
    start: int  # absolute byte offset of element 0


def read_header(path: Path) -> dict[str, StoredTensor]:
    """Tensors of one safetensors file, checked for the layout the format requires."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise SafetensorsFormatError(f"{path}: too short for a safetensors file ({size} bytes)")
        n = struct.unpack("<Q", head)[0]
        if n > min(_MAX_HEADER, size - 8):
            raise SafetensorsFormatError(f"{path}: header length {n} exceeds the file ({size} bytes)")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SafetensorsFormatError(f"{path}: header is not JSON ({exc})") from None
    out, data_start = {}, 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise SafetensorsFormatError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        e = TensorEntry(name, dtype, tuple(info["shape"]))
        b0, b1 = info["data_offsets"]
        if b1 - b0 != e.nbytes or data_start + b1 > size:
            raise SafetensorsFormatError(
                f"{path}: tensor {name!r} byte range [{b0}, {b1}) does not fit "
                f"its shape {list(e.shape)} or the file (truncated?)"
            )
        out[name] = StoredTensor(e, path, data_start + b0)
    return out


def model_files(folder: Path) -> list[Path]:
    """The safetensors files of a Hugging Face model folder, index order when sharded."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = [folder / f for f in dict.fromkeys(weight_map.values())]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise SafetensorsFormatError(f"{index}: not a safetensors index ({type(exc).__name__}: {exc})") from None
        for f in files:
            if not f.is_file():
                raise SafetensorsFormatError(f"{index}: names {f.name}, which is not in {folder}")
        return files
    single = folder / SINGLE_NAME
    if single.is_file():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        raise SafetensorsFormatError(
            f"{folder}: no *.safetensors weights (pytorch_model.bin is not read: convert it to safetensors first)"
        )
    return found


def read_model_header(folder: Path) -> dict[str, StoredTensor]:
    """Every tensor of a model folder, in file order then header order."""
    out: dict[str, StoredTensor] = {}
    for f in model_files(folder):
        for name, st in read_header(f).items():
            if name in out:
                raise SafetensorsFormatError(f"{f}: tensor {name!r} also in {out[name].path}")
            out[name] = st
    return out


def read_elements(st: StoredTensor, first: int, n: int, fd: int | None = None) -> torch.Tensor:
    """Elements [first, first + n) of a stored tensor, flat, into a fresh buffer."""
    e = st.entry
    nbytes = n * e.itemsize
    buf = bytearray(nbytes)
    own = fd is None
    if own:
        fd = os.open(st.path, os.O_RDONLY)
    try:
        view, pos, got = memoryview(buf), st.start + first * e.itemsize, 0
        while got < nbytes:
            k = os.preadv(fd, [view[got:]], pos + got)
            if k == 0:
                raise SafetensorsFormatError(f"{st.path}: unexpected end of file reading {e.name!r}")
            got += k
    finally:
        if own:
            os.close(fd)
    if nbytes == 0:
        return torch.empty(0, dtype=e.dtype)
    return torch.frombuffer(buf, dtype=e.dtype)
