"""The fault probes: bad or unusual inputs of every kind the CLIs accept, each with the
behaviour a careful user should get (issue 15; defects 1, 2, 5 of issue 14).

A case builds its inputs in its own folder (copies of the shared tiny run, edited
configs, data, adapters, model variants; tests.faults.fixtures) and returns the command
to run (or a list: all but the last are set-up). tests.faults.probe runs them all and
counts the verdicts; tests/test_faults_*.py assert them (the cases with ci=True).

Expectations (tests.faults.runner.Expect): bad input -> exit 2 and an `error:` line that
names what and where (regexes), nothing that existed changed; a documented recovery ->
its exit status and message (damaged checkpoint skipped with a warning, SIGTERM ->
checkpoint -> 75). `defect` names the issue item a case shows when it fails today.
"""
from __future__ import annotations

import json
import math
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.faults.fixtures import (
    Fx,
    edit_json,
    flip_last_byte,
    rewrite_manifest,
    set_theta,
    theta_of_checkpoint,
    truncate,
)
from tests.faults.runner import Call, Expect

CFG = r"cfg\.yaml"
CFG_LINE = r"cfg\.yaml:\d+"
OVERRIDE = r"(?i)command.line|override"
DISK = r"(?i)no space left|disk( is)? full|file too large|quota"
NONFINITE = r"(?i)non-finite|\bnan\b|\binf\b"

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
    title: str                      # what a careful user did
    build: Callable                 # (ws, fx) -> Call | [Call, ...] (earlier ones are set-up)
    expect: Expect
    defect: str = ""                # issue item shown when this fails today ("15.1", "14.1", ...)
    ci: bool = True                 # part of the pytest suite (else the harness only)
    needs: str = ""                 # "tmpfs": only where a private tmpfs can be mounted


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
def train(ws: Path, fx: Fx, changes: dict | None = None, *overrides, text: str | None = None,
          argv: tuple = (), **kw) -> Call:
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
    return Call("export", ["--base", base or fx.model, "--adapter", adapter, "--out", out or Path(ws) / "merged",
                           *extra], **kw)


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
        except Exception as exc:   # noqa: BLE001 - any failure to read it is the finding
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


# ================================================================ configs
def _cfg_text(text):
    def build(ws, fx):
        return train(ws, fx, text=text(fx, ws) if callable(text) else text)
    return build


YAML_WHERE = (CFG_LINE,)   # file:line of the syntax error, as every config error names it
case("config-yaml-syntax", "config", "YAML with an unclosed bracket", err(*YAML_WHERE))(
    _cfg_text(lambda fx, ws: yaml_text(fx, ws) + "extra: [1, 2\n"))
case("config-yaml-tab", "config", "a tab used for indentation", err(*YAML_WHERE))(
    _cfg_text(lambda fx, ws: yaml_text(fx, ws).replace("  lr:", "\tlr:")))
case("config-top-list", "config", "a YAML whose top level is a list", err(CFG, r"(?i)mapping|top.level|list"),
     defect="15.tb")(_cfg_text("- method\n- model\n"))
case("config-top-scalar", "config", "a YAML whose top level is a string", err(CFG, r"(?i)mapping|top.level"),
     defect="15.tb")(_cfg_text("just some text\n"))
case("config-empty", "config", "an empty YAML file", err(CFG, r"output_dir|model\.path|required"))(_cfg_text(""))
case("config-dup-key", "config", "`lr:` twice in train (the second would win)",
     err(CFG_LINE, r"(?i)duplicate", r"lr"), defect="15.4")(
    _cfg_text(lambda fx, ws: yaml_text(fx, ws).replace("  lr: 0.05\n", "  lr: 0.05\n  lr: 0.5\n")))
case("config-dup-section", "config", "a second `method:` block (the first would be thrown away)",
     err(CFG_LINE, r"(?i)duplicate", r"method"), defect="15.4")(
    _cfg_text(lambda fx, ws: yaml_text(fx, ws) + "method:\n  name: gpart\n  d: 1024\n"))
case("config-unknown-top", "config", "misspelt top-level key", err(CFG_LINE, "outptu_dir"))(
    _cfg_text(lambda fx, ws: yaml_text(fx, ws) + "outptu_dir: /tmp/x\n"))


def _changes(changes, *overrides, argv=()):
    def build(ws, fx):
        return train(ws, fx, changes(ws, fx) if callable(changes) else changes, *overrides, argv=argv)
    return build


for _id, _title, _ch, _names, _defect in [
    ("config-unknown-nested", "train.learning_rate instead of lr", {"train": {"learning_rate": 0.1}},
     (CFG_LINE, "learning_rate"), ""),
    ("config-type-int", "max_steps: ten", {"train": {"max_steps": "ten"}}, (CFG_LINE, "max_steps"), ""),
    ("config-type-float-for-int", "method.d: 4.5", {"method": {"d": 4.5}}, (CFG_LINE, r"\bd\b"), ""),
    ("config-type-bool", "data.packing: maybe", {"data": {"packing": "maybe"}}, (CFG_LINE, "packing"), ""),
    ("config-type-list", "train.betas: 0.9 (not a list)", {"train": {"betas": 0.9}}, (CFG_LINE, "betas"), ""),
    ("config-section-scalar", "train: 5", {"train": 5}, (CFG_LINE, "train"), "15.msg"),
    ("config-bad-method", "method.name: lorra", {"method": {"name": "lorra"}}, (CFG_LINE, r"method\.name"), ""),
    ("config-d-zero", "method.d: 0", {"method": {"d": 0}}, (CFG_LINE, r"method\.d"), ""),
    ("config-d-over-D", "method.d larger than D", {"method": {"d": 100_000}}, (CFG_LINE, r"method\.d", "D"), ""),
    ("config-seed-negative", "method.seed: -1", {"method": {"seed": -1}}, (CFG_LINE, r"method\.seed"), ""),
    ("config-seed-2p64", "method.seed: 2^64", {"method": {"seed": 2**64}}, (CFG_LINE, r"method\.seed"), ""),
    ("config-dropout-one", "method.dropout: 1.0", {"method": {"dropout": 1.0}}, (CFG_LINE, "dropout"), ""),
    ("config-lr-negative", "train.lr: -0.1", {"train": {"lr": -0.1}}, (CFG_LINE, r"train\.lr"), ""),
    ("config-lr-nan", "train.lr: .nan", {"train": {"lr": float("nan")}}, (CFG_LINE, r"train\.lr"), ""),
    ("config-lr-inf", "train.lr: .inf (trains to theta = +-inf)", {"train": {"lr": float("inf")}},
     (CFG_LINE, r"train\.lr"), "15.3"),
    ("config-lr-string", "train.lr: fast", {"train": {"lr": "fast"}}, (CFG_LINE, r"lr"), ""),
    ("config-wd-nan", "train.weight_decay: .nan", {"train": {"weight_decay": float("nan")}},
     (CFG_LINE, "weight_decay"), ""),
    ("config-clip-nan", "train.max_grad_norm: .nan", {"train": {"max_grad_norm": float("nan")}},
     (CFG_LINE, "max_grad_norm"), ""),
    ("config-warmup-two", "train.warmup_ratio: 2", {"train": {"warmup_ratio": 2}}, (CFG_LINE, "warmup_ratio"), ""),
    ("config-betas-three", "train.betas with three numbers", {"train": {"betas": [0.9, 0.99, 0.5]}},
     (CFG_LINE, "betas"), ""),
    ("config-regex-invalid", "method.target_modules an invalid regex",
     {"method": {"target_modules": r"model\.layers\.[0-9+\.(q_proj"}}, (CFG_LINE, "target_modules"), "15.tb"),
    ("config-targets-empty-list", "method.target_modules: []", {"method": {"target_modules": []}},
     (CFG_LINE, "target_modules"), ""),
    ("config-targets-nomatch", "method.target_modules matching nothing", {"method": {"target_modules": ["qproj"]}},
     (CFG_LINE, "target_modules"), ""),
    ("config-targets-ints", "method.target_modules: [1, 2]", {"method": {"target_modules": [1, 2]}},
     (CFG_LINE, "target_modules"), ""),
    ("config-max-length-one", "data.max_length: 1", {"data": {"max_length": 1}}, (CFG_LINE, "max_length"), ""),
    ("config-format-bad", "data.format: xml", {"data": {"format": "xml"}}, (CFG_LINE, r"data\.format"), ""),
    ("config-precision-fp16", "model.precision: fp16", {"model": {"precision": "fp16"}}, (CFG_LINE, "precision"), ""),
    ("config-ds-missing", "deepspeed: a JSON file that is not there", {"deepspeed": "nope.json"},
     (CFG_LINE, "nope.json"), ""),
    ("config-ds-int", "deepspeed: 5", {"deepspeed": 5}, (CFG_LINE, "deepspeed"), ""),
    ("config-ds-fp16", "deepspeed with fp16 enabled (refused: use bf16)",
     {"deepspeed": {"zero_optimization": {"stage": 3}, "fp16": {"enabled": True}}}, (CFG, "fp16"), "15.tb"),
    ("config-prepare-unknown", "prepare: [nope]", {"prepare": ["nope"]}, (CFG_LINE, "prepare", "nope"), ""),
    ("config-model-missing", "model.path: a folder that is not there", {"model": {"path": "/nonexistent/model"}},
     (CFG_LINE, r"model\.path"), ""),
    ("config-data-missing", "data.train: a file that is not there", {"data": {"train": "/nonexistent/train.jsonl"}},
     (CFG_LINE, r"data\.train"), ""),
    ("config-shard-size-bad", "export.max_shard_size: 5XB", {"export": {"max_shard_size": "5XB"}},
     (CFG_LINE, "max_shard_size"), ""),
    ("config-timeout-zero", "dist.timeout_minutes: 0", {"dist": {"timeout_minutes": 0}}, (CFG_LINE, "timeout"), ""),
    ("config-backend-bad", "dist.backend: tcp", {"dist": {"backend": "tcp"}}, (CFG_LINE, "backend"), ""),
    ("config-keep-last-zero", "checkpoint.keep_last: 0", {"checkpoint": {"keep_last": 0}}, (CFG_LINE, "keep_last"), ""),
]:
    case(_id, "config", _title, err(*_names), defect=_defect)(_changes(_ch))


@case("config-ds-badjson", "config", "deepspeed: a JSON file with a syntax error", err(r"bad\.json:\d+"))
def _(ws, fx):
    (ws / "bad.json").write_text('{"zero_optimization": {"stage": 3,}\n')
    return train(ws, fx, {"deepspeed": str(ws / "bad.json")})


@case("config-file-missing", "config", "--config naming a file that is not there", err("nothere"))
def _(ws, fx):
    return Call("train", ["--config", ws / "nothere.yaml"])


@case("config-file-is-dir", "config", "--config naming a folder", err("somedir"))
def _(ws, fx):
    (ws / "somedir").mkdir()
    return Call("train", ["--config", ws / "somedir"])


@case("config-output-is-file", "config", "output_dir is an existing file", err(r"output_dir", "afile"), defect="15.tb")
def _(ws, fx):
    (ws / "afile").write_text("keep me\n")
    return train(ws, fx, {"output_dir": str(ws / "afile")})


@case("config-output-under-file", "config", "output_dir inside a file", err(r"output_dir", "afile"), defect="15.tb")
def _(ws, fx):
    (ws / "afile").write_text("keep me\n")
    return train(ws, fx, {"output_dir": str(ws / "afile" / "run")})


@case("config-ckpt-dir-is-file", "config", "checkpoint.dir is an existing file", err(r"checkpoint\.dir", "afile"),
      defect="15.tb", ci=False)
def _(ws, fx):
    (ws / "afile").write_text("keep me\n")
    return train(ws, fx, {"checkpoint": {"dir": str(ws / "afile")}})


# --dry-run must refuse what training refuses (it reads no weights and no data, so
# missing files are its business to skip; bad values are not).
for _id, _title, _ch, _names in [
    ("dryrun-lr-inf", "--dry-run with train.lr: .inf", {"train": {"lr": float("inf")}}, (CFG_LINE, r"train\.lr")),
    ("dryrun-regex-invalid", "--dry-run with an invalid target regex",
     {"method": {"target_modules": "(q_proj"}}, (CFG_LINE, "target_modules")),
    ("dryrun-ds-fp16", "--dry-run with DeepSpeed fp16", {"deepspeed": {"zero_optimization": {"stage": 3},
                                                                       "fp16": {"enabled": True}}}, (CFG, "fp16")),
]:
    case(_id, "config", _title, err(*_names), defect="15.dryrun")(_changes(_ch, argv=("--dry-run",)))


@case("dryrun-dup-key", "config", "--dry-run with `lr:` twice", err(CFG_LINE, r"(?i)duplicate"), defect="15.4")
def _(ws, fx):
    return train(ws, fx, text=yaml_text(fx, ws).replace("  lr: 0.05\n", "  lr: 0.05\n  lr: 0.5\n"),
                 argv=("--dry-run",))


# ================================================================ overrides
for _id, _title, _ov, _names, _defect in [
    ("override-unknown", "foo.bar=1", "foo.bar=1", (OVERRIDE, r"foo\.bar"), "15.msg"),
    ("override-case", "Train.lr=0.1", "Train.lr=0.1", (OVERRIDE, r"Train"), "15.msg"),
    ("override-double-dot", "train..lr=0.1", "train..lr=0.1", (OVERRIDE, r"train\.\.lr"), "15.msg"),
    ("override-no-equals", "train.lr (no value)", "train.lr", (OVERRIDE, r"train\.lr"), ""),
    ("override-bad-value", "train.lr=abc", "train.lr=abc", (OVERRIDE, r"train\.lr"), ""),
    ("override-empty-key", "=5", "=5", (OVERRIDE,), "15.msg"),
    ("override-section", "train=5", "train=5", (OVERRIDE, r"train"), "15.msg"),
    ("override-d-float", "method.d=1e3", "method.d=1e3", (OVERRIDE, r"method\.d"), ""),
    ("override-lr-inf", "train.lr=inf", "train.lr=inf", (OVERRIDE, r"train\.lr"), "15.3"),
]:
    case(_id, "override", _title, err(*_names, not_names=(CFG,)), defect=_defect,
         ci=_id not in ("override-lr-inf", "override-d-float", "override-empty-key"))(_changes(None, _ov))


@case("override-list-value", "override", "method.target_modules=[q_proj,v_proj] (a valid list override)", ok(),
      ci=False)
def _(ws, fx):
    return train(ws, fx, {"train": {"max_steps": 1}}, "method.target_modules=[q_proj,v_proj]")


@case("override-resume-Auto", "override", "train.resume=Auto (capital A) on an existing run",
      err(r"train\.resume", r"Auto"), defect="15.msg")
def _(ws, fx):
    fx.copy_run(ws)
    return train(ws, fx, {"train": {"max_steps": 6}}, "train.resume=Auto")


@case("override-resume-missing", "override", "train.resume=<a path that is not there>",
      err(r"train\.resume", r"(?i)not found|does not exist|no such"), defect="15.msg")
def _(ws, fx):
    fx.copy_run(ws)
    return train(ws, fx, {"train": {"max_steps": 6}}, f"train.resume={ws / 'nope'}")


@case("override-resume-file", "override", "train.resume=<a file>", err(r"train\.resume", "afile"), defect="15.msg",
      ci=False)
def _(ws, fx):
    fx.copy_run(ws)
    (ws / "afile").write_text("x\n")
    return train(ws, fx, {"train": {"max_steps": 6}}, f"train.resume={ws / 'afile'}")


# ================================================================ data
BAD_UTF8 = (json.dumps(GOOD) + "\n").encode() + b'{"prompt": "\xff\xfe", "completion": " x"}\n'

for _id, _title, _recs, _raw, _names, _defect in [
    ("data-bad-json-line", "line 3 is not JSON", [GOOD, GOOD, '{"prompt": "x", ', GOOD], None,
     (r"train\.jsonl:3",), ""),
    ("data-missing-key", "line 2 has no completion", [GOOD, {"prompt": "x"}], None,
     (r"train\.jsonl:2", "completion"), ""),
    ("data-empty-file", "an empty data file", [], b"", (r"train\.jsonl", r"(?i)empty|no records"), ""),
    ("data-blank-lines", "only blank lines", [], b"\n\n\n", (r"train\.jsonl", r"(?i)empty|no records"), ""),
    ("data-not-object", "a line that is a JSON list", ["[1, 2]"], None, (r"train\.jsonl:1",), ""),
    ("data-completion-number", "completion: 5", [{"prompt": "x", "completion": 5}], None,
     (r"train\.jsonl:1", "completion"), ""),
    ("data-non-utf8", "bytes that are not UTF-8 on line 2", [], BAD_UTF8,
     (r"train\.jsonl(:2)?", r"(?i)utf-?8|encoding|decode"), "15.tb"),
    ("data-bom", "a UTF-8 byte-order mark before line 1", [], b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n",
     (r"train\.jsonl:1",), ""),
    ("data-choices-bad", "choices that do not contain the completion",
     [dict(GOOD, choices=[" a", " b"])], None, (r"train\.jsonl:1", "choices"), ""),
    ("data-chat-no-assistant", "chat record without an assistant turn",
     [{"messages": [{"role": "user", "content": "hi"}]}], None, (r"train\.jsonl:1", "assistant"), ""),
]:
    case(_id, "data", _title, err(*_names), defect=_defect)(
        (lambda recs, raw: lambda ws, fx: data_case(ws, fx, recs, raw=raw))(_recs, _raw))


@case("data-eval-bad-line", "data", "line 2 of the eval file is not JSON", err(r"eval\.jsonl:2"))
def _(ws, fx):
    return data_case(ws, fx, [GOOD, "{oops"], which="eval", name="eval.jsonl")


@case("data-unknown-ext", "data", "a .txt data file", err(r"train\.txt"))
def _(ws, fx):
    return data_case(ws, fx, [GOOD], name="train.txt")


@case("data-is-dir", "data", "data.train naming a folder", err(r"data\.train"))
def _(ws, fx):
    (ws / "folder.jsonl").mkdir()
    return train(ws, fx, {"data": {"train": str(ws / "folder.jsonl")}})


@case("data-format-mismatch", "data", "data.format: chat on prompt/completion records",
      err(r"train\.jsonl:1", "messages"))
def _(ws, fx):
    return data_case(ws, fx, [GOOD], changes={"data": {"format": "chat"}})


@case("data-choices-objective-without-choices", "data", "train.objective: choices on records without choices",
      err(r"train\.jsonl:1", "choices"))
def _(ws, fx):
    return data_case(ws, fx, [GOOD, GOOD], changes={"train": {"objective": "choices"}})


@case("data-csv-missing-columns", "data", "a CSV without prompt/completion columns", err(r"train\.csv"))
def _(ws, fx):
    (ws / "train.csv").write_text("a,b\n1,2\n")
    return train(ws, fx, {"data": {"train": str(ws / "train.csv")}})


@case("data-parquet-garbage", "data", "a .parquet file that is not Parquet", err(r"train\.parquet"))
def _(ws, fx):
    (ws / "train.parquet").write_bytes(b"not parquet at all\n" * 10)
    return train(ws, fx, {"data": {"train": str(ws / "train.parquet")}})


_LONG = {"prompt": "Reverse: " + " ".join(["red cat blue dog"] * 20) + "\nAnswer:", "completion": " dog"}


@case("data-all-prompts-too-long", "data", "every prompt longer than data.max_length (no label token left)",
      err(r"train\.jsonl", r"(?i)max_length|label|nothing to learn|no .*tokens"), defect="15.5")
def _(ws, fx):
    c = data_case(ws, fx, [_LONG] * 16)
    c.checks = (_loss_not_zero(),)
    return c


@case("data-empty-completions-no-eos", "data", "empty completions with data.add_eos: false",
      err(r"train\.jsonl", r"(?i)completion|label|nothing to learn|no .*tokens"), defect="15.5")
def _(ws, fx):
    c = data_case(ws, fx, [{"prompt": "Reverse: red cat\nAnswer:", "completion": ""}] * 16,
                  changes={"data": {"add_eos": False}})
    c.checks = (_loss_not_zero(),)
    return c


@case("data-eval-no-labels", "data", "every eval prompt longer than data.max_length (eval_loss would be 0.0)",
      err(r"eval\.jsonl", r"(?i)max_length|label|nothing to evaluate|no .*tokens"), defect="15.5")
def _(ws, fx):
    c = data_case(ws, fx, [_LONG] * 16, which="eval", name="eval.jsonl")
    c.checks = (_loss_not_zero(),)
    return c


def _tokcache_copy(ws, fx) -> Path:
    """This probe's own copy of the shared tokenised cache (built by the shared run)."""
    fx.base_run  # noqa: B018 - the shared run builds the cache entries
    dst = Path(ws) / "tok"
    shutil.copytree(fx.tokcache, dst, ignore=shutil.ignore_patterns("*.lock"))
    return dst


@case("data-tokcache-truncated", "data", "a truncated Arrow file in the tokenised-data cache (rebuilt)",
      ok(r"(?i)rebuil|damaged|corrupt|truncated"), defect="15.tb")
def _(ws, fx):
    tok = _tokcache_copy(ws, fx)
    arrow = sorted(tok.glob("train-*/data/*.arrow"))[0]
    truncate(arrow, 0.3)
    return train(ws, fx, {"data": {"cache_dir": str(tok)}}, may_change=("tok/*",))


@case("data-tokcache-no-data", "data", "a tokenised-cache entry marked complete without its data (rebuilt)",
      ok(r"(?i)rebuil|damaged|corrupt|missing|incomplete"), defect="15.tb", ci=False)
def _(ws, fx):
    tok = _tokcache_copy(ws, fx)
    shutil.rmtree(sorted(tok.glob("train-*/data"))[0])
    return train(ws, fx, {"data": {"cache_dir": str(tok)}}, may_change=("tok/*",))


# ================================================================ checkpoints (resume)
def _damage_then_resume(damage, step=4):
    def build(ws, fx):
        run = fx.copy_run(ws)
        damage(run / "checkpoints" / f"step-{step:06d}")
        c = resume(ws, fx)
        c.checks = (_resumed_from(2), _latest_verifies())
        return c
    return build


SKIPPED = r"skipping checkpoint step-000004"
for _id, _title, _damage, _defect, _ci in [
    ("ckpt-manifest-empty-object", "newest checkpoint's manifest.json is {}",
     lambda c: (c / "manifest.json").write_text("{}"), "15.tb", True),
    ("ckpt-manifest-list", "newest checkpoint's manifest.json is []",
     lambda c: (c / "manifest.json").write_text("[]"), "15.tb", False),
    ("ckpt-manifest-no-sha", "newest manifest lists files without sha256",
     lambda c: edit_json(c / "manifest.json", lambda m: [v.pop("sha256") for v in m["files"].values()]),
     "15.tb", False),
    ("ckpt-manifest-garbage", "newest manifest.json is not JSON",
     lambda c: (c / "manifest.json").write_text("{{{"), "", False),
    ("ckpt-state-truncated", "newest state.safetensors truncated", lambda c: truncate(c / "state.safetensors"), "",
     False),
    ("ckpt-state-flipped", "a flipped byte in the newest state.safetensors",
     lambda c: flip_last_byte(c / "state.safetensors"), "", False),
    ("ckpt-rng-missing", "newest checkpoint lost its rng-rank0 file",
     lambda c: (c / "rng-rank0.safetensors").unlink(), "", False),
]:
    case(_id, "checkpoint", _title + " (resume=auto skips it with a warning)", ok(SKIPPED), defect=_defect,
         ci=_ci)(_damage_then_resume(_damage))


@case("ckpt-verified-but-unreadable", "checkpoint",
      "newest checkpoint's state.json is {} with a matching manifest (verifies, cannot be loaded): "
      "resume=auto skips it with a warning", ok(SKIPPED + r".*state\.json"), defect="15.tb")
def _(ws, fx):
    run = fx.copy_run(ws)
    ck = run / "checkpoints" / "step-000004"
    (ck / "state.json").write_text("{}\n")
    rewrite_manifest(ck)
    c = resume(ws, fx)
    c.checks = (_resumed_from(2), _latest_verifies())
    return c


@case("ckpt-verified-but-unreadable-explicit", "checkpoint",
      "train.resume=<a checkpoint whose state.json is {} with a matching manifest> (refused, nothing written)",
      err(r"train\.resume", r"step-000004", r"state\.json"), defect="15.tb", ci=False)
def _(ws, fx):
    run = fx.copy_run(ws)
    ck = run / "checkpoints" / "step-000004"
    (ck / "state.json").write_text("{}\n")
    rewrite_manifest(ck)
    return train(ws, fx, {"train": {"max_steps": 6}}, f"train.resume={ck}")


@case("ckpt-all-corrupt", "checkpoint", "every checkpoint corrupt, resume=auto (must not start over and overwrite)",
      err(r"checkpoints", r"(?i)step-0000|corrupt|damaged|no usable|truncated"), defect="15.8")
def _(ws, fx):
    run = fx.copy_run(ws)
    for s in (2, 4):
        truncate(run / "checkpoints" / f"step-{s:06d}" / "state.safetensors")
    c = resume(ws, fx, may_change=())
    return c


@case("ckpt-explicit-corrupt", "checkpoint", "train.resume=<a truncated checkpoint>",
      err(r"step-000004", r"state\.safetensors"), defect="15.6")
def _(ws, fx):
    run = fx.copy_run(ws)
    ck = run / "checkpoints" / "step-000004"
    truncate(ck / "state.safetensors")
    return train(ws, fx, {"train": {"max_steps": 6}}, f"train.resume={ck}")


for _id, _ov, _key in [("ckpt-drift-seed", "method.seed=1", r"method\.seed"),
                       ("ckpt-drift-d", "method.d=2048", r"method\.d"),
                       ("ckpt-drift-targets", "method.target_modules=[q_proj]", r"method\.target_modules")]:
    case(_id, "checkpoint", f"resume=auto with {_ov} (drift refused, nothing rewritten)",
         err(OVERRIDE, _key), defect="15.6", ci=_id == "ckpt-drift-seed")(
        (lambda ov: lambda ws, fx: (fx.copy_run(ws), resume(ws, fx, None, ov, may_change=()))[1])(_ov))


@case("ckpt-max-steps-below", "checkpoint",
      "resume=auto with train.max_steps=2 below the newest checkpoint's step 4",
      err(r"max_steps", r"step.?0*4|step-000004"), defect="15.1")
def _(ws, fx):
    fx.copy_run(ws)
    c = resume(ws, fx, {"train": {"max_steps": 2}}, may_change=())
    c.checks = (_checkpoint_is("run/checkpoints/step-000002", 2, fx),)
    return c


@case("ckpt-max-steps-equal", "checkpoint",
      "resume=auto with train.max_steps equal to the newest step (nothing to do: step-000004 must stay as it is)",
      ok(), defect="15.1", ci=False)
def _(ws, fx):
    fx.copy_run(ws)
    c = resume(ws, fx, {"train": {"max_steps": 4}}, may_change=("run/adapter/*", "run/run_config.yaml"))
    c.checks = (_checkpoint_is("run/checkpoints/step-000004", 4, fx),)
    return c


@case("ckpt-stale-tmp", "checkpoint", "a stale .step-000006.tmp from a killed run (replaced)", ok(), ci=False)
def _(ws, fx):
    run = fx.copy_run(ws)
    tmp = run / "checkpoints" / ".step-000006.tmp"
    tmp.mkdir()
    (tmp / "state.safetensors").write_bytes(b"half written")
    c = resume(ws, fx, may_change=RESUME_MAY + ("run/checkpoints/.step-000006.tmp/*",))
    c.checks = (_resumed_from(4), _latest_verifies())
    return c


@case("ckpt-resume-auto-fresh", "checkpoint", "resume=auto with no checkpoint yet (starts fresh, says so)",
      ok(r"(?i)starting fresh|no .*checkpoint"), ci=False)
def _(ws, fx):
    return train(ws, fx, {"train": {"resume": "auto"}})


@case("ckpt-resume-ok", "checkpoint", "resume=auto of an intact run (continues from step 4)", ok(), ci=False)
def _(ws, fx):
    fx.copy_run(ws)
    c = resume(ws, fx)
    c.checks = (_resumed_from(4), _latest_verifies())
    return c


# ================================================================ output folders
@case("output-new-run-existing", "output", "a new run (no resume) into an existing output_dir",
      err(r"output_dir", r"(?i)exists|already|resume|overwrite"), defect="15.2")
def _(ws, fx):
    fx.copy_run(ws)
    return train(ws, fx, {"train": {"max_steps": 2}, "checkpoint": {"every_steps": 2}})


@case("output-new-run-overwrite", "output",
      "overwrite_output_dir=true: a new run replaces an earlier run's results, and says so",
      ok(r"(?i)overwrite_output_dir.*removing"), ci=False)
def _(ws, fx):
    fx.copy_run(ws)
    c = train(ws, fx, {"train": {"max_steps": 2}, "overwrite_output_dir": True},
              may_change=("run/*",))
    c.checks = (_only_checkpoints("run/checkpoints", [2]), _latest_verifies())
    return c


@case("output-resume-and-overwrite", "output", "train.resume=auto together with overwrite_output_dir=true",
      err(r"overwrite_output_dir", r"train\.resume"), ci=False)
def _(ws, fx):
    fx.copy_run(ws)
    return resume(ws, fx, {"overwrite_output_dir": True}, may_change=())


@case("output-export-exists", "output", "export.merged=true while the export folder exists",
      err(r"export", r"(?i)exists"))
def _(ws, fx):
    run = fx.copy_run(ws)
    (run / "merged").mkdir()
    (run / "merged" / "model.safetensors").write_bytes(b"an earlier export")
    return resume(ws, fx, None, "export.merged=true", may_change=())


@case("output-export-only-no-resume", "output", "--export-only without train.resume",
      err(r"train\.resume"), defect="15.6")
def _(ws, fx):
    fx.copy_run(ws)
    return train(ws, fx, None, argv=("--export-only",))


@case("output-export-only-no-checkpoint", "output", "--export-only train.resume=auto with no checkpoint",
      err(r"(?i)checkpoint"), ci=False)
def _(ws, fx):
    return train(ws, fx, {"train": {"resume": "auto"}}, argv=("--export-only",))


@case("output-export-only-ok", "output", "--export-only train.resume=auto on a finished run", ok(), ci=False)
def _(ws, fx):
    fx.copy_run(ws)
    c = train(ws, fx, {"train": {"resume": "auto", "max_steps": 4}}, argv=("--export-only",),
              may_change=("run/run_config.yaml",), append_only=APPEND)
    c.checks = (_merged_exists("run/merged"), _merged_equals_shared(fx, "run/merged"))
    return c


# ================================================================ adapters: export
def _adapter_edit(edit, cli="export"):
    def build(ws, fx):
        a = fx.copy_adapter(ws)
        edit(a)
        c = export(ws, fx, a) if cli == "export" else evaluate(ws, fx, a)
        c.checks = (_merged_finite(),) if cli == "export" else ()
        return c
    return build


def _cfg_edit(fn):
    return lambda a: edit_json(a / "adapter_config.json", fn)


ACFG = r"adapter_config\.json"
AW = r"adapter_model\.safetensors"
_ADAPTER_EDITS = [
    ("no-seed", "adapter_config.json without seed", _cfg_edit(lambda c: c.pop("seed")), (ACFG, "seed"), "15.tb"),
    ("seed-string", "seed: \"abc\"", _cfg_edit(lambda c: c.update(seed="abc")), (ACFG, "seed"), "15.tb"),
    ("seed-float", "seed: 1.5", _cfg_edit(lambda c: c.update(seed=1.5)), (ACFG, "seed"), "15.7"),
    ("seed-negative", "seed: -1", _cfg_edit(lambda c: c.update(seed=-1)), (ACFG, "seed"), "15.7"),
    ("seed-2p64", "seed: 2^64", _cfg_edit(lambda c: c.update(seed=2**64)), (ACFG, "seed"), "15.7"),
    ("no-layout", "adapter_config.json without layout", _cfg_edit(lambda c: c.pop("layout")), (ACFG, "layout"),
     "15.tb"),
    ("layout-garbage", "layout: \"x\"", _cfg_edit(lambda c: c.update(layout="x")), (ACFG, "layout"), "15.tb"),
    ("wrong-D", "D that disagrees with the layout", _cfg_edit(lambda c: c.update(D=c["D"] + 1)), (ACFG, r"\bD\b"),
     "15.7"),
    ("d-mismatch", "d that disagrees with theta's length", _cfg_edit(lambda c: c.update(d=2048)), (AW, r"\bd\b|2048"),
     ""),
    ("config-list", "adapter_config.json is []", lambda a: (a / "adapter_config.json").write_text("[]"), (ACFG,),
     "15.tb"),
    ("config-garbage", "adapter_config.json is not JSON", lambda a: (a / "adapter_config.json").write_text("{x"),
     (ACFG,), ""),
    ("weights-missing", "adapter_model.safetensors missing", lambda a: (a / "adapter_model.safetensors").unlink(),
     (AW,), ""),
    ("weights-truncated", "adapter_model.safetensors truncated", lambda a: truncate(a / "adapter_model.safetensors"),
     (AW,), ""),
    ("flipped-byte", "one flipped byte in theta (no checksum)",
     lambda a: flip_last_byte(a / "adapter_model.safetensors"),
     (AW, r"(?i)checksum|sha|corrupt|hash"), "15.7"),
    ("theta-nan", "a NaN in theta", lambda a: set_theta(a, lambda t: t.__setitem__(5, float("nan"))),
     (AW, NONFINITE), "15.3"),
    ("theta-inf", "an inf in theta", lambda a: set_theta(a, lambda t: t.__setitem__(5, float("inf"))),
     (AW, NONFINITE), "15.3"),
    ("hash-unknown", "hash version 99", _cfg_edit(lambda c: c["hash"].update(version=99)), (ACFG, "hash"), ""),
    ("format-v99", "format_version 99", _cfg_edit(lambda c: c.update(format_version=99)), (ACFG, "format"), ""),
]
for _id, _title, _edit, _names, _defect in _ADAPTER_EDITS:
    case(f"export-adapter-{_id}", "adapter", f"export: {_title}", err(*_names), defect=_defect,
         ci=_defect != "" or _id in ("d-mismatch", "weights-truncated"))(_adapter_edit(_edit))


@case("export-ok", "adapter", "export: the run's adapter into its base (works)", ok())
def _(ws, fx):
    c = export(ws, fx, fx.copy_adapter(ws))
    c.checks = (_merged_equals_shared(fx),)
    return c


@case("export-adapter-missing", "adapter", "export: --adapter naming nothing", err("nope"), ci=False)
def _(ws, fx):
    return export(ws, fx, ws / "nope")


@case("export-adapter-is-file", "adapter", "export: --adapter naming a file", err("afile"), ci=False)
def _(ws, fx):
    (ws / "afile").write_text("x")
    return export(ws, fx, ws / "afile")


@case("export-2layer-into-3layer", "adapter", "export: a 2-layer adapter into a 3-layer model",
      err(ACFG, r"(?i)layer|target|\bD\b|wrong base|cover"), defect="15.7")
def _(ws, fx):
    return export(ws, fx, fx.copy_adapter(ws), base=fx.model_3layer)


@case("export-into-other-shape", "adapter", "export: adapter into a model with other MLP shapes",
      err(ACFG, r"(?i)shape|wrong base"))
def _(ws, fx):
    return export(ws, fx, fx.copy_adapter(ws), base=fx.model_wide)


@case("export-checkpoint-folder", "adapter", "export: a checkpoint folder as --adapter (README documents it)",
      ok(), defect="14.1")
def _(ws, fx):
    c = export(ws, fx, fx.copy_checkpoint(ws, 4))
    c.checks = (_merged_equals_shared(fx),)
    return c


@case("export-checkpoint-other-shape", "adapter", "export: a checkpoint folder into a model of another shape",
      err(r"ckpt", r"(?i)shape|wrong base|\bD\b|model\.path"), defect="14.1")
def _(ws, fx):
    return export(ws, fx, fx.copy_checkpoint(ws, 4), base=fx.model_wide)


@case("export-checkpoint-corrupt", "adapter", "export: a checkpoint folder with a truncated state",
      err(r"ckpt", r"state\.safetensors"), defect="15.tb")
def _(ws, fx):
    ck = fx.copy_checkpoint(ws, 4)
    truncate(ck / "state.safetensors")
    return export(ws, fx, ck)


@case("export-checkpoint-manifest-empty", "adapter", "export: a checkpoint folder whose manifest.json is {}",
      err(r"ckpt", r"manifest"), defect="15.tb", ci=False)
def _(ws, fx):
    ck = fx.copy_checkpoint(ws, 4)
    (ck / "manifest.json").write_text("{}")
    return export(ws, fx, ck)


def _reference(ws, fx, **overrides):
    from safetensors.torch import load_file

    from tests.export_helpers import write_reference_adapter

    theta = load_file(str(fx.base_run / "adapter" / "adapter_model.safetensors"))["gpart_theta"]
    ref = Path(ws) / "ref"
    write_reference_adapter(ref, theta, theta.numel(), 0,
                            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                            **overrides)
    return ref


@case("export-reference-ok", "adapter", "export: an authors' stateless reference adapter (works)", ok())
def _(ws, fx):
    c = export(ws, fx, _reference(ws, fx))
    c.checks = (_merged_equals_shared(fx),)
    return c


@case("export-reference-no-backend", "adapter",
      "export: an authors' reference adapter without assignment_backend (pre-2026-07-22: torch.randint)",
      err(ACFG, "assignment_backend"), defect="14.2")
def _(ws, fx):
    ref = _reference(ws, fx)
    edit_json(ref / "adapter_config.json", lambda c: c.pop("assignment_backend"))
    return export(ws, fx, ref)


@case("export-reference-modules-to-save", "adapter",
      "export: an authors' reference adapter with modules_to_save (extra trained tensors)",
      err(ACFG, "modules_to_save"), defect="14.2")
def _(ws, fx):
    return export(ws, fx, _reference(ws, fx, modules_to_save=["lm_head"]))


@case("export-reference-materialized", "adapter", "export: a reference adapter with materialized assignments",
      err(ACFG, "assignment_backend"), ci=False)
def _(ws, fx):
    return export(ws, fx, _reference(ws, fx, assignment_backend="materialized"))


@case("export-out-exists", "adapter", "export: --out an existing folder (no --overwrite)",
      err(r"merged", r"(?i)exists"))
def _(ws, fx):
    (ws / "merged").mkdir()
    (ws / "merged" / "model.safetensors").write_bytes(b"an earlier export")
    return export(ws, fx, fx.copy_adapter(ws))


@case("export-out-under-file", "adapter", "export: --out inside a file", err(r"afile"), defect="15.tb", ci=False)
def _(ws, fx):
    (ws / "afile").write_text("x")
    return export(ws, fx, fx.copy_adapter(ws), out=ws / "afile" / "merged")


@case("export-dtype-bad", "adapter", "export: --dtype int8", err(r"int8"), ci=False)
def _(ws, fx):
    return export(ws, fx, fx.copy_adapter(ws), None, None, "--dtype", "int8")


@case("export-shard-size-bad", "adapter", "export: --max-shard-size 5XB", err(r"5XB|max-shard-size"), defect="15.tb")
def _(ws, fx):
    return export(ws, fx, fx.copy_adapter(ws), None, None, "--max-shard-size", "5XB")


# ================================================================ adapters: evaluate
for _id, _edit, _names, _defect in [
    ("no-seed", _cfg_edit(lambda c: c.pop("seed")), (ACFG, "seed"), "15.tb"),
    ("no-layout", _cfg_edit(lambda c: c.pop("layout")), (ACFG, "layout"), "15.tb"),
    ("seed-float", _cfg_edit(lambda c: c.update(seed=1.5)), (ACFG, "seed"), "15.7"),
    ("theta-nan", lambda a: set_theta(a, lambda t: t.__setitem__(5, float("nan"))), (AW, NONFINITE), "15.3"),
    ("flipped-byte", lambda a: flip_last_byte(a / "adapter_model.safetensors"), (AW, r"(?i)checksum|sha|corrupt"),
     "15.7"),
]:
    case(f"evaluate-adapter-{_id}", "evaluate", f"evaluate: adapter with {_id.replace('-', ' ')}", err(*_names),
         defect=_defect)(_adapter_edit(_edit, cli="evaluate"))


@case("evaluate-2layer-into-3layer", "evaluate", "evaluate: a 2-layer adapter on a 3-layer model",
      err(ACFG, r"(?i)layout|layer"))
def _(ws, fx):
    return evaluate(ws, fx, fx.copy_adapter(ws), model=fx.model_3layer)


@case("evaluate-model-missing", "evaluate", "evaluate: --model naming nothing", err(r"nope"), defect="15.tb")
def _(ws, fx):
    return evaluate(ws, fx, None, model=ws / "nope")


@case("evaluate-model-renamed-key", "evaluate", "evaluate: a model whose q_proj weight is stored under another name",
      err(r"q_proj"), defect="new")
def _(ws, fx):
    c = evaluate(ws, fx, None, model=fx.model_renamed)
    return c


@case("evaluate-data-bad-line", "evaluate", "evaluate: a data file with a bad line 2", err(r"bad\.jsonl:2"))
def _(ws, fx):
    write_jsonl(ws / "bad.jsonl", [GOOD, "{nope"])
    return evaluate(ws, fx, None, data=ws / "bad.jsonl")


@case("evaluate-json-dir-missing", "evaluate", "evaluate: --json into a folder that does not exist (after the work)",
      err(r"nodir"), defect="15.tb")
def _(ws, fx):
    return evaluate(ws, fx, None, "--json", ws / "nodir" / "out.json")


@case("evaluate-max-length-zero", "evaluate", "evaluate: --max-length 0", err(r"max.length"), defect="15.tb")
def _(ws, fx):
    c = evaluate(ws, fx, None)
    c.argv[c.argv.index("--max-length") + 1] = "0"
    return c


@case("evaluate-batch-size-zero", "evaluate", "evaluate: --batch-size 0", err(r"batch.size"), defect="15.msg")
def _(ws, fx):
    return evaluate(ws, fx, None, "--batch-size", "0")


@case("evaluate-paired-missing", "evaluate", "evaluate paired: a predictions file that is not there", err(r"nope"),
      ci=False)
def _(ws, fx):
    write_jsonl(ws / "a.jsonl", [{"record": "x:1", "predicted": 0, "answer": 0}])
    return Call("evaluate", ["paired", ws / "a.jsonl", ws / "nope.jsonl"])


@case("evaluate-paired-bad-line", "evaluate", "evaluate paired: line 2 is not JSON", err(r"b\.jsonl:2"), ci=False)
def _(ws, fx):
    write_jsonl(ws / "a.jsonl", [{"record": "x:1", "predicted": 0, "answer": 0}])
    write_jsonl(ws / "b.jsonl", [{"record": "x:1", "predicted": 0, "answer": 0}, "{"])
    return Call("evaluate", ["paired", ws / "a.jsonl", ws / "b.jsonl"])


# ================================================================ verify
@case("verify-ok", "verify", "export verify: the shared merge against base + adapter (OK)", ok(r"OK"))
def _(ws, fx):
    return Call("export", ["verify", "--merged", fx.merged, "--base", fx.model, "--adapter", fx.base_run / "adapter"])


@case("verify-nan-logits", "verify", "export verify: a merged model whose logits are NaN (must not print OK)",
      ok(NONFINITE, r"FAILED|error:", code=1), defect="15.3")
def _(ws, fx):
    m = Path(ws) / "merged"
    shutil.copytree(fx.merged, m)
    from safetensors.torch import load_file, save_file

    t = load_file(str(m / "model.safetensors"))
    t["model.norm.weight"][:] = float("nan")
    save_file(t, str(m / "model.safetensors"), metadata={"format": "pt"})
    c = Call("export", ["verify", "--merged", m, "--base", fx.model, "--adapter", fx.base_run / "adapter"])
    c.checks = (lambda ws, out: "verify passed (OK, exit 0) a model whose logits are all NaN"
                if out.rc == 0 and ": OK" in out.stdout else None,)
    return c


@case("verify-merged-missing", "verify", "export verify: --merged naming nothing", err(r"nope"), defect="15.tb")
def _(ws, fx):
    return Call("export", ["verify", "--merged", ws / "nope", "--base", fx.model, "--adapter", fx.base_run / "adapter"])


# ================================================================ base models
@case("base-train-renamed-key", "base", "training on a model whose q_proj weight is stored under another name",
      err(r"model\.path|model\.safetensors", r"q_proj"), defect="new")
def _(ws, fx):
    return train(ws, fx, {"model": {"path": str(fx.model_renamed)}})


@case("base-train-nan-weight", "base", "training on a model with a NaN weight (loss is NaN from step 1)",
      err(NONFINITE, r"(?i)step|loss"), defect="15.3")
def _(ws, fx):
    c = train(ws, fx, {"model": {"path": str(fx.model_nan)}})
    c.checks = (_finite_metrics(), _finite_theta("run/adapter"))
    return c


@case("base-train-truncated", "base", "training on a model whose safetensors file is truncated",
      err(r"model\.safetensors"), defect="15.tb")
def _(ws, fx):
    return train(ws, fx, {"model": {"path": str(fx.model_truncated)}})


@case("base-train-bad-config-json", "base", "training on a model whose config.json is not JSON",
      err(r"config\.json"), defect="15.tb")
def _(ws, fx):
    return train(ws, fx, {"model": {"path": str(fx.model_bad_config)}})


@case("base-train-no-weights", "base", "training on a model folder without weights", err(r"model\.path|safetensors"),
      defect="15.tb", ci=False)
def _(ws, fx):
    return train(ws, fx, {"model": {"path": str(fx.model_no_weights)}})


@case("base-export-missing", "base", "export: --base naming nothing", err(r"nope"), ci=False)
def _(ws, fx):
    return export(ws, fx, fx.copy_adapter(ws), base=ws / "nope")


@case("base-export-no-weights", "base", "export: --base without safetensors", err(r"safetensors"), ci=False)
def _(ws, fx):
    return export(ws, fx, fx.copy_adapter(ws), base=fx.model_no_weights)


@case("base-export-renamed-key", "base", "export: a base whose q_proj weight is stored under another name",
      err(r"q_proj"))
def _(ws, fx):
    return export(ws, fx, fx.copy_adapter(ws), base=fx.model_renamed)


@case("base-export-truncated", "base", "export: a base whose safetensors file is truncated", err(r"model\.safetensors"))
def _(ws, fx):
    return export(ws, fx, fx.copy_adapter(ws), base=fx.model_truncated)


@case("base-export-nan-weight", "base", "export: a base with a NaN target weight (merged tensor non-finite)",
      err(NONFINITE, r"q_proj"), defect="14.5")
def _(ws, fx):
    # The adapter's recorded base identity would refuse this base before the merge (its
    # NaN changes the fingerprint: cases_identity); a version 1 adapter records none, so
    # what is tested here is still the check of every merged tensor.
    a = fx.copy_adapter(ws)

    def version_1(cfg):
        cfg.update(format_version=1)
        cfg.pop("digest", None)
        cfg["base_model"].pop("identity", None)
    edit_json(a / "adapter_config.json", version_1)
    c = export(ws, fx, a, base=fx.model_nan)
    c.checks = (_merged_finite(),)
    return c


# ================================================================ disk full
def _small(ws, fx, how, copy=(), free=0, limit=0, mkdir=()):
    """A small file system at ws/small: tmpfs (copy-in, then `free` bytes left) or RLIMIT_FSIZE."""
    mnt = Path(ws) / "small"
    mnt.mkdir()
    if how == "rlimit":
        for src, rel in copy:
            (shutil.copytree if Path(src).is_dir() else shutil.copy2)(src, mnt / rel)
        for rel in mkdir:
            (mnt / rel).mkdir(parents=True, exist_ok=True)
    return {"how": how, "mount": str(mnt), "copy": [[str(s), r] for s, r in copy], "free_bytes": free,
            "limit_bytes": limit, "mkdir": list(mkdir)}


@case("disk-full-checkpoint", "diskfull", "disk full while writing a checkpoint (resume 4 -> 6)",
      err(DISK, r"step-000006|checkpoint"), defect="15.tb")
def _(ws, fx):
    fs = _small(ws, fx, fx.server.fs_mode, copy=[(fx.base_run, "run")], free=40_000, limit=32_000)
    cfg = fx.write_config(ws, {"output_dir": str(ws / "small" / "run"), "train": {"max_steps": 6, "resume": "auto"},
                               "checkpoint": {"every_steps": 2}})
    c = Call("train", ["--config", cfg], fs=fs, may_change=("small/run/run_config.yaml",),
             append_only=("small/run/metrics.jsonl",))
    c.checks = (_checkpoint_is("small/run/checkpoints/step-000004", 4, fx), _latest_verifies("small/run/checkpoints"))
    return c


@case("disk-full-adapter", "diskfull", "disk full while writing the adapter (checkpoints elsewhere)",
      err(DISK, r"adapter"), defect="15.tb", needs="tmpfs")
def _(ws, fx):
    shutil.copytree(fx.base_run / "checkpoints", ws / "ckpts")
    run_wo_ckpt = ws / "_src"
    shutil.copytree(fx.base_run, run_wo_ckpt, ignore=shutil.ignore_patterns("checkpoints"))
    fs = _small(ws, fx, "tmpfs", copy=[(run_wo_ckpt, "run")], free=12_000)
    cfg = fx.write_config(ws, {"output_dir": str(ws / "small" / "run"), "train": {"max_steps": 6, "resume": "auto"},
                               "checkpoint": {"every_steps": 2, "dir": str(ws / "ckpts")}})
    c = Call("train", ["--config", cfg], fs=fs,
             may_change=("small/run/run_config.yaml", "ckpts/*", "small/run/eval_predictions.jsonl"),
             append_only=("small/run/metrics.jsonl",))
    c.checks = (_finite_theta("small/run/adapter"),)
    return c


@case("disk-full-export", "diskfull", "disk full during the offline export", err(DISK, r"merged"), defect="15.tb")
def _(ws, fx):
    fs = _small(ws, fx, fx.server.fs_mode, copy=[(fx.base_run / "adapter", "adapter")], free=128_000,
                limit=256_000)
    return Call("export", ["--base", fx.model, "--adapter", ws / "small" / "adapter", "--out", ws / "small" / "merged"],
                fs=fs)


@case("disk-full-tokcache", "diskfull", "disk full while building the tokenised-data cache",
      err(DISK, r"small|cache"), defect="15.tb")
def _(ws, fx):
    data = ws / "train.jsonl"
    data.write_text(fx.train.read_text() + json.dumps(GOOD) + "\n")   # a new cache key
    fs = _small(ws, fx, fx.server.fs_mode, free=8_000, limit=8_000, mkdir=("tok",))
    cfg = fx.write_config(ws, {"data": {"train": str(data), "cache_dir": str(ws / "small" / "tok")}})
    return Call("train", ["--config", cfg], fs=fs)


@case("disk-full-evaluate-json", "diskfull", "disk full writing evaluate --json", err(DISK, r"out\.json"),
      defect="15.tb")
def _(ws, fx):
    filler = ws / "_filler"
    filler.write_bytes(b"\0" * 4096)
    fs = _small(ws, fx, fx.server.fs_mode, copy=[(filler, "filler")], free=0, limit=100)
    return evaluate(ws, fx, None, "--json", ws / "small" / "out.json", fs=fs)


# ================================================================ non-finite values
@case("nonfinite-lr-huge", "nonfinite", "train.lr=1e30 (finite, but the loss becomes NaN)",
      err(NONFINITE, r"(?i)step"), defect="15.3")
def _(ws, fx):
    c = train(ws, fx, {"train": {"max_steps": 3, "lr": 1e30, "max_grad_norm": 0.0}})
    c.checks = (_finite_metrics(), _finite_theta("run/adapter"))
    return c


@case("nonfinite-keeps-last-checkpoint", "nonfinite",
      "resume at step 4 with train.lr=1e30: the loss turns NaN two steps later; step-000004 stays the last one",
      err(NONFINITE, r"step 6", r"step-000004"), defect="15.3")
def _(ws, fx):
    fx.copy_run(ws)
    return resume(ws, fx, {"train": {"max_steps": 8, "lr": 1e30, "max_grad_norm": 0.0, "warmup_ratio": 0.0}},
                  may_change=("run/run_config.yaml",))


# ================================================================ signals
def _signal_run(signum):
    def build(ws, fx):
        c = train(ws, fx, {"train": {"max_steps": 400, "log_every": 50}})
        c.signal = {"signum": int(signum), "when_file": str(ws / "run" / "metrics.jsonl"),
                    "when_contains": '"step": 2,'}
        c.checks = (_latest_verifies(),)
        return c
    return build


case("signal-sigterm", "signal", "SIGTERM mid-run (checkpoint, exit 75)", ok(r"stop signal received", code=75))(
    _signal_run(signal.SIGTERM))
case("signal-sigusr1", "signal", "SIGUSR1 mid-run (checkpoint, exit 75)", ok(r"stop signal received", code=75),
     ci=False)(_signal_run(signal.SIGUSR1))


@case("signal-sigint", "signal", "Ctrl-C (SIGINT) mid-run: no traceback, nothing half-written",
      ok(r"(?i)interrupt", code=130), defect="15.tb")
def _(ws, fx):
    c = train(ws, fx, {"train": {"max_steps": 400, "log_every": 50}})
    c.signal = {"signum": int(signal.SIGINT), "when_file": str(ws / "run" / "metrics.jsonl"),
                "when_contains": '"step": 2,'}
    return c


# ================================================================ other CLIs
@case("plan-regex-invalid", "cli", "python -m gpart_ds.plan on a config with an invalid target regex",
      err(CFG_LINE, "target_modules"), defect="15.tb")
def _(ws, fx):
    cfg = fx.write_config(ws, {"method": {"target_modules": "(q_proj"}})
    return Call("plan", ["--config", cfg, "--nodes", "1", "--gpus-per-node", "1", "--gpu-mem-gb", "80"])


@case("assets-unknown", "cli", "python -m gpart_ds.assets nope", err(r"nope"), ci=False)
def _(ws, fx):
    return Call("assets", ["nope"])


@case("preflight-bad-config", "cli", "python -m gpart_ds.preflight with method.d=0", err(r"method\.d"))
def _(ws, fx):
    cfg = fx.write_config(ws)
    return Call("preflight", ["--config", cfg, "--nodes", "1", "--tasks-per-node", "1", "--device", "cpu",
                              "method.d=0"])


@case("preflight-existing-output", "cli", "python -m gpart_ds.preflight: a new run into another run's output_dir",
      err(r"output_dir", r"(?i)already holds"), ci=False)
def _(ws, fx):
    fx.copy_run(ws)
    cfg = fx.write_config(ws)
    return Call("preflight", ["--config", cfg, "--nodes", "1", "--tasks-per-node", "1", "--device", "cpu",
                              "--wait-s", "5"], may_change=("run/.preflight/*",))


@case("study-config-missing", "cli", "python -m experiments.study --config naming nothing", err(r"nope"),
      ci=False)
def _(ws, fx):
    return Call("study", ["--config", ws / "nope.yaml", "--out", ws / "study"])


@case("bench-unknown-method", "cli", "python -m experiments.bench --methods gpart,nope", err(r"nope"), ci=False)
def _(ws, fx):
    return Call("bench", ["--methods", "gpart,nope", "--out", ws / "bench"])


@case("stale-build-lock", "cli", "a build lock left in TORCH_EXTENSIONS_DIR by a killed DeepSpeed build "
      "(every later CPU run waited on it forever): removed with a warning, the run trains",
      ok(r"(?i)stale build lock"), defect="new", ci=False)
def _(ws, fx):
    import os
    import time

    from gpart_ds.distributed import extension_dir

    fx.base_run  # noqa: B018 - the op is built (or loaded) by then
    built = extension_dir("deepspeed_shm_comm")
    ext = ws / "_ext"
    shutil.copytree(built, ext / built.name, ignore=shutil.ignore_patterns("lock"))
    lock = ext / built.name / "lock"
    lock.write_text("")
    old = time.time() - 900
    os.utime(lock, (old, old))
    return train(ws, fx, {"train": {"max_steps": 1}}, env={"TORCH_EXTENSIONS_DIR": str(ext)}, timeout=300)


# ================================================================ ranks (2-rank launches)
def _launch(ws, fx, changes=None, *overrides, **kw) -> Call:
    cfg = fx.write_config(ws, changes)
    # A hang detector, not a speed limit: on a loaded 2-core machine a 2-rank start alone took 60 s.
    return Call("launcher", [2, "--config", cfg, *overrides], timeout=kw.pop("timeout", 600), **kw)


# Three launches in CI (~20-60 s each): a refusal found by a collective (non-finite), a
# failure on one rank (disk full), and ranks dying with their launcher. A refusal every rank
# reaches alone from the same files (an existing output_dir) is covered in one process.
@case("ranks-new-run-existing", "ranks", "2 ranks: a new run into an existing output_dir (every rank refuses)",
      err(r"output_dir", r"(?i)exists|already|resume|overwrite"), defect="15.2", ci=False)
def _(ws, fx):
    fx.copy_run(ws)
    return _launch(ws, fx, {"train": {"max_steps": 2}})


@case("ranks-nonfinite", "ranks", "2 ranks: train.lr=1e30 (the loss becomes NaN: every rank stops, same error)",
      err(NONFINITE, r"(?i)step"), defect="15.3")
def _(ws, fx):
    c = _launch(ws, fx, {"train": {"max_steps": 3, "lr": 1e30, "max_grad_norm": 0.0}})
    c.checks = (_finite_metrics(), _finite_theta("run/adapter"))
    return c


@case("ranks-disk-full-checkpoint", "ranks", "2 ranks: disk full while writing a checkpoint (no hang, clear error)",
      err(DISK, r"step-000006|checkpoint"), defect="15.tb")
def _(ws, fx):
    # Per-file limit (inherited by the launcher's ranks): the 64 KB state file cannot be written.
    shutil.copytree(fx.base_run, ws / "run")
    cfg = fx.write_config(ws, {"train": {"max_steps": 6, "resume": "auto"}, "checkpoint": {"every_steps": 2}})
    c = Call("launcher", [2, "--config", cfg], timeout=600, fs={"how": "rlimit", "limit_bytes": 32_000},
             may_change=("run/run_config.yaml",), append_only=APPEND)
    c.checks = (_checkpoint_is("run/checkpoints/step-000004", 4, fx), _latest_verifies())
    return c


def _sigterm_ranks(rank):
    def build(ws, fx):
        c = _launch(ws, fx, {"train": {"max_steps": 400, "log_every": 50}})
        c.signal = {"signum": int(signal.SIGTERM), "rank": rank, "when_file": str(ws / "run" / "metrics.jsonl"),
                    "when_contains": '"step": 2,'}
        c.checks = (_latest_verifies(),)
        return c
    return build


case("ranks-sigterm-every-rank", "ranks", "2 ranks: SIGTERM to every rank mid-run, as SLURM sends it "
     "(checkpoint, exit 75)", ok(r"stop signal received", code=75), ci=False)(_sigterm_ranks("all"))
@case("ranks-sigterm-launcher", "ranks", "2 ranks: SIGTERM to the `deepspeed` command only, as `kill PID` or a "
      "container runtime sends it: the ranks see their launcher die, checkpoint and exit 75 (the command itself "
      "dies of the signal: deepspeed's runner has no handler), no rank left running",
      Expect(error=False, code=None, says=(r"stop signal received",)), defect="new")
def _(ws, fx):
    c = _sigterm_ranks(None)(ws, fx)
    c.grace_s = 120   # a step and a checkpoint, on a loaded machine
    c.checks = (_latest_verifies(), _preempted())
    return c


@case("ranks-kill-rank", "ranks", "2 ranks: SIGKILL of rank 1 after step 3 (job ends, checkpoints intact, "
      "rank 0 names the last checkpoint and train.resume=auto)",
      Expect(error=False, code=None, says=(r"error: rank 0: lost contact", r"train\.resume=auto")), ci=False,
      defect="new")
def _(ws, fx):
    c = _launch(ws, fx, {"train": {"max_steps": 400, "log_every": 50}, "checkpoint": {"every_steps": 2}})
    c.signal = {"signum": int(signal.SIGKILL), "rank": 1, "when_file": str(ws / "run" / "metrics.jsonl"),
                "when_contains": '"step": 3,'}
    c.checks = (_latest_verifies(),)
    return c


# The second round (issue 29): cases a new user tried that the first round never asked,
# one module per class; they register into CASES through `case` like the ones above.
# isort: off   (the import order is the order the cases register in, and are reported in)
from tests.faults import cases_identity, cases_upfront, cases_writers  # noqa: E402,F401

# isort: on

KINDS = ("config", "override", "data", "checkpoint", "output", "adapter", "evaluate", "verify", "base",
         "diskfull", "nonfinite", "signal", "cli", "ranks", "writers", "identity", "upfront")
BY_ID = {c.id: c for c in CASES}
assert len(BY_ID) == len(CASES), "case ids must be unique"
assert all(c.kind in KINDS for c in CASES)
