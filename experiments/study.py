"""The quality study: every method on every task, the method as the only variable.

    python -m experiments.study --config configs/study_smollm2.yaml [--quick] [--out DIR]
                             [--steps N] [--eval-examples N] [--seeds 0,1]
                             [--tasks a,b] [--methods a,b]

For each task (a run config plus overrides) x method (GPart at several d, LoRA, VeRA,
full fine-tuning) x seed, one real training run through the launcher and trainer, with
the same steps, data order (train.seed), evaluation records and schedule. GPart's learning
rate is set from D/d (lr = gpart_lr_per_sqrt * sqrt(D/d), see method.md: the per-step
movement of a weight is about lr * s_j); the others use the lr their entry names.
Writes study.json, study.md (table: metric before/after, held-out loss, trainable
parameters, adapter bytes, wall time) and study.png (metric vs trainable parameters;
loss curves) under the output folder. Runs already complete there (their metrics.jsonl
has a summary for the same settings) are reused, so an interrupted study continues.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from gpart_ds.config import ConfigError, load_config, resolve_config_path

METRICS = ("accuracy", "exact_match", "eval_loss")


def load_study(path: str) -> dict:
    p = resolve_config_path(path)
    try:
        cfg = OmegaConf.to_container(OmegaConf.load(p), resolve=True)
    except Exception as exc:
        raise ConfigError(f"{p}: not a valid study config: {exc}") from None
    for key in ("tasks", "methods", "steps", "ranks", "seeds", "eval_examples"):
        if key not in cfg:
            raise ConfigError(f"{p}: required key {key!r} missing")
    for name, t in cfg["tasks"].items():
        if t.get("metric") not in METRICS:
            raise ConfigError(f"{p}: tasks.{name}.metric must be one of {METRICS}, got {t.get('metric')!r}")
        if "config" not in t:
            raise ConfigError(f"{p}: tasks.{name}.config (a run config) is required")
    from gpart_ds import methods

    for name, m in cfg["methods"].items():
        if not isinstance(m, dict) or m.get("name") not in methods.names():
            raise ConfigError(f"{p}: methods.{name}.name must be one of {methods.names()}")
    cfg["_path"] = str(p)
    return cfg


def target_count(run_cfg) -> int:
    from gpart_ds.model import check_targets

    return check_targets(run_cfg).D


def run_overrides(study: dict, task: dict, method: dict, seed: int, D: int) -> list[str]:
    """The run's overrides: the study's budget, the method entry's method.* keys, its lr
    (default auto: the method's calibrated rate at this D) and the seed (data order, and
    the method's own seed where it has one: GPart's partition, VeRA's projections)."""
    from gpart_ds import methods

    m = dict(method)
    lr = m.pop("lr", "auto")
    if lr == "auto":
        lr = methods.get(m["name"]).auto_lr(_Method(m), D)
    out = [f"train.max_steps={study['steps']}", f"train.seed={seed}", f"method.seed={seed}",
           f"train.eval_examples={study['eval_examples']}", "train.log_every=1", "checkpoint.keep_last=1"]
    out += [f"method.{k}={v}" for k, v in m.items()]
    out.append(f"train.lr={float(lr):.6g}")
    return list(task.get("overrides", [])) + out


class _Method(dict):
    """A study method entry read as a method config (attribute access, defaults)."""

    def __getattr__(self, key):
        from gpart_ds.config import MethodConfig

        return self[key] if key in self else getattr(MethodConfig(), key)


def _key(config: str, overrides: list[str], ranks: int) -> str:
    return hashlib.sha256(json.dumps([config, overrides, ranks]).encode()).hexdigest()[:16]


def read_run(out: Path) -> dict | None:
    f = out / "metrics.jsonl"
    if not f.is_file():
        return None
    recs = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    summary = next((r for r in recs if r.get("event") == "summary"), None)
    if summary is None:
        return None
    return {"summary": summary, "losses": [r["loss"] for r in recs if "step_time_s" in r]}


def run_one(config: Path, overrides: list[str], ranks: int, out: Path, log: Path) -> dict:
    from .bench.compare import run_method

    key = _key(str(config), overrides, ranks)
    stamp = out / "study_key"
    if stamp.is_file() and stamp.read_text().strip() == key and (done := read_run(out)):
        return done
    method = next(o.split("=", 1)[1] for o in overrides if o.startswith("method.name="))
    rest = [o for o in overrides if not o.startswith(("method.name=", "train.max_steps="))]
    steps = int(next(o.split("=", 1)[1] for o in overrides if o.startswith("train.max_steps=")))
    run_method(str(config), method, ranks, steps, out, rest, log)
    stamp.write_text(key + "\n")
    return read_run(out)


def summarize(rows: list[dict]) -> list[dict]:
    """Mean (and spread) over seeds per task x method."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["method"]), []).append(r)
    out = []
    for (task, method), rs in groups.items():
        def mean(k):
            vals = [r[k] for r in rs if r.get(k) is not None]
            return statistics.mean(vals) if vals else None

        def sd(k):
            vals = [r[k] for r in rs if r.get(k) is not None]
            return statistics.stdev(vals) if len(vals) > 1 else None

        out.append({"task": task, "method": method, "seeds": len(rs), "metric": rs[0]["metric"],
                    "before": mean("before"), "after": mean("after"), "after_sd": sd("after"),
                    "eval_loss_before": mean("eval_loss_before"), "eval_loss_after": mean("eval_loss_after"),
                    "trainable_params": rs[0]["trainable_params"], "adapter_bytes": rs[0]["adapter_bytes"],
                    "lr": rs[0]["lr"], "wall_s": mean("wall_s")})
    return out


def format_markdown(rep: dict) -> str:
    lines = [f"# Quality study, {rep['date']}", "",
             f"Machine: {rep['machine']['cpu']}, {rep['machine']['cores']} cores; {rep['ranks']} ZeRO-3 ranks; "
             f"{rep['steps']} steps per run; seeds {rep['seeds']}; {rep['eval_examples']} eval records; "
             f"runs' eval + train time {rep['runs_min']:.1f} min (this invocation {rep['total_min']:.1f} min, "
             f"finished runs are reused).  ", f"Command: `{rep['command']}`", ""]
    for task in rep["tasks"]:
        rows = [r for r in rep["summary"] if r["task"] == task]
        if not rows:
            continue
        metric = rows[0]["metric"].replace("_", " ")
        lines += [f"## {task} ({metric})", "",
                  f"| method | trainable params | lr | {metric} before | {metric} after | eval loss after | "
                  "adapter | wall (min) |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            sd = f" ± {100 * r['after_sd']:.1f}" if r["after_sd"] is not None else ""
            adapter = f"{r['adapter_bytes'] / 1024:.0f} KiB" if r["adapter_bytes"] else "(whole model)"
            lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['lr']:.3g} | {100 * r['before']:.1f}% | "
                         f"{100 * r['after']:.1f}%{sd} | {r['eval_loss_after']:.4f} | {adapter} | "
                         f"{r['wall_s'] / 60:.1f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(rep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in rep["tasks"] if any(r["task"] == t for r in rep["summary"])]
    fig, axes = plt.subplots(2, len(tasks), figsize=(5.5 * len(tasks), 7.5), squeeze=False)
    for i, task in enumerate(tasks):
        ax = axes[0][i]
        for r in (r for r in rep["summary"] if r["task"] == task):
            color = "#2a7ab0" if r["method"].startswith("gpart") else "#d9822b"
            ax.scatter(r["trainable_params"], 100 * r["after"], color=color)
            ax.annotate(r["method"], (r["trainable_params"], 100 * r["after"]), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
        before = [r["before"] for r in rep["summary"] if r["task"] == task]
        ax.axhline(100 * before[0], color="gray", ls="--", lw=1, label="before training")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        metric = next(r["metric"] for r in rep["summary"] if r["task"] == task)
        ax.set_ylabel(f"{metric.replace('_', ' ')} after training (%)")
        ax.set_title(task, fontsize=10)
        ax.legend(fontsize=8)
        ax = axes[1][i]
        for r in (r for r in rep["runs"] if r["task"] == task and r["seed"] == rep["seeds"][0]):
            ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=r["method"], lw=1.2)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m experiments.study", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/study_smollm2.yaml")
    ap.add_argument("--quick", action="store_true", help="the config's `quick` subset (minutes)")
    ap.add_argument("--out", default=None, help="default: the study config's output_dir (+ /quick)")
    ap.add_argument("--steps", type=int, default=None, help="override the config's steps per run")
    ap.add_argument("--eval-examples", type=int, default=None, help="override the config's eval_examples")
    ap.add_argument("--seeds", default=None, help="override the config's seeds, e.g. 0,1,2")
    ap.add_argument("--tasks", default=None, help="only these of the config's tasks, e.g. qasc")
    ap.add_argument("--methods", default=None, help="only these of the config's methods")
    args = ap.parse_args(argv)
    study = load_study(args.config)   # a ConfigError: `error: ...`, exit 2 (errors.run_cli)
    if args.steps is not None:
        study["steps"] = args.steps
    if args.eval_examples is not None:
        study["eval_examples"] = args.eval_examples
    if args.seeds:
        study["seeds"] = [int(x) for x in args.seeds.split(",")]
    tasks, methods = list(study["tasks"]), list(study["methods"])
    for flag, chosen, known in (("--tasks", args.tasks, tasks), ("--methods", args.methods, methods)):
        if chosen:
            want = [x.strip() for x in chosen.split(",") if x.strip()]
            bad = [x for x in want if x not in known]
            if bad:
                raise ConfigError(f"{flag}: {bad} not in {args.config} (known: {known})")
            known[:] = want
    if args.quick:
        q = study.get("quick", {})
        study = {**study, "steps": q.get("steps", 2), "eval_examples": q.get("eval_examples", 16),
                 "seeds": study["seeds"][:1]}
        tasks, methods = q.get("tasks", tasks[:1]), q.get("methods", methods[:2])
    out = Path(args.out or (Path(study.get("output_dir", "outputs/study")) / ("quick" if args.quick else "")))
    (out / "logs").mkdir(parents=True, exist_ok=True)
    base_dir = Path(study["_path"]).parent

    # Every run config and override checked before the first run starts (assets first:
    # the target count needs the model's config.json).
    from . import assets

    plans = []
    for task in tasks:
        t = study["tasks"][task]
        config = resolve_config_path(base_dir / t["config"])
        cfg0 = load_config(config, list(t.get("overrides", [])) + ["method.d=1"], check_files=False)
        for recipe in cfg0.prepare:
            assets.ensure(recipe)
        D = target_count(cfg0)
        for method in methods:
            for seed in study["seeds"]:
                ov = run_overrides(study, t, study["methods"][method], seed, D)
                load_config(config, ov, check_files=False)
                plans.append((task, method, seed, config, ov))

    t0, rows, runs = time.perf_counter(), [], []
    for i, (task, method, seed, config, ov) in enumerate(plans, 1):
        name = f"{task}-{method}-s{seed}"
        print(f"[study] {i}/{len(plans)} {name}", flush=True)
        res = run_one(config, ov, study["ranks"], out / "runs" / name, out / "logs" / f"{name}.log")
        s = res["summary"]
        metric = study["tasks"][task]["metric"]
        lr = float(next(o.split("=", 1)[1] for o in ov if o.startswith("train.lr=")))
        row = {"task": task, "method": method, "seed": seed, "metric": metric, "lr": lr,
               "before": s.get(f"{metric}_before") if metric != "eval_loss" else s["eval_loss_before"],
               "after": s.get(f"{metric}_after") if metric != "eval_loss" else s["eval_loss_after"],
               "eval_loss_before": s["eval_loss_before"], "eval_loss_after": s["eval_loss_after"],
               "trainable_params": s["trainable_params"], "adapter_bytes": s["adapter_bytes"],
               "wall_s": s["wall_s"], "losses": res["losses"]}
        rows.append({k: v for k, v in row.items() if k != "losses"})
        runs.append(row)
        print(f"[study] {name}: {metric} {row['before']:.3f} -> {row['after']:.3f}, "
              f"eval loss {s['eval_loss_after']:.4f}", flush=True)
    from .bench.compare import machine

    rep = {"date": _dt.date.today().isoformat(), "machine": machine(), "config": study["_path"],
           "command": "python -m experiments.study " + " ".join(argv if argv is not None else sys.argv[1:]),
           "ranks": study["ranks"], "steps": study["steps"], "seeds": study["seeds"],
           "eval_examples": study["eval_examples"], "tasks": tasks, "methods": methods,
           "gpart_lr_per_sqrt": study.get("gpart_lr_per_sqrt"),
           "total_min": (time.perf_counter() - t0) / 60, "runs_min": sum(r["wall_s"] for r in rows) / 60,
           "rows": rows, "runs": runs,
           "summary": summarize(rows)}
    from gpart_ds.fileio import write_atomic

    write_atomic(out / "study.json", json.dumps(rep, indent=2) + "\n")
    md = format_markdown(rep)
    write_atomic(out / "study.md", md)
    plot(rep, out / "study.png")
    print(md, flush=True)
    print(f"[study] wrote {out / 'study.json'}, {out / 'study.md'}, {out / 'study.png'}", flush=True)
    return rep


def cli(argv=None) -> int:
    """`python -m experiments.study`: main() with bad input as `error: ...`, exit 2."""
    from gpart_ds.errors import run_cli

    return run_cli(lambda: main(argv))


if __name__ == "__main__":
    sys.exit(cli())
