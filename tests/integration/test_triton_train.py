"""method.kernel=triton through the real trainer: ZeRO-3 (1 CPU rank, gloo), the tiny model,
Triton's interpreter standing in for the GPU (tests/conftest.py sets TRITON_INTERPRET).

The split path runs there (more than 64 tokens per micro-batch): Triton's one-pass
kernels build W0 + delta bit for bit like the eager ones and scatter dL/dW with atomics,
so the run follows the eager run's losses and theta up to the scatter's summation order.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from gpart_ds.export.offline import merge_offline
from tests.export_helpers import raw_bytes, read_folder
from tests.helpers import REPO, theta_of

pytestmark = [pytest.mark.slow]

ARGS = ["--config", "configs/tiny.yaml", "train.max_steps=3", "train.log_every=1", "train.eval_examples=8"]


def _train(*args, env=None):
    full = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(
        [sys.executable, "launch/train.py", *ARGS, *args],
        cwd=REPO,
        env=full,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_assets):
    tmp = tmp_path_factory.mktemp("triton_train")
    procs = {}
    for kernel in ("triton", "eager"):
        extra = ["export.merged=true"] if kernel == "triton" else []
        procs[kernel] = _train(
            f"method.kernel={kernel}", f"output_dir={tmp / kernel}", *extra, env={"TRITON_INTERPRET": "1"}
        )
        assert procs[kernel].returncode == 0, procs[kernel].stdout[-4000:] + procs[kernel].stderr[-4000:]
    return tmp, procs


def _losses(run_dir):
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "step" in r and "loss" in r]


def test_triton_kernels_train_like_the_eager_ones(runs):
    tmp, procs = runs
    assert "kernels=triton" in procs["triton"].stdout + procs["triton"].stderr
    assert "kernels=eager" in procs["eager"].stdout + procs["eager"].stderr
    a, b = _losses(tmp / "triton"), _losses(tmp / "eager")
    assert len(a) == 3 and a[0] == b[0]  # step 1: theta = 0 on both, same forward
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=0)
    ta, tb = theta_of(tmp / "triton"), theta_of(tmp / "eager")
    assert ta.abs().sum() > 0
    torch.testing.assert_close(ta, tb, rtol=1e-4, atol=1e-6)


def test_merged_export_with_triton_kernels_equals_the_offline_eager_merge(runs, tiny_assets, tmp_path):
    tmp, _ = runs
    merge_offline(tiny_assets / "model", tmp / "triton" / "adapter", tmp_path / "offline", kernel="eager")
    m, off = read_folder(tmp / "triton" / "merged"), read_folder(tmp_path / "offline")
    assert m.keys() == off.keys()
    for k in m:
        assert raw_bytes(m[k]) == raw_bytes(off[k]), k


def test_triton_kernel_without_a_gpu_or_the_interpreter_is_a_config_error(tmp_path, tiny_assets):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "launch/train.py", *ARGS, "method.kernel=triton", f"output_dir={tmp_path / 'run'}"],
        cwd=REPO,
        env=dict(env, DS_ACCELERATOR="cpu"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: command-line override 'method.kernel': triton: Triton kernels run on CUDA devices" in proc.stderr
    assert "Traceback" not in proc.stderr
