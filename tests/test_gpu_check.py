"""The GPU window's tooling on CPU: wheelhouse parts, argument handling, the probe, the report.

The GPU steps themselves run only where a GPU is lent (launch/gpu_check.sh); `--dry` runs
them here at toy sizes and is exercised by hand (minutes), not in CI.
"""

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "launch"))
import gpu_check  # noqa: E402
import wheelhouse  # noqa: E402


def _wheelhouse(tmp_path, sizes):
    src = tmp_path / "wh"
    src.mkdir()
    for name, n in sizes.items():
        (src / name).write_bytes(bytes((i * 7 + len(name)) % 251 for i in range(n)))
    files = {p.name: {"sha256": wheelhouse.sha256_file(p), "bytes": p.stat().st_size} for p in src.iterdir()}
    (src / "MANIFEST.json").write_text(json.dumps({"python": "3.12", "packages": {}, "assets": [], "files": files}))
    return src


def test_parts_stay_under_the_carry_limit_and_reassemble_bit_for_bit(tmp_path):
    src = _wheelhouse(tmp_path, {"big.whl": 2500, "a.whl": 700, "b.whl": 300, "empty.tar": 0})
    dirs = wheelhouse.pack(src, tmp_path / "carry", part_bytes=1000)
    assert [d.name for d in dirs] == [f"part{i}" for i in range(1, len(dirs) + 1)]
    assert all(sum(f.stat().st_size for f in d.iterdir()) <= 1000 for d in dirs)
    assert (dirs[0] / "MANIFEST.json").is_file()
    assert any(f.name.startswith("big.whl.piece") for d in dirs for f in d.iterdir())
    manifest = wheelhouse.unpack(tmp_path / "carry", tmp_path / "out")
    for name in manifest["files"]:
        assert (tmp_path / "out" / name).read_bytes() == (src / name).read_bytes(), name


def test_a_missing_or_damaged_part_is_named(tmp_path):
    src = _wheelhouse(tmp_path, {"big.whl": 2500, "a.whl": 700})
    dirs = wheelhouse.pack(src, tmp_path / "carry", part_bytes=1000)
    piece = next(f for d in dirs for f in sorted(d.iterdir()) if f.name.startswith("big.whl.piece"))
    piece.write_bytes(b"x" + piece.read_bytes()[1:])
    with pytest.raises(wheelhouse.WheelhouseError, match="big.whl: sha256 differs"):
        wheelhouse.unpack(tmp_path / "carry", tmp_path / "out")
    dirs = wheelhouse.pack(src, tmp_path / "carry", part_bytes=1000)
    next(f for d in dirs for f in d.iterdir() if f.name == "a.whl").unlink()
    with pytest.raises(wheelhouse.WheelhouseError, match="a.whl: not in any part"):
        wheelhouse.unpack(tmp_path / "carry", tmp_path / "out2")
    with pytest.raises(wheelhouse.WheelhouseError, match="no part"):
        wheelhouse.unpack(tmp_path / "nothing", tmp_path / "out3")


def test_closure_is_the_locked_stack_without_torch():
    """The wheelhouse brings deepspeed and what it needs at the locked versions, nothing of
    torch's, and this suite's venv (launch/setup_env.sh) holds exactly those versions."""
    import importlib.metadata as md

    import lock

    pins = wheelhouse.closure()
    assert {"deepspeed", "transformers", "omegaconf", "pytest", "hjson"} <= set(pins)
    assert not {"torch", "triton", "sympy", "jinja2", "nvidia-nccl-cu13"} & set(pins)
    assert pins == {n: lock.pins(lock.CUDA)[n] for n in pins} == {n: lock.pins(lock.CPU)[n] for n in pins}
    if "+cpu" in md.version("torch"):  # our CPU venv (a GPU image keeps its own packages)
        assert {n: md.version(n) for n in pins} == pins


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "env,nope"], "--steps: unknown ['nope']"),
        (["--budget", "5"], "--budget must be in [10, 3600]"),
    ],
)
def test_gpu_check_refuses_bad_arguments(args, message, tmp_path):
    proc = subprocess.run(
        [sys.executable, "launch/gpu_check.py", "--out", str(tmp_path), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_wheelhouse_refuses_bad_arguments():
    for args, message in (
        (["build", "--python", "312"], "--python must look like 3.12"),
        (["build", "--part-mb", "64"], "--part-mb must be in [1, 63]"),
    ):
        proc = subprocess.run(
            [sys.executable, "launch/wheelhouse.py", *args], cwd=REPO, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_probe_reports_what_the_wheelhouse_must_bring(tmp_path):
    proc = subprocess.run(
        [sys.executable, "launch/gpu_check.py", "--probe", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "probe.json").read_text())
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    # which pins this venv lacks is the machine's (PyPI moves); the rule is gpu_check.needed
    import importlib.metadata as md

    def installed(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    assert report["python"] == py and set(report["pins"]) == set(report["installed"])
    assert report["installed"] == {name: installed(name) for name in report["pins"]}
    assert report["need"] == gpu_check.needed(report["pins"], report["installed"])
    assert report["build"] == (
        f"bash launch/make_wheelhouse.sh --python {py} --only {','.join(report['need']) or 'none'} --smollm2"
    )


def test_needed_brings_missing_and_other_versions_but_keeps_the_images_big_packages():
    pins = {"deepspeed": "0.18.1", "numpy": "2.3.4", "pyarrow": "21.0.0", "omegaconf": "2.3.0"}
    assert gpu_check.needed(pins, {n: None for n in pins}) == list(pins)
    assert gpu_check.needed(pins, dict(pins)) == []
    have = {"deepspeed": "0.18.0", "numpy": "2.1.0", "pyarrow": "20.0.0", "omegaconf": "2.3.0"}
    # another deepspeed is brought; numpy 2.x is kept (same major); pyarrow 20 is not
    assert gpu_check.needed(pins, have) == ["deepspeed", "pyarrow"]
    assert gpu_check.needed(pins, {"numpy": "2.3.4"}) == ["deepspeed", "pyarrow", "omegaconf"]


def test_env_step_and_summary_in_dry_mode(tmp_path):
    """The driver's loop: a step runs, one is skipped for lack of budget, both are reported."""
    rc = gpu_check.main(
        ["--dry", "--steps", "env,optests", "--budget", "31", "--out", str(tmp_path), "--work", str(tmp_path / "work")]
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert rc == 0 and summary["dry"] is True
    assert summary["steps"]["env"]["status"] == "ok" and summary["steps"]["env"]["python"]
    assert summary["steps"]["optests"]["status"] == "skipped"
    assert "left of the budget" in summary["steps"]["optests"]["reason"]
    md = (tmp_path / "summary.md").read_text()
    assert "| env | ok |" in md and "| optests | skipped |" in md


def test_report_states_targets_and_export_comparison():
    results = {
        "layer": {
            "status": "ok",
            "rows": {
                "trainable": {"ms": 8.0, "vs_trainable": 1.0, "vs_lora": 1.4},
                "gpart_triton": {"ms": 9.0, "vs_trainable": 1.125, "vs_lora": 1.6},
            },
            "best_gpart": "gpart_triton",
            "targets_met": {"vs_trainable <= 1.2": True, "vs_lora <= 1.7": True},
            "delta_generation_hbm_fraction": 0.5,
        },
        "tiny": {
            "status": "ok",
            "losses_consistent": True,
            "cpu_eager": {"losses": [1.0]},
            **{
                k: {"max_rel_loss_diff_vs_cpu": 0.01, "export_vs_cpu_merge": {"equal": True, "dtype": "torch.bfloat16"}}
                for k in ("gpu_compiled", "gpu_triton")
            },
        },
    }
    md = gpu_check.markdown(results, 540)
    assert "| gpart_triton | 9.00 | 1.12x | 1.60x |" in md
    assert "50% of the H200's 4.8 TB/s (target >= 80%)" in md
    assert "gpu_triton: max relative loss difference 0.0100; merged export vs CPU merge: bit-identical" in md


def test_compare_folders_counts_ulps(tmp_path):
    import torch
    from safetensors.torch import save_file

    a = torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)
    b = a.clone()
    b[1] = torch.tensor(2.0, dtype=torch.bfloat16).view(torch.int16).add(1).view(torch.bfloat16)
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    save_file({"w": a}, tmp_path / "x" / "model.safetensors")
    save_file({"w": b}, tmp_path / "y" / "model.safetensors")
    assert gpu_check._compare_folders(tmp_path / "x", tmp_path / "x")["equal"]
    r = gpu_check._compare_folders(tmp_path / "x", tmp_path / "y")
    assert not r["equal"] and r["max_ulps"] == 1 and r["unequal"] == ["w"]


def test_every_file_the_gpu_check_names_exists():
    # The GPU window is short and rare: a test or config that moved must fail here, not there.
    import re

    text = (REPO / "launch" / "gpu_check.py").read_text()
    named = set(re.findall(r"\b((?:tests|configs|launch)/[\w/]+\.(?:py|yaml|sh|json))", text))
    assert "tests/methods/gpart/test_triton.py" in named
    missing = sorted(p for p in named if not (REPO / p).is_file())
    assert not missing, missing
