"""The locked environment (launch/lock.py): offline checks of the locks against pyproject.toml,
and of this suite's venv against the locks. Nothing here asks a registry."""

import importlib.metadata as md
import re
import shutil
import sys

import pytest

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "launch"))
import lock  # noqa: E402


@pytest.fixture
def copy(tmp_path, monkeypatch):
    """pyproject.toml and the locks copied to tmp_path, lock.py pointed at the copies."""
    (tmp_path / "launch" / "lock").mkdir(parents=True)
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    for p in (lock.CPU, lock.CUDA, lock.ASSETS):
        shutil.copy(p, tmp_path / "launch" / "lock" / p.name)
    monkeypatch.setattr(lock, "REPO", tmp_path)
    for name, p in (("CPU", lock.CPU), ("CUDA", lock.CUDA), ("ASSETS", lock.ASSETS)):
        monkeypatch.setattr(lock, name, tmp_path / "launch" / "lock" / p.name)
    return tmp_path


def test_the_committed_locks_satisfy_pyproject_and_agree():
    assert lock.drift() == []


def test_the_versions_the_readme_names_are_the_locked_ones():
    # the README said transformers 5.25.0 while the lock held 5.24.0
    text = (REPO / "README.md").read_text()
    pins = lock.pins(lock.CPU)
    named = re.findall(r"\b(torch|deepspeed|transformers|torchft|triton)\s+(\d+\.\d+(?:\.\d+)?)\b", text)
    assert named, "the README names no locked version: update this test with it"
    wrong = [f"{n} {v} (lock: {pins[n]})" for n, v in named if pins[n].split("+")[0] != v]
    assert not wrong, f"README.md names versions the lock does not hold: {wrong}"


def test_a_range_that_excludes_the_locked_version_is_drift(copy):
    py = copy / "pyproject.toml"
    have = lock.pins(lock.CPU)["omegaconf"]
    py.write_text(py.read_text().replace('"omegaconf>=2.3"', f'"omegaconf>{have}"'))
    assert lock.drift() == [
        f"cpu.txt: omegaconf=={have} outside pyproject dependencies >{have}",
        f"cuda.txt: omegaconf=={have} outside pyproject dependencies >{have}",
    ]


def test_a_new_dependency_or_extra_that_is_not_locked_is_drift(copy):
    py = copy / "pyproject.toml"
    py.write_text(
        py.read_text()
        .replace('"psutil>=5.9",', '"psutil>=5.9",\n    "no-such-pkg>=1",')
        .replace("serve = [", 'serve = ["other-pkg",')
    )
    problems = lock.drift()
    assert "cpu.txt: no-such-pkg (pyproject dependencies) is not locked" in problems
    assert "cuda.txt: other-pkg (pyproject [serve]) is not locked" in problems


def test_the_two_stacks_may_differ_only_in_torch_and_what_it_brings(copy):
    cuda = lock.CUDA
    have = lock.pins(cuda)["transformers"]
    cuda.write_text(cuda.read_text().replace(f"transformers=={have} ", "transformers==5.0.0 "))
    assert lock.drift() == [f"transformers: cpu.txt {have} but cuda.txt 5.0.0 (refresh both)"]
    assert lock.TORCH_SIDE.match("nvidia-nccl-cu13") and not lock.TORCH_SIDE.match("numpy")


def test_every_locked_package_carries_hashes_and_requirements_filters_entries():
    for path in (lock.CPU, lock.CUDA, lock.ASSETS):
        text = lock.requirements("cpu" if path == lock.CPU else "cuda" if path == lock.CUDA else "assets")
        assert len([ln for ln in text.splitlines() if "==" in ln]) == len(lock.pins(path))
        assert all("--hash=sha256:" in e for e in text.split("==")[1:]), path
    only = lock.requirements("cpu", only={"torch"})
    assert only.startswith("torch==2.13.0+cpu") and only.count("==") == 1 and "--hash=sha256:" in only
    rest = lock.requirements("cpu", skip={"torch", "mpi4py"})
    assert "torch==" not in rest and "mpi4py==" not in rest and "numpy==" in rest


def test_this_venv_is_exactly_the_lock():
    """launch/setup_env.sh installed the lock and nothing else (mpi4py only where mpicc is)."""
    if "+cpu" not in md.version("torch"):
        pytest.skip("not the CPU venv of launch/setup_env.sh (a GPU image keeps its own packages)")
    skip = set() if shutil.which("mpicc") else {"mpi4py"}
    assert lock.verify(sys.executable, "cpu", skip) == []


def test_verify_names_a_changed_missing_or_extra_package(monkeypatch):
    want = lock.expected("cpu")
    have = dict(want, numpy="1.0", extra_pkg="2.0")
    del have["omegaconf"]
    monkeypatch.setattr(lock, "installed", lambda python: have)
    assert lock.verify("python", "cpu") == [
        f"numpy: lock {want['numpy']}, installed 1.0",
        f"omegaconf: lock {want['omegaconf']}, installed nothing",
        "extra_pkg==2.0: installed but not in the lock",
    ]


def test_lock_cli_check_is_offline_and_exits_by_drift(copy):
    assert lock.main(["check"]) == 0
    lock.CPU.write_text("# nothing\n")
    assert lock.main(["check"]) == 2  # a lock without entries is named, not a traceback
