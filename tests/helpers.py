"""Helpers shared by the tests: start real multi-rank runs, through the deepspeed launcher
where the launcher is part of what a test proves, directly (torchrun's variables) elsewhere."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from gpart_ds.distributed import free_port

REPO = Path(__file__).resolve().parent.parent

# The tiny run every launcher test repeats (deepspeed, sbatch, mpirun): 12 steps is long
# enough for a signal sent after step 2 to land mid-run.
LAUNCH_OVERRIDES = ["train.max_steps=12", "train.log_every=4", "train.eval_examples=8"]
CHOICES_EVAL = "eval_with_choices.jsonl"  # the shared tiny run's eval records, beside its folder


def deepspeed_launcher() -> str:
    exe = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed")
    if exe is None:
        raise RuntimeError("the deepspeed launcher is not installed (pip install deepspeed)")
    return exe


def run_deepspeed(
    n: int, script: str, *args: str, timeout: float = 900, check: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus n script args` on CPU ranks (gloo), from the repo root."""
    cmd = [deepspeed_launcher(), "--num_gpus", str(n), "--master_port", str(free_port()), script, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=rank_env(env), capture_output=True, text=True, timeout=timeout)
    return _checked(proc, " ".join(cmd), check)


def run_ranks(
    n: int, script: str, *args: str, timeout: float = 900, check: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`script args` on n CPU ranks started directly with torchrun's variables
    (experiments/local_ranks.py): the same ranks, collectives and ZeRO-3 as under
    `deepspeed`, without the launcher's ~6 s per run; for tests of the code, not of a launcher."""
    from experiments import local_ranks

    cmd = [sys.executable, "-u", script, *args]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        code = local_ranks.run(n, cmd, cwd=REPO, env=rank_env(env), timeout=timeout, stdout=out, stderr=err)
        out.seek(0)
        err.seek(0)
        proc = subprocess.CompletedProcess(cmd, code, out.read(), err.read())
    return _checked(proc, f"{n} ranks of {' '.join(cmd)}", check)


def rank_env(extra: dict | None = None) -> dict:
    """The environment of every multi-rank test run: CPU ranks (unless DS_ACCELERATOR says
    otherwise), one thread each (two ranks share the 2 cores), unbuffered output."""
    env = dict(
        os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"
    )
    env.update(extra or {})
    return env


def _checked(proc: subprocess.CompletedProcess, what: str, check: bool) -> subprocess.CompletedProcess:
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{what} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def theta_of(run_dir: Path):
    from gpart_ds.methods.gpart.adapter import load_adapter

    return load_adapter(Path(run_dir) / "adapter")[0]


def micro_llama(layers=2, dtype=None, seed=0):
    """A tiny random Llama built in memory (hidden 16, 2 heads, 1 kv head), eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(dtype or torch.float64).eval()


def committed_gpart_sweeps() -> list[dict]:
    """GPart's lr sweeps in the quality reports under docs/ that train.lr: auto is fitted to
    (experiments.lr_fit's reading, sweeps of at least MIN_RATES rates)."""
    import json

    from experiments import lr_fit

    reports = [
        (p, json.loads((REPO / p).read_text()))
        for p in ("docs/quality_rt.json", "docs/quality_qasc.json", "docs/quality_arithmetic.json")
    ]
    return [s for s in lr_fit.sweeps(reports) if len(s["points"]) >= lr_fit.MIN_RATES]
