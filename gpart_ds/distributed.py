"""Process-group set-up: rank discovery, backend choice, a long init timeout."""
from __future__ import annotations

import datetime
import os
import socket

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def discover_env() -> None:
    """Make RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* exist.

    The deepspeed launcher and torchrun set them; a bare `python launch/train.py` is a
    world of one.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_RANK", "0")
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def backend_for(name: str) -> str:
    if name != "auto":
        return name
    return "nccl" if torch.cuda.is_available() else "gloo"


def local_world_size() -> int:
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 1


def share_cpu_threads() -> None:
    """CPU ranks on one node split its cores instead of each taking all of them.

    Without this, N ranks x all-cores threads oversubscribe the machine and every GEMM
    slows down; torchrun does the same. An explicit OMP_NUM_THREADS wins.
    """
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size()))


def init(backend: str = "auto", timeout_minutes: float = 60.0) -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed; returns (rank, local_rank, world)."""
    import deepspeed

    discover_env()
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    else:
        share_cpu_threads()
    deepspeed.init_distributed(dist_backend=backend_for(backend), auto_mpi_discovery=False,
                               timeout=datetime.timedelta(minutes=timeout_minutes))
    return int(os.environ["RANK"]), local_rank, int(os.environ["WORLD_SIZE"])


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
