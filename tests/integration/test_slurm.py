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
from pathlib import Path

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
    # 4 CPUs declared on a 2-core machine so that two 2-task jobs run side by side.
    cluster = OneNodeSlurm(tmp_path_factory.mktemp("slurm"), cpus=max(4, os.cpu_count() or 1))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def submit(slurm, tmp_path, name, *overrides):
    """sbatch slurm/gpart.sh configs/tiny.yaml on 2 CPU tasks; returns (job id, output_dir)."""
    out = tmp_path / "run"
    env = {
        "GPART_DEVICE": "cpu",
        "GPART_PYTHON": sys.executable,
        "GPART_LOG_DIR": str(tmp_path / "logs"),
        "OMP_NUM_THREADS": "1",
    }
    job = slurm.sbatch(
        f"--job-name={name}",
        "--nodes=1",
        "--ntasks-per-node=2",
        "--time=15",
        f"--output={tmp_path}/slurm-%j.out",
        "slurm/gpart.sh",
        "configs/tiny.yaml",
        f"output_dir={out}",
        *LAUNCH_OVERRIDES,
        *overrides,
        env=env,
        cwd=REPO,
    )
    return job, out


def _events(out):
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _explain(slurm, tmp_path, job):
    logs = [
        f"--- {p.relative_to(tmp_path)}\n{p.read_text()[-3000:]}"
        for p in sorted(tmp_path.rglob("*.log")) + sorted(tmp_path.glob("slurm-*.out"))
    ]
    return f"job {job}: {slurm.job(job)}\n" + "\n".join(logs)


TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


@pytest.fixture(scope="module")
def jobs(slurm, tmp_path_factory, tiny_assets):
    """Two sbatch jobs of the tiny config, run side by side (CI time): "straight" runs
    through; "usr1" gets SIGUSR1 (what --signal=USR1@120 sends before a time limit; here
    to the batch shell as well as the ranks) once
    it has logged step 2, and its requeued run is started at once (slurmctld otherwise
    holds a requeued job ~2 minutes, Reason=BeginTime)."""
    runs = {}
    for name in ("straight", "usr1"):
        tmp = tmp_path_factory.mktemp(name)
        job, out = submit(slurm, tmp, f"gpart-{name}")
        runs[name] = {"job": job, "out": out, "tmp": tmp, "t0": time.time()}
    a, b = runs["straight"], runs["usr1"]
    signalled = released = False
    deadline = time.time() + 900
    while time.time() < deadline:
        for r in runs.values():
            r["info"] = slurm.job(r["job"])
            if "seconds" not in r and r["info"]["JobState"] in TERMINAL:
                r["seconds"] = time.time() - r["t0"]
        state = b["info"]["JobState"]
        if (
            not signalled
            and state == "RUNNING"
            and any(e.get("step", 0) >= 2 and "loss" in e for e in _events(b["out"]))
        ):
            # --full: the batch shell gets it too, as when a preemption signals the whole job;
            # the script must survive it to requeue on the ranks' 75
            subprocess.run(["scancel", "--full", "--signal=USR1", str(b["job"])], env=slurm.env, check=True)
            signalled = True
        if signalled and not released and (state, b["info"].get("Restarts")) == ("PENDING", "1"):
            subprocess.run(["scontrol", "update", f"JobId={b['job']}", "StartTime=now"], env=slurm.env, check=True)
            released = True
        b_done = state in TERMINAL and (released or not signalled or state != "COMPLETED")
        if a["info"]["JobState"] in TERMINAL and b_done:
            break
        time.sleep(0.2)
    b["signalled"], b["released"] = signalled, released
    return runs


def test_sbatch_job_completes_and_equals_the_deepspeed_launch(slurm, jobs, deepspeed_tiny_run):
    r = jobs["straight"]
    job, out, info = r["job"], r["out"], r["info"]
    print(f"\nsbatch job {job}: {info['JobState']} in {r.get('seconds', float('nan')):.0f} s")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", _explain(slurm, r["tmp"], job)
    reference, _ = deepspeed_tiny_run
    torch.testing.assert_close(theta_of(out), theta_of(reference), rtol=0, atol=1e-6)
    # per-job log folder: the script's own lines, the preflight, one file per rank
    logs = r["tmp"] / "logs" / f"gpart-straight-{job}"
    assert {p.name for p in logs.iterdir()} == {"job.log", "preflight.log", "rank-0.log", "rank-1.log"}
    assert "preflight ok" in (logs / "preflight.log").read_text()
    assert "ranks from torch-style variables: world 2" in (logs / "rank-0.log").read_text()
    assert "ranks finished with exit status 0" in (logs / "job.log").read_text()


def test_usr1_mid_run_checkpoints_and_the_requeued_job_resumes_to_the_same_theta(slurm, jobs, deepspeed_tiny_run):
    r = jobs["usr1"]
    job, out, info = r["job"], r["out"], r["info"]
    print(f"\npreempted + requeued sbatch job {job}: {info['JobState']} in {r.get('seconds', float('nan')):.0f} s")
    assert r["signalled"], "the job ended before it logged step 2\n" + _explain(slurm, r["tmp"], job)
    assert r["released"], "the job was not requeued after SIGUSR1\n" + _explain(slurm, r["tmp"], job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", _explain(slurm, r["tmp"], job)
    assert info["Restarts"] == "1"
    events = _events(out)
    stop = [e for e in events if e.get("event") == "preempted"]
    resume = [e for e in events if e.get("event") == "resume"]
    assert len(stop) == 1 and 2 <= stop[0]["step"] < 12, events
    assert len(resume) == 1 and resume[0]["step"] == stop[0]["step"]
    job_log = (r["tmp"] / "logs" / f"gpart-usr1-{job}" / "job.log").read_text()
    assert "preempted" in job_log and "restart 1]" in job_log
    reference, _ = deepspeed_tiny_run
    torch.testing.assert_close(theta_of(out), theta_of(reference), rtol=0, atol=1e-6)


def test_srun_mpi_pmix_ranks_agree_on_the_master_through_mpi4py(slurm, tmp_path):
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install 'gpart_ds[mpi]')")
    plugins = subprocess.run(["srun", "--mpi=list"], env=slurm.env, capture_output=True, text=True)
    if "pmix" not in plugins.stdout + plugins.stderr:
        pytest.skip("this SLURM has no pmix plugin")
    code = (
        "from gpart_ds.distributed import discover; r = discover(); "
        "print('RANKS', r.rank, r.world, r.master_addr, r.master_port, r.source, flush=True)"
    )
    proc = subprocess.run(
        ["srun", "--mpi=pmix", "-n", "2", "--time=5", sys.executable, "-c", code],
        env={**slurm.env, "PYTHONPATH": str(REPO)},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = sorted(line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("RANKS"))
    assert [line[:2] for line in lines] == [["0", "2"], ["1", "2"]]
    assert lines[0][2:] == lines[1][2:] and lines[0][4] == "mpi4py"


def test_fault_tolerant_job_restarts_a_failed_node_step_and_completes(slurm, tmp_path, tiny_assets):
    """GPART_FT=1 (dist.fault_tolerance=nodes): the lighthouse on the first node, one srun step
    per node; kill -9 of the node's ranks mid-run and the script starts the step again, which
    resumes (alone here: from the last checkpoint; beside live nodes it would heal from them)
    and finishes; the job completes with exit 0. One node only on this cluster: the
    kill-a-node-the-others-train-on case runs on simulated nodes (test_fault_tolerance.py)."""
    import signal

    job, out = submit(
        slurm, tmp_path, "gpart-ft", "train.max_steps=40", "checkpoint.every_steps=4", "dist.fault_tolerance=nodes"
    )
    killed, deadline = [], time.time() + 900
    while time.time() < deadline:
        info = slurm.job(job)
        if info["JobState"] in TERMINAL:
            break
        if not killed and any(e.get("step", 0) >= 6 and "loss" in e for e in _events(out)):
            for proc in Path("/proc").glob("[0-9]*/cmdline"):
                try:
                    cmd = proc.read_bytes().split(b"\0")
                except OSError:
                    continue
                if b"launch/train.py" in cmd and f"output_dir={out}".encode() in cmd:
                    killed.append(int(proc.parent.name))
                    os.kill(killed[-1], signal.SIGKILL)
        time.sleep(0.2)
    assert killed, "the job ended before it logged step 6\n" + _explain(slurm, tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", _explain(slurm, tmp_path, job)
    logs = tmp_path / "logs" / f"gpart-ft-{job}"
    job_log = (logs / "job.log").read_text()
    assert "node 0 (" in job_log and "starting it again (1/3)" in job_log and "exit status 0" in job_log
    assert (logs / "lighthouse.log").exists()
    events = _events(out)
    assert [e["step"] for e in events if e.get("event") == "resume"] and events[-1]["event"] == "summary"
    assert (out / "adapter").is_dir()
