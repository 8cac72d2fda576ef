import pytest


@pytest.fixture(scope="session")
def tiny_assets():
    """The tiny model and data (created once, atomically, by the asset recipe)."""
    from gpart_ds import assets

    return assets.ensure("tiny")


@pytest.fixture(scope="session")
def deepspeed_tiny_run(tmp_path_factory, tiny_assets):
    """`deepspeed --num_gpus 2 launch/train.py` on the tiny config: the reference the other
    launchers (sbatch, mpirun) must reproduce. Returns (output_dir, completed process)."""
    from tests.helpers import LAUNCH_OVERRIDES, run_deepspeed

    out = tmp_path_factory.mktemp("deepspeed_tiny") / "run"
    proc = run_deepspeed(2, "launch/train.py", "--config", "configs/tiny.yaml", f"output_dir={out}",
                         *LAUNCH_OVERRIDES)
    return out, proc
