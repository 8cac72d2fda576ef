"""GPart against LoRA and full fine-tuning on the same run: speed, memory, state, scaling.

    python -m experiments.bench [--config configs/smollm2_rt.yaml] [--methods gpart,lora,full]
                             [--ranks 2] [--steps 6] [--warmup 2] [--out outputs/bench]
                             [--quick] [key.sub=value ...]

One invocation trains every method with the same config (data, order, batch, ranks,
steps; `method.name` is the only change) through the real trainer on real ranks (started
with torchrun's variables, experiments/local_ranks.py), then
reads each run's metrics.jsonl. Reported per method: median step time and tokens/s
after `--warmup` steps, peak memory per rank during training (host RSS on CPU, CUDA max
allocated on GPUs), trainable parameters, model-state bytes per rank (gradients + fp32
master + optimizer moments), checkpoint and adapter bytes; the ratios GPart/LoRA and
GPart/full; GPart on 1 rank against the same ranks (scaling); the planner's per-GPU
projection for Llama-70B on 8, 16 and 64 GPUs; and the one-layer micro-benchmark
(bench/layer.py). Writes report.json, report.md and report.png under --out.

--quick: the tiny model and 1 + 3 steps, to check the pipeline (what the tests run).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from gpart_ds.config import REPO_ROOT
from gpart_ds.fileio import save_figure, write_atomic

# The method under test; every other method in a report is a baseline it is compared with.
SUBJECT, LORA, FULL = "gpart", "lora", "full"


def _label(name: str) -> str:
    """The method's own short label at its default settings ('LoRA r=8')."""
    from gpart_ds import methods, plan

    return methods.create(plan.spec(name)).label if name in methods.names() else name


QUICK = {"config": "configs/tiny.yaml", "steps": 3, "warmup": 1}
# Steps per method without --quick: timed ones, after the warm-up left out of the medians
# (not named FULL: that is the full fine-tuning method's name).
DEFAULT_RUN = {"steps": 6, "warmup": 2}


def run_method(
    config: str, method: str, ranks: int, steps: int, out: Path, overrides: list[str], log_file: Path
) -> Path:
    """Train one method on `ranks` ranks of this machine (launch/train.py started with
    torchrun's variables, experiments/local_ranks.py: the step times are the trainer's,
    without the deepspeed launcher's start-up); returns its output folder."""
    from experiments import local_ranks

    if out.exists():
        shutil.rmtree(out)  # metrics.jsonl appends: start clean
    env = dict(os.environ)
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if not cuda:
        env.setdefault("DS_ACCELERATOR", "cpu")
    cmd = [
        sys.executable,
        "-u",
        str(REPO_ROOT / "launch" / "train.py"),
        "--config",
        config,
        f"method.name={method}",
        f"train.max_steps={steps}",
        f"output_dir={out}",
        "train.log_every=1",
        "checkpoint.keep_last=1",
        *overrides,
    ]
    with open(log_file, "w") as fh:
        fh.write(f"{ranks} rank(s): " + " ".join(cmd) + "\n")
        fh.flush()
        code = local_ranks.run(ranks, cmd, cwd=REPO_ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if code != 0:
        tail = log_file.read_text()[-3000:]
        raise RuntimeError(f"{method} on {ranks} rank(s) failed (exit {code}); log {log_file}:\n{tail}")
    return out


def read_run(out: Path, warmup: int) -> dict:
    """Figures of one run from its metrics.jsonl (rank 0's step records, the summary)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "step_time_s" in r]
    summary = next(r for r in records if r.get("event") == "summary")
    timed = steps[warmup:] or steps
    step_s = statistics.median(r["step_time_s"] for r in timed)
    tokens_per_s = sum(r["tokens"] for r in timed) / sum(r["step_time_s"] for r in timed)
    mem_key = "train_peak_gpu_gb" if "train_peak_gpu_gb" in summary else "train_peak_rss_gb"
    state = summary.get("model_state_bytes") or {}
    return {
        "step_s": step_s,
        "tokens_per_s": tokens_per_s,
        "timed_steps": len(timed),
        "peak_mem_gb": summary[mem_key],
        "memory_kind": "CUDA max allocated" if "gpu" in mem_key else "host peak RSS",
        "trainable_params": summary["trainable_params"],
        "model_state_bytes": state.get("total", 0),
        "model_state": state,
        "checkpoint_bytes": summary.get("checkpoint_bytes", 0),
        "adapter_bytes": summary.get("adapter_bytes", 0),
        "final_loss": summary.get("final_loss"),
        "world": summary["world"],
    }


def ratios(results: dict, num: str, dens=(LORA, FULL)) -> dict:
    out = {}
    keys = ("step_s", "peak_mem_gb", "model_state_bytes", "trainable_params", "checkpoint_bytes")
    for den in dens:
        if num in results and den in results:
            out[f"{num}/{den}"] = {k: (results[num][k] / results[den][k] if results[den][k] else None) for k in keys}
    return out


def projections(config: str = "configs/llama70b.yaml", worlds=(8, 16, 64)) -> dict:
    """The planner's per-GPU bytes for Llama-70B, per method and cluster size."""
    from gpart_ds import plan
    from gpart_ds.config import load_config

    cfg = load_config(REPO_ROOT / config, check_files=False)
    arch, _ = plan.arch_for_config(cfg)
    out = {}
    for method in plan.COMPARED:
        for w in worlds:
            p = plan.plan_for_config(cfg, arch, w, method=method)
            out.setdefault(method, {})[str(w)] = {
                "gpu_gib": p.gpu_total / plan.GIB,
                "host_gib": p.host_total / plan.GIB,
            }
    return {"config": config, "model": arch.name, "params": arch.n_params, "worlds": list(worlds), "per_gpu": out}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    import torch

    info = {
        "host": platform.node(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    return info


def machine_name(info: dict) -> str:
    """What a report calls the machine of `machine()`: its GPU, else its CPU."""
    return info.get("gpu") or info["cpu"]


def _gb(n: float) -> str:
    return f"{n / 2**30:.3f} GB" if n >= 2**26 else f"{n / 2**20:.2f} MB" if n >= 2**16 else f"{n / 1024:.1f} KB"


def format_markdown(rep: dict) -> str:
    res = rep["results"]
    lines = [
        f"# GPart benchmark, {rep['date']}",
        "",
        f"Machine: {machine_name(rep['machine'])}, {rep['machine']['cores']} cores, "
        f"torch {rep['machine']['torch']}, deepspeed {rep['machine'].get('deepspeed', '-')}.  ",
        f"Command: `{rep['command']}`  ",
        f"Config: `{rep['config']}`, {rep['ranks']} ranks, {rep['steps']} steps ({rep['warmup']} warm-up excluded).",
        "",
        "| method | trainable params | step (s, median) | tokens/s | peak mem / rank (GB) | "
        "model state / rank | checkpoint | adapter |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, r in res.items():
        lines.append(
            f"| {_label(m)} | {r['trainable_params']:,} | {r['step_s']:.2f} | "
            f"{r['tokens_per_s']:.0f} | {r['peak_mem_gb']:.2f} | {_gb(r['model_state_bytes'])} | "
            f"{_gb(r['checkpoint_bytes'])} | {_gb(r['adapter_bytes']) if r['adapter_bytes'] else '-'} |"
        )
    if res:
        lines.append(f"\nMemory is {next(iter(res.values()))['memory_kind']} per rank, max over ranks.")
    if rep["ratios"]:
        lines += [
            "",
            "| ratio | step time | peak memory | model state | trainable | checkpoint |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in rep["ratios"].items():
            cells = [
                f"{r[k]:.3g}x" if r[k] is not None else "-"
                for k in ("step_s", "peak_mem_gb", "model_state_bytes", "trainable_params", "checkpoint_bytes")
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if rep.get("targets"):
        lines += ["", "| target | measured | met |", "|---|---|---|"]
        for t in rep["targets"]:
            lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |")
    sc = rep.get("scaling")
    if sc:
        lines += [
            "",
            f"Scaling (GPart): 1 rank {sc['1']['step_s']:.2f} s/step, {sc['1']['peak_mem_gb']:.2f} GB; "
            f"{rep['ranks']} ranks {sc[str(rep['ranks'])]['step_s']:.2f} s/step, "
            f"{sc[str(rep['ranks'])]['peak_mem_gb']:.2f} GB per rank (same micro-batch per rank).",
        ]
    pj = rep.get("projections")
    if pj:
        ws = pj["worlds"]
        lines += [
            "",
            f"Planner projection, {pj['config']} ({pj['params'] / 1e9:.1f}B parameters), GiB per GPU:",
            "",
            "| method | " + " | ".join(f"{w} GPUs" for w in ws) + " |",
            "|---|" + "---|" * len(ws),
        ]
        for m, per in pj["per_gpu"].items():
            lines.append(f"| {_label(m)} | " + " | ".join(f"{per[str(w)]['gpu_gib']:.1f}" for w in ws) + " |")
    lay = rep.get("layer")
    if lay:
        from .layer import format_report

        lines += ["", "One adapted layer (`python -m experiments.bench.layer`):", "", format_report(lay)]
    return "\n".join(lines) + "\n"


def plot(rep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = rep["results"]
    names = [_label(m) for m in res]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    panels = [
        ("step_s", "median step time (s)"),
        ("peak_mem_gb", "peak memory per rank (GB)"),
        ("model_state_bytes", "model state per rank (MB)"),
    ]
    colors = ["#2a7ab0" if m == SUBJECT else "#999999" for m in res]
    for ax, (key, title) in zip(axes, panels):
        vals = [r[key] / 2**20 if key == "model_state_bytes" else r[key] for r in res.values()]
        bars = ax.bar(names, vals, color=colors)
        ax.set_title(title, fontsize=10)
        if key == "model_state_bytes":
            ax.set_yscale("log")
        for b, v in zip(bars, vals):
            ax.annotate(
                f"{v:.3g}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8
            )
    fig.suptitle(
        f"{Path(rep['config']).name}, {rep['ranks']} ranks, {machine_name(rep['machine'])} ({rep['date']})", fontsize=10
    )
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def check_targets(rep: dict) -> list[dict]:
    """The benchmark's targets (docs/performance.md), where the methods they compare were run."""
    r, out = rep["results"], []
    g, lora, full = r.get(SUBJECT), r.get(LORA), r.get(FULL)
    if g and lora:
        q = g["step_s"] / lora["step_s"]
        out.append({"target": "GPart step time <= 1.5x LoRA", "measured": f"{q:.2f}x", "met": q <= 1.5})
        q = g["peak_mem_gb"] / lora["peak_mem_gb"]
        out.append({"target": "GPart peak memory <= 1.15x LoRA", "measured": f"{q:.2f}x", "met": q <= 1.15})
        a, b = g["model_state_bytes"], lora["model_state_bytes"]
        out.append(
            {
                "target": "GPart model state within a few % of LoRA's (or below)",
                "measured": f"{a / b:.2f}x",
                "met": a <= 1.05 * b,
            }
        )
    if g and full:
        q = g["step_s"] / full["step_s"]
        out.append({"target": "GPart step time below full fine-tuning", "measured": f"{q:.2f}x", "met": q < 1.0})
        q = g["model_state_bytes"] / full["model_state_bytes"]
        out.append(
            {"target": "GPart model state < 5% of full fine-tuning", "measured": f"{100 * q:.2f}%", "met": q < 0.05}
        )
    return out


def parse(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m experiments.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", default="configs/smollm2_rt.yaml")
    ap.add_argument("--methods", default="gpart,lora,full")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"timed steps per method (after the warm-up; default {DEFAULT_RUN['steps']})",
    )
    ap.add_argument(
        "--warmup",
        type=int,
        default=None,
        help=f"first steps left out of the medians (default {DEFAULT_RUN['warmup']})",
    )
    ap.add_argument("--no-scaling", action="store_true", help="skip the 1-rank GPart run")
    ap.add_argument("--no-layer", action="store_true", help="skip the one-layer micro-benchmark")
    ap.add_argument(
        "--eval-examples",
        type=int,
        default=4,
        help="eval records before/after each run (kept small: not what is timed; 0: all)",
    )
    ap.add_argument("--out", default="outputs/bench")
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 steps: checks the pipeline")
    ap.add_argument("overrides", nargs="*", help="config overrides for every run, key.sub=value")
    args = ap.parse_args(argv)
    from gpart_ds.config import ConfigError

    if args.quick:
        given = [f for f, v in (("--steps", args.steps), ("--warmup", args.warmup)) if v is not None]
        if given:
            raise ConfigError(
                f"{', '.join(given)}: --quick sets the steps itself ({QUICK['steps']} timed after "
                f"{QUICK['warmup']} warm-up); drop --quick to choose them"
            )
        args.config, args.steps, args.warmup = QUICK["config"], QUICK["steps"], QUICK["warmup"]
    args.steps = DEFAULT_RUN["steps"] if args.steps is None else args.steps
    args.warmup = DEFAULT_RUN["warmup"] if args.warmup is None else args.warmup
    for flag, value, least in (("--ranks", args.ranks, 1), ("--steps", args.steps, 1), ("--warmup", args.warmup, 0)):
        if value < least:
            raise ConfigError(f"{flag}: must be >= {least}, got {value}")
    if args.eval_examples < 0:
        raise ConfigError(f"--eval-examples: must be >= 0 (0: all records), got {args.eval_examples}")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    from gpart_ds.config import ConfigError, load_config

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    from gpart_ds.methods import names as method_names

    METHODS = method_names()
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ConfigError(f"--methods: unknown {bad or repr(args.methods)}; choose from {METHODS}")
    if len(set(methods)) < len(methods):
        raise ConfigError(f"--methods {args.methods}: a method named twice (each is one run)")
    # Fail on a bad config or override, for any of the methods, before any run starts
    # (a ConfigError: `error: ...`, exit 2, through errors.run_cli).
    for m in methods:
        load_config(args.config, [*args.overrides, f"method.name={m}"], check_files=False)
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    total = args.warmup + args.steps
    common = [f"train.eval_examples={args.eval_examples}", *args.overrides]
    results, scaling = {}, {}
    for m in methods:
        print(f"[bench] {m} on {args.ranks} rank(s), {total} steps ...", flush=True)
        run = run_method(
            args.config,
            m,
            args.ranks,
            total,
            out / "runs" / f"{m}-{args.ranks}r",
            common,
            out / "logs" / f"{m}-{args.ranks}r.log",
        )
        results[m] = read_run(run, args.warmup)
        print(f"[bench] {m}: {results[m]['step_s']:.2f} s/step, {results[m]['peak_mem_gb']:.2f} GB", flush=True)
    if SUBJECT in methods and not args.no_scaling and args.ranks > 1:
        print(f"[bench] {SUBJECT} on 1 rank, {total} steps ...", flush=True)
        run = run_method(
            args.config, SUBJECT, 1, total, out / "runs" / f"{SUBJECT}-1r", common, out / "logs" / f"{SUBJECT}-1r.log"
        )
        scaling = {"1": read_run(run, args.warmup), str(args.ranks): results[SUBJECT]}
    cmd = "python -m experiments.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    rep = {
        "date": _dt.date.today().isoformat(),
        "command": cmd.strip(),
        "machine": machine(),
        "config": args.config,
        "ranks": args.ranks,
        "steps": args.steps,
        "warmup": args.warmup,
        "overrides": args.overrides,
        "results": results,
        "ratios": ratios(results, SUBJECT),
        "scaling": scaling,
    }
    rep["targets"] = check_targets(rep)
    try:
        rep["projections"] = projections()
    except Exception as exc:  # the planner needs only configs/; report rather than lose the runs
        rep["projections"] = None
        print(f"[bench] planner projection failed: {exc!r}", flush=True)
    if not args.no_layer:
        from .layer import PRESETS, bench as layer_bench

        shape = dict(PRESETS["smollm2"])
        if args.quick:
            shape.update(tokens=64)
        import torch

        rep["layer"] = layer_bench(
            dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32, repeat=3 if args.quick else 5, **shape
        )
    write_atomic(out / "report.json", json.dumps(rep, indent=2) + "\n")
    md = format_markdown(rep)
    write_atomic(out / "report.md", md)
    plot(rep, out / "report.png")
    print(md, flush=True)
    print(f"[bench] wrote {out / 'report.json'}, {out / 'report.md'}, {out / 'report.png'}", flush=True)
    return rep


def cli(argv=None) -> int:
    """`python -m experiments.bench`: main() with bad input as `error: ...`, exit 2."""
    from gpart_ds.errors import run_cli

    return run_cli(lambda: main(argv))
