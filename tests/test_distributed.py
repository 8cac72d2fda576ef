"""Rank discovery from each launcher's environment (no process group is started here)."""

import pytest

from gpart_ds import distributed
from gpart_ds.distributed import LaunchError, discover, parse_first_host, tasks_on_node


class FakeComm:
    """Stands in for mpi4py's COMM_WORLD: rank `rank` of `size`, `local` ranks per node."""

    def __init__(self, rank, size, local, root_value=None):
        self.rank, self.size, self.local = rank, size, local
        self.root_value = root_value  # what rank 0 broadcasts, as seen by the other ranks

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def Split_type(self, kind, key):
        return FakeComm(self.rank % self.local, self.local, self.local)

    def Free(self):
        pass

    def bcast(self, value, root):
        assert root == 0
        return value if self.rank == 0 else self.root_value


def test_torch_style_variables_win_over_everything_else():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_SIZE": "4",
        "MASTER_ADDR": "h0",
        "MASTER_PORT": "1234",
        "SLURM_PROCID": "5",
        "SLURM_STEP_ID": "0",
        "OMPI_COMM_WORLD_SIZE": "2",
    }
    r = discover(env)
    assert (r.rank, r.world, r.local_rank, r.local_world, r.master_addr, r.master_port) == (3, 8, 1, 4, "h0", 1234)


def test_torch_style_world_without_master_is_refused_with_what_to_set():
    with pytest.raises(LaunchError, match="MASTER_ADDR/MASTER_PORT"):
        discover({"RANK": "0", "WORLD_SIZE": "2"})


def test_slurm_step_variables_give_ranks_head_node_and_a_job_derived_port():
    env = {
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "5",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "2",
        "SLURM_STEP_TASKS_PER_NODE": "2(x4)",
        "SLURM_STEP_NODELIST": "gpu[07-10]",
        "SLURM_JOB_ID": "123456",
    }
    r = discover(env)
    assert (r.rank, r.world, r.local_rank, r.local_world) == (5, 8, 1, 2)
    assert r.master_addr == "gpu07" and r.master_port == distributed.slurm_port(env)
    # every rank of the job derives the same port
    assert discover({**env, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}).master_port == r.master_port


def test_the_batch_script_itself_is_not_a_rank():
    """sbatch's batch step has SLURM_PROCID=0 and SLURM_NTASKS=N but no SLURM_STEP_ID."""
    r = discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_NODELIST": "n[1-2]"})
    assert (r.rank, r.world) == (0, 1)


def test_mpi_ranks_and_master_come_from_mpi4py_with_rank0s_address_broadcast():
    env = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2"}
    root = discover(env, mpi_comm=FakeComm(0, 4, 2))
    other = discover(env, mpi_comm=FakeComm(3, 4, 2, root_value=(root.master_addr, root.master_port)))
    assert (root.rank, root.world, root.local_rank, root.local_world) == (0, 4, 0, 2)
    assert (other.rank, other.local_rank) == (3, 1)
    assert (other.master_addr, other.master_port) == (root.master_addr, root.master_port)
    assert root.source == "mpi4py"


def test_mpi_without_mpi4py_uses_launcher_variables_or_says_what_is_missing(monkeypatch):
    monkeypatch.setattr(distributed, "_mpi4py_comm", lambda: None)
    env = {
        "OMPI_COMM_WORLD_SIZE": "2",
        "OMPI_COMM_WORLD_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
    }
    with pytest.raises(LaunchError, match="mpi4py is not installed"):
        discover(env)
    r = discover({**env, "MASTER_ADDR": "h0", "MASTER_PORT": "999"})
    assert (r.rank, r.world, r.local_rank, r.local_world, r.master_addr) == (1, 2, 1, 2, "h0")
    # PMI (MPICH / Intel MPI) names
    r = discover({"PMI_SIZE": "3", "PMI_RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert (r.rank, r.world) == (2, 3)


def test_srun_mpi_pmix_without_mpi4py_falls_back_to_slurm_variables(monkeypatch):
    monkeypatch.setattr(distributed, "_mpi4py_comm", lambda: None)
    env = {
        "PMIX_RANK": "1",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "1",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_NODELIST": "vm",
        "SLURM_JOB_ID": "7",
    }
    r = discover(env)
    assert (r.rank, r.world, r.master_addr, r.source) == (1, 2, "vm", "SLURM step variables")


def test_no_launcher_is_a_world_of_one():
    r = discover({})
    assert (r.rank, r.world, r.local_rank) == (0, 1, 0) and r.master_port > 0


@pytest.mark.parametrize(
    "nodelist, first", [("vm", "vm"), ("gpu[007-009,012],cpu1", "gpu007"), ("a1,b[2-3]", "a1"), ("node[3]", "node3")]
)
def test_first_host_of_a_slurm_node_list(nodelist, first):
    assert parse_first_host(nodelist) == first


def test_tasks_on_node_expands_slurms_compressed_counts():
    assert [tasks_on_node("4(x2),2", i) for i in range(3)] == [4, 4, 2]
    assert tasks_on_node("8", 0) == 8 and tasks_on_node("8", 1) is None


# ---------------------------------------------------------------- a rank's life beside its launcher
_RANK = r"""
import signal, sys, time
from pathlib import Path
from gpart_ds.distributed import Ranks, follow_launcher
flag = Path(sys.argv[1])
# Written beside, then renamed: the test polls for the flag and must never read it half-written.
part = flag.with_suffix(".part")
signal.signal(signal.SIGTERM, lambda *_: (part.write_text("SIGTERM"), part.rename(flag), sys.exit(75)))
follow_launcher(Ranks(0, 2, 0, 2, "127.0.0.1", 1, "torch-style variables"), poll_s=0.2)
print("ready", flush=True)
time.sleep(120)
"""
# A launcher: starts the rank (or, with "nest", a launcher of the rank) and reports pids.
_LAUNCHER = r"""
import subprocess, sys, time
rank = sys.argv[1:]
p = subprocess.Popen([sys.executable, *rank], stdout=sys.stdout)
print(p.pid, flush=True)
time.sleep(120)
"""


def _spawn_chain(tmp_path, levels):
    """runner -> [deepspeed-like launcher ->] rank; returns (top process, pids, flag file)."""
    import subprocess
    import sys

    from tests.helpers import REPO

    flag = tmp_path / "flag"
    rank = ["-c", _RANK, str(flag)]
    cmd = [sys.executable, "-c", _LAUNCHER, *rank]
    if levels == 2:  # the middle process looks like deepspeed's per-node launcher in /proc/PID/cmdline
        cmd = [sys.executable, "-c", _LAUNCHER, "-c", _LAUNCHER + "\n# deepspeed.launcher.launch", *rank]
    top = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, text=True, env={**__import__("os").environ, "PYTHONPATH": str(REPO)}
    )
    pids = [int(top.stdout.readline())]
    if levels == 2:
        pids.append(int(top.stdout.readline()))
    assert top.stdout.readline().strip() == "ready"
    return top, pids, flag


def _wait_for(flag, seconds=30.0):
    import time

    end = time.monotonic() + seconds
    while time.monotonic() < end and not flag.exists():
        time.sleep(0.1)
    return flag.exists()


@pytest.mark.parametrize("levels", [1, 2], ids=["its-launcher-dies", "the-command-above-deepspeeds-launcher-dies"])
def test_a_rank_gets_sigterm_when_its_launcher_dies(tmp_path, levels):
    """SIGTERM to `deepspeed` kills the runner alone (it has no handler); its per-node
    launcher and the ranks would train on as orphans. A rank follows its parent
    (PR_SET_PDEATHSIG) and, under deepspeed's launcher, the launcher's parent: it gets
    SIGTERM, which the trainer turns into a checkpoint and exit 75 (signal-* probes)."""
    import os
    import signal

    top, pids, flag = _spawn_chain(tmp_path, levels)
    try:
        os.kill(top.pid, signal.SIGKILL)
        top.wait()
        assert _wait_for(flag), "the rank kept running after its launcher died"
        assert flag.read_text() == "SIGTERM"
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_single_process_is_left_alone(monkeypatch):
    calls = []
    monkeypatch.setattr("ctypes.CDLL", lambda *a, **k: calls.append(a))
    distributed.follow_launcher(distributed.Ranks(0, 1, 0, 1, "127.0.0.1", 1, "single process"))
    assert calls == []


def _lock(tmp_path, monkeypatch, age_s):
    import os
    import time

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    folder = tmp_path / "ext" / "deepspeed_shm_comm"
    folder.mkdir(parents=True)
    lock = folder / "lock"
    lock.write_text("")
    os.utime(lock, (time.time() - age_s,) * 2)
    return folder, lock


def test_a_stale_build_lock_is_removed_with_a_warning(tmp_path, monkeypatch, caplog):
    """A build killed half-way leaves torch's lock file, on which every later CPU run
    waits forever in deepspeed.init_distributed, silently."""
    import logging

    folder, lock = _lock(tmp_path, monkeypatch, age_s=900)
    with caplog.at_level(logging.WARNING):
        assert distributed.clear_stale_build_lock() is True
    assert not lock.exists() and "removing a stale build lock" in caplog.text and str(lock) in caplog.text


def test_a_build_lock_in_use_is_kept(tmp_path, monkeypatch):
    import subprocess

    folder, lock = _lock(tmp_path, monkeypatch, age_s=10)  # a build that just started
    assert distributed.clear_stale_build_lock() is False and lock.exists()
    folder2, lock2 = folder, lock
    import os
    import time

    os.utime(lock2, (time.time() - 900,) * 2)  # an old lock, but a build works in the folder
    builder = subprocess.Popen(["sleep", "30"], cwd=folder2)
    try:
        assert distributed.clear_stale_build_lock() is False and lock2.exists()
    finally:
        builder.kill()
        builder.wait()


def test_a_lost_peer_is_recognised_in_gloo_and_nccl_words(monkeypatch):
    from gpart_ds import comm

    monkeypatch.setattr(comm, "world", lambda: 2)
    for text in (
        "[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:8595: Connection reset by peer",
        "[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:29584",
        "NCCL communicator was aborted on rank 3",
    ):
        assert comm.peer_lost(RuntimeError(text))
    assert not comm.peer_lost(RuntimeError("CUDA out of memory"))
    monkeypatch.setattr(comm, "world", lambda: 1)
    assert not comm.peer_lost(RuntimeError("Connection reset by peer"))


def test_shutdown_destroys_the_process_group_and_is_a_no_op_without_one(tmp_path):
    """Left to interpreter exit, gloo's worker threads aborted 4 in 30 two-rank processes
    here ("terminate called without an active exception"); Trainer.close destroys the
    groups first (distributed.shutdown). In a child: the test process keeps no group."""
    import subprocess
    import sys

    from tests.helpers import REPO

    code = f"""
import torch.distributed as dist
from gpart_ds import distributed
distributed.shutdown()   # no group yet: nothing to do
dist.init_process_group("gloo", init_method="file://{tmp_path}/store", rank=0, world_size=1)
assert dist.is_initialized()
distributed.shutdown()
print("initialized after shutdown:", dist.is_initialized())
distributed.shutdown()   # twice: still fine
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "initialized after shutdown: False" in proc.stdout


def test_a_rank_that_ran_exits_through_atexit_and_flush_but_skips_the_teardown(tmp_path):
    """exit_process after distributed.init: the exit status, atexit handlers and temporary
    folders as at a normal exit, buffered output flushed, and objects NOT torn down (the
    teardown is where gloo's threads aborted finished runs). A real init, world of one."""
    import subprocess
    import sys

    from tests.helpers import REPO, free_port, rank_env

    code = f"""
import atexit, sys, tempfile, torch, torch.distributed as dist
from gpart_ds import distributed
class Torn:
    def __del__(self):
        print("teardown ran", flush=True)
keep = Torn()
distributed.init()
dist.all_reduce(torch.ones(3))
tmp = tempfile.TemporaryDirectory(dir="{tmp_path}")
atexit.register(lambda: open("{tmp_path}/atexit_ran", "w").close())
sys.stdout.write("unflushed tail")   # no newline, no flush
distributed.exit_process(3)
print("not reached")
"""
    env = rank_env(
        {
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
        }
    )
    env.pop("PYTHONUNBUFFERED")  # the tail reaches the pipe only if the exit path flushes it
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.endswith("unflushed tail"), proc.stdout
    assert "not reached" not in proc.stdout and "teardown ran" not in proc.stdout
    # the atexit handler ran; the temporary folder went with the atexit finalizers
    assert [p.name for p in tmp_path.iterdir()] == ["atexit_ran"]


def test_exit_process_is_a_plain_exit_where_nothing_distributed_ran(monkeypatch):
    monkeypatch.setattr(distributed, "_STARTED", False)
    with pytest.raises(SystemExit) as exc:
        distributed.exit_process(4)
    assert exc.value.code == 4


def test_exit_process_skips_the_teardown_after_a_group_started_without_init(monkeypatch):
    """A process group made by torch or DeepSpeed directly (a test worker) counts too."""
    import atexit

    import torch.distributed as dist

    monkeypatch.setattr(distributed, "_STARTED", False)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(atexit, "_run_exitfuncs", lambda: None)  # not pytest's own handlers
    exits = []
    monkeypatch.setattr(distributed.os, "_exit", exits.append)
    distributed.exit_process(5)
    assert exits == [5]


def test_the_trainer_closes_on_the_ends_every_rank_reaches_together(monkeypatch):
    """Finished, preempted and non-finite ends destroy the process groups; any other error
    leaves them (a peer may still be inside a collective: destroying could hang)."""
    from gpart_ds import trainer as tr

    closed = []
    monkeypatch.setattr(tr.distributed, "shutdown", lambda: closed.append(True))
    t = object.__new__(tr.Trainer)  # no setup: only the context manager is under test
    t._locks = []  # (what __init__ sets first: no folder owned yet)
    for exc, want in (
        (None, 1),
        (tr.Preempted("ckpt"), 1),
        (tr.NonFiniteError("nan"), 1),
        (RuntimeError("peer lost"), 0),
        (tr.UserError("bad"), 0),
    ):
        closed.clear()
        try:
            with t:
                if exc is not None:
                    raise exc
        except Exception as e:
            assert e is exc
        assert len(closed) == want, exc


def test_a_lock_too_young_at_start_up_is_removed_while_the_run_waits_on_it(tmp_path, monkeypatch, caplog):
    """A build killed a minute before this run started: its lock is too young to call stale
    at start-up; the watch during deepspeed.init_distributed removes it once it is old enough
    (here 0.5 s), which ends torch's wait instead of hanging forever."""
    import logging
    import time

    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: False)
    folder, lock = _lock(tmp_path, monkeypatch, age_s=0)
    assert distributed.clear_stale_build_lock(min_age_s=0.5) is False  # the check at start-up
    with caplog.at_level(logging.WARNING), distributed.watch_build_lock(period_s=0.1, min_age_s=0.5):
        deadline = time.time() + 10
        while lock.exists() and time.time() < deadline:  # what torch's FileBaton.wait does
            time.sleep(0.05)
    assert not lock.exists() and "removing a stale build lock" in caplog.text
