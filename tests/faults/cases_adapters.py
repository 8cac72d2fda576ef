"""Fault probes of kinds `adapter`, `evaluate` and `verify`: the export, evaluate and
export verify given edited, damaged or foreign adapters, checkpoints and reference
adapters, bad outputs and arguments.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.faults.cases import (
    ACFG,
    AW,
    GOOD,
    NONFINITE,
    _merged_equals_shared,
    _merged_finite,
    case,
    err,
    evaluate,
    export,
    ok,
    write_jsonl,
)
from tests.faults.fixtures import (
    edit_json,
    flip_last_byte,
    set_theta,
    truncate,
)
from tests.faults.runner import Call


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


_ADAPTER_EDITS = [
    ("no-seed", "adapter_config.json without seed", _cfg_edit(lambda c: c.pop("seed")), (ACFG, "seed"), "traceback"),
    ("seed-string", 'seed: "abc"', _cfg_edit(lambda c: c.update(seed="abc")), (ACFG, "seed"), "traceback"),
    ("seed-float", "seed: 1.5", _cfg_edit(lambda c: c.update(seed=1.5)), (ACFG, "seed"), "export-checks-less"),
    ("seed-negative", "seed: -1", _cfg_edit(lambda c: c.update(seed=-1)), (ACFG, "seed"), "export-checks-less"),
    ("seed-2p64", "seed: 2^64", _cfg_edit(lambda c: c.update(seed=2**64)), (ACFG, "seed"), "export-checks-less"),
    (
        "no-layout",
        "adapter_config.json without layout",
        _cfg_edit(lambda c: c.pop("layout")),
        (ACFG, "layout"),
        "traceback",
    ),
    ("layout-garbage", 'layout: "x"', _cfg_edit(lambda c: c.update(layout="x")), (ACFG, "layout"), "traceback"),
    (
        "wrong-D",
        "D that disagrees with the layout",
        _cfg_edit(lambda c: c.update(D=c["D"] + 1)),
        (ACFG, r"\bD\b"),
        "export-checks-less",
    ),
    (
        "d-mismatch",
        "d that disagrees with theta's length",
        _cfg_edit(lambda c: c.update(d=2048)),
        (AW, r"\bd\b|2048"),
        "",
    ),
    (
        "config-list",
        "adapter_config.json is []",
        lambda a: (a / "adapter_config.json").write_text("[]"),
        (ACFG,),
        "traceback",
    ),
    (
        "config-garbage",
        "adapter_config.json is not JSON",
        lambda a: (a / "adapter_config.json").write_text("{x"),
        (ACFG,),
        "",
    ),
    (
        "weights-missing",
        "adapter_model.safetensors missing",
        lambda a: (a / "adapter_model.safetensors").unlink(),
        (AW,),
        "",
    ),
    (
        "weights-truncated",
        "adapter_model.safetensors truncated",
        lambda a: truncate(a / "adapter_model.safetensors"),
        (AW,),
        "",
    ),
    (
        "flipped-byte",
        "one flipped byte in theta (no checksum)",
        lambda a: flip_last_byte(a / "adapter_model.safetensors"),
        (AW, r"(?i)checksum|sha|corrupt|hash"),
        "export-checks-less",
    ),
    (
        "theta-nan",
        "a NaN in theta",
        lambda a: set_theta(a, lambda t: t.__setitem__(5, float("nan"))),
        (AW, NONFINITE),
        "non-finite",
    ),
    (
        "theta-inf",
        "an inf in theta",
        lambda a: set_theta(a, lambda t: t.__setitem__(5, float("inf"))),
        (AW, NONFINITE),
        "non-finite",
    ),
    ("hash-unknown", "hash version 99", _cfg_edit(lambda c: c["hash"].update(version=99)), (ACFG, "hash"), ""),
    ("format-v99", "format_version 99", _cfg_edit(lambda c: c.update(format_version=99)), (ACFG, "format"), ""),
]
for _id, _title, _edit, _names, _defect in _ADAPTER_EDITS:
    case(
        f"export-adapter-{_id}",
        "adapter",
        f"export: {_title}",
        err(*_names),
        defect=_defect,
        ci=_defect != "" or _id in ("d-mismatch", "weights-truncated"),
    )(_adapter_edit(_edit))


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


@case(
    "export-2layer-into-3layer",
    "adapter",
    "export: a 2-layer adapter into a 3-layer model",
    err(ACFG, r"(?i)layer|target|\bD\b|wrong base|cover"),
    defect="export-checks-less",
)
def _(ws, fx):
    return export(ws, fx, fx.copy_adapter(ws), base=fx.model_3layer)


@case(
    "export-into-other-shape",
    "adapter",
    "export: adapter into a model with other MLP shapes",
    err(ACFG, r"(?i)shape|wrong base"),
)
def _(ws, fx):
    return export(ws, fx, fx.copy_adapter(ws), base=fx.model_wide)


@case(
    "export-checkpoint-folder",
    "adapter",
    "export: a checkpoint folder as --adapter (README documents it)",
    ok(),
    defect="checkpoint-as-adapter",
)
def _(ws, fx):
    c = export(ws, fx, fx.copy_checkpoint(ws, 4))
    c.checks = (_merged_equals_shared(fx),)
    return c


@case(
    "export-checkpoint-other-shape",
    "adapter",
    "export: a checkpoint folder into a model of another shape",
    err(r"ckpt", r"(?i)shape|wrong base|\bD\b|model\.path"),
    defect="checkpoint-as-adapter",
)
def _(ws, fx):
    return export(ws, fx, fx.copy_checkpoint(ws, 4), base=fx.model_wide)


@case(
    "export-checkpoint-corrupt",
    "adapter",
    "export: a checkpoint folder with a truncated state",
    err(r"ckpt", r"state\.safetensors"),
    defect="traceback",
)
def _(ws, fx):
    ck = fx.copy_checkpoint(ws, 4)
    truncate(ck / "state.safetensors")
    return export(ws, fx, ck)


@case(
    "export-checkpoint-manifest-empty",
    "adapter",
    "export: a checkpoint folder whose manifest.json is {}",
    err(r"ckpt", r"manifest"),
    defect="traceback",
    ci=False,
)
def _(ws, fx):
    ck = fx.copy_checkpoint(ws, 4)
    (ck / "manifest.json").write_text("{}")
    return export(ws, fx, ck)


def _reference(ws, fx, **overrides):
    from safetensors.torch import load_file

    from tests.export_helpers import write_reference_adapter

    theta = load_file(str(fx.base_run / "adapter" / "adapter_model.safetensors"))["gpart_theta"]
    ref = Path(ws) / "ref"
    write_reference_adapter(
        ref,
        theta,
        theta.numel(),
        0,
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        **overrides,
    )
    return ref


@case("export-reference-ok", "adapter", "export: an authors' stateless reference adapter (works)", ok())
def _(ws, fx):
    c = export(ws, fx, _reference(ws, fx))
    c.checks = (_merged_equals_shared(fx),)
    return c


@case(
    "export-reference-no-backend",
    "adapter",
    "export: an authors' reference adapter without assignment_backend (pre-2026-07-22: torch.randint)",
    err(ACFG, "assignment_backend"),
    defect="old-reference-adapter",
)
def _(ws, fx):
    ref = _reference(ws, fx)
    edit_json(ref / "adapter_config.json", lambda c: c.pop("assignment_backend"))
    return export(ws, fx, ref)


@case(
    "export-reference-modules-to-save",
    "adapter",
    "export: an authors' reference adapter with modules_to_save (extra trained tensors)",
    err(ACFG, "modules_to_save"),
    defect="old-reference-adapter",
)
def _(ws, fx):
    return export(ws, fx, _reference(ws, fx, modules_to_save=["lm_head"]))


@case(
    "export-reference-materialized",
    "adapter",
    "export: a reference adapter with materialized assignments",
    err(ACFG, "assignment_backend"),
    ci=False,
)
def _(ws, fx):
    return export(ws, fx, _reference(ws, fx, assignment_backend="materialized"))


@case(
    "export-out-exists", "adapter", "export: --out an existing folder (no --overwrite)", err(r"merged", r"(?i)exists")
)
def _(ws, fx):
    (ws / "merged").mkdir()
    (ws / "merged" / "model.safetensors").write_bytes(b"an earlier export")
    return export(ws, fx, fx.copy_adapter(ws))


@case("export-out-under-file", "adapter", "export: --out inside a file", err(r"afile"), defect="traceback", ci=False)
def _(ws, fx):
    (ws / "afile").write_text("x")
    return export(ws, fx, fx.copy_adapter(ws), out=ws / "afile" / "merged")


@case(
    "export-out-uncreatable",
    "adapter",
    "export: --out where no folder can be created (/proc)",
    err(r"--out '/proc/\S+' cannot be created", r"choose another --out"),
    ci=False,
)
def _(ws, fx):
    return export(ws, fx, fx.copy_adapter(ws), out=f"/proc/gpart-probe-{ws.name}")


@case("export-dtype-bad", "adapter", "export: --dtype int8", err(r"int8"), ci=False)
def _(ws, fx):
    return export(ws, fx, fx.copy_adapter(ws), None, None, "--dtype", "int8")


@case(
    "export-shard-size-bad", "adapter", "export: --max-shard-size 5XB", err(r"5XB|max-shard-size"), defect="traceback"
)
def _(ws, fx):
    return export(ws, fx, fx.copy_adapter(ws), None, None, "--max-shard-size", "5XB")


# ================================================================ adapters: evaluate
for _id, _edit, _names, _defect in [
    ("no-seed", _cfg_edit(lambda c: c.pop("seed")), (ACFG, "seed"), "traceback"),
    ("no-layout", _cfg_edit(lambda c: c.pop("layout")), (ACFG, "layout"), "traceback"),
    ("seed-float", _cfg_edit(lambda c: c.update(seed=1.5)), (ACFG, "seed"), "export-checks-less"),
    ("theta-nan", lambda a: set_theta(a, lambda t: t.__setitem__(5, float("nan"))), (AW, NONFINITE), "non-finite"),
    (
        "flipped-byte",
        lambda a: flip_last_byte(a / "adapter_model.safetensors"),
        (AW, r"(?i)checksum|sha|corrupt"),
        "export-checks-less",
    ),
]:
    case(
        f"evaluate-adapter-{_id}",
        "evaluate",
        f"evaluate: adapter with {_id.replace('-', ' ')}",
        err(*_names),
        defect=_defect,
    )(_adapter_edit(_edit, cli="evaluate"))


@case(
    "evaluate-2layer-into-3layer",
    "evaluate",
    "evaluate: a 2-layer adapter on a 3-layer model",
    err(ACFG, r"(?i)layout|layer"),
)
def _(ws, fx):
    return evaluate(ws, fx, fx.copy_adapter(ws), model=fx.model_3layer)


@case("evaluate-model-missing", "evaluate", "evaluate: --model naming nothing", err(r"nope"), defect="traceback")
def _(ws, fx):
    return evaluate(ws, fx, None, model=ws / "nope")


@case(
    "evaluate-model-renamed-key",
    "evaluate",
    "evaluate: a model whose q_proj weight is stored under another name",
    err(r"q_proj"),
    defect="new",
)
def _(ws, fx):
    c = evaluate(ws, fx, None, model=fx.model_renamed)
    return c


@case("evaluate-data-bad-line", "evaluate", "evaluate: a data file with a bad line 2", err(r"bad\.jsonl:2"))
def _(ws, fx):
    write_jsonl(ws / "bad.jsonl", [GOOD, "{nope"])
    return evaluate(ws, fx, None, data=ws / "bad.jsonl")


@case(
    "evaluate-json-dir-missing",
    "evaluate",
    "evaluate: --json into a folder that does not exist (after the work)",
    err(r"nodir"),
    defect="traceback",
)
def _(ws, fx):
    return evaluate(ws, fx, None, "--json", ws / "nodir" / "out.json")


@case("evaluate-max-length-zero", "evaluate", "evaluate: --max-length 0", err(r"max.length"), defect="traceback")
def _(ws, fx):
    c = evaluate(ws, fx, None)
    c.argv[c.argv.index("--max-length") + 1] = "0"
    return c


@case("evaluate-batch-size-zero", "evaluate", "evaluate: --batch-size 0", err(r"batch.size"), defect="unclear-message")
def _(ws, fx):
    return evaluate(ws, fx, None, "--batch-size", "0")


@case(
    "evaluate-paired-missing",
    "evaluate",
    "evaluate paired: a predictions file that is not there",
    err(r"nope"),
    ci=False,
)
def _(ws, fx):
    write_jsonl(ws / "a.jsonl", [{"record": "x:1", "predicted": 0, "answer": 0}])
    return Call("evaluate", ["paired", ws / "a.jsonl", ws / "nope.jsonl"])


@case("evaluate-paired-bad-line", "evaluate", "evaluate paired: line 2 is not JSON", err(r"b\.jsonl:2"), ci=False)
def _(ws, fx):
    write_jsonl(ws / "a.jsonl", [{"record": "x:1", "predicted": 0, "answer": 0}])
    write_jsonl(ws / "b.jsonl", [{"record": "x:1", "predicted": 0, "answer": 0}, "{"])
    return Call("evaluate", ["paired", ws / "a.jsonl", ws / "b.jsonl"])


# ================================================================ verify
def _verify(merged, fx) -> Call:
    """export verify of `merged` against the shared run's base and adapter."""
    return Call("export", ["verify", "--merged", merged, "--base", fx.model, "--adapter", fx.base_run / "adapter"])


@case("verify-ok", "verify", "export verify: the shared merge against base + adapter (OK)", ok(r"OK"))
def _(ws, fx):
    return _verify(fx.merged, fx)


@case(
    "verify-nan-logits",
    "verify",
    "export verify: a merged model whose logits are NaN (must not print OK)",
    ok(NONFINITE, r"FAILED|error:", code=1),
    defect="non-finite",
)
def _(ws, fx):
    m = Path(ws) / "merged"
    shutil.copytree(fx.merged, m)
    from safetensors.torch import load_file, save_file

    t = load_file(str(m / "model.safetensors"))
    t["model.norm.weight"][:] = float("nan")
    save_file(t, str(m / "model.safetensors"), metadata={"format": "pt"})
    c = _verify(m, fx)
    c.checks = (
        lambda ws, out: (
            "verify passed (OK, exit 0) a model whose logits are all NaN"
            if out.rc == 0 and ": OK" in out.stdout
            else None
        ),
    )
    return c


@case("verify-merged-missing", "verify", "export verify: --merged naming nothing", err(r"nope"), defect="traceback")
def _(ws, fx):
    return _verify(ws / "nope", fx)
