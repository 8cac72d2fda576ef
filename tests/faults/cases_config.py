"""Fault probes of kinds `config` and `override`: the YAML file (syntax, structure,
duplicate keys, unknown or mistyped keys, bad values, folders that are files), --dry-run
refusing what training refuses, and command-line overrides.
"""

from __future__ import annotations

from tests.faults.cases import (
    CFG,
    CFG_LINE,
    OVERRIDE,
    case,
    err,
    ok,
    train,
    yaml_text,
)
from tests.faults.runner import Call


# ================================================================ configs
def _cfg_text(text):
    def build(ws, fx):
        return train(ws, fx, text=text(fx, ws) if callable(text) else text)

    return build


YAML_WHERE = (CFG_LINE,)  # file:line of the syntax error, as every config error names it
case("config-yaml-syntax", "config", "YAML with an unclosed bracket", err(*YAML_WHERE))(
    _cfg_text(lambda fx, ws: yaml_text(fx, ws) + "extra: [1, 2\n")
)
case("config-yaml-tab", "config", "a tab used for indentation", err(*YAML_WHERE))(
    _cfg_text(lambda fx, ws: yaml_text(fx, ws).replace("  lr:", "\tlr:"))
)
case(
    "config-top-list",
    "config",
    "a YAML whose top level is a list",
    err(CFG, r"(?i)mapping|top.level|list"),
    defect="traceback",
)(_cfg_text("- method\n- model\n"))
case(
    "config-top-scalar",
    "config",
    "a YAML whose top level is a string",
    err(CFG, r"(?i)mapping|top.level"),
    defect="traceback",
)(_cfg_text("just some text\n"))
case("config-empty", "config", "an empty YAML file", err(CFG, r"output_dir|model\.path|required"))(_cfg_text(""))
case(
    "config-dup-key",
    "config",
    "`lr:` twice in train (the second would win)",
    err(CFG_LINE, r"(?i)duplicate", r"lr"),
    defect="duplicate-keys",
)(_cfg_text(lambda fx, ws: yaml_text(fx, ws).replace("  lr: 0.05\n", "  lr: 0.05\n  lr: 0.5\n")))
case(
    "config-dup-section",
    "config",
    "a second `method:` block (the first would be thrown away)",
    err(CFG_LINE, r"(?i)duplicate", r"method"),
    defect="duplicate-keys",
)(_cfg_text(lambda fx, ws: yaml_text(fx, ws) + "method:\n  name: gpart\n  d: 1024\n"))
case("config-unknown-top", "config", "misspelt top-level key", err(CFG_LINE, "outptu_dir"))(
    _cfg_text(lambda fx, ws: yaml_text(fx, ws) + "outptu_dir: /tmp/x\n")
)


def _changes(changes, *overrides, argv=()):
    def build(ws, fx):
        return train(ws, fx, changes(ws, fx) if callable(changes) else changes, *overrides, argv=argv)

    return build


for _id, _title, _ch, _names, _defect in [
    (
        "config-unknown-nested",
        "train.learning_rate instead of lr",
        {"train": {"learning_rate": 0.1}},
        (CFG_LINE, "learning_rate"),
        "",
    ),
    ("config-type-int", "max_steps: ten", {"train": {"max_steps": "ten"}}, (CFG_LINE, "max_steps"), ""),
    ("config-type-float-for-int", "method.d: 4.5", {"method": {"d": 4.5}}, (CFG_LINE, r"\bd\b"), ""),
    ("config-type-bool", "data.packing: maybe", {"data": {"packing": "maybe"}}, (CFG_LINE, "packing"), ""),
    ("config-type-list", "train.betas: 0.9 (not a list)", {"train": {"betas": 0.9}}, (CFG_LINE, "betas"), ""),
    ("config-section-scalar", "train: 5", {"train": 5}, (CFG_LINE, "train"), "unclear-message"),
    ("config-bad-method", "method.name: lorra", {"method": {"name": "lorra"}}, (CFG_LINE, r"method\.name"), ""),
    ("config-d-zero", "method.d: 0", {"method": {"d": 0}}, (CFG_LINE, r"method\.d"), ""),
    ("config-d-over-D", "method.d larger than D", {"method": {"d": 100_000}}, (CFG_LINE, r"method\.d", "D"), ""),
    ("config-seed-negative", "method.seed: -1", {"method": {"seed": -1}}, (CFG_LINE, r"method\.seed"), ""),
    ("config-seed-2p64", "method.seed: 2^64", {"method": {"seed": 2**64}}, (CFG_LINE, r"method\.seed"), ""),
    ("config-dropout-one", "method.dropout: 1.0", {"method": {"dropout": 1.0}}, (CFG_LINE, "dropout"), ""),
    ("config-lr-negative", "train.lr: -0.1", {"train": {"lr": -0.1}}, (CFG_LINE, r"train\.lr"), ""),
    ("config-lr-nan", "train.lr: .nan", {"train": {"lr": float("nan")}}, (CFG_LINE, r"train\.lr"), ""),
    (
        "config-lr-inf",
        "train.lr: .inf (trains to theta = +-inf)",
        {"train": {"lr": float("inf")}},
        (CFG_LINE, r"train\.lr"),
        "non-finite",
    ),
    ("config-lr-string", "train.lr: fast", {"train": {"lr": "fast"}}, (CFG_LINE, r"lr"), ""),
    (
        "config-wd-nan",
        "train.weight_decay: .nan",
        {"train": {"weight_decay": float("nan")}},
        (CFG_LINE, "weight_decay"),
        "",
    ),
    (
        "config-clip-nan",
        "train.max_grad_norm: .nan",
        {"train": {"max_grad_norm": float("nan")}},
        (CFG_LINE, "max_grad_norm"),
        "",
    ),
    ("config-warmup-two", "train.warmup_ratio: 2", {"train": {"warmup_ratio": 2}}, (CFG_LINE, "warmup_ratio"), ""),
    (
        "config-betas-three",
        "train.betas with three numbers",
        {"train": {"betas": [0.9, 0.99, 0.5]}},
        (CFG_LINE, "betas"),
        "",
    ),
    (
        "config-regex-invalid",
        "method.target_modules an invalid regex",
        {"method": {"target_modules": r"model\.layers\.[0-9+\.(q_proj"}},
        (CFG_LINE, "target_modules"),
        "traceback",
    ),
    (
        "config-targets-empty-list",
        "method.target_modules: []",
        {"method": {"target_modules": []}},
        (CFG_LINE, "target_modules"),
        "",
    ),
    (
        "config-targets-nomatch",
        "method.target_modules matching nothing",
        {"method": {"target_modules": ["qproj"]}},
        (CFG_LINE, "target_modules"),
        "",
    ),
    (
        "config-targets-ints",
        "method.target_modules: [1, 2]",
        {"method": {"target_modules": [1, 2]}},
        (CFG_LINE, "target_modules"),
        "",
    ),
    ("config-max-length-one", "data.max_length: 1", {"data": {"max_length": 1}}, (CFG_LINE, "max_length"), ""),
    ("config-format-bad", "data.format: xml", {"data": {"format": "xml"}}, (CFG_LINE, r"data\.format"), ""),
    ("config-precision-fp16", "model.precision: fp16", {"model": {"precision": "fp16"}}, (CFG_LINE, "precision"), ""),
    (
        "config-ds-missing",
        "deepspeed: a JSON file that is not there",
        {"deepspeed": "nope.json"},
        (CFG_LINE, "nope.json"),
        "",
    ),
    ("config-ds-int", "deepspeed: 5", {"deepspeed": 5}, (CFG_LINE, "deepspeed"), ""),
    (
        "config-ds-fp16",
        "deepspeed with fp16 enabled (refused: use bf16)",
        {"deepspeed": {"zero_optimization": {"stage": 3}, "fp16": {"enabled": True}}},
        (CFG, "fp16"),
        "traceback",
    ),
    ("config-prepare-unknown", "prepare: [nope]", {"prepare": ["nope"]}, (CFG_LINE, "prepare", "nope"), ""),
    (
        "config-model-missing",
        "model.path: a folder that is not there",
        {"model": {"path": "/nonexistent/model"}},
        (CFG_LINE, r"model\.path"),
        "",
    ),
    (
        "config-data-missing",
        "data.train: a file that is not there",
        {"data": {"train": "/nonexistent/train.jsonl"}},
        (CFG_LINE, r"data\.train"),
        "",
    ),
    (
        "config-shard-size-bad",
        "export.max_shard_size: 5XB",
        {"export": {"max_shard_size": "5XB"}},
        (CFG_LINE, "max_shard_size"),
        "",
    ),
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


@case(
    "config-output-is-file", "config", "output_dir is an existing file", err(r"output_dir", "afile"), defect="traceback"
)
def _(ws, fx):
    (ws / "afile").write_text("keep me\n")
    return train(ws, fx, {"output_dir": str(ws / "afile")})


@case("config-output-under-file", "config", "output_dir inside a file", err(r"output_dir", "afile"), defect="traceback")
def _(ws, fx):
    (ws / "afile").write_text("keep me\n")
    return train(ws, fx, {"output_dir": str(ws / "afile" / "run")})


@case(
    "config-output-uncreatable",
    "config",
    "output_dir where no folder can be created (/proc)",
    err(r"output_dir '/proc/\S+' cannot be created", r"choose another output_dir"),
)
def _(ws, fx):
    return train(ws, fx, {"output_dir": f"/proc/gpart-probe-{ws.name}"})


@case(
    "config-ckpt-dir-is-file",
    "config",
    "checkpoint.dir is an existing file",
    err(r"checkpoint\.dir", "afile"),
    defect="traceback",
    ci=False,
)
def _(ws, fx):
    (ws / "afile").write_text("keep me\n")
    return train(ws, fx, {"checkpoint": {"dir": str(ws / "afile")}})


# --dry-run must refuse what training refuses (it reads no weights and no data, so
# missing files are its business to skip; bad values are not).
for _id, _title, _ch, _names in [
    ("dryrun-lr-inf", "--dry-run with train.lr: .inf", {"train": {"lr": float("inf")}}, (CFG_LINE, r"train\.lr")),
    (
        "dryrun-regex-invalid",
        "--dry-run with an invalid target regex",
        {"method": {"target_modules": "(q_proj"}},
        (CFG_LINE, "target_modules"),
    ),
    (
        "dryrun-ds-fp16",
        "--dry-run with DeepSpeed fp16",
        {"deepspeed": {"zero_optimization": {"stage": 3}, "fp16": {"enabled": True}}},
        (CFG, "fp16"),
    ),
]:
    case(_id, "config", _title, err(*_names), defect="dry-run-accepts")(_changes(_ch, argv=("--dry-run",)))


@case(
    "dryrun-dup-key", "config", "--dry-run with `lr:` twice", err(CFG_LINE, r"(?i)duplicate"), defect="duplicate-keys"
)
def _(ws, fx):
    return train(ws, fx, text=yaml_text(fx, ws).replace("  lr: 0.05\n", "  lr: 0.05\n  lr: 0.5\n"), argv=("--dry-run",))


# ================================================================ overrides
for _id, _title, _ov, _names, _defect in [
    ("override-unknown", "foo.bar=1", "foo.bar=1", (OVERRIDE, r"foo\.bar"), "unclear-message"),
    ("override-case", "Train.lr=0.1", "Train.lr=0.1", (OVERRIDE, r"Train"), "unclear-message"),
    ("override-double-dot", "train..lr=0.1", "train..lr=0.1", (OVERRIDE, r"train\.\.lr"), "unclear-message"),
    ("override-no-equals", "train.lr (no value)", "train.lr", (OVERRIDE, r"train\.lr"), ""),
    ("override-bad-value", "train.lr=abc", "train.lr=abc", (OVERRIDE, r"train\.lr"), ""),
    ("override-empty-key", "=5", "=5", (OVERRIDE,), "unclear-message"),
    ("override-section", "train=5", "train=5", (OVERRIDE, r"train"), "unclear-message"),
    ("override-d-float", "method.d=1e3", "method.d=1e3", (OVERRIDE, r"method\.d"), ""),
    ("override-lr-inf", "train.lr=inf", "train.lr=inf", (OVERRIDE, r"train\.lr"), "non-finite"),
]:
    case(
        _id,
        "override",
        _title,
        err(*_names, not_names=(CFG,)),
        defect=_defect,
        ci=_id not in ("override-lr-inf", "override-d-float", "override-empty-key"),
    )(_changes(None, _ov))


@case(
    "override-list-value", "override", "method.target_modules=[q_proj,v_proj] (a valid list override)", ok(), ci=False
)
def _(ws, fx):
    return train(ws, fx, {"train": {"max_steps": 1}}, "method.target_modules=[q_proj,v_proj]")


@case(
    "override-resume-Auto",
    "override",
    "train.resume=Auto (capital A) on an existing run",
    err(r"train\.resume", r"Auto"),
    defect="unclear-message",
)
def _(ws, fx):
    fx.copy_run(ws)
    return train(ws, fx, {"train": {"max_steps": 6}}, "train.resume=Auto")


@case(
    "override-resume-missing",
    "override",
    "train.resume=<a path that is not there>",
    err(r"train\.resume", r"(?i)not found|does not exist|no such"),
    defect="unclear-message",
)
def _(ws, fx):
    fx.copy_run(ws)
    return train(ws, fx, {"train": {"max_steps": 6}}, f"train.resume={ws / 'nope'}")


@case(
    "override-resume-file",
    "override",
    "train.resume=<a file>",
    err(r"train\.resume", "afile"),
    defect="unclear-message",
    ci=False,
)
def _(ws, fx):
    fx.copy_run(ws)
    (ws / "afile").write_text("x\n")
    return train(ws, fx, {"train": {"max_steps": 6}}, f"train.resume={ws / 'afile'}")
