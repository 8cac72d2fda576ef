"""slurm/gpart.sh on a real (one-node, localhost) SLURM cluster, 2 CPU tasks, tiny config.

The cluster is started here (munged, slurmctld, slurmd in a temporary folder; SLURM and
munge are apt-installed first when missing). Skipped only where that is impossible: not
root and SLURM not installed.
"""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import LAUNCH_OVERRIDES, REPO, theta_of
from tests.integration.slurm_cluster import OneNodeSlurm, ensure_installed

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why_not = ensure_installed()
    if why_not:
        pytest.skip(why_not)
    cluster = OneNodeSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def submit(slurm, tmp_path, name, *overrides):
    """sbatch slurm/gpart.sh configs/tiny.yaml on 2 CPU tasks; returns (job id, output_dir)."""
    out = tmp_path / "run"
    env = {"GPART_DEVICE": "cpu", "GPART_PYTHON": sys.executable, "GPART_LOG_DIR": str(tmp_path / "logs"),
           "OMP_NUM_THREADS": "1"}
    job = slurm.sbatch(f"--job-name={name}", "--nodes=1", "--ntasks-per-node=2", "--time=15",
                       f"--output={tmp_path}/slurm-%j.out", "slurm/gpart.sh", "configs/tiny.yaml",
                       f"output_dir={out}", *LAUNCH_OVERRIDES, *overrides, env=env, cwd=REPO)
    return job, out


def _events(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _explain(slurm, tmp_path, job):
    logs = [f"--- {p.relative_to(tmp_path)}\n{p.read_text()[-3000:]}"
            for p in sorted(tmp_path.rglob("*.log")) + sorted(tmp_path.glob("slurm-*.out"))]
    return f"job {job}: {slurm.job(job)}\n" + "\n".join(logs)


def test_sbatch_job_completes_and_equals_the_deepspeed_launch(slurm, deepspeed_tiny_run, tmp_path):
    t0 = time.time()
    job, out = submit(slurm, tmp_path, "gpart-straight")
    info = slurm.wait(job, timeout=600)
    print(f"sbatch job {job}: {info['JobState']} in {time.time() - t0:.0f} s")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", _explain(slurm, tmp_path, job)
    reference, _ = deepspeed_tiny_run
    torch.testing.assert_close(theta_of(out), theta_of(reference), rtol=0, atol=1e-6)
    # per-job log folder: the script's own lines, the preflight, one file per rank
    logs = tmp_path / "logs" / f"gpart-straight-{job}"
    assert {p.name for p in logs.iterdir()} == {"job.log", "preflight.log", "rank-0.log", "rank-1.log"}
    assert "preflight ok" in (logs / "preflight.log").read_text()
    assert "ranks from torch-style variables: world 2" in (logs / "rank-0.log").read_text()
    assert "ranks finished with exit status 0" in (logs / "job.log").read_text()


def test_usr1_mid_run_checkpoints_and_the_requeued_job_resumes_to_the_same_theta(
        slurm, deepspeed_tiny_run, tmp_path):
    job, out = submit(slurm, tmp_path, "gpart-usr1")
    deadline = time.time() + 600
    while not ((out / "metrics.jsonl").exists() and any(e.get("step", 0) >= 2 and "loss" in e
                                                         for e in _events(out))):
        assert slurm.job(job)["JobState"] in ("PENDING", "RUNNING"), _explain(slurm, tmp_path, job)
        assert time.time() < deadline, _explain(slurm, tmp_path, job)
        time.sleep(0.2)
    # What --signal=USR1@120 does before a time limit: USR1 to every task of the job's steps.
    subprocess.run(["scancel", "--signal=USR1", str(job)], env=slurm.env, check=True)
    requeued = slurm.wait(job, timeout=300, until=lambda j: (j["JobState"], j.get("Restarts")) == ("PENDING", "1")
                          or j["JobState"] in ("FAILED", "COMPLETED"))
    assert requeued["JobState"] == "PENDING", _explain(slurm, tmp_path, job)
    # slurmctld holds a requeued batch job for ~2 minutes (Reason=BeginTime); skip the wait
    # (it has to be pending again for the update to apply).
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm.env, check=True)
    info = slurm.wait(job, timeout=600)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", _explain(slurm, tmp_path, job)

    events = _events(out)
    stop = [e for e in events if e.get("event") == "preempted"]
    resume = [e for e in events if e.get("event") == "resume"]
    assert len(stop) == 1 and 2 <= stop[0]["step"] < 12, events
    assert len(resume) == 1 and resume[0]["step"] == stop[0]["step"]
    job_log = (tmp_path / "logs" / f"gpart-usr1-{job}" / "job.log").read_text()
    assert "preempted" in job_log and "restart 1]" in job_log
    reference, _ = deepspeed_tiny_run
    torch.testing.assert_close(theta_of(out), theta_of(reference), rtol=0, atol=1e-6)


def test_srun_mpi_pmix_ranks_agree_on_the_master_through_mpi4py(slurm, tmp_path):
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install 'gpart_ds[mpi]')")
    plugins = subprocess.run(["srun", "--mpi=list"], env=slurm.env, capture_output=True, text=True)
    if "pmix" not in plugins.stdout + plugins.stderr:
        pytest.skip("this SLURM has no pmix plugin")
    code = ("from gpart_ds.distributed import discover; r = discover(); "
            "print('RANKS', r.rank, r.world, r.master_addr, r.master_port, r.source, flush=True)")
    proc = subprocess.run(["srun", "--mpi=pmix", "-n", "2", "--time=5", sys.executable, "-c", code],
                          env={**slurm.env, "PYTHONPATH": str(REPO)}, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = sorted(line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("RANKS"))
    assert [line[:2] for line in lines] == [["0", "2"], ["1", "2"]]
    assert lines[0][2:] == lines[1][2:] and lines[0][4] == "mpi4py"
