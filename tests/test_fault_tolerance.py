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
    assert sim_nodes.main(["--ft", "--config", "tiny", "--kill-node", "1", "--kill-at", "-1", "output_dir=/tmp/x"]) == 2
    assert sim_nodes.main(["--ft", "--config", "tiny", "--restart-at", "3", "output_dir=/tmp/x"]) == 2
    err = capsys.readouterr().err
    assert "need --ft" in err and "a node must survive" in err and "--kill-node must be in 0..1" in err
    assert "--kill-at must be >= 0, got -1" in err and "--restart-at needs --kill-node" in err


def _procs_naming(text: str) -> list[int]:
    """Processes whose command line or open files name `text` (the ranks and agents by their
    output_dir override, the lighthouse by its log file)."""
    import os
    from pathlib import Path

    found = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if text in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace") or any(
                text in os.readlink(fd) for fd in (d / "fd").iterdir()
            ):
                found.append(int(d.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--ft"], []], ids=["ft", "one-world"])
def test_a_stop_signal_to_the_launcher_ends_every_node_it_started(tmp_path, tiny_assets, flags):
    """SIGTERM to launch/sim_nodes.py (kill, timeout, a scheduler) ends the agents, the ranks
    and the lighthouse too: a --ft node's ranks run in sessions of their own and trained on,
    orphaned, when only the launcher died."""
    import os
    import signal
    import subprocess
    import time

    from tests.helpers import rank_env

    out = tmp_path / "run"
    cmd = [sys.executable, "launch/sim_nodes.py", *flags, "--nodes", "2", "--per-node", "1"]
    proc = subprocess.Popen(
        [*cmd, "--config", "configs/tiny.yaml", f"output_dir={out}", "train.max_steps=100000"],
        cwd=REPO,
        env=rank_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    ranks = f"launch/train.py --config configs/tiny.yaml output_dir={out}"
    try:
        deadline = time.time() + 120
        while len([p for p in _procs_naming(ranks) if p != proc.pid]) < 4:  # 2 agents, 2 ranks
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        log = proc.communicate(timeout=60)[0]
        assert proc.returncode == 130 and "error: interrupted" in log, log[-3000:]
        time.sleep(1)
        assert _procs_naming(str(out)) == [], log[-3000:]
    finally:  # whatever failed, nothing of this test trains on
        proc.kill()
        for pid in _procs_naming(str(out)):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
