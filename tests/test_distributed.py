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
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_SIZE": "4", "MASTER_ADDR": "h0",
           "MASTER_PORT": "1234", "SLURM_PROCID": "5", "SLURM_STEP_ID": "0", "OMPI_COMM_WORLD_SIZE": "2"}
    r = discover(env)
    assert (r.rank, r.world, r.local_rank, r.local_world, r.master_addr, r.master_port) == (3, 8, 1, 4, "h0", 1234)


def test_torch_style_world_without_master_is_refused_with_what_to_set():
    with pytest.raises(LaunchError, match="MASTER_ADDR/MASTER_PORT"):
        discover({"RANK": "0", "WORLD_SIZE": "2"})


def test_slurm_step_variables_give_ranks_head_node_and_a_job_derived_port():
    env = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_NODEID": "2", "SLURM_STEP_TASKS_PER_NODE": "2(x4)", "SLURM_STEP_NODELIST": "gpu[07-10]",
           "SLURM_JOB_ID": "123456"}
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
    env = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    with pytest.raises(LaunchError, match="mpi4py is not installed"):
        discover(env)
    r = discover({**env, "MASTER_ADDR": "h0", "MASTER_PORT": "999"})
    assert (r.rank, r.world, r.local_rank, r.local_world, r.master_addr) == (1, 2, 1, 2, "h0")
    # PMI (MPICH / Intel MPI) names
    r = discover({"PMI_SIZE": "3", "PMI_RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert (r.rank, r.world) == (2, 3)


def test_srun_mpi_pmix_without_mpi4py_falls_back_to_slurm_variables(monkeypatch):
    monkeypatch.setattr(distributed, "_mpi4py_comm", lambda: None)
    env = {"PMIX_RANK": "1", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2",
           "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "vm", "SLURM_JOB_ID": "7"}
    r = discover(env)
    assert (r.rank, r.world, r.master_addr, r.source) == (1, 2, "vm", "SLURM step variables")


def test_no_launcher_is_a_world_of_one():
    r = discover({})
    assert (r.rank, r.world, r.local_rank) == (0, 1, 0) and r.master_port > 0


@pytest.mark.parametrize("nodelist, first", [("vm", "vm"), ("gpu[007-009,012],cpu1", "gpu007"),
                                             ("a1,b[2-3]", "a1"), ("node[3]", "node3")])
def test_first_host_of_a_slurm_node_list(nodelist, first):
    assert parse_first_host(nodelist) == first


def test_tasks_on_node_expands_slurms_compressed_counts():
    assert [tasks_on_node("4(x2),2", i) for i in range(3)] == [4, 4, 2]
    assert tasks_on_node("8", 0) == 8 and tasks_on_node("8", 1) is None
