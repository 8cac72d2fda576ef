"""The quality study's analysis: read finished runs, choose each method's lr, summarise
seeds, paired tests, parity, and write study.json / study.md / PNGs.

Metrics come from each run's per-record verdicts (the trainer's eval_predictions.jsonl
for the last evaluation, predictions/step-N.jsonl for the earlier ones with
train.eval_predictions), split by record index: the first `test_records` eval records
are the test set (every reported number), the rest the dev set (only the choice of lr).
Learning curves use the first `curve_records` records at every evaluation (the ones
scored during training too, train.eval_examples_during), so every point of a curve is
measured on the same records. Paired tests and parity compare every entry with the
study's `compare_with` entry; nothing here depends on which method an entry runs.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import statistics
from collections import Counter
from pathlib import Path

from gpart_ds.evaluate import paired
from gpart_ds.fileio import write_atomic

from .bench.compare import machine, machine_name

# Parity tolerance when the reference's own seed spread is smaller: 2 points of accuracy,
# 10% (relative) of the reference's exact match (the study's targets, docs/quality.md).
ACCURACY_POINTS = 0.02
# Metrics judged in accuracy points (the rest, exact match, relative to the reference).
ACCURACIES = ("accuracy", "answer_accuracy")
EXACT_MATCH_RELATIVE = 0.10
PARITY_PARAM_RATIO = 10  # parity counts for a method with at most the reference's trainable parameters / 10


# ------------------------------------------------------------------ one run
LOCAL = ("out", "base_out")  # a run's folders on this machine: not in the reports


def _public(run: dict) -> dict:
    return {k: v for k, v in run.items() if k not in LOCAL}


def verdict_file(out: Path, step: int, last: int) -> Path | None:
    """The verdicts of the evaluation at `step`: predictions/step-N.jsonl, or for the last
    evaluation eval_predictions.jsonl (a run folder of an older trainer has step-N for it)."""
    f = out / "predictions" / f"step-{step:06d}.jsonl"
    if not f.is_file() and step == last:
        f = out / "eval_predictions.jsonl"
    return f if f.is_file() else None


def verdicts(out: Path, step: int, metric: str, last: int | None = None) -> dict[int, bool] | None:
    """Eval record index -> correct at `step` (choice accuracy, the generated answer, or exact
    match). Curves of answer_accuracy need train.eval_generate=always."""
    f = verdict_file(out, step, step if last is None else last)
    if f is None:
        return None
    rows = [
        r
        for r in (json.loads(line) for line in f.read_text().splitlines() if line.strip())
        if r.get("index") is not None
    ]
    if metric == "accuracy":
        return {r["index"]: r["predicted"] == r["answer"] for r in rows if "predicted" in r}
    if metric == "answer_accuracy":
        return {r["index"]: bool(r["answer_correct"]) for r in rows if "answer_correct" in r}
    return {r["index"]: bool(r["match"]) for r in rows if "match" in r}


def _frac(v: dict[int, bool], keep) -> float | None:
    xs = [ok for i, ok in v.items() if keep(i)]
    return sum(xs) / len(xs) if xs else None


def _last_run(out: Path) -> list[dict] | None:
    """The records of the last run in a folder's metrics.jsonl (None: no such file)."""
    f = out / "metrics.jsonl"
    if not f.is_file():
        return None
    recs = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    start = max((i for i, r in enumerate(recs) if r.get("event") == "start"), default=0)
    return recs[start:]


# ------------------------------------------------------------------ the base model, evaluated once
# Every method starts exactly at the base model (GPart theta = 0, LoRA B = 0, VeRA b = 0, full
# fine-tuning the base itself), so every run of a task scores the same model at step 0. The
# study evaluates it once per task and output folder: the first run of a task does, the
# others run with train.eval_before=false and their reports take step 0 from that run.
def eval_settings(cfg: dict) -> dict:
    """What decides a run's evaluation before training, from its resolved config (a
    run_config.yaml): the base, the eval records and how they are tokenised, scored,
    batched and decoded. Two runs that agree on these score the same model the same way."""
    m, d, t = cfg["model"], cfg["data"], cfg["train"]
    return {
        "model.path": m["path"],
        "model.precision": m["precision"],
        **{f"data.{k}": d.get(k) for k in ("eval", "format", "max_length", "too_long", "chat_template", "add_eos")},
        "train.objective": t.get("objective", "lm"),
        "train.eval_examples": t["eval_examples"],
        "eval micro-batch": t.get("eval_micro_batch_size") or t["micro_batch_size"],
        "generated answers at step 0": t.get("eval_generate", "final") != "never",
        "train.eval_generate_batch": t.get("eval_generate_batch", 64),
    }


def run_config(out: Path) -> dict | None:
    """A run folder's run_config.yaml as a dict (None: not there)."""
    from omegaconf import OmegaConf

    f = out / "run_config.yaml"
    return OmegaConf.to_container(OmegaConf.load(f), resolve=False) if f.is_file() else None


def _step0(out: Path) -> dict | None:
    """The evaluation before training of a finished study run (its eval record at step 0,
    its verdicts written), or None."""
    recs = _last_run(out) if (out / "study_key").is_file() else None
    if not recs or not any(r.get("event") == "summary" for r in recs):
        return None
    if not (out / "predictions" / "step-000000.jsonl").is_file():
        return None
    return next((r for r in recs if r.get("event") == "eval" and r.get("step") == 0), None)


def base_evaluations(root: Path, task: str) -> list[Path]:
    """The finished runs of `task` under a study's output folder that evaluated the base
    model (step 0): the sweep and seed runs first, then probe and ablation runs."""
    found = {
        p.parent.parent
        for pat in (f"*/{task}/*/*/predictions/step-000000.jsonl", f"*/*/{task}/*/*/predictions/step-000000.jsonl")
        for p in root.glob(pat)
    }
    return sorted(
        (r for r in found if _step0(r) is not None), key=lambda r: (r.relative_to(root).parts[0] != "runs", str(r))
    )


def base_run(root: Path, task: str, settings: dict) -> Path | None:
    """A finished run of `task` under `root` whose evaluation before training a run with
    these eval_settings can take as its own (None: there is none yet)."""
    for r in base_evaluations(root, task):
        cfg = run_config(r)
        if cfg is not None and eval_settings(cfg) == settings:
            return r
    return None


def _borrowed_base(entry: dict, cfg: dict) -> Path:
    """The run whose step-0 evaluation stands for this run's (it ran train.eval_before=false);
    ConfigError when there is none, or when the candidates evaluated differently."""
    from gpart_ds.config import ConfigError

    out, task, root = entry["out"], entry["task"], entry.get("root")
    mine = eval_settings(cfg)
    found = base_evaluations(Path(root), task) if root is not None else []
    for r in found:
        theirs = run_config(r)
        if theirs is not None and eval_settings(theirs) == mine:
            return r
    if not found:
        raise ConfigError(
            f"{out}: trained with train.eval_before=false, and no finished run of task {task!r} in "
            f"{root} has the base model's evaluation (step 0) to stand for its own; delete the "
            "run's folder to train it again (the next run of the task evaluates the base)"
        )
    cfg0 = run_config(found[0])
    theirs = eval_settings(cfg0) if cfg0 else {}
    diff = ", ".join(f"{k}: {theirs.get(k)!r} there, {v!r} here" for k, v in mine.items() if theirs.get(k) != v)
    raise ConfigError(
        f"{out}: trained with train.eval_before=false, but the runs of task {task!r} in {root} that "
        f"evaluated the base model did so with other settings ({found[0]}: {diff}); their step 0 is "
        "not this run's: delete the run's folder to train it again with its own"
    )


def read_run(entry: dict, test_records: int, metric: str, curve_records: int | None = None) -> dict | None:
    """A finished run's results. Its evaluation before training (the curve's first point,
    `before`, `served_before`) is its own, or, where it ran train.eval_before=false, that
    of the run of its task in the same output folder that evaluated the base model with
    the same settings (`before_from`)."""
    out = entry["out"]
    recs = _last_run(out)
    if recs is None:
        return None
    summary = next((r for r in recs if r.get("event") == "summary"), None)
    if summary is None:
        return None
    evals = [r for r in recs if r.get("event") == "eval"]
    base = out  # the folder of the step-0 verdicts
    cfg = run_config(out)
    if not any(e["step"] == 0 for e in evals) and cfg is not None and cfg["train"].get("eval_before", True) is False:
        base = _borrowed_base(entry, cfg)
        evals = [_step0(base)] + evals
    folder = lambda step: base if step == 0 else out  # noqa: E731
    curve = []
    for e in evals:
        v = verdicts(folder(e["step"]), e["step"], metric, summary["steps"])
        if v is None:
            continue
        curve.append(
            {
                "step": e["step"],
                "test": _frac(v, lambda i: i < test_records),
                "dev": _frac(v, lambda i: i >= test_records),
                "curve": _frac(v, lambda i: i < (curve_records or test_records)),
                "eval_loss": e["eval_loss"],
            }
        )
    if not curve:
        return None
    # What a server answers (the generated answers of the evaluations before and after
    # training, train.eval_generate's default), whatever metric the task is tuned on.
    served = [verdicts(folder(step), step, "answer_accuracy", summary["steps"]) for step in (0, summary["steps"])]
    served = [_frac(v, lambda i: i < test_records) if v else None for v in served]
    shared = {"before_from": base.relative_to(entry["root"]).as_posix()} if base != out else {}
    return (
        {k: entry[k] for k in ("task", "method", "lr", "seed", "phase")}
        | shared
        | {
            "served_before": served[0],
            "served_after": served[1],
            "out": str(out),
            "base_out": str(base),
            "metric": metric,
            "curve": curve,
            "losses": [r["loss"] for r in recs if "step_time_s" in r],
            "before": curve[0]["test"],
            "after": curve[-1]["test"],
            "dev_after": curve[-1]["dev"],
            "eval_loss_after": summary["eval_loss_after"],
            "trainable_params": summary["trainable_params"],
            "adapter_bytes": summary["adapter_bytes"],
            "wall_s": summary["wall_s"],
            "median_step_time_s": summary["median_step_time_s"],
            "steps": summary["steps"],
        }
    )


def _dev_score(run: dict) -> tuple:
    """How an lr is chosen: the final dev metric (a run whose loss is not finite never
    wins); ties by the lower training loss over the last 5 steps, then the smaller lr.
    Nothing here reads a test record."""
    finite = run["dev_after"] if run["dev_after"] is not None and math.isfinite(run["eval_loss_after"]) else -1.0
    tail = [x for x in run["losses"][-5:] if math.isfinite(x)]
    return (finite, -statistics.mean(tail) if tail else -math.inf, -run["lr"])


def plan_run(plan, entry: dict) -> dict | None:
    """A planned run's results: its folder here, or else the run an earlier report records
    (--reuse-runs; `out` None, `source` its report), or None while it is not finished."""
    metric = plan.study["tasks"][entry["task"]]["metric"]
    r = read_run(entry, plan.study["test_records"], metric, plan.study.get("curve_records"))
    return r if r is not None else plan.recorded_run(entry)


# ------------------------------------------------------------------ choosing and seeds
def sweep_runs(plan, task: str, method: str) -> tuple[list[dict], list[float]]:
    """(finished sweep runs, the grid's rates with no finished run yet)."""
    read = [(e["lr"], plan_run(plan, e)) for e in plan.sweep(task, method)]
    return [r for _, r in read if r is not None], [lr for lr, r in read if r is None]


def _chosen(runs: list[dict], missing: list[float], partial: bool) -> float | None:
    """The dev-chosen lr: once the whole grid is finished, or (partial) among the
    finished runs of the grid."""
    if not runs or (missing and not partial):
        return None
    return max(runs, key=_dev_score)["lr"]


def best_lr(plan, task: str, method: str, waiting: str | None = None) -> float | None:
    """The dev-chosen lr of a sweep (None while it is incomplete; `waiting` names, for the
    log, the runs that wait for it)."""
    lr = _chosen(*sweep_runs(plan, task, method), plan.partial)
    if lr is None and waiting:
        print(
            f"[study] {task}/{method}: sweep incomplete, no {waiting} yet (--partial: the best finished rate)",
            flush=True,
        )
    return lr


def final_entries(plan, task: str, methods: list[str]) -> list[dict]:
    out = []
    for m in methods:
        lr = best_lr(plan, task, m, waiting="seeds")
        if lr is None:
            continue
        out += [plan.entry(task, m, lr, s, "final") for s in plan.study["seeds"]]
    return out


# ------------------------------------------------------------------ the report
def _mean_sd(xs: list[float]) -> tuple[float | None, float | None]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def _test_verdicts(run: dict, step: int, test_records: int) -> dict[int, bool]:
    folder = (run.get("base_out") or run["out"]) if step == 0 else run["out"]  # step 0: maybe another run's
    v = verdicts(Path(folder), step, run["metric"], run["steps"]) or {}
    return {i: ok for i, ok in v.items() if i < test_records}


def paired_test(a: dict, b: dict, test_records: int, step_a=None, step_b=None) -> dict:
    """Exact McNemar test of two runs' final test-set verdicts (a = reference)."""
    va = _test_verdicts(a, step_a if step_a is not None else a["steps"], test_records)
    vb = _test_verdicts(b, step_b if step_b is not None else b["steps"], test_records)
    to_rows = lambda v: [{"record": i, "match": ok} for i, ok in sorted(v.items())]  # noqa: E731
    return paired(to_rows(va), to_rows(vb))


def parity(metric: str, ref: dict, row: dict) -> dict:
    """A method at parity with the reference: its mean within the reference's seed spread,
    or within the fixed tolerance (2 accuracy points; 10% relative exact match),
    whichever is larger."""
    tol = ACCURACY_POINTS if metric in ACCURACIES else EXACT_MATCH_RELATIVE * ref["test_mean"]
    tol = max(tol, ref["test_sd"] or 0.0)
    gap = ref["test_mean"] - row["test_mean"]
    return {"gap": gap, "tolerance": tol, "holds": gap <= tol}


def build(plan, tasks: list[str], methods: list[str], sweeps: list[dict], command: str) -> dict:
    study, T = plan.study, plan.study["test_records"]
    ref_name = study.get("compare_with")
    runs, summary, tests = [], [], []
    for task in tasks:
        metric = study["tasks"][task]["metric"]
        for e in (e for e in sweeps if e["task"] == task):
            r = plan_run(plan, e)
            if r is not None:
                runs.append(r)
        rows = {}
        for m in methods:
            sweep, missing = sweep_runs(plan, task, m)
            lr = _chosen(sweep, missing, plan.partial)
            if lr is None:
                continue
            seeded = [plan_run(plan, plan.entry(task, m, lr, s, "final")) for s in study["seeds"]]
            seeded = [r for r in seeded if r is not None]
            for r in seeded:
                if r["seed"] != study.get("sweep_seed", 0):
                    runs.append(r)
            mean, sd = _mean_sd([r["after"] for r in seeded])
            served = [r.get("served_after") for r in seeded]
            served_mean, served_sd = _mean_sd(served) if served and None not in served else (None, None)
            mcfg = study["methods"][m]
            unit = plan.unit(task, m)
            auto = plan.auto_lr(task, m)
            peak = interpolated_best(sweep)
            row = {
                "task": task,
                "method": m,
                "name": mcfg["name"],
                "metric": metric,
                "best_lr": lr,
                "grid_missing": missing,
                "lr_over_unit": lr / unit if unit else None,
                "seeds": [r["seed"] for r in seeded],
                # train.lr=auto against the sweep: the grid's best and the peak of a
                # parabola in log(lr) through the best point and its neighbours
                "auto_lr": auto,
                "peak_lr": peak,
                "auto_over_best": auto / lr if auto else None,
                "auto_over_peak": auto / peak if auto and peak else None,
                "test_mean": mean,
                "test_sd": sd,
                "test_by_seed": [r["after"] for r in seeded],
                "before": seeded[0]["before"] if seeded else None,
                # the generated answer (as served) on the same test records and seeds
                "served_mean": served_mean,
                "served_sd": served_sd,
                "served_before": seeded[0].get("served_before") if seeded else None,
                "dev_best": max(r["dev_after"] for r in sweep if r["dev_after"] is not None),
                "sweep": sorted(
                    (
                        {"lr": r["lr"], "dev": r["dev_after"], "test": r["after"], "eval_loss": r["eval_loss_after"]}
                        for r in sweep
                    ),
                    key=lambda x: x["lr"],
                ),
                "trainable_params": sweep[0]["trainable_params"],
                "adapter_bytes": sweep[0]["adapter_bytes"],
                "median_step_time_s": statistics.median(r["median_step_time_s"] for r in sweep),
                "steps": sweep[0]["steps"],
                "curve": _mean_curve(seeded),
            }
            used = {(r["lr"], r["seed"]): r for r in sweep + seeded}.values()  # seed 0 is a sweep run
            reused = Counter(r["source"]["file"] for r in used if r.get("source"))
            if reused:  # how many of the row's runs were trained elsewhere (--reuse-runs)
                row["runs_from"] = dict(sorted(reused.items()))
            rows[m] = row
            summary.append(row)
            for r in seeded[:1]:  # the adapter against the base model, same records
                t = _paired_or_recorded(plan, task, "base", m, r, r, T, step_a=0)
                if t:
                    tests.append(t)
        ref = rows.get(ref_name)
        if ref is None or ref["test_mean"] is None:
            continue
        seeds_ref = {r["seed"]: r for r in _seeded_runs(runs, task, ref_name, ref["best_lr"])}
        for m, row in rows.items():
            if m == ref_name or row["test_mean"] is None:
                continue
            for r in _seeded_runs(runs, task, m, row["best_lr"]):
                if r["seed"] in seeds_ref:
                    t = _paired_or_recorded(plan, task, ref_name, m, seeds_ref[r["seed"]], r, T)
                    if t:
                        tests.append(t)
        set_parity(rows.values(), ref_name)
    return {
        "date": _dt.date.today().isoformat(),
        "machine": machine(),
        "config": repo_path(study["_path"]),
        "command": command,
        **header(study),
        "tasks": tasks,
        "methods": methods,
        "D": {task: {m: plan.D(task, m) for m in methods} for task in tasks},
        "runs_min": runs_min(runs),
        "summary": summary,
        "paired": tests,
        "runs": [_public(r) for r in runs],
    }


def _paired_or_recorded(plan, task: str, a: str, b: str, run_a: dict, run_b: dict, T: int, step_a=None):
    """The paired test of two runs from their verdicts; where one of them is a recorded run
    (its verdicts stayed on the machine that trained it), the test its report made of the
    same two runs, if it made one (None otherwise)."""
    head = {"task": task, "a": a, "b": b, "seed": run_b["seed"]}
    if run_a["out"] is not None and run_b["out"] is not None:
        return {**head, **paired_test(run_a, run_b, T, step_a=step_a)}
    return plan.recorded_test(head, run_a, run_b)


def runs_min(runs) -> float:
    """The runs' own time in minutes: their wall clocks summed (build and merge both report it)."""
    return sum(r["wall_s"] for r in runs) / 60


def set_parity(rows, ref_name: str | None) -> None:
    """Each row (one task's) smaller than the reference gets its parity verdict against it."""
    rows = list(rows)
    ref = next((r for r in rows if r["method"] == ref_name and r["test_mean"] is not None), None)
    for row in rows:
        row.pop("parity", None)
        if ref is None or row is ref or row["test_mean"] is None:
            continue
        if row["trainable_params"] < ref["trainable_params"]:  # the question: does a smaller one match?
            row["parity"] = {
                **parity(row["metric"], ref, row),
                "reference": ref_name,
                "param_ratio": ref["trainable_params"] / row["trainable_params"],
                "eligible": row["trainable_params"] * PARITY_PARAM_RATIO <= ref["trainable_params"],
            }


def header(study: dict) -> dict:
    """What every report of a study states about its runs, and what two reports must share
    for their rows to stand in one table: the same records, seeds, evaluations, reference."""
    return {
        "ranks": study["ranks"],
        "seeds": study["seeds"],
        "sweep_seed": study.get("sweep_seed", 0),
        "eval_examples": study["eval_examples"],
        "test_records": study["test_records"],
        "eval_every": study["eval_every"],
        "curve_records": study.get("curve_records") or study["test_records"],
        "compare_with": study.get("compare_with"),
    }


def _rows_to_merge(earlier: dict, tasks: list[str], methods: list[str]) -> list[dict]:
    return [r for r in earlier["summary"] if r["task"] in tasks and r["method"] not in methods]


def _check_header(earlier: dict, source: str, study: dict, flag: str) -> None:
    from gpart_ds.config import ConfigError

    for k, v in header(study).items():
        if earlier.get(k) != v:
            raise ConfigError(
                f"{flag} {source}: its {k} is {earlier.get(k)!r}, this study's {v!r}; only reports "
                "of the same records, seeds and reference stand in one table"
            )


def check_merge(
    earlier: dict, source: str, study: dict, tasks: list[str], methods: list[str], steps: dict[str, int]
) -> None:
    """Refuse (ConfigError) an earlier report whose rows cannot stand beside this study's:
    checked before any run is trained. `steps`: each task's budget here."""
    from gpart_ds.config import ConfigError

    _check_header(earlier, source, study, "--merge")
    for r in _rows_to_merge(earlier, tasks, methods):
        if r["steps"] != steps[r["task"]]:
            raise ConfigError(
                f"--merge {source}: {r['task']}/{r['method']} ran {r['steps']} steps, this study "
                f"{steps[r['task']]} (--steps)"
            )


def repo_path(path: str) -> str:
    """`path` as the repository it lies in names it (docs/quality_rt.json, configs/...), so a
    report records no machine's folders; as given when it lies in no checkout."""
    p = Path(path).resolve()
    for root in p.parents:
        if (root / "pyproject.toml").is_file():
            return p.relative_to(root).as_posix()
    return path


def _origin_of(report: dict, source: str) -> dict:
    return {
        "file": repo_path(source),
        "date": report["date"],
        "command": report["command"],
        "machine": report["machine"],
    }


class RecordedRuns:
    """The finished runs earlier reports record (--reuse-runs), standing in for run folders
    this machine lacks: a grid measured on another machine or day is extended, or its
    seeds run, without training its finished rates again. A run is the same run when its
    task, method entry (and so D), lr, seed and steps are: check() refuses, before any
    run, a report whose records, seeds or budget differ from the study's."""

    def __init__(self, reports: list[tuple[str, dict]] = ()):
        self.reports = list(reports)
        self._runs = {}
        for source, rep in self.reports:
            origin = _origin_of(rep, source)
            for r in rep["runs"]:
                key = (r["task"], r["method"], r["lr"], r["seed"])
                self._runs.setdefault(key, ({**r, "out": None, "source": r.get("source", origin)}, source, rep))

    def check(self, study: dict, tasks: list[str], methods: list[str], steps: dict[str, int], D) -> None:
        """ConfigError unless every recorded run of these tasks and methods is one this study
        would make: same header (records, seeds, reference), steps, and target count D(task, method)."""
        from gpart_ds.config import ConfigError

        for source, rep in self.reports:
            _check_header(rep, source, study, "--reuse-runs")
            for task, m in {(r["task"], r["method"]) for r in rep["runs"]}:
                if task not in tasks or m not in methods:
                    continue
                ran = {r["steps"] for r in rep["runs"] if (r["task"], r["method"]) == (task, m)}
                if ran != {steps[task]}:
                    raise ConfigError(
                        f"--reuse-runs {source}: {task}/{m} ran {sorted(ran)} steps, this study {steps[task]} (--steps)"
                    )
                if rep["D"][task][m] != D(task, m):
                    raise ConfigError(
                        f"--reuse-runs {source}: {task}/{m} targets {rep['D'][task][m]:,} weights, "
                        f"this study's entry {D(task, m):,}: the entry changed, its runs are not "
                        "this study's"
                    )

    def run(self, entry: dict) -> dict | None:
        hit = self._runs.get((entry["task"], entry["method"], entry["lr"], entry["seed"]))
        return {**hit[0], "phase": entry["phase"]} if hit else None

    def test(self, head: dict, run_a: dict, run_b: dict) -> dict | None:
        """The paired test a report made of these two runs (its chosen rates were theirs).
        A run trained here stands for the report's run only when it is that run: the same
        training losses, step by step (a re-run on another CPU differs in the last digits,
        and so may its verdicts)."""
        for r in (run_b, run_a):
            hit = r.get("source") and self._runs.get((head["task"], r["method"], r["lr"], r["seed"]))
            if not hit:
                continue
            rep = hit[2]
            other = run_a if r is run_b else run_b
            if other["out"] is not None:  # (against the base, other is r: recorded)
                mine = self._runs.get((head["task"], other["method"], other["lr"], other["seed"]))
                if mine is None or mine[2] is not rep or mine[0].get("losses") != other.get("losses"):
                    return None
            best = {row["method"]: row["best_lr"] for row in rep["summary"] if row["task"] == head["task"]}
            if best.get(head["b"]) != run_b["lr"] or (head["a"] != "base" and best.get(head["a"]) != run_a["lr"]):
                return None
            return next(
                ({**t, "source": r["source"]} for t in rep["paired"] if {k: t.get(k) for k in head} == head), None
            )
        return None


def merge(rep: dict, earlier: dict, source: str, order: list[str]) -> dict:
    """Add to `rep` the rows of an earlier report (a study.json, e.g. one kept under docs/)
    for its tasks and the methods rep did not run (check_merge first). The runs behind a
    report stay on the machine that trained them: this is how results measured on another
    machine or day stand beside today's. Each added row names its `source`; paired tests
    need both runs' verdicts, so only the earlier report's own come along; parity (from
    means and spreads) is recomputed over the union. `order`: the study's method order."""
    add = _rows_to_merge(earlier, rep["tasks"], rep["methods"])
    if not add:
        return rep
    origin = _origin_of(earlier, source)
    added = {(r["task"], r["method"]) for r in add}
    rep["summary"] += [{**r, "source": r.get("source", origin)} for r in add]
    rep["runs"] += [r for r in earlier["runs"] if (r["task"], r["method"]) in added]
    # Today's rows whose chosen runs are the earlier report's own (--reuse-runs of the same
    # file, same rate): its tests of them against the rows added here still hold.
    chosen = {(r["task"], r["method"]): r["best_lr"] for r in earlier["summary"]}
    same = {
        (r["task"], r["method"])
        for r in rep["summary"]
        if source in r.get("runs_from", {}) and chosen.get((r["task"], r["method"])) == r["best_lr"]
    }
    rep["paired"] += [
        t
        for t in earlier["paired"]
        if (t["task"], t["b"]) in added and (t["a"] == "base" or (t["task"], t["a"]) in added)
    ]
    rep["paired"] += [t for t in earlier["paired"] if (t["task"], t["b"]) in same and (t["task"], t["a"]) in added]
    rank = {m: i for i, m in enumerate(order)}
    rep["methods"] = sorted(
        dict.fromkeys(rep["methods"] + [r["method"] for r in add]), key=lambda m: rank.get(m, len(rank))
    )
    rep["summary"].sort(key=lambda r: (rep["tasks"].index(r["task"]), rep["methods"].index(r["method"])))
    for task, m in added:
        rep["D"].setdefault(task, {})[m] = earlier["D"][task][m]
    rep["runs_min"] = runs_min(rep["runs"])
    for task in rep["tasks"]:
        set_parity([r for r in rep["summary"] if r["task"] == task], rep["compare_with"])
    return rep


def interpolated_best(sweep: list[dict]) -> float | None:
    """The lr at the peak of a parabola in log(lr) through the best dev point and its two
    neighbours (the grid's best lr if it is at an edge of the grid)."""
    pts = sorted((r["lr"], r["dev_after"]) for r in sweep if r["dev_after"] is not None)
    if not pts:
        return None
    i = max(range(len(pts)), key=lambda k: pts[k][1])
    if i == 0 or i == len(pts) - 1:
        return pts[i][0]
    (x0, y0), (x1, y1), (x2, y2) = [(math.log(x), y) for x, y in pts[i - 1 : i + 2]]
    den = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / den
    b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / den
    if a >= 0:
        return pts[i][0]
    return math.exp(min(max(-b / (2 * a), x0), x2))


def _seeded_runs(runs, task, method, lr):
    return [r for r in runs if r["task"] == task and r["method"] == method and r["lr"] == lr]


def _mean_curve(seeded: list[dict]) -> list[dict]:
    if not seeded:
        return []
    steps = sorted(set.intersection(*({c["step"] for c in r["curve"]} for r in seeded)))
    out = []
    for s in steps:
        pts = [next(c for c in r["curve"] if c["step"] == s) for r in seeded]
        out.append({"step": s, "curve": statistics.mean(p["curve"] for p in pts)})
    return out


# ------------------------------------------------------------------ formatting
def _pct(x, sd=None) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" + (f" ± {100 * sd:.1f}" if sd is not None else "")


def _size(n: int) -> str:
    return f"{n / 1024:,.0f} KiB" if n else "(the model)"


def _origin(row: dict) -> tuple[str, str, str]:
    src = row["source"]
    return src["file"], src["date"], machine_name(src["machine"])


def format_markdown(rep: dict) -> str:
    m = rep["machine"]
    lines = [
        f"# Quality study, {rep['date']}",
        "",
        f"Machine: {machine_name(m)}, {m['cores']} cores; {rep['ranks']} rank(s); "
        f"seeds {rep['seeds']} (lr chosen on seed {rep['sweep_seed']}); {rep['eval_examples']} eval records "
        f"every {rep['eval_every']} steps: the first {rep['test_records']} are the test set (reported), the rest "
        f"the dev set (lr choice); runs' own time {rep['runs_min'] / 60:.1f} h.  ",
        f"Command: `{rep['command']}`",
        "",
    ]
    for task in rep["tasks"]:
        rows = [r for r in rep["summary"] if r["task"] == task]
        if not rows:
            continue
        metric = rows[0]["metric"].replace("_", " ")
        # the base evaluated once per task and output folder: the runs that took step 0 from another
        once = Counter(r["before_from"] for r in rep["runs"] if r["task"] == task and r.get("before_from"))
        lines += [
            f"## {task} ({metric}, {rows[0]['steps']} steps)",
            "",
            f"Base model: {_pct(rows[0]['before'])} on the test records"
            + (
                f" ({_pct(rows[0]['served_before'])} generated answer)."
                if rows[0].get("served_before") is not None and rows[0]["metric"] != "answer_accuracy"
                else "."
            )
            + "".join(
                f" Evaluated once, by {f}: {n} other run(s) take their step 0 from it (train.eval_before=false)."
                for f, n in once.items()
            ),
            "",
            f"| method | trainable params | adapter | best lr | test {metric} (mean ± sd) | generated answer "
            f"(as served) | seeds | dev {metric} at best lr | lr=auto (x best) | s/step |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lr = f"{r['best_lr']:.3g}" + (f" ({r['lr_over_unit']:.3g}x unit)" if r["lr_over_unit"] else "")
            auto = f"{r['auto_lr']:.3g} ({r['auto_over_best']:.2g}x)" if r["auto_lr"] else "-"
            lines.append(
                f"| {r['method']} | {r['trainable_params']:,} | {_size(r['adapter_bytes'])} | {lr} | "
                f"{_pct(r['test_mean'], r['test_sd'])} | {_pct(r.get('served_mean'), r.get('served_sd'))} | "
                f"{len(r['seeds'])} | {_pct(r['dev_best'])} | "
                f"{auto} | {r['median_step_time_s']:.1f} |"
            )
        merged = [r for r in rows if r.get("source")]
        for src in dict.fromkeys(_origin(r) for r in merged):
            names = ", ".join(r["method"] for r in merged if _origin(r) == src)
            lines += ["", f"{names}: measured earlier, from {src[0]} ({src[1]}, {src[2]}; --merge)."]
        for r in rows:
            for f, n in r.get("runs_from", {}).items():
                src = next(x["source"] for x in rep["runs"] if x.get("source", {}).get("file") == f)
                lines += [
                    "",
                    f"{r['method']}: {n} of its runs trained earlier, recorded in {f} ({src['date']}, "
                    f"{machine_name(src['machine'])}; --reuse-runs).",
                ]
            if r.get("grid_missing"):
                lines += [
                    "",
                    f"{r['method']}: lr chosen among {len(r['sweep'])} of the grid's "
                    f"{len(r['sweep']) + len(r['grid_missing'])} rates (--partial); not run yet: "
                    + ", ".join(f"{x:.3g}" for x in r["grid_missing"])
                    + ".",
                ]
        par = [r for r in rows if r.get("parity")]
        if par:
            ref = par[0]["parity"]["reference"]
            lines += [
                "",
                f"| vs {ref} | params ({ref} / method) | gap ({ref} - method) | tolerance | parity |",
                "|---|---|---|---|---|",
            ]
            for r in par:
                p = r["parity"]
                verdict = ("yes" if p["holds"] else "no") + (
                    "" if p["eligible"] else f" (more than {ref}'s parameters / {PARITY_PARAM_RATIO})"
                )
                lines.append(
                    f"| {r['method']} | {p['param_ratio']:.0f}x | {100 * p['gap']:+.1f} pts | "
                    f"{100 * p['tolerance']:.1f} pts | {verdict} |"
                )
        tests = [t for t in rep["paired"] if t["task"] == task]
        if tests:
            lines += [
                "",
                "Paired tests on the test records (exact McNemar; fixed = right in b, wrong in a):",
                "",
                "| a | b | seed | a | b | fixed | broken | p |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for t in tests:
                lines.append(
                    f"| {t['a']} | {t['b']} | {t['seed']} | {_pct(t['accuracy_before'])} | "
                    f"{_pct(t['accuracy_after'])} | {t['fixed']} | {t['broken']} | {t['p_value']:.3g} |"
                )
        lines += [
            "",
            f"Learning-rate sweeps (seed {rep['sweep_seed']}; dev / test {metric} after training):",
            "",
            "| method | " + " | ".join(["lr: dev / test"] * 1) + " |",
            "|---|---|",
        ]
        for r in rows:
            cells = ", ".join(f"{s['lr']:.3g}: {_pct(s['dev'])} / {_pct(s['test'])}" for s in r["sweep"])
            lines.append(f"| {r['method']} | {cells} |")
        lines.append("")
    return "\n".join(lines) + "\n"


PALETTE = ("#2a7ab0", "#d9822b", "#6a9f3a", "#8e4fa6", "#c0392b", "#7f8c8d")


def color(name: str) -> str:
    """One colour per method of the registry (its order), whatever the study holds."""
    from gpart_ds import methods

    names = methods.names()
    return PALETTE[names.index(name) % len(PALETTE)] if name in names else "k"


def _styles(rows: list[dict]) -> dict[str, dict]:
    """Line style and marker per entry (the colour is the method's): solid and circles for
    the largest entry of each method, then dashed and squares, dotted and triangles, ..."""
    out = {}
    for name in {r["name"] for r in rows}:
        same = sorted((r for r in rows if r["name"] == name), key=lambda r: -r["trainable_params"])
        for i, r in enumerate(same):
            out[r["method"]] = {"ls": ("-", "--", ":", "-.")[i % 4], "marker": ("o", "s", "^", "D")[i % 4]}
    return out


def _pyplot():
    """matplotlib's pyplot on the file-only backend (reports run on machines without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curve_text(curve: list[dict]) -> str:
    """A learning curve as `step: metric %` pairs, for the Markdown tables."""
    return ", ".join(f"{c['step']}: {100 * c['curve']:.1f}" for c in curve)


def _save(fig, path: Path) -> None:
    import os

    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)


def plot(rep: dict, out: Path) -> list[Path]:
    plt = _pyplot()

    tasks = [t for t in rep["tasks"] if any(r["task"] == t for r in rep["summary"])]
    if not tasks:
        return []
    paths = []
    # 1. test metric vs trainable parameters (mean ± sd over seeds)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = sorted(
            (r for r in rep["summary"] if r["task"] == task and r["test_mean"] is not None),
            key=lambda r: r["trainable_params"],
        )
        for i, r in enumerate(rows):
            ax.errorbar(
                r["trainable_params"],
                100 * r["test_mean"],
                yerr=100 * (r["test_sd"] or 0),
                fmt="o",
                color=color(r["name"]),
                capsize=3,
            )
            # neighbours along the parameter axis are often within a point: labels alternate
            # below and above so that they do not print over each other
            ax.annotate(
                r["method"],
                (r["trainable_params"], 100 * r["test_mean"]),
                fontsize=7,
                xytext=(4, -12 if i % 2 == 0 else 7),
                textcoords="offset points",
            )
        if rows and rows[0]["before"] is not None:
            ax.axhline(100 * rows[0]["before"], color="gray", ls="--", lw=1, label="base model")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(f"test {rows[0]['metric'].replace('_', ' ')} (%)" if rows else "")
        ax.set_title(f"{task} (best lr, mean ± sd over seeds)", fontsize=9)
        ax.legend(fontsize=7)
    paths.append(out / "study_frontier.png")
    _save(fig, paths[-1])
    # 2. learning curves at each method's best lr (test metric, mean over seeds) + training loss
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.6 * len(tasks), 6.4), squeeze=False)
    for i, task in enumerate(tasks):
        rows = [r for r in rep["summary"] if r["task"] == task]
        styles = _styles(rows)
        for r in rows:
            ls = styles[r["method"]]["ls"]
            axes[0][i].plot(
                [c["step"] for c in r["curve"]],
                [100 * c["curve"] for c in r["curve"]],
                ms=4,
                **styles[r["method"]],
                color=color(r["name"]),
                label=f"{r['method']} @ {r['best_lr']:.2g}",
            )
            run = next(
                (
                    x
                    for x in rep["runs"]
                    if x["task"] == task
                    and x["method"] == r["method"]
                    and x["lr"] == r["best_lr"]
                    and x["seed"] == rep["sweep_seed"]
                ),
                None,
            )
            if run:
                axes[1][i].plot(
                    range(1, len(run["losses"]) + 1),
                    _smooth(run["losses"]),
                    ls=ls,
                    color=color(r["name"]),
                    label=r["method"],
                    lw=1.2,
                )
        axes[0][i].set_title(f"{task}: held-out metric vs step (first {rep['curve_records']} records)", fontsize=9)
        axes[0][i].set_xlabel("step")
        axes[0][i].set_ylabel("%")
        axes[0][i].legend(fontsize=6)
        axes[1][i].set_xlabel("step")
        axes[1][i].set_ylabel(f"training loss (seed {rep['sweep_seed']}, 3-step mean)")
        axes[1][i].legend(fontsize=6)
    paths.append(out / "study_curves.png")
    _save(fig, paths[-1])
    # 3. the lr sweeps: dev metric vs lr
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [r for r in rep["summary"] if r["task"] == task]
        styles = _styles(rows)
        for r in rows:
            ax.plot(
                [s["lr"] for s in r["sweep"]],
                [100 * (s["dev"] or 0) for s in r["sweep"]],
                color=color(r["name"]),
                **styles[r["method"]],
                label=r["method"],
            )
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("dev metric after training (%)")
        ax.set_title(f"{task}: lr sweep (seed {rep['sweep_seed']})", fontsize=9)
        ax.legend(fontsize=6)
    paths.append(out / "study_lr.png")
    _save(fig, paths[-1])
    return paths


def _smooth(xs: list[float], k: int = 3) -> list[float]:
    return [statistics.mean(xs[max(0, i - k + 1) : i + 1]) for i in range(len(xs))]


def _write_pair(rep: dict, md: str, out: Path, stem: str) -> None:
    """A report as STEM.json (the data) and STEM.md (the tables), each replaced whole."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / f"{stem}.json", json.dumps(rep, indent=1) + "\n")
    write_atomic(out / f"{stem}.md", md)


def write(rep: dict, out: Path) -> None:
    md = format_markdown(rep)
    _write_pair(rep, md, out, "study")
    paths = plot(rep, out)
    print(md, flush=True)
    print(f"[study] wrote {out / 'study.json'}, {out / 'study.md'}" + "".join(f", {p}" for p in paths), flush=True)


# ------------------------------------------------------------------ the flattening probe
def flat_step(curve: list[dict], key: str, tol: float) -> int | None:
    """The first eval step after which the metric never rises more than `tol` above it."""
    for i, c in enumerate(curve):
        if c[key] is None:
            continue
        if max(x[key] for x in curve[i:]) - c[key] <= tol:
            return c["step"]
    return None


def build_probe(plan, entries: list[dict], command: str) -> dict:
    study = plan.study
    runs = []
    for e in entries:
        metric = study["tasks"][e["task"]]["metric"]
        r = read_run(e, study["test_records"], metric, study.get("curve_records"))
        if r is None:
            continue
        final = r["curve"][-1]["test"]
        tol = ACCURACY_POINTS if metric in ACCURACIES else EXACT_MATCH_RELATIVE * max(final, 1e-9)
        r["flat_step"] = flat_step(r["curve"], "curve", tol)
        r["flat_tolerance"] = tol
        runs.append(r)
    for r in runs:
        r["name"] = study["methods"][r["method"]]["name"]
    return {
        "date": _dt.date.today().isoformat(),
        "machine": machine(),
        "command": command,
        "test_records": study["test_records"],
        "runs": [_public(r) for r in runs],
    }


def write_probe(rep: dict, out: Path) -> None:
    plt = _pyplot()

    lines = [
        f"# Flattening probe, {rep['date']}",
        "",
        f"Command: `{rep['command']}`  ",
        f"Constant lr after warm-up; test metric on the first {rep['test_records']} eval records.",
        "",
        "| task | method | lr | steps | test metric by step | flat from step (tolerance) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rep["runs"]:
        pts = _curve_text(r["curve"])
        lines.append(
            f"| {r['task']} | {r['method']} | {r['lr']:.3g} | {r['steps']} | {pts} | "
            f"{r['flat_step']} ({100 * r['flat_tolerance']:.1f} pts) |"
        )
    _write_pair(rep, "\n".join(lines) + "\n", out, "probe")
    tasks = sorted({r["task"] for r in rep["runs"]})
    if tasks:
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.4), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            for r in (r for r in rep["runs"] if r["task"] == task):
                ax.plot(
                    [c["step"] for c in r["curve"]],
                    [100 * c["curve"] for c in r["curve"]],
                    marker=".",
                    color=color(r["name"]),
                    label=f"{r['method']} lr {r['lr']:.2g}",
                )
            ax.set_xlabel("step")
            ax.set_ylabel("test metric (%)")
            ax.set_title(f"{task}: constant lr", fontsize=9)
            ax.legend(fontsize=7)
        _save(fig, out / "probe.png")
    print("\n".join(lines), flush=True)


# ------------------------------------------------------------------ ablations
def build_ablations(plan, entries: list[dict], command: str) -> dict:
    study = plan.study
    runs = []
    for e in entries:
        r = read_run(e, study["test_records"], study["tasks"][e["task"]]["metric"], study.get("curve_records"))
        if r is not None:
            r["variant"] = e["phase"]
            r["overrides"] = [
                o
                for o in e["overrides"]
                if o not in plan.entry(e["task"], e["method"], e["lr"], e["seed"], "x")["overrides"]
            ]
            runs.append(r)
    return {
        "date": _dt.date.today().isoformat(),
        "command": command,
        "test_records": study["test_records"],
        "method": study["ablations"]["method"],
        "runs": [_public(r) for r in runs],
    }


def write_ablations(rep: dict, out: Path) -> None:
    plt = _pyplot()

    lines = [
        f"# Ablations of {rep['method']}, {rep['date']}",
        "",
        f"Command: `{rep['command']}`  ",
        "One knob changed at a time around the chosen lr (seed of the sweep). Test metric on the first "
        f"{rep['test_records']} eval records, dev on the rest; final training loss = mean of the last 5 "
        "steps.",
        "",
        "| task | variant | change | lr | test by step | test after | dev after | final training loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rep["runs"]:
        pts = _curve_text(r["curve"])
        last = statistics.mean(r["losses"][-5:]) if r["losses"] else float("nan")
        lines.append(
            f"| {r['task']} | {r['variant']} | {' '.join(r['overrides']) or '-'} | {r['lr']:.3g} | {pts} | "
            f"{_pct(r['after'])} | {_pct(r['dev_after'])} | {last:.4f} |"
        )
    _write_pair(rep, "\n".join(lines) + "\n", out, "ablations")
    tasks = sorted({r["task"] for r in rep["runs"]})
    if tasks:
        fig, axes = plt.subplots(2, len(tasks), figsize=(5.2 * len(tasks), 6.4), squeeze=False)
        for i, task in enumerate(tasks):
            for r in (r for r in rep["runs"] if r["task"] == task):
                lw = 2.2 if r["variant"] == "baseline" else 1.0
                axes[0][i].plot(
                    [c["step"] for c in r["curve"]],
                    [100 * c["curve"] for c in r["curve"]],
                    marker=".",
                    lw=lw,
                    label=r["variant"],
                )
                axes[1][i].plot(range(1, len(r["losses"]) + 1), _smooth(r["losses"], 5), lw=lw, label=r["variant"])
            axes[0][i].set_title(f"{task}: {rep['method']} ablations, test metric", fontsize=9)
            axes[0][i].set_xlabel("step")
            axes[0][i].set_ylabel("%")
            axes[0][i].legend(fontsize=6)
            axes[1][i].set_xlabel("step")
            axes[1][i].set_ylabel("training loss (5-step mean)")
            axes[1][i].set_yscale("log")
        _save(fig, out / "ablations.png")
    print("\n".join(lines), flush=True)
