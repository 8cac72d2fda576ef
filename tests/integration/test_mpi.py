"""`mpirun -np 2 python launch/train.py`: ranks and master from mpi4py (Open MPI, CPU)."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.helpers import LAUNCH_OVERRIDES, REPO, theta_of

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def mpirun():
    exe = shutil.which("mpirun")
    if exe is None:
        pytest.skip("mpirun is not installed (apt-get install openmpi-bin libopenmpi-dev)")
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install 'gpart_ds[mpi]')")
    return exe


def test_mpirun_two_ranks_train_the_tiny_config_like_the_deepspeed_launch(mpirun, deepspeed_tiny_run, tmp_path):
    out = tmp_path / "run"
    # Open MPI refuses root without these; --oversubscribe: 2 ranks may exceed the slots
    # it counts; --bind-to none: let the ranks share the cores as the deepspeed launch does.
    env = dict(
        os.environ,
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # discovery must come from MPI, not from the test's environment
    proc = subprocess.run(
        [
            mpirun,
            "-np",
            "2",
            "--oversubscribe",
            "--bind-to",
            "none",
            sys.executable,
            "launch/train.py",
            "--config",
            "configs/tiny.yaml",
            f"output_dir={out}",
            *LAUNCH_OVERRIDES,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "ranks from mpi4py: world 2, 2 on this node" in log
    reference, _ = deepspeed_tiny_run
    torch.testing.assert_close(theta_of(out), theta_of(reference), rtol=0, atol=1e-6)
