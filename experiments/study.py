"""The quality study: every method on every task at its best learning rate, several seeds.

    python -m experiments.study [--config configs/study_smollm2.yaml] [--phase sweep|final|all]
                                [--tasks a,b] [--methods a,b] [--seeds 0,1,2] [--steps N]
                                [--out DIR] [--quick] [--report-only] [--partial]
                                [--grid METHOD=V,V ...]
    python -m experiments.study --probe [--tasks a] [--steps N]    # how many steps a method needs
    python -m experiments.study --ablations [--tasks a]            # one optimiser knob at a time

Every run is one real training run through the launcher and trainer with the method and
the learning rate as the only variables: the same run config, steps, schedule, data order
and evaluation records. A method entry of the study config is a `method.*` block (its
`name` one of the registry's, every other key a method.* override) plus its grid:

    lrs       learning rates (numbers, or `auto`: what train.lr=auto gives the entry), or
    lr_mults  multiples of `lr_unit` (or `auto`, as in lrs); lr_unit: `auto` (the default:
              train.lr=auto's rate), a number, or an expression in
              D (the task's target weights) and the entry's numeric keys, with sqrt(), e.g.
              "1.24e-4 * sqrt(D / d)". A fixed expression keeps the grid (and the finished
              runs) in place when the calibrated default changes.

`--grid METHOD=V,V` replaces an entry's grid for one invocation (its lr_mults, or its lrs,
as the entry has): e.g. the rates chosen at one budget re-run at another (`--steps 80
--grid gpart-d131k=3 --grid lora-r8=0.003`) without a copy of the config.

Per task and method:
  sweep   every lr of the grid, one seed (`sweep_seed`);
  final   the lr with the best held-out metric on the dev records, re-run on `seeds`
          (the sweep's run is that seed's run when the seed is the sweep seed).
          Chosen once the whole grid is finished; with --partial among the grid's
          finished runs (the report lists the rates not run yet).

Every run evaluates all `eval_examples` records after training, the first `curve_records`
every `eval_every` steps, and writes each record's verdict (train.eval_predictions); the
base model (step 0) is evaluated once per task and output folder, by the first run of the
task, since every method starts exactly at it (the others run train.eval_before=false and
their reports take step 0 from that run); the study splits them into test records (the first
`test_records`: the reported numbers, the learning curves and the paired tests) and dev
records (the rest: only used to choose the lr), so the choice of lr never sees the
records it is judged on. Paired tests and the parity verdict compare every method with
the `compare_with` entry. --probe trains the `probe` entries at a constant lr (after
warm-up) for `probe.steps` steps: the curve that says when a method has flattened.
--ablations re-runs one entry at its chosen lr with one knob changed at a time (the
`ablations` variants: any overrides; `lr_mult=X` scales the chosen lr), seed
`sweep_seed`, against the unchanged run.

Finished runs are reused (a run's folder carries the hash of its config, overrides and
ranks), so the study can be stopped and continued; runs that fail are reported (exit 1
after the report) and retried on the next invocation. Reports (experiments/study_report.py):
study.json, study.md, and PNGs of the metric vs trainable parameters, learning curves and
lr sweeps. The runs stay on the machine that trained them; `--merge STUDY_JSON` puts an
earlier report's rows (e.g. docs/quality_qasc.json, measured another day) beside this
invocation's for the methods it leaves out, once the two share records, seeds and budget.
"""

from __future__ import annotations

import argparse
import ast
import functools
import hashlib
import json
import math
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from gpart_ds.config import ConfigError, load_config, resolve_config_path, resolved_lr
from gpart_ds.errors import RunFailed

METRICS = ("accuracy", "answer_accuracy", "exact_match")
PHASES = ("sweep", "final", "all")
# train.* keys left out of a run's identity (_key): they add reports, not change the run.
# eval_before: the study evaluates the base once per task and output folder (execute), so a
# run is the same run whether it evaluated the base itself or another run of its task did.
EVAL_ONLY_KEYS = ("eval_generate", "eval_generate_batch", "eval_before")
# Keys added to the schema after runs existed, whose default reproduces those runs: at the
# default they are left out of a run's identity, so finished runs stay finished after an
# upgrade (any other value is part of it). A key added that way is listed here.
NEUTRAL_AT_DEFAULT = ("dist.fault_tolerance", "dist.ft_max_retries")
# Keys of a method entry that are the study's, not method.* overrides.
GRID_KEYS = ("lrs", "lr_mults", "lr_unit")


def _need(cond, where: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {msg}")


def _check_seeds(seeds, where: str) -> None:
    """A non-empty list of distinct integers >= 0 (each is a run's train.seed and
    method.seed, which must be in [0, 2^64))."""
    ok = isinstance(seeds, list) and seeds and all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)
    _need(ok and all(x >= 0 for x in seeds), where, f"a non-empty list of integers >= 0, got {seeds!r}")
    _need(len(set(seeds)) == len(seeds), where, f"{seeds!r} names a seed twice")


def _is_rate(x) -> bool:
    return x == "auto" or (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0)


# What a grid value is, per kind of grid: the one rule for the study config and --grid.
# auto in either: the rate train.lr: auto gives the entry (how far the default is from the best).
_GRID_VALUE = {"lr_mults": "a multiple (a number > 0 or auto)", "lrs": "a learning rate (> 0 or auto)"}


def _grid_key(m: dict) -> str:
    """Which grid an entry has (load_study checks it has exactly one)."""
    return "lr_mults" if m.get("lr_mults") else "lrs"


def _grid_value_ok(key: str, x) -> bool:
    return _is_rate(x)


def load_study(path: str) -> dict:
    """The study config, its own keys checked (every run's config is checked by the Plan)."""
    from gpart_ds import methods

    p = resolve_config_path(path)
    try:
        cfg = OmegaConf.to_container(OmegaConf.load(p), resolve=True)
    except Exception as exc:
        raise ConfigError(f"{p}: not a valid study config: {exc}") from None
    _need(isinstance(cfg, dict), str(p), "a study config is a mapping")
    for key in ("tasks", "methods", "ranks", "seeds", "eval_examples", "test_records", "eval_every"):
        _need(key in cfg, str(p), f"required key {key!r} missing")
    _check_seeds(cfg["seeds"], f"{p}: seeds")
    _need(
        0 < cfg["test_records"] < cfg["eval_examples"],
        f"{p}: test_records",
        f"must be in (0, eval_examples={cfg['eval_examples']}): the rest are the dev records that choose the lr",
    )
    _need(
        0 < cfg.get("curve_records", 1) <= cfg["test_records"],
        f"{p}: curve_records",
        f"must be in (0, test_records={cfg['test_records']}]: the learning curves' records are test records",
    )
    for name, t in cfg["tasks"].items():
        _need(
            t.get("metric") in METRICS,
            f"{p}: tasks.{name}.metric",
            f"must be one of {METRICS}, got {t.get('metric')!r}",
        )
        _need("config" in t, f"{p}: tasks.{name}.config", "a run config is required")
        _need(
            int(t.get("steps", cfg.get("steps", 0))) >= 1,
            f"{p}: tasks.{name}.steps",
            "steps per run (here or at the top level) must be >= 1",
        )
    for name, m in cfg["methods"].items():
        where = f"{p}: methods.{name}"
        _need(isinstance(m, dict) and m.get("name") in methods.names(), where, f"name must be one of {methods.names()}")
        _need(
            bool(m.get("lrs")) != bool(m.get("lr_mults")),
            where,
            "needs either lrs (the learning rates to sweep: numbers or auto) or lr_mults (multiples of lr_unit)",
        )
        key = _grid_key(m)
        _need(isinstance(m[key], list), f"{where}.{key}", f"a list, got {m[key]!r}")
        for x in m[key]:
            _need(_grid_value_ok(key, x), f"{where}.{key}", f"{x!r} is not {_GRID_VALUE[key]}")
        _need("lr_unit" not in m or m.get("lr_mults"), f"{where}.lr_unit", "lr_unit goes with lr_mults")
        if isinstance(m.get("lr_unit"), str) and m["lr_unit"] != "auto":
            lr_unit(m, 1000, f"{where}.lr_unit", check_only=True)
    ref = cfg.get("compare_with")
    _need(ref is None or ref in cfg["methods"], f"{p}: compare_with", f"{ref!r} is not one of methods")
    cfg["_path"] = str(p)
    return cfg


# ------------------------------------------------------------------ learning rates
_OPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.Pow: lambda a, b: a**b,
}


def lr_unit(entry: dict, D: int, where: str, check_only: bool = False) -> float | None:
    """A number, or an expression's value: arithmetic on numbers, D and the entry's
    numeric keys, and sqrt(); None for `auto` (the caller resolves it)."""
    unit = entry.get("lr_unit", "auto")
    if unit == "auto":
        return None
    if not isinstance(unit, str):
        _need(_is_rate(unit), where, f"must be a number > 0, auto, or an expression, got {unit!r}")
        return float(unit)
    names = {k: v for k, v in entry.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    names["D"] = D

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.Name):
            _need(node.id in names, where, f"{unit!r}: unknown name {node.id!r} (known: {sorted(names)})")
            return names[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "sqrt"
            and len(node.args) == 1
            and not node.keywords
        ):
            return math.sqrt(ev(node.args[0]))
        raise ConfigError(f"{where}: {unit!r}: only numbers, D, the entry's keys, + - * / ** and sqrt()")

    try:
        tree = ast.parse(unit, mode="eval")
    except SyntaxError:
        raise ConfigError(f"{where}: {unit!r} is not an expression") from None
    try:
        value = ev(tree)
    except (ArithmeticError, ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {unit!r}: {exc}") from None
    if not check_only:
        _need(_is_rate(value), where, f"{unit!r} = {value!r} at D={D}: must be > 0")
    return float(value)


def _round(lr: float) -> float:
    return float(f"{lr:.4g}")  # run folders are named by lr: the grid is stable to 4 digits


def target_count(run_cfg) -> int:
    from gpart_ds.model import check_targets

    return check_targets(run_cfg).D


def steps_of(study: dict, task: dict) -> int:
    return int(task.get("steps", study.get("steps", 0)))


def method_overrides(entry: dict) -> list[str]:
    """A study method entry as method.* overrides, name first (its grid keys are the study's)."""
    keys = ["name"] + [k for k in entry if k not in GRID_KEYS and k != "name"]
    return [f"method.{k}={entry[k]}" for k in keys]


def run_overrides(
    study: dict, task: dict, entry: dict, lr: float, seed: int, steps: int, extra: tuple = ()
) -> list[str]:
    """The run's overrides: the study's budget and evaluation, the entry's method.* keys,
    the seed (data order, and the method's own seed where it has one: GPart's partition,
    VeRA's projections; LoRA and full fine-tuning say they ignore method.seed, and the key
    stays in their runs so that runs already finished keep their identity), the lr; then
    the variant's `extra`."""
    out = [
        f"train.max_steps={steps}",
        f"train.seed={seed}",
        f"method.seed={seed}",
        f"train.eval_examples={study['eval_examples']}",
        f"train.eval_every={study['eval_every']}",
        "train.eval_predictions=true",
        "train.log_every=1",
        "checkpoint.keep_last=1",
    ]
    if study.get("curve_records"):  # the evaluations during training score only these
        out.append(f"train.eval_examples_during={study['curve_records']}")
    if task.get("metric") == "answer_accuracy":  # the curves are of generated answers too
        out.append("train.eval_generate=always")
    out += method_overrides(entry)
    out.append(f"train.lr={lr:.6g}")
    return list(task.get("overrides", [])) + out + list(extra)


@functools.cache
def _schema_defaults() -> dict:
    """The schema's defaults, built once (identity() asks for them per planned run)."""
    from gpart_ds.config.schema import RunConfig

    return OmegaConf.to_container(OmegaConf.structured(RunConfig))


def identity(config: str, overrides: list[str], ranks: int) -> list:
    """What a run is: its resolved config (the run config with the overrides applied,
    output_dir aside) and its ranks. Not the config's path or text: the same run from another
    checkout, or after a comment or a key the study overrides changed in the run config, is
    the same run and is reused."""
    cfg = OmegaConf.to_container(load_config(config, overrides, check_files=False), resolve=True)
    for where in ("output_dir", "config_file", "overrides"):  # where it came from, not what it is
        cfg.pop(where, None)
    # Keys that decide what an evaluation also reports, not what is trained or scored: a run
    # finished before such a key existed is the same run.
    for key in EVAL_ONLY_KEYS:
        cfg["train"].pop(key, None)
    defaults = _schema_defaults()
    for dotted in NEUTRAL_AT_DEFAULT:
        section, key = dotted.split(".")
        if key in cfg.get(section, {}) and cfg[section][key] == defaults[section][key]:
            cfg[section].pop(key)
    return [cfg, ranks]


def _key(config: str, overrides: list[str], ranks: int) -> str:
    """identity() as a short hash: what a finished run's folder carries (study_key)."""
    return hashlib.sha256(
        json.dumps(identity(config, overrides, ranks), sort_keys=True, default=str).encode()
    ).hexdigest()[:16]


def is_done(out: Path, key: str) -> bool:
    stamp = out / "study_key"
    return (
        stamp.is_file()
        and stamp.read_text().strip() == key
        and (out / "metrics.jsonl").is_file()
        and any('"event": "summary"' in line for line in (out / "metrics.jsonl").read_text().splitlines())
    )


def _override_value(overrides: list[str], key: str) -> str:
    return [o.split("=", 1)[1] for o in overrides if o.startswith(f"{key}=")][-1]


def run_one(config: Path, overrides: list[str], ranks: int, out: Path, log: Path) -> bool:
    """Train one run unless it is already complete; True when it is complete afterwards."""
    from .bench.compare import run_method

    key = _key(str(config), overrides, ranks)
    if is_done(out, key):
        return True
    method = _override_value(overrides, "method.name")
    steps = int(_override_value(overrides, "train.max_steps"))
    rest = [o for o in overrides if not o.startswith(("method.name=", "train.max_steps="))]
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        run_method(str(config), method, ranks, steps, out, rest, log)
    except RuntimeError as exc:  # a failed run is reported and retried next time; the rest go on
        print(f"[study] FAILED: {str(exc).splitlines()[0]}", flush=True)
        return False
    (out / "study_key").write_text(key + "\n")
    return True


class Plan:
    """The runs of one invocation, with everything a report needs to know about each."""

    def __init__(
        self, study: dict, out: Path, tasks: list[str], methods: list[str], partial: bool = False, recorded=None
    ):
        from gpart_ds import assets

        from . import study_report

        self.study, self.out, self.tasks, self.methods = study, out, tasks, methods
        # runs that earlier reports record (--reuse-runs): finished, though not on this machine
        self.recorded = recorded or study_report.RecordedRuns()
        # partial: a method's lr is chosen among its finished grid runs even while others
        # are missing (the report names them), so a long search can be reported and its
        # seeds run before the whole grid is done.
        self.partial = partial
        base = Path(study["_path"]).parent
        self.config, self._D, self._auto = {}, {}, {}
        for task in tasks:
            t = study["tasks"][task]
            self.config[task] = resolve_config_path(base / t["config"])
            cfg0 = load_config(self.config[task], list(t.get("overrides", [])), check_files=False)
            for recipe in cfg0.prepare:  # the target count needs the model's config.json
                assets.ensure(recipe)

    def _where(self, method: str) -> str:
        return f"{self.study['_path']}: methods.{method}"

    def run_config(self, task: str, method: str):
        """The task's run config with the entry's method.* keys and train.lr=auto."""
        t, m = self.study["tasks"][task], self.study["methods"][method]
        ov = list(t.get("overrides", [])) + method_overrides(m) + ["train.lr=auto"]
        return load_config(self.config[task], ov, check_files=False)

    def D(self, task: str, method: str) -> int:
        """The target weights of the entry on the task (its target_modules may differ)."""
        if (task, method) not in self._D:
            self._D[task, method] = target_count(self.run_config(task, method))
        return self._D[task, method]

    def auto_lr(self, task: str, method: str) -> float | None:
        """What train.lr=auto gives the entry (None: the method has no calibrated rate)."""
        if (task, method) not in self._auto:
            try:
                self._auto[task, method] = resolved_lr(self.run_config(task, method), self.D(task, method))
            except NotImplementedError:
                self._auto[task, method] = None
        return self._auto[task, method]

    def unit(self, task: str, method: str) -> float | None:
        """The lr the entry's lr_mults multiply (None: the entry sweeps absolute lrs)."""
        m = self.study["methods"][method]
        if not m.get("lr_mults"):
            return None
        unit = lr_unit(m, self.D(task, method), f"{self._where(method)}.lr_unit")
        if unit is None:
            unit = self.auto_lr(task, method)
            _need(unit is not None, self._where(method), "lr_unit auto: the method has no calibrated rate")
        return unit

    def lr_grid(self, task: str, method: str) -> list[float]:
        m = self.study["methods"][method]
        out = []
        for x in m.get("lr_mults") or m["lrs"]:
            if m.get("lr_mults") and x != "auto":
                out.append(_round(self.unit(task, method) * x))
                continue
            lr = self.auto_lr(task, method) if x == "auto" else x
            _need(lr is not None, f"{self._where(method)}.lrs", "auto: the method has no calibrated rate")
            out.append(_round(lr))
        return out

    def run_dir(self, task: str, method: str, lr: float, seed: int, kind: str = "runs") -> Path:
        return self.out / kind / task / method / f"lr{lr:.4g}-s{seed}"

    def entry(self, task, method, lr, seed, phase, extra=(), steps=None, kind="runs") -> dict:
        t, m = self.study["tasks"][task], self.study["methods"][method]
        steps = steps or steps_of(self.study, t)
        ov = run_overrides(self.study, t, m, lr, seed, steps, extra)
        load_config(self.config[task], ov, check_files=False)  # every run validated before the first starts
        out = self.run_dir(task, method, lr, seed, kind)
        return {
            "task": task,
            "method": method,
            "lr": lr,
            "seed": seed,
            "phase": phase,
            "overrides": ov,
            "config": self.config[task],
            "out": out,
            "root": self.out,
            "key": _key(str(self.config[task]), ov, self.study["ranks"]),
        }

    def recorded_run(self, entry: dict) -> dict | None:
        return self.recorded.run(entry)

    def recorded_test(self, head: dict, run_a: dict, run_b: dict) -> dict | None:
        return self.recorded.test(head, run_a, run_b)

    def to_train(self, entries: list[dict]) -> list[dict]:
        """The entries a report does not already record (those are trained, or found done, here)."""
        return [e for e in entries if self.recorded.run(e) is None]

    def sweep(self, task: str, method: str) -> list[dict]:
        return [
            self.entry(task, method, lr, self.study.get("sweep_seed", 0), "sweep") for lr in self.lr_grid(task, method)
        ]


def finished_elsewise(out: Path, key: str) -> bool:
    """`out` holds a finished run of another configuration (e.g. other --steps: the folder
    is named by task, method, lr and seed only)."""
    stamp = out / "study_key"
    if not stamp.is_file():
        return False
    theirs = stamp.read_text().strip()
    return theirs != key and is_done(out, theirs)


def execute(entries: list[dict], ranks: int, log_dir: Path) -> int:
    """Train the entries not yet complete; returns how many failed. Refuses, before any
    run, to replace a finished run of another configuration."""
    t0 = time.perf_counter()
    clash = [e["out"] for e in entries if finished_elsewise(e["out"], e["key"])]
    _need(
        not clash,
        str(clash[0]) if clash else "",
        f"holds a finished run of another configuration ({len(clash)} such folder(s) in this study's "
        "plan), which this run would replace: use another --out for it, or delete the folders to re-run them",
    )
    todo = [e for e in entries if not is_done(e["out"], e["key"])]
    print(f"[study] {len(entries)} runs planned, {len(entries) - len(todo)} already complete", flush=True)
    failed = 0
    for i, e in enumerate(todo, 1):
        name = f"{e['task']}/{e['method']}/lr{e['lr']:.4g}-s{e['seed']}"
        base = base_evaluated(e)
        overrides = e["overrides"] + ["train.eval_before=false"] if base else e["overrides"]
        shared = f"; the base model's evaluation is {base.relative_to(e['root'])}'s" if base else ""
        print(
            f"[study] {i}/{len(todo)} {e['phase']} {name} ({(time.perf_counter() - t0) / 60:.0f} min so far{shared})",
            flush=True,
        )
        log = log_dir / log_name(e["out"], log_dir.parent)
        failed += not run_one(e["config"], overrides, ranks, e["out"], log)
    return failed


def base_evaluated(entry: dict) -> Path | None:
    """The finished run of the entry's task in the same output folder that evaluated the
    base model (step 0) with the entry's evaluation settings, or None: then the entry
    evaluates it. Every method starts exactly at the base (GPart theta = 0, LoRA B = 0,
    VeRA b = 0, full fine-tuning the base itself), so every run of a task would score the
    same model on the same records: the study does it once per task and output folder, in
    the first run of the plan (runs go one at a time: a later run finds it finished; where
    it failed, the next run evaluates the base instead). The report takes the step-0
    verdicts of the others from it (study_report.read_run)."""
    from . import study_report

    if entry.get("root") is None:
        return None
    cfg = OmegaConf.to_container(load_config(entry["config"], entry["overrides"], check_files=False), resolve=True)
    if not cfg["train"]["eval_before"]:  # the task's own overrides skip it: nothing to share
        return None
    return study_report.base_run(Path(entry["root"]), entry["task"], study_report.eval_settings(cfg))


def log_name(run_out: Path, study_out: Path) -> str:
    """A run's log file: its folder under the study's output with '/' -> '-', the sweep and
    final runs' without the leading 'runs' (a probe or ablation run has a sweep run's task,
    method, lr and seed: named by those alone, its log replaced the sweep run's)."""
    parts = run_out.relative_to(study_out).parts
    return "-".join(parts[1:] if parts[0] == "runs" else parts) + ".log"


def _number_or_word(v: str):
    try:
        return float(v)
    except ValueError:
        return v


def apply_grid(study: dict, specs: list[str], methods: list[str]) -> None:
    """`--grid METHOD=V,V`: the entry's grid becomes these values, in the entry's own terms
    (multiples of lr_unit for an lr_mults entry, learning rates or auto for an lrs entry);
    a run at a value the full grid also has is the same run (same folder and key)."""
    given = set()
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip()
        _need(sep and values.strip(), f"--grid {spec}", "expected METHOD=V[,V...], e.g. lora-r8=0.001,0.003")
        _need(name in methods, f"--grid {spec}", f"{name!r} is not one of the methods run (known: {methods})")
        _need(name not in given, f"--grid {spec}", f"{name} has a --grid already: give its values in one, {name}=V,V")
        given.add(name)
        m = study["methods"][name]
        key = _grid_key(m)
        grid = []
        for v in (v.strip() for v in values.split(",")):
            x = _number_or_word(v)
            _need(_grid_value_ok(key, x), f"--grid {spec}", f"{v!r} is not {_GRID_VALUE[key]}")
            grid.append(x)
        m[key] = grid


def _apply_quick(study: dict, tasks: list[str], methods: list[str]) -> tuple[list[str], list[str]]:
    q = study.get("quick", {})
    for k in ("eval_examples", "test_records", "curve_records", "eval_every", "steps", "seeds"):
        if k in q:
            study[k] = q[k]
    if "steps" in q:
        for t in study["tasks"].values():
            t.pop("steps", None)
    for m in study["methods"].values():
        for k in ("lr_mults", "lrs"):
            if k in m and "grid" in q:
                m[k] = m[k][: q["grid"]]
    return q.get("tasks", tasks[:1]), q.get("methods", methods[:2])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(
        prog="python -m experiments.study", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", default="configs/study_smollm2.yaml")
    ap.add_argument(
        "--phase",
        choices=PHASES,
        default="all",
        help="sweep: the lr grids only; final: also the best lr on every seed (default all = both)",
    )
    ap.add_argument("--probe", action="store_true", help="the flattening probe (constant lr, long runs) instead")
    ap.add_argument("--ablations", action="store_true", help="the `ablations` variants instead (after the sweep)")
    ap.add_argument("--quick", action="store_true", help="the config's `quick` subset (the pipeline, minutes)")
    ap.add_argument("--report-only", action="store_true", help="write the reports from finished runs; train nothing")
    ap.add_argument("--out", default=None, help="default: the study config's output_dir (+ /quick)")
    ap.add_argument("--steps", type=int, default=None, help="steps per run for every task (default: the config's)")
    ap.add_argument("--seeds", default=None, help="override the config's seeds, e.g. 0,1,2")
    ap.add_argument("--tasks", default=None, help="only these of the config's tasks, e.g. qasc")
    ap.add_argument("--methods", default=None, help="only these of the config's methods")
    ap.add_argument(
        "--partial",
        action="store_true",
        help="choose each method's lr among its finished grid runs when some are missing "
        "(the report lists the missing rates); default: only after the whole grid",
    )
    ap.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="METHOD=V,V",
        help="this entry's grid for this invocation: multiples of lr_unit (lr_mults entries) "
        "or learning rates (lrs entries), e.g. --grid lora-r8=0.003; repeatable",
    )
    ap.add_argument(
        "--merge",
        action="append",
        default=[],
        metavar="STUDY_JSON",
        help="add an earlier report's rows (e.g. docs/quality_qasc.json) for the methods this "
        "invocation leaves out: results measured on another machine or day; repeatable",
    )
    ap.add_argument(
        "--reuse-runs",
        action="append",
        default=[],
        metavar="STUDY_JSON",
        help="count the runs an earlier report records (e.g. docs/quality_qasc.json) as finished "
        "for the methods this invocation runs: a grid measured on another machine or day is "
        "extended (--grid) or its seeds run without training its rates again; repeatable",
    )
    args = ap.parse_args(argv)
    study = load_study(args.config)  # a ConfigError: `error: ...`, exit 2 (errors.run_cli)
    tasks, methods = list(study["tasks"]), list(study["methods"])
    if args.quick:
        tasks, methods = _apply_quick(study, tasks, methods)
    if args.steps is not None:
        _need(args.steps >= 1, "--steps", f"must be >= 1, got {args.steps}")
        study["steps"] = args.steps
        for t in study["tasks"].values():
            t.pop("steps", None)
    if args.seeds is not None:
        try:
            seeds = [int(x) for x in args.seeds.split(",")]
        except ValueError:
            seeds = args.seeds
        _check_seeds(seeds, f"--seeds {args.seeds}")
        study["seeds"] = seeds
    for flag, chosen, known in (("--tasks", args.tasks, tasks), ("--methods", args.methods, methods)):
        if chosen:
            want = [x.strip() for x in chosen.split(",") if x.strip()]
            bad = [x for x in want if x not in known]
            if bad:
                raise ConfigError(f"{flag}: {bad} not in {args.config} (known: {known})")
            known[:] = want
    apply_grid(study, args.grid, methods)
    out = Path(args.out or (Path(study.get("output_dir", "outputs/study")) / ("quick" if args.quick else "")))
    command = "python -m experiments.study " + " ".join(argv if argv is not None else sys.argv[1:])
    for flag, given in (("--merge", args.merge), ("--reuse-runs", args.reuse_runs)):
        if given and (args.probe or args.ablations):
            raise ConfigError(f"{flag}: only for the study's own report (not --probe or --ablations)")
    earlier = [(f, _load_report(f)) for f in args.merge]
    reused = [(f, _load_report(f, "--reuse-runs")) for f in args.reuse_runs]
    if args.probe:
        return _probe(study, out, tasks, args, command)
    if args.ablations:
        return _ablations(study, out, tasks, args, command)
    from . import study_report

    for f, rep in earlier:  # refused before anything is trained
        study_report.check_merge(rep, f, study, tasks, methods, {t: steps_of(study, study["tasks"][t]) for t in tasks})
    recorded = study_report.RecordedRuns(reused)
    plan = Plan(study, out, tasks, methods, partial=args.partial, recorded=recorded)
    recorded.check(study, tasks, methods, {t: steps_of(study, study["tasks"][t]) for t in tasks}, plan.D)
    sweeps = [e for task in tasks for m in methods for e in plan.sweep(task, m)]
    failed = 0
    if not args.report_only:
        # Task by task: each task's sweep and then its seeds, so a task's results are
        # complete before the next task starts.
        for task in tasks:
            failed += execute(plan.to_train([e for e in sweeps if e["task"] == task]), study["ranks"], out / "logs")
            if args.phase in ("final", "all"):
                finals = study_report.final_entries(plan, task, methods)
                failed += execute(plan.to_train(finals), study["ranks"], out / "logs")
    rep = study_report.build(plan, tasks, methods, sweeps, command)
    for f, e in earlier:
        rep = study_report.merge(rep, e, f, list(study["methods"]))
    study_report.write(rep, out)
    _failed(failed, out)
    return rep


def _load_report(path: str, flag: str = "--merge") -> dict:
    """An earlier study.json for --merge or --reuse-runs; ConfigError naming the file when it is not one."""
    try:
        rep = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{flag} {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{flag} {path}: cannot read it ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{flag} {path}: not JSON (line {exc.lineno}: {exc.msg})") from None
    missing = (
        [k for k in ("summary", "runs", "paired", "D", "date", "command", "machine") if k not in rep]
        if isinstance(rep, dict)
        else ["summary"]
    )
    if missing:
        raise ConfigError(
            f"{flag} {path}: not a study report (no {', '.join(missing)}); the study writes one as study.json"
        )
    return rep


def _failed(n: int, out: Path) -> None:
    if n:
        raise RunFailed(
            f"{n} run(s) failed (their logs: {out / 'logs'}); the report covers the finished runs. "
            "Run the same command again to retry them (finished runs are reused)"
        )


def _probe(study: dict, out: Path, tasks: list[str], args, command: str) -> dict:
    """Constant-lr (after warm-up) long runs of the `probe` entries: when does each flatten?"""
    from . import study_report

    pr = study.get("probe")
    _need(bool(pr), study["_path"], "no `probe` section")
    # The probe's curve is what it is for: every test record at every evaluation.
    probe_study = {
        **study,
        "eval_every": pr.get("eval_every", study["eval_every"]),
        "curve_records": study["test_records"],
    }
    for method in pr["methods"]:
        _need(method in study["methods"], f"{study['_path']}: probe.methods.{method}", "is not one of methods")
    plan = Plan(probe_study, out, tasks, list(pr["methods"]))
    entries = []
    for task in tasks:
        per_task = pr.get("steps", 0)
        steps = int(args.steps or (per_task.get(task, 0) if isinstance(per_task, dict) else per_task))
        _need(steps >= 1, f"{study['_path']}: probe.steps", f"for {task} must be >= 1")
        for method, lr in pr["methods"].items():
            entries.append(
                plan.entry(
                    task,
                    method,
                    float(lr),
                    study.get("sweep_seed", 0),
                    "probe",
                    extra=("train.schedule=constant",),
                    steps=steps,
                    kind="probe",
                )
            )
    failed = 0 if args.report_only else execute(entries, study["ranks"], out / "logs")
    rep = study_report.build_probe(plan, entries, command)
    study_report.write_probe(rep, out)
    _failed(failed, out)
    return rep


def _ablations(study: dict, out: Path, tasks: list[str], args, command: str) -> dict:
    """One knob at a time around an entry's chosen lr (seed sweep_seed): `ablations.variants`
    name -> extra overrides; `lr_mult=X` in a variant's overrides scales the chosen lr."""
    from . import study_report

    ab = study.get("ablations")
    _need(bool(ab), study["_path"], "no `ablations` section")
    method = ab["method"]
    _need(method in study["methods"], f"{study['_path']}: ablations.method", f"{method!r} is not one of methods")
    tasks = [t for t in tasks if t in ab.get("tasks", tasks)]
    plan = Plan(study, out, tasks, [method], partial=args.partial)
    entries = []
    for task in tasks:
        lr = study_report.best_lr(plan, task, method, waiting="ablations")
        if lr is None:
            continue
        entries.append(plan.entry(task, method, lr, study.get("sweep_seed", 0), "baseline"))
        for name, extra in ab["variants"].items():
            mult = next((float(x.split("=", 1)[1]) for x in extra if x.startswith("lr_mult=")), 1.0)
            extra = tuple(x for x in extra if not x.startswith("lr_mult="))
            entries.append(
                plan.entry(
                    task,
                    method,
                    _round(lr * mult),
                    study.get("sweep_seed", 0),
                    name,
                    extra=extra,
                    kind=f"ablations/{name}",
                )
            )
    failed = 0 if args.report_only else execute(entries, study["ranks"], out / "logs")
    rep = study_report.build_ablations(plan, entries, command)
    study_report.write_ablations(rep, out)
    _failed(failed, out)
    return rep


def cli(argv=None) -> int:
    """`python -m experiments.study`: main() with bad input as `error: ...`, exit 2."""
    from gpart_ds.errors import run_cli

    return run_cli(lambda: main(argv))


if __name__ == "__main__":
    sys.exit(cli())
