"""Run metrics: peak memory, a JSON-lines log, and the rank-0 console line."""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch


def peak_rss_bytes() -> int:
    """This process's peak resident memory.

    VmHWM where /proc has it: ru_maxrss also counts the parent's peak when the process
    was spawned with vfork (Python's subprocess does), so a rank started by a large
    parent would report the parent's memory.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory_gb() -> dict[str, float]:
    """Peak host RSS of this process and, on GPU, peak allocated device memory."""
    out = {"peak_rss_gb": peak_rss_bytes() / 2**30}
    if torch.cuda.is_available():
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


class MetricsLog:
    """Appends one JSON object per line; earlier runs in the same file are kept."""

    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(path, "a", buffering=1)
            self.write({"event": "start", "time": time.time()})

    def write(self, record: dict) -> None:
        if self.path is not None:
            self._fh.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.path is not None:
            self._fh.close()


def format_step(rec: dict, max_steps: int) -> str:
    mem = rec.get("peak_gpu_gb", rec.get("peak_rss_gb", 0.0))
    return (f"step {rec['step']}/{max_steps}  loss {rec['loss']:.4f}  lr {rec['lr']:.2e}  "
            f"{rec['step_time_s']:.2f}s/step  {rec['tokens_per_s']:.0f} tok/s  peak {mem:.2f} GB")
