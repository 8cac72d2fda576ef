"""dist.fault_tolerance (gpart_ds/ft.py): what is refused before anything starts. The run
itself (3 simulated nodes, one killed and restarted): tests/integration/test_fault_tolerance.py."""

import sys

import pytest

from gpart_ds import ft
from gpart_ds.config import ConfigError, load_config
from tests.helpers import REPO

sys.path.insert(0, str(REPO / "launch"))
import sim_nodes  # noqa: E402


def _load(*overrides):
    return load_config("configs/tiny.yaml", ["output_dir=/tmp/ft-unused", *overrides], check_files=False)


def test_the_default_is_none_and_nodes_is_accepted():
    assert _load().dist.fault_tolerance == "none"
    cfg = _load("dist.fault_tolerance=nodes")
    assert cfg.dist.fault_tolerance == "nodes" and cfg.dist.ft_max_retries == 3


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["dist.fault_tolerance=node"], "dist.fault_tolerance"),
        (["dist.fault_tolerance=nodes", "dist.ft_max_retries=-1"], "dist.ft_max_retries"),
        (["dist.fault_tolerance=nodes", "method.name=full"], "dist.fault_tolerance"),
        (["dist.fault_tolerance=nodes", "dist.frozen_partition=global"], "dist.frozen_partition"),
        (["dist.fault_tolerance=nodes", "dist.frozen_partition_size=1"], "dist.frozen_partition"),
        (["dist.fault_tolerance=nodes", "train.grad_accum=2"], "train.grad_accum"),
        (["dist.fault_tolerance=nodes", "dist.backend=mpi"], "dist.backend"),
        (["dist.fault_tolerance=nodes", "overwrite_output_dir=true"], "overwrite_output_dir"),
        (["dist.fault_tolerance=nodes", "train.resume=/some/checkpoint"], "train.resume"),
    ],
)
def test_settings_it_cannot_run_with_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _load(*overrides)


def test_lora_and_an_explicit_auto_resume_are_fine():
    _load("dist.fault_tolerance=nodes", "method.name=lora", "train.resume=auto")


def test_the_replica_and_the_lighthouse_come_from_the_launcher():
    lh = {ft.LIGHTHOUSE_ENV: "http://h:1"}
    assert ft.place({ft.REPLICA_ENV: "1", ft.REPLICAS_ENV: "3", **lh}) == ft.ReplicaPlace(1, 3, "http://h:1")
    assert ft.place({"SLURM_NODEID": "2", "SLURM_JOB_NUM_NODES": "4", **lh}) == ft.ReplicaPlace(2, 4, "http://h:1")
    with pytest.raises(ft.FaultToleranceError, match=ft.REPLICA_ENV):
        ft.place(lh)
    with pytest.raises(ft.FaultToleranceError, match="outside"):
        ft.place({ft.REPLICA_ENV: "3", ft.REPLICAS_ENV: "3", **lh})
    with pytest.raises(ft.FaultToleranceError, match="not an integer"):
        ft.place({ft.REPLICA_ENV: "a", ft.REPLICAS_ENV: "3", **lh})
    with pytest.raises(ft.FaultToleranceError, match=ft.LIGHTHOUSE_ENV):
        ft.place({ft.REPLICA_ENV: "0", ft.REPLICAS_ENV: "1"})


def test_sim_nodes_refuses_a_kill_without_ft_or_a_survivor(capsys):
    assert sim_nodes.main(["--config", "tiny", "--kill-node", "1", "output_dir=/tmp/x"]) == 2
    assert sim_nodes.main(["--ft", "--nodes", "1", "--config", "tiny", "--kill-node", "0", "output_dir=/tmp/x"]) == 2
    assert sim_nodes.main(["--ft", "--nodes", "2", "--config", "tiny", "--kill-node", "2", "output_dir=/tmp/x"]) == 2
    err = capsys.readouterr().err
    assert "need --ft" in err and "a node must survive" in err and "--kill-node must be in 0..1" in err
