"""Offline streaming merge, verification, reference adapters and bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from gpart_ds.export.files import ExportError, check_targets_stored
from gpart_ds.export.offline import merge_offline
from gpart_ds.export.verify import verify
from gpart_ds.methods.gpart.adapter import AdapterError
from gpart_ds.methods.gpart.layer import apply_gpart
from gpart_ds.methods.gpart.sources import open_source
from tests.export_helpers import (
    expected_targets,
    make_adapter,
    make_base,
    raw_bytes,
    read_folder,
    write_reference_adapter,
)
from tests.helpers import REPO


@pytest.fixture(scope="module")
def tok_dir(tiny_assets):
    return tiny_assets / "model"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_offline_merge_is_w0_plus_delta_and_leaves_the_rest_byte_identical(tmp_path, tok_dir, dtype):
    base = make_base(tmp_path / "base", tok_dir, dtype=dtype, tie=dtype == torch.float32)
    theta, layout = make_adapter(tmp_path / "ad", base, d=37, seed=5, dtype=dtype)
    stats = merge_offline(base, tmp_path / "ad", tmp_path / "out")
    assert stats["dtype"] == str(dtype)
    b, m = read_folder(base), read_folder(tmp_path / "out")
    assert m.keys() == b.keys()
    want = expected_targets(b, layout, theta, 5, dtype)
    assert len(want) == 2 * 7
    for name, t in m.items():
        assert t.dtype == dtype
        if name in want:
            assert raw_bytes(t) == raw_bytes(want[name]), name
            assert not torch.equal(t, b[name]), f"{name}: delta had no effect"
        else:
            assert raw_bytes(t) == raw_bytes(b[name]), name
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["dtype"] == str(dtype).removeprefix("torch.")
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".*tmp*"))


def test_merged_folder_serves_the_trained_model_logits(tmp_path, tok_dir):
    base = make_base(tmp_path / "base", tok_dir, dtype=torch.bfloat16)
    theta, layout = make_adapter(tmp_path / "ad", base, d=50, seed=1, dtype=torch.bfloat16)
    merge_offline(base, tmp_path / "ad", tmp_path / "out", max_shard_size=4000)
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(files) > 2 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16).eval()
    g = apply_gpart(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16), d=50, seed=1).eval()
    with torch.no_grad():
        g.gpart_theta.copy_(theta)
        ids = torch.randint(4, 320, (2, 9), generator=torch.Generator().manual_seed(0))
        assert torch.equal(merged(input_ids=ids).logits, g(input_ids=ids).logits)
    r = verify(tmp_path / "out", base, tmp_path / "ad")
    assert r["ok"] and r["max_abs_logit_diff"] == 0.0


def test_verify_fails_on_a_merge_that_is_not_the_adapter(tmp_path, tok_dir):
    base = make_base(tmp_path / "base", tok_dir)
    make_adapter(tmp_path / "ad", base, d=20, seed=0)
    make_adapter(tmp_path / "other", base, d=20, seed=0, theta_seed=9)
    merge_offline(base, tmp_path / "other", tmp_path / "out")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpart_ds.export",
            "verify",
            "--merged",
            str(tmp_path / "out"),
            "--base",
            str(base),
            "--adapter",
            str(tmp_path / "ad"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and "FAILED" in proc.stdout


def test_reference_adapter_merges_to_the_reference_weights(tmp_path, tok_dir):
    """The authors' stateless backend: W0 + ((theta * s)[g]).to(W0.dtype), biases excluded,
    as their merge_and_unload computes it (written out independently in export_helpers):
    bit for bit on every target weight, every other tensor untouched."""
    base = make_base(tmp_path / "base", tok_dir, dtype=torch.bfloat16)
    theta = torch.randn(64, generator=torch.Generator().manual_seed(3)) * 0.3
    write_reference_adapter(tmp_path / "ref", theta, 64, proj_seed=42, target_modules=["q_proj", "v_proj"])
    src = open_source(tmp_path / "ref", base)
    assert src.kind == "reference" and src.seed == 42 and src.dtype is None
    assert [t.name.rsplit(".", 1)[1] for t in src.targets] == ["q_proj", "v_proj"] * 2
    merge_offline(base, tmp_path / "ref", tmp_path / "out")
    from gpart_ds.targets import build_layout, skeleton

    layout = build_layout(skeleton(str(base)), ["q_proj", "v_proj"])
    b, m = read_folder(base), read_folder(tmp_path / "out")
    want = expected_targets(b, layout, theta, 42, torch.bfloat16)
    for name, t in m.items():
        assert raw_bytes(t) == raw_bytes(want.get(name, b[name])), name


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("assignment_backend", "materialized", "torch.randint"),
        ("bias", "all", "bias='all' is not supported"),
        ("partition_scope", "transformer_block", "partition_scope"),
        ("projection_type", "fastfood", "projection_type"),
    ],
)
def test_reference_settings_we_cannot_reproduce_are_refused(tmp_path, tok_dir, key, value, match):
    base = make_base(tmp_path / "base", tok_dir)
    write_reference_adapter(tmp_path / "ref", torch.zeros(8), 8, 0, "all-linear", **{key: value})
    with pytest.raises(AdapterError, match=match):
        merge_offline(base, tmp_path / "ref", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_reference_adapters_older_than_the_backend_key_are_refused_not_guessed(tmp_path, tok_dir):
    # Before 2026-07-22 the authors' code wrote no assignment_backend and used torch.randint
    # assignments: merging them as SplitMix64 would silently produce another model.
    base = make_base(tmp_path / "base", tok_dir)
    write_reference_adapter(tmp_path / "ref", torch.zeros(8), 8, 0, "all-linear", drop=("assignment_backend",))
    with pytest.raises(AdapterError, match="no 'assignment_backend' key.*torch.randint"):
        merge_offline(base, tmp_path / "ref", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_reference_adapters_with_extra_trained_modules_are_refused(tmp_path, tok_dir):
    base = make_base(tmp_path / "base", tok_dir)
    write_reference_adapter(tmp_path / "ref", torch.zeros(8), 8, 0, "all-linear", modules_to_save=["lm_head"])
    with pytest.raises(AdapterError, match="modules_to_save.*lm_head"):
        merge_offline(base, tmp_path / "ref", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_diverged_adapter_is_not_merged(tmp_path, tok_dir):
    from safetensors.torch import load_file, save_file

    from gpart_ds.fileio import sha256_file

    base = make_base(tmp_path / "base", tok_dir)
    make_adapter(tmp_path / "ad", base, d=16, seed=0)
    w = tmp_path / "ad" / "adapter_model.safetensors"
    theta = load_file(str(w))["gpart_theta"]
    theta[3] = float("nan")
    save_file({"gpart_theta": theta}, str(w))  # as a diverged run would have written it
    cfg_path = tmp_path / "ad" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["weights_sha256"] = sha256_file(w)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="1 non-finite values"):
        merge_offline(base, tmp_path / "ad", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_merge_whose_target_is_missing_from_the_base_files_is_refused(tmp_path, tok_dir):
    from gpart_ds import safetensors_io as stio

    class Renamed:  # a merge that adapts a tensor the base files do not hold
        targets = {"model.layers.0.self_attn.q_proj.weight": None, "model.layers.9.renamed.weight": None}

    base = make_base(tmp_path / "base", tok_dir)
    with pytest.raises(ExportError, match="not in the base model's safetensors files.*renamed"):
        check_targets_stored(Renamed(), stio.read_model_header(base), base)


def test_wrong_base_model_is_refused_by_name(tmp_path, tok_dir):
    a = make_base(tmp_path / "a", tok_dir, hidden=8)
    b = make_base(tmp_path / "b", tok_dir, hidden=16, heads=2)
    make_adapter(tmp_path / "ad", a, d=16, seed=0)
    with pytest.raises(
        AdapterError, match=r"q_proj.weight has shape \[8, 8\] in the adapter but \[16, 16\].*wrong base"
    ):
        merge_offline(b, tmp_path / "ad", tmp_path / "out")
    c = make_base(tmp_path / "c", tok_dir, layers=1)
    with pytest.raises(AdapterError, match="layers.1.self_attn.q_proj.weight is not in the base model"):
        merge_offline(c, tmp_path / "ad", tmp_path / "out")
    # a 2-layer adapter into a 3-layer model: every adapter target exists, but layer 2's would
    # be left unadapted
    e = make_base(tmp_path / "e", tok_dir, layers=3)
    with pytest.raises(AdapterError, match=r"adapter's 14 targets differ from the base model's 21 .*target 14"):
        merge_offline(e, tmp_path / "ad", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corrupted_adapter_and_unknown_hash_version_are_refused(tmp_path, tok_dir):
    base = make_base(tmp_path / "base", tok_dir)
    make_adapter(tmp_path / "ad", base, d=16, seed=0)
    w = tmp_path / "ad" / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-7])
    # the SHA-256 recorded in adapter_config.json catches it before the file is parsed
    with pytest.raises(AdapterError, match="adapter_model.safetensors: SHA-256 differs"):
        merge_offline(base, tmp_path / "ad", tmp_path / "out")
    make_adapter(tmp_path / "ad2", base, d=16, seed=0)
    cfg_path = tmp_path / "ad2" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["hash"]["version"] = 2
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="hash .* is not supported"):
        merge_offline(base, tmp_path / "ad2", tmp_path / "out")


def test_existing_output_is_kept_unless_overwrite(tmp_path, tok_dir):
    base = make_base(tmp_path / "base", tok_dir)
    make_adapter(tmp_path / "ad", base, d=16, seed=0)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpart_ds.export",
            "--base",
            str(base),
            "--adapter",
            str(tmp_path / "ad"),
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "already exists; pass --overwrite" in proc.stderr
    assert (out / "precious.txt").read_text() == "keep me"
    merge_offline(base, tmp_path / "ad", out, overwrite=True)
    assert not (out / "precious.txt").exists() and (out / "model.safetensors").is_file()


DISK_FULL = """
import resource, signal, sys
from gpart_ds.export.offline import merge_offline
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
merge_offline(sys.argv[1], sys.argv[2], sys.argv[3], overwrite=True)
"""


def test_disk_full_leaves_the_previous_output_intact_and_no_partial_files(tmp_path, tok_dir):
    base = make_base(tmp_path / "base", tok_dir, hidden=32, inter=64)
    make_adapter(tmp_path / "ad", base, d=64, seed=0)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("the previous export")
    size = (base / "model.safetensors").stat().st_size
    proc = subprocess.run(
        [sys.executable, "-c", DISK_FULL.format(limit=size // 2), str(base), str(tmp_path / "ad"), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "File too large" in proc.stderr
    assert (out / "model.safetensors").read_text() == "the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad", "base", "out"]


PEAK = """
import sys, json
from gpart_ds import safetensors_io
from gpart_ds.export.offline import merge_offline
import torch
def hwm():  # VmHWM, not ru_maxrss: the latter inherits the parent's peak across exec
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
base, ad, out = sys.argv[1:4]
import gc, psutil
import gpart_ds.methods, gpart_ds.model, transformers  # imports before the baseline
gpart_ds.targets.skeleton(base)   # transformers' model code: loaded once, whatever the model's size
gc.collect()
before = psutil.Process().memory_info().rss
merge_offline(base, ad, out, block_bytes=int(sys.argv[4]), kernel=sys.argv[5])
print(json.dumps({"before": before, "peak": hwm()}))
"""


def _merge_peak_growth(folder: Path, tok_dir, layers: int) -> tuple[int, int]:
    """(model bytes, peak RSS growth of an eager offline merge in a fresh process)."""
    base = make_base(folder / "base", tok_dir, hidden=512, heads=8, kv=8, inter=2048, layers=layers)
    make_adapter(folder / "ad", base, d=4096, seed=0)
    proc = subprocess.run(
        [sys.executable, "-c", PEAK, str(base), str(folder / "ad"), str(folder / "out"), str(512 * 2048 * 4), "eager"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return (base / "model.safetensors").stat().st_size, r["peak"] - max(r["before"], 0)


@pytest.mark.slow
def test_offline_merge_memory_is_bounded_by_a_block_not_the_model(tmp_path, tok_dir):
    # Two models of 6 and 12 layers x (4 x 512^2 + 3 x 512 x 2048) fp32: 97 and 193 MB of
    # targets, the same 4 MB largest tensor. A block-bounded merge peaks at the same
    # height for both (read buffer, merged block, the eager hash's int64 workspace and
    # the allocator's slack: ~50 MB here, ~65 MB on a loaded machine); a merge that loads
    # the model would grow by the 96 MB between them. Comparing the two in the same test
    # is what makes the bound independent of the machine's noise.
    small, grew_small = _merge_peak_growth(tmp_path / "small", tok_dir, layers=6)
    large, grew_large = _merge_peak_growth(tmp_path / "large", tok_dir, layers=12)
    mib = 2**20
    print(
        f"models {small / mib:.0f} / {large / mib:.0f} MiB, peak growth "
        f"{grew_small / mib:.0f} / {grew_large / mib:.0f} MiB"
    )
    assert grew_large - grew_small < (large - small) / 4
    assert grew_large < large / 2
