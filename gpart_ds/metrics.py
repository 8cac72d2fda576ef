"""What a run reports: peak memory, the metrics sinks, and rank 0's progress line.

Sinks (rank 0 only), each fed the same records:
    <output_dir>/metrics.jsonl     always: one JSON object per line (steps, evals, summary)
    <output_dir>/tensorboard/      TensorBoard event files (log.tensorboard: auto = when the
                                   `tensorboard` package is installed)
    Weights & Biases               log.wandb: true (needs `wandb`; WANDB_MODE=offline or
                                   log.wandb_mode: offline writes a local run folder)
"""

from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Numeric fields of a step record that are plotted (the rest are bookkeeping).
_STEP_SCALARS = ("loss", "lr", "step_time_s", "tokens_per_s", "peak_rss_gb", "peak_gpu_gb")


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


def _scalars(record: dict) -> tuple[str, int, dict[str, float]] | None:
    """(namespace, step, values) to plot for a record, or None."""
    if "step_time_s" in record:
        return "train", record["step"], {k: record[k] for k in _STEP_SCALARS if k in record}
    if record.get("event") == "eval":
        return (
            "eval",
            record["step"],
            {k: v for k, v in record.items() if k not in ("event", "step") and isinstance(v, (int, float))},
        )
    return None


class _TensorBoard:
    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))

    def write(self, record: dict) -> None:
        s = _scalars(record)
        if s:
            ns, step, values = s
            for k, v in values.items():
                self.writer.add_scalar(f"{ns}/{k}", v, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, folder: Path, cfg):
        import wandb
        from omegaconf import OmegaConf

        self.run = wandb.init(
            project=cfg.log.wandb_project,
            dir=str(folder),
            mode=cfg.log.wandb_mode,
            name=folder.name,
            config=OmegaConf.to_container(cfg, resolve=True),
        )

    def write(self, record: dict) -> None:
        s = _scalars(record)
        if s:
            ns, step, values = s
            self.run.log({f"{ns}/{k}": v for k, v in values.items()}, step=step)
        elif record.get("event") == "summary":
            self.run.summary.update({k: v for k, v in record.items() if isinstance(v, (int, float, str))})

    def close(self) -> None:
        self.run.finish()


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401

        return True
    except ImportError:
        return False


class MetricsLog:
    """Appends one JSON object per line (earlier runs in the same file are kept) and feeds
    the optional sinks. `out_dir` None: a rank that writes nothing. `tag`: fields every
    record carries (the replica group of a fault-tolerant run, whose nodes share the file)."""

    def __init__(self, out_dir: Path | None, cfg=None, tag: dict | None = None):
        self.path = None if out_dir is None else Path(out_dir) / "metrics.jsonl"
        self.tag = dict(tag or {})
        self.sinks = []
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", buffering=1)
        if cfg is not None:
            tb = cfg.log.tensorboard
            if tb is True or (tb == "auto" and _tensorboard_available()):
                self.sinks.append(_TensorBoard(self.path.parent / "tensorboard"))
            if cfg.log.wandb:
                self.sinks.append(_WandB(self.path.parent, cfg))
        self.write({"event": "start", "time": time.time()})

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        record = {**record, **self.tag} if self.tag else record
        self._fh.write(json.dumps(record) + "\n")
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        if self.path is None or self._fh.closed:
            return
        self._fh.close()
        for sink in self.sinks:
            sink.close()


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def format_step(rec: dict, max_steps: int, eta_s: float | None = None) -> str:
    mem = rec.get("peak_gpu_gb", rec.get("peak_rss_gb", 0.0))
    eta = f"  ETA {format_duration(eta_s)}" if eta_s is not None else ""
    return (
        f"step {rec['step']}/{max_steps}  loss {rec['loss']:.4f}  lr {rec['lr']:.2e}  "
        f"{rec['step_time_s']:.2f}s/step  {rec['tokens_per_s']:.0f} tok/s  peak {mem:.2f} GB{eta}"
    )


class Progress:
    """Rank 0's progress: a bar on a terminal, and a step line every `log_every` steps
    with the time left at the median step time so far (robust to the slow first step)."""

    def __init__(self, max_steps: int, start: int, desc: str, log_every: int):
        from tqdm import tqdm

        self.max_steps, self.log_every = max_steps, log_every
        self.times: list[float] = []
        # disable=None: no bar when stdout is not a terminal (logs keep the step lines)
        self.bar = tqdm(total=max_steps, initial=start, desc=desc, dynamic_ncols=True, disable=None)

    def eta_s(self, step: int) -> float | None:
        if not self.times:
            return None
        recent = sorted(self.times[-50:])
        return recent[len(recent) // 2] * (self.max_steps - step)

    def update(self, rec: dict) -> None:
        self.times.append(rec["step_time_s"])
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{rec['loss']:.4f}")
        if rec["step"] % self.log_every == 0 or rec["step"] == self.max_steps:
            self.bar.write(format_step(rec, self.max_steps, self.eta_s(rec["step"])))

    def close(self) -> None:
        self.bar.close()


def answer_fell(s: dict) -> str | None:
    """A sentence when the generated answers got worse than the base model's, else None
    (also where the base was not evaluated: train.eval_before=false, its fields null)."""
    before, after = s.get("answer_accuracy_before"), s.get("answer_accuracy_after")
    if before is None or after is None or after >= before:
        return None
    return f"the generated answers' accuracy fell from {100 * before:.1f}% to {100 * after:.1f}%"


def summary_table(s: dict, adapter_dir: Path | None) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    def num(v):
        return "-" if v is None else f"{v:.4f}"

    rows = [
        (
            "generated answer (greedy, as served)",
            pct(s.get("answer_accuracy_before")),
            pct(s.get("answer_accuracy_after")),
        ),
        ("choice accuracy (label words ranked)", pct(s["accuracy_before"]), pct(s["accuracy_after"])),
        ("exact match (teacher-forced)", pct(s.get("exact_match_before")), pct(s.get("exact_match_after"))),
        ("eval loss (completion tokens)", num(s.get("eval_loss_before")), num(s.get("eval_loss_after"))),
    ]
    # A run that trained no step this time (resumed at max_steps, --export-only) has no step time.
    step = f"{s['median_step_time_s']:.2f} s" if s.get("median_step_time_s") else "- (no step this run)"
    lines = ["", "| metric | before | after |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows if (b, c) != ("-", "-")]
    if s.get("eval_loss_before") is None:  # every evaluation has a loss: none means none ran
        lines += ["", "before: not evaluated (train.eval_before=false)"]
    adapter = (
        f"adapter on disk: {s['adapter_bytes'] / 1024:.1f} KiB ({adapter_dir})"
        if adapter_dir
        else "no adapter (full fine-tuning: export.merged writes the model)"
    )
    lines += [
        "",
        f"method: {s['method']}   trainable parameters: {s['trainable_params']:,}   {adapter}",
        f"ranks: {s['world']}   steps: {s['steps']}   lr: {s['lr']:.3g}   median step: {step}   "
        f"wall time (eval + train): {s['wall_s'] / 60:.1f} min   "
        f"peak memory per rank: {s.get('peak_gpu_gb', s['peak_rss_gb']):.2f} GB",
        "",
    ]
    return "\n".join(lines)
