"""The fault probes: bad or unusual inputs of every kind the CLIs accept, each with the
behaviour a careful user should get (round one: nothing lost, nothing silent, no tracebacks
for bad input; and the export and reference-adapter defects found beside it).

This module is what every case shares: Case and the registry (CASES, `case`), the
expectations (`err`, `ok`), the calls (`train`, `resume`, `export`, `evaluate`) and the
checks of silent wrong results. The cases live in one module per kind of fault, imported
at the end in the order they are reported in: cases_config (config, override),
cases_data, cases_checkpoint (checkpoint, output), cases_adapters (adapter, evaluate,
verify), cases_base, cases_runtime (diskfull, nonfinite, signal), cases_cli, cases_ranks,
and the second round's cases_identity, cases_upfront, cases_writers.

A case builds its inputs in its own folder (copies of the shared tiny run, edited
configs, data, adapters, model variants; tests.faults.fixtures) and returns the command
to run (or a list: all but the last are set-up). tests.faults.probe runs them all and
counts the verdicts; tests/test_faults_*.py assert them (the cases with ci=True).

Expectations (tests.faults.runner.Expect): bad input -> exit 2 and an `error:` line that
names what and where (regexes), nothing that existed changed; a documented recovery ->
its exit status and message (damaged checkpoint skipped with a warning, SIGTERM ->
checkpoint -> 75). `defect` names the kind of defect a case shows when it fails today
(tests.faults.probe.DEFECTS lists them).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.faults.fixtures import (
    Fx,
    theta_of_checkpoint,
)
from tests.faults.runner import Call, Expect

CFG = r"cfg\.yaml"
CFG_LINE = r"cfg\.yaml:\d+"
OVERRIDE = r"(?i)command.line|override"
DISK = r"(?i)no space left|disk( is)? full|file too large|quota"
NONFINITE = r"(?i)non-finite|\bnan\b|\binf\b"
ACFG = r"adapter_config\.json"
AW = r"adapter_model\.safetensors"

# What a successful resume of the copied run may change: its checkpoints (keep_last
# deletes older ones), adapter, resolved config and final verdicts (a resume that trains on
# writes its own: they read the same only while the tiny model's exact match was 0 on every
# record; its generated answers differ); metrics.jsonl only grows.
RESUME_MAY = ("run/checkpoints/*", "run/adapter/*", "run/run_config.yaml", "run/eval_predictions.jsonl")
APPEND = ("run/metrics.jsonl",)


@dataclass
class Case:
    id: str
    kind: str
    title: str  # what a careful user did
    build: Callable  # (ws, fx) -> Call | [Call, ...] (earlier ones are set-up)
    expect: Expect
    defect: str = ""  # the kind of defect shown when this fails today (tests.faults.probe.DEFECTS)
    ci: bool = True  # part of the pytest suite (else the harness only)
    needs: str = ""  # "tmpfs": only where a private tmpfs can be mounted


CASES: list[Case] = []


def case(id, kind, title, expect, defect="", ci=True, needs=""):
    def deco(fn):
        CASES.append(Case(id, kind, title, fn, expect, defect, ci, needs))
        return fn

    return deco


def err(*names, not_names=(), code=2) -> Expect:
    return Expect(error=True, code=code, names=tuple(names), not_names=tuple(not_names))


def ok(*says, code=0) -> Expect:
    return Expect(error=False, code=code, says=tuple(says))


# ---------------------------------------------------------------- helpers
def train(
    ws: Path, fx: Fx, changes: dict | None = None, *overrides, text: str | None = None, argv: tuple = (), **kw
) -> Call:
    cfg = fx.write_config(ws, changes, text=text)
    return Call("train", ["--config", cfg, *argv, *overrides], **kw)


def yaml_text(fx: Fx, ws: Path, changes: dict | None = None) -> str:
    return yaml.safe_dump(fx.config(ws, changes), sort_keys=False)


def resume(ws: Path, fx: Fx, changes: dict | None = None, *overrides, may_change=RESUME_MAY, **kw) -> Call:
    """Resume the copied shared run (run/, checkpoints 2 and 4) with train.resume=auto."""
    ch = {"train": {"max_steps": 6, "resume": "auto"}, "checkpoint": {"every_steps": 2}}
    if changes:
        from tests.faults.fixtures import deep_update

        ch = deep_update(ch, changes)
    return train(ws, fx, ch, *overrides, may_change=may_change, append_only=APPEND, **kw)


def export(ws, fx, adapter, base=None, out=None, *extra, **kw) -> Call:
    return Call(
        "export", ["--base", base or fx.model, "--adapter", adapter, "--out", out or Path(ws) / "merged", *extra], **kw
    )


def evaluate(ws, fx, adapter=None, *extra, model=None, data=None, **kw) -> Call:
    argv = ["--model", model or fx.model, "--data", data or fx.eval, "--max-examples", "4", "--max-length", "64"]
    if adapter is not None:
        argv += ["--adapter", adapter]
    return Call("evaluate", argv + list(extra), **kw)


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


GOOD = {"prompt": "Reverse: red cat\nAnswer:", "completion": " cat red"}


def data_case(ws, fx, records, which="train", raw: bytes | None = None, name="train.jsonl", changes=None):
    p = Path(ws) / name
    if raw is not None:
        p.write_bytes(raw)
    else:
        write_jsonl(p, records)
    ch = {"data": {which: str(p)}}
    if changes:
        from tests.faults.fixtures import deep_update

        ch = deep_update(ch, changes)
    return train(ws, fx, ch)


# ---------------------------------------------------------------- checks (silent wrong results)
def _finite_theta(rel):
    def check(ws, out):
        import torch
        from safetensors.torch import load_file

        p = out.path(rel) / "adapter_model.safetensors"
        if not p.is_file():
            return None
        t = next(iter(load_file(str(p)).values()))
        return None if bool(torch.isfinite(t).all()) else f"{rel}: theta has non-finite values after exit {out.rc}"

    return check


def _finite_metrics(rel="run/metrics.jsonl"):
    def check(ws, out):
        p = out.path(rel)
        if not p.is_file():
            return None
        for line in p.read_text().splitlines():
            rec = json.loads(line)
            bad = [k for k, v in rec.items() if isinstance(v, float) and not math.isfinite(v)]
            if bad:
                return f"{rel}: non-finite {bad} at step {rec.get('step')}"
        return None

    return check


def _loss_not_zero(rel="run/metrics.jsonl"):
    def check(ws, out):
        p = out.path(rel)
        if not p.is_file():
            return None
        losses = [json.loads(ln).get("loss") for ln in p.read_text().splitlines()]
        losses = [x for x in losses if x is not None]
        if losses and all(x == 0.0 for x in losses):
            return f"{rel}: every training loss is 0.0 (no label tokens were trained on)"
        evals = [json.loads(ln).get("eval_loss") for ln in p.read_text().splitlines()]
        if any(x == 0.0 for x in evals if x is not None):
            return f"{rel}: eval_loss 0.0 (nothing was evaluated)"
        return None

    return check


def _checkpoint_is(rel, step, fx):
    """The checkpoint folder still holds the shared run's state of that step."""

    def check(ws, out):
        import torch

        p = out.path(rel)
        if not p.is_dir():
            return f"{rel}: gone"
        try:
            a = theta_of_checkpoint(p)
        except Exception as exc:  # noqa: BLE001 - any failure to read it is the finding
            return f"{rel}: unreadable after the call ({type(exc).__name__})"
        b = theta_of_checkpoint(fx.base_run / "checkpoints" / f"step-{step:06d}")
        return None if torch.equal(a, b) else f"{rel}: holds another theta than step {step}'s"

    return check


def _latest_verifies(rel="run/checkpoints"):
    def check(ws, out):
        from gpart_ds.checkpoint import CheckpointError, verify

        root = out.path(rel)
        latest = root / "latest"
        if not latest.is_file():
            return f"{rel}/latest: missing"
        try:
            verify(root / latest.read_text().strip())
        except (CheckpointError, KeyError, TypeError, AttributeError) as exc:
            return f"{rel}/latest -> {latest.read_text().strip()}: does not verify ({exc})"
        return None

    return check


def _resumed_from(step, rel="run/metrics.jsonl"):
    def check(ws, out):
        p = out.path(rel)
        events = [json.loads(ln) for ln in p.read_text().splitlines()] if p.is_file() else []
        got = [e.get("step") for e in events if e.get("event") == "resume"]
        return None if got and got[-1] == step else f"resumed from step {got[-1] if got else None}, expected {step}"

    return check


def _only_checkpoints(rel, steps):
    """The checkpoint folder holds exactly these steps (an earlier run's are gone)."""

    def check(ws, out):
        root = out.path(rel)
        got = sorted(int(p.name.split("-")[1]) for p in root.glob("step-*")) if root.is_dir() else []
        return None if got == list(steps) else f"{rel}: checkpoints of steps {got}, expected {list(steps)}"

    return check


def _preempted(rel="run/metrics.jsonl"):
    def check(ws, out):
        p = out.path(rel)
        events = [json.loads(ln) for ln in p.read_text().splitlines()] if p.is_file() else []
        return None if any(e.get("event") == "preempted" for e in events) else "no preemption checkpoint recorded"

    return check


def _merged_finite(rel="merged"):
    def check(ws, out):
        import torch
        from safetensors.torch import load_file

        folder = out.path(rel)
        for f in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
            for k, v in load_file(str(f)).items():
                if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                    return f"{rel}/{f.name}: {k} has non-finite values"
        return None

    return check


def _merged_exists(rel="merged"):
    def check(ws, out):
        return None if (out.path(rel) / "model.safetensors").is_file() else f"{rel}: no merged model written"

    return check


def _merged_equals_shared(fx, rel="merged"):
    """The merged weights equal the shared adapter's merge (a checkpoint folder of the
    same step must give the same model)."""

    def check(ws, out):
        import torch
        from safetensors.torch import load_file

        p = out.path(rel) / "model.safetensors"
        if not p.is_file():
            return f"{rel}: no merged model written"
        a, b = load_file(str(p)), load_file(str(fx.merged / "model.safetensors"))
        diff = [k for k in b if k not in a or not torch.equal(a[k], b[k])]
        return f"{rel}: differs from the adapter's merge in {diff[:3]}" if diff else None

    return check


# The cases, one module per kind of fault; each registers its cases into CASES through
# `case`. The first round: the inputs every CLI accepts and what happens mid-run; the second
# round (output ownership, identity, up-front refusals): cases a new user tried that the
# first round never asked.
# The import order is the order the cases register in, and are reported in:
# isort: off
from tests.faults import cases_config, cases_data, cases_checkpoint  # noqa: E402,F401
from tests.faults import cases_adapters, cases_base, cases_runtime, cases_cli, cases_ranks  # noqa: E402,F401
from tests.faults import cases_identity, cases_upfront, cases_writers  # noqa: E402,F401

# isort: on

KINDS = (
    "config",
    "override",
    "data",
    "checkpoint",
    "output",
    "adapter",
    "evaluate",
    "verify",
    "base",
    "diskfull",
    "nonfinite",
    "signal",
    "cli",
    "ranks",
    "writers",
    "identity",
    "upfront",
)
BY_ID = {c.id: c for c in CASES}
assert len(BY_ID) == len(CASES), "case ids must be unique"
assert all(c.kind in KINDS for c in CASES)
