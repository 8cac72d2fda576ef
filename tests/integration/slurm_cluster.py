"""A throw-away one-node SLURM cluster on localhost, for tests: munged, slurmctld, slurmd.

Everything (munge key and socket, slurm.conf, state, spool, logs) lives in one temporary
folder and the daemons run as root on free ports, so nothing of a system-wide SLURM or
munge installation is touched; `stop()` ends exactly the daemons it started.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from gpart_ds.distributed import free_port

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a daemon that exited but was not reaped yet (a zombie) is gone for our purposes
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))


def missing_binaries() -> list[str]:
    return [
        b
        for b in ("sbatch", "srun", "scontrol", "slurmctld", "slurmd", "munged", "mungekey")
        if shutil.which(b) is None
    ]


def ensure_installed() -> str | None:
    """Install SLURM and munge with apt-get if they are missing; None, or why not."""
    if not missing_binaries():
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return (
            f"SLURM is not installed ({', '.join(missing_binaries())} missing) and this is not a "
            "root Debian/Ubuntu machine where it could be installed (apt-get install slurm-wlm munge)"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            return f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}"
    return None if not missing_binaries() else f"still missing after install: {missing_binaries()}"


class OneNodeSlurm:
    def __init__(self, root: Path, cpus: int | None = None):
        self.root = root
        self.cpus = cpus or os.cpu_count() or 2
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.pids: dict[str, int] = {}

    # ------------------------------------------------------------------ daemons
    def start(self, timeout: float = 60) -> None:
        """Start munged, slurmctld and slurmd; on failure stop what did start, then raise."""
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> None:
        r = self.root
        for sub in ("munge", "state", "spool", "log"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(r, 0o755)
        os.chmod(r / "munge", 0o700)  # munged refuses a key in a folder others can write
        key, sock = r / "munge" / "munge.key", r / "munge" / "munge.sock"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}", "--bits=1024"], check=True, capture_output=True)
        subprocess.run(
            [
                "munged",
                "--force",
                f"--socket={sock}",
                f"--key-file={key}",
                f"--log-file={r / 'log' / 'munged.log'}",
                f"--pid-file={r / 'munged.pid'}",
                f"--seed-file={r / 'munge' / 'seed'}",
            ],
            check=True,
            capture_output=True,
        )
        self._record_pid("munged")
        self.conf.write_text(self._slurm_conf(sock))
        for daemon in ("slurmctld", "slurmd"):
            proc = subprocess.run([daemon, "-f", str(self.conf)], env=self.env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{daemon} did not start: {proc.stderr}\n{self.logs()}")
            self._record_pid(daemon)
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = self._run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            if out in ("idle", "mixed", "allocated"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the SLURM node did not become idle (state {out!r})\n{self.logs()}")

    def _record_pid(self, daemon: str, timeout: float = 30) -> None:
        """The daemons fork into the background and write their pid file a moment later."""
        pid_file = self.root / f"{daemon}.pid"
        deadline = time.time() + timeout
        while time.time() < deadline:
            text = pid_file.read_text().strip() if pid_file.exists() else ""
            if text.isdigit():
                self.pids[daemon] = int(text)
                return
            time.sleep(0.1)
        raise RuntimeError(f"{daemon} wrote no pid file {pid_file}\n{self.logs()}")

    def _slurm_conf(self, munge_socket: Path) -> str:
        r = self.root
        # proctrack/pgid and task/none: no cgroups needed (containers, CI machines).
        return f"""ClusterName=gpartci
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={r / "state"}
SlurmdSpoolDir={r / "spool"}
SlurmctldPidFile={r / "slurmctld.pid"}
SlurmdPidFile={r / "slurmd.pid"}
SlurmctldLogFile={r / "log" / "slurmctld.log"}
SlurmdLogFile={r / "log" / "slurmd.log"}
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
MinJobAge=600
SlurmdParameters=config_overrides
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

    def stop(self) -> None:
        """End the daemons this cluster started (by pid), SIGKILL after 10 s."""
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.pids.pop(name, None)
            if pid is None:
                continue
            for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break
                deadline = time.time() + wait
                while time.time() < deadline and _alive(pid):
                    time.sleep(0.1)
                if not _alive(pid):
                    break

    def logs(self) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*.log")):
            out.append(f"--- {f.name}\n{f.read_text()[-3000:]}")
        return "\n".join(out)

    # ------------------------------------------------------------------ jobs
    def _run(self, *cmd: str, check: bool = True, env: dict | None = None, cwd=None):
        proc = subprocess.run(
            cmd, env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=120, cwd=cwd
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr}")
        return proc

    def sbatch(self, *args: str, env: dict | None = None, cwd=None) -> int:
        return int(self._run("sbatch", "--parsable", *args, env=env, cwd=cwd).stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, Reason, ...)."""
        out = self._run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(
        self,
        job_id: int,
        states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"),
        timeout: float = 600,
        until=None,
    ) -> dict[str, str]:
        """Poll until the job is in one of `states` (or `until(job)` holds); returns the job."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.job(job_id)
            if until(job) if until else job.get("JobState") in states:
                return job
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.job(job_id)} after {timeout} s\n{self.logs()}")
