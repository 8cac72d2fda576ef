"""Merged export from a real ZeRO-3 run: every rank writes its own shards in place.

The model is chosen for awkward shard boundaries on 3 ranks: hidden size 2, so each
RMSNorm weight (2 elements) is smaller than the world and one rank holds only padding;
q_proj (4 elements) leaves rank 2 empty; the embedding (640) splits 214/214/212 with
padding; the output files are split by a tiny max_shard_size; embeddings are tied.
"""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from gpart_ds.export.offline import merge_offline
from gpart_ds.methods.gpart.layer import apply_gpart
from gpart_ds.methods.gpart.sources import open_source
from tests.export_helpers import expected_targets, make_base, raw_bytes, read_folder
from tests.helpers import REPO, run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def run_args(base, out):
    return (
        "--config",
        "configs/tiny.yaml",
        f"model.path={base}",
        "model.precision=bf16",
        "method.d=16",
        "train.max_steps=3",
        "train.lr=0.5",
        "train.eval_examples=4",
        f"output_dir={out}",
        "export.max_shard_size=100",
    )


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, tiny_assets):
    tmp = tmp_path_factory.mktemp("export3")
    base = make_base(
        tmp / "base", tiny_assets / "model", hidden=2, heads=1, kv=1, inter=3, layers=2, tie=True, dtype=torch.bfloat16
    )
    out = tmp / "run"
    run_ranks(3, "launch/train.py", *run_args(base, out), "export.merged=true")
    return base, out


def test_zero3_merged_export_equals_offline_merge_and_w0_plus_delta(tmp_path, zero3_run):
    base, out = zero3_run
    merged = out / "merged"
    files = sorted(p.name for p in merged.glob("*.safetensors"))
    assert len(files) >= 3 and (merged / "model.safetensors.index.json").is_file()
    prov = json.loads((merged / "gpart_merge.json").read_text())
    assert prov["ranks"] == 3 and prov["compute_dtype"] == "torch.bfloat16"

    # 1. byte-identical to the offline streaming merge of the run's adapter
    merge_offline(base, out / "adapter", tmp_path / "offline", max_shard_size=100)
    m, off, b = read_folder(merged), read_folder(tmp_path / "offline"), read_folder(base)
    assert m.keys() == off.keys() == b.keys()
    for k in m:
        assert raw_bytes(m[k]) == raw_bytes(off[k]), k

    # 2. targets are W0 + delta computed independently; everything else is the base, bytes
    src = open_source(out / "adapter", base)
    assert src.dtype == torch.bfloat16 and src.theta.abs().sum() > 0
    from gpart_ds.targets import build_layout, skeleton

    layout = build_layout(skeleton(str(base)), "all-linear")
    want = expected_targets(b, layout, src.theta, src.seed, torch.bfloat16)
    changed = 0
    for k, t in m.items():
        assert raw_bytes(t) == raw_bytes(want.get(k, b[k])), k
        changed += k in want and not torch.equal(t, b[k])
    assert changed >= 10

    # 3. plain transformers loads it and gives the trained GPart model's logits
    served = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16).eval()
    g = apply_gpart(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16), d=16, seed=src.seed).eval()
    with torch.no_grad():
        g.gpart_theta.copy_(src.theta)
        ids = torch.randint(4, 320, (2, 7), generator=torch.Generator().manual_seed(0))
        assert torch.equal(served(input_ids=ids).logits, g(input_ids=ids).logits)


def test_export_only_from_a_checkpoint_and_existing_folder_refused(tmp_path, zero3_run):
    base, out = zero3_run
    again = tmp_path / "again"
    run_ranks(3, "launch/train.py", "--export-only", *run_args(base, out), "train.resume=auto", f"export.dir={again}")
    a, b = read_folder(again), read_folder(out / "merged")
    assert a.keys() == b.keys() and all(raw_bytes(a[k]) == raw_bytes(b[k]) for k in a)
    # an existing export folder is refused at configuration time (exit 2, key named)
    proc = subprocess.run(
        [
            sys.executable,
            "launch/train.py",
            "--export-only",
            *run_args(base, out),
            "train.resume=auto",
            f"export.dir={again}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "export.dir" in proc.stderr and "already exists" in proc.stderr


def test_offline_export_from_a_checkpoint_folder_uses_the_runs_dtype(tmp_path, zero3_run):
    """`python -m gpart_ds.export --adapter OUT/checkpoints/step-N`: theta from the checkpoint,
    rounding in the dtype the run trained in (recorded in the checkpoint), byte-identical to
    the run's own merged export."""
    base, out = zero3_run
    ckpt = out / "checkpoints" / "step-000003"
    assert json.loads((ckpt / "state.json").read_text())["dtype"] == "bfloat16"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpart_ds.export",
            "--base",
            str(base),
            "--adapter",
            str(ckpt),
            "--out",
            str(tmp_path / "from_ckpt"),
            "--max-shard-size",
            "100",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = read_folder(tmp_path / "from_ckpt"), read_folder(out / "merged")
    assert a.keys() == b.keys() and all(raw_bytes(a[k]) == raw_bytes(b[k]) for k in a)
    assert json.loads((tmp_path / "from_ckpt" / "gpart_merge.json").read_text())["adapter_kind"] == "checkpoint"
