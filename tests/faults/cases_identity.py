"""Fault probes, round two (output ownership, identity, up-front refusals), kind `identity`:
Adapters and checkpoints that cannot be misapplied: the digest of what defines the delta,
the base model's identity (shapes and a fingerprint of its weights), merged folders as bases.

What an adversarial user tries: edit a field of adapter_config.json (GPart, LoRA, VeRA)
or of a checkpoint, swap weight files between adapters, apply an adapter to another
model of the same shapes, to a merged model, to a converted copy; change the base
weights in place under a run and resume it. Each is refused naming the file and the
field (or both models), or accepted where it is the same delta on the same weights (a
bf16 copy of the base, an edited dropout, an adapter of an earlier version).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from tests.faults.cases import (
    ACFG,
    AW,
    _merged_equals_shared,
    _merged_finite,
    case,
    err,
    evaluate,
    export,
    ok,
    resume,
    train,
)
from tests.faults.fixtures import edit_json, rewrite_manifest
from tests.faults.runner import Call, run_call

OTHER = r"models/other_weights"
TINY_BASE = r"tiny/model"
MERGED = r"(?i)merged model"
EDITED = r"(?i)edited|changed|differs"


# ---------------------------------------------------------------- inputs
def _variant(fx, name, edit):
    return fx._model_variant(name, edit)


def other_weights(fx) -> Path:
    """The tiny model's architecture with other weights (another checkpoint of it)."""

    def edit(dst, t, cfg):
        for k in t:
            if t[k].is_floating_point():
                t[k] = t[k] * 1.05

    return _variant(fx, "other_weights", edit)


def as_dtype(fx, dtype_name) -> Path:
    import torch

    dt = getattr(torch, dtype_name)

    def edit(dst, t, cfg):
        for k in t:
            if t[k].is_floating_point():
                t[k] = t[k].to(dt)
        cfg["torch_dtype"] = dtype_name

    return _variant(fx, f"as_{dtype_name}", edit)


def renamed_norm(fx) -> Path:
    """A tensor no adapter targets (the final norm) stored under another name."""

    def edit(dst, t, cfg):
        t["model.norm.weight_renamed"] = t.pop("model.norm.weight")

    return _variant(fx, "renamed_norm", edit)


def resized_vocab(fx) -> Path:
    """The embeddings resized by one token (a tokenizer that gained a special token)."""
    import torch

    def edit(dst, t, cfg):
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            if k in t:
                t[k] = torch.cat([t[k], t[k][:1]])
        cfg["vocab_size"] = cfg["vocab_size"] + 1

    return _variant(fx, "resized_vocab", edit)


def other_adapter(fx) -> Path:
    """A second GPart adapter of the shared run's shape: seed 1, other theta (valid, digest and all)."""
    import torch

    from gpart_ds.methods.gpart.adapter import load_adapter, save_adapter

    dst = fx.root / "adapters" / "seed1"
    if (dst / "adapter_config.json").is_file():
        return dst
    theta, cfg = load_adapter(fx.base_run / "adapter")
    cfg = {k: v for k, v in cfg.items() if k not in ("weights_sha256", "digest")}
    save_adapter(dst, torch.randn(theta.numel(), generator=torch.Generator().manual_seed(1)) * 0.1, {**cfg, "seed": 1})
    return dst


def peft_run(fx, method: str) -> Path:
    """A 2-step LoRA or VeRA run of the tiny config (its adapter is a PEFT folder)."""
    ws = fx.root / f"peft_{method}"
    run = ws / "run"
    if (run / "adapter" / "gpart_ds_run.json").is_file():
        return run
    shutil.rmtree(ws, ignore_errors=True)
    ws.mkdir(parents=True)
    m = {"name": method, "target_modules": "all-linear", "r": 4}
    if method == "vera":
        m["seed"] = 0
    cfg = fx.config(ws, {"train": {"lr": 0.001}})
    cfg["method"] = m
    (ws / "cfg.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = run_call(fx.server, ws, Call("train", ["--config", ws / "cfg.yaml"], timeout=600), tag=method)
    if out.rc != 0:
        raise RuntimeError(f"the {method} run failed (exit {out.rc}):\n{out.stderr[-4000:]}")
    return run


def copy_peft(ws, fx, method) -> Path:
    dst = Path(ws) / f"{method}_adapter"
    shutil.copytree(peft_run(fx, method) / "adapter", dst)
    return dst


def verify(ws, fx, adapter, base=None, merged=None) -> Call:
    return Call("export", ["verify", "--merged", merged or fx.merged, "--base", base or fx.model, "--adapter", adapter])


def _acfg(fn):
    return lambda a: edit_json(a / "adapter_config.json", fn)


def _swap_layout_names(c):
    """Two targets of one shape (layer 0's q_proj and o_proj) trade places: a valid layout,
    the canonical offsets kept, the weights scattered onto the wrong matrices."""
    rows = c["layout"]
    i = next(i for i, r in enumerate(rows) if r[0].endswith("layers.0.self_attn.q_proj"))
    j = next(i for i, r in enumerate(rows) if r[0].endswith("layers.0.self_attn.o_proj"))
    rows[i][0], rows[j][0] = rows[j][0], rows[i][0]


# ================================================================ GPart adapter_config.json edits
_GPART_EDITS = [
    ("seed", "the seed (another partition: 0 -> 1)", _acfg(lambda c: c.update(seed=c["seed"] + 1)), "seed"),
    ("seed-big", "the seed set to a valid 2^63", _acfg(lambda c: c.update(seed=2**63)), "seed"),
    ("layout-swap", "two targets of one shape swapped in the layout", _acfg(_swap_layout_names), "layout"),
    (
        "targets",
        "target_modules spelt as the same modules' list",
        _acfg(
            lambda c: c.update(
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            )
        ),
        "target_modules",
    ),
    (
        "dtype",
        "dtype float32 -> bfloat16 (the merge would round in it)",
        _acfg(lambda c: c.update(dtype="bfloat16")),
        "dtype",
    ),
    ("method", "method gpart -> lora", _acfg(lambda c: c.update(method="lora")), "method"),
    (
        "base-identity",
        "the recorded base identity edited (to fit another base)",
        _acfg(lambda c: c["base_model"]["identity"].update(weights_sha256="0" * 64)),
        "base_identity",
    ),
    (
        "digest-field",
        "one of the digest's own field hashes edited",
        _acfg(lambda c: c["digest"]["fields"].update(seed="0" * 16)),
        "seed",
    ),
    (
        "digest-sha",
        "the digest's overall SHA-256 edited",
        _acfg(lambda c: c["digest"].update(sha256="0" * 64)),
        "digest",
    ),
    ("digest-removed", "the digest removed (a version 2 adapter)", _acfg(lambda c: c.pop("digest")), "digest"),
    ("digest-garbage", 'digest: "x"', _acfg(lambda c: c.update(digest="x")), "digest"),
]


def _gpart_edit(edit, cli):
    def build(ws, fx):
        a = fx.copy_adapter(ws)
        edit(a)
        if cli == "export":
            c = export(ws, fx, a)
            c.checks = (_merged_finite(),)
            return c
        if cli == "evaluate":
            return evaluate(ws, fx, a)
        return verify(ws, fx, a)

    return build


for _id, _title, _edit, _field in _GPART_EDITS:
    case(
        f"id-export-gpart-{_id}",
        "identity",
        f"export: adapter_config.json with {_title}",
        err(ACFG, rf"'{_field}'|{_field}", EDITED),
        defect="adapter-identity",
    )(_gpart_edit(_edit, "export"))
for _id in ("seed", "layout-swap", "dtype"):
    _title, _edit, _field = next((t, e, f) for i, t, e, f in _GPART_EDITS if i == _id)
    case(
        f"id-evaluate-gpart-{_id}",
        "identity",
        f"evaluate: adapter_config.json with {_title}",
        err(ACFG, rf"'{_field}'", EDITED),
        defect="adapter-identity",
    )(_gpart_edit(_edit, "evaluate"))
case(
    "id-verify-gpart-seed",
    "identity",
    "export verify: the shared merge against an adapter whose seed was edited (said OK before)",
    err(ACFG, r"'seed'", EDITED),
    defect="adapter-identity",
)(_gpart_edit(next(e for i, _, e, _ in _GPART_EDITS if i == "seed"), "verify"))


@case(
    "id-export-gpart-dropout",
    "identity",
    "export: adapter_config.json with dropout edited (not part of the delta: merges as before)",
    ok(),
)
def _(ws, fx):
    a = fx.copy_adapter(ws)
    edit_json(a / "adapter_config.json", lambda c: c.update(dropout=0.3))
    c = export(ws, fx, a)
    c.checks = (_merged_equals_shared(fx),)
    return c


@case(
    "id-export-gpart-v1",
    "identity",
    "export: a version 1 adapter (written before digests: no digest, no base identity): merged, with a warning",
    ok(r"(?i)no digest"),
)
def _(ws, fx):
    a = fx.copy_adapter(ws)

    def old(c):
        c.update(format_version=1)
        c.pop("digest")
        c["base_model"].pop("identity")

    edit_json(a / "adapter_config.json", old)
    c = export(ws, fx, a)
    c.checks = (_merged_equals_shared(fx),)
    return c


@case(
    "id-export-gpart-v1-merged-base",
    "identity",
    "export: a version 1 adapter into a merged model (no identity "
    "to compare: its recorded base path is not the merged folder)",
    err(ACFG, MERGED, r"adapter"),
)
def _(ws, fx):
    a = fx.copy_adapter(ws)

    def old(c):
        c.update(format_version=1)
        c.pop("digest")
        c["base_model"].pop("identity")

    edit_json(a / "adapter_config.json", old)
    return export(ws, fx, a, base=fx.merged)


# ================================================================ swapped files
@case(
    "id-export-weights-swapped",
    "identity",
    "export: another adapter's adapter_model.safetensors copied in",
    err(AW, r"(?i)sha-256|corrupt"),
)
def _(ws, fx):
    a = fx.copy_adapter(ws)
    shutil.copy2(other_adapter(fx) / "adapter_model.safetensors", a / "adapter_model.safetensors")
    return export(ws, fx, a)


@case(
    "id-export-weights-swapped-sha-fixed",
    "identity",
    "export: another adapter's weights copied in and weights_sha256 updated to match",
    err(ACFG, r"'weights_sha256'", EDITED),
    defect="adapter-identity",
)
def _(ws, fx):
    a = fx.copy_adapter(ws)
    other = other_adapter(fx)
    shutil.copy2(other / "adapter_model.safetensors", a / "adapter_model.safetensors")
    sha = json.loads((other / "adapter_config.json").read_text())["weights_sha256"]
    edit_json(a / "adapter_config.json", lambda c: c.update(weights_sha256=sha))
    return export(ws, fx, a)


@case(
    "id-export-config-swapped",
    "identity",
    "export: another adapter's adapter_config.json (seed 1) with this adapter's weights",
    err(AW, r"(?i)sha-256|corrupt"),
)
def _(ws, fx):
    a = fx.copy_adapter(ws)
    shutil.copy2(other_adapter(fx) / "adapter_config.json", a / "adapter_config.json")
    return export(ws, fx, a)


@case(
    "id-export-other-adapter-ok",
    "identity",
    "export: a second, consistent adapter (seed 1) into its base (works)",
    ok(),
)
def _(ws, fx):
    a = Path(ws) / "seed1"
    shutil.copytree(other_adapter(fx), a)
    return export(ws, fx, a)


# ================================================================ another base model
@case(
    "id-export-other-base",
    "identity",
    "export: the adapter into another model of the same shapes",
    err(ACFG, TINY_BASE, OTHER),
    defect="wrong-base",
)
def _(ws, fx):
    return export(ws, fx, fx.copy_adapter(ws), base=other_weights(fx))


@case(
    "id-evaluate-other-base",
    "identity",
    "evaluate: the adapter on another model of the same shapes",
    err(ACFG, TINY_BASE, OTHER),
    defect="wrong-base",
)
def _(ws, fx):
    return evaluate(ws, fx, fx.copy_adapter(ws), model=other_weights(fx))


@case(
    "id-verify-other-base",
    "identity",
    "export verify: --base another model of the same shapes",
    err(ACFG, TINY_BASE, OTHER),
    defect="wrong-base",
)
def _(ws, fx):
    return verify(ws, fx, fx.copy_adapter(ws), base=other_weights(fx))


@case(
    "id-export-checkpoint-other-base",
    "identity",
    "export: a checkpoint folder into another model of the same shapes",
    err(r"state\.json", TINY_BASE, OTHER),
    defect="wrong-base",
)
def _(ws, fx):
    return export(ws, fx, fx.copy_checkpoint(ws, 4), base=other_weights(fx))


@case(
    "id-export-renamed-norm",
    "identity",
    "export: into a copy of the base whose final norm is stored under another name (no target renamed)",
    err(ACFG, r"(?i)names or shapes"),
    defect="wrong-base",
)
def _(ws, fx):
    return export(ws, fx, fx.copy_adapter(ws), base=renamed_norm(fx))


@case(
    "id-export-resized-vocab",
    "identity",
    "export: into a copy of the base with one more token in its embeddings (no target reshaped)",
    err(ACFG, r"(?i)names or shapes", r"resized_vocab"),
    defect="wrong-base",
)
def _(ws, fx):
    return export(ws, fx, fx.copy_adapter(ws), base=resized_vocab(fx))


# Converted copies: the identity compares the weights at bf16 precision (gpart_ds/identity.py)
@case(
    "id-export-bf16-copy",
    "identity",
    "export: into a bf16 copy of the fp32 base (the same weights at bf16: accepted)",
    ok(),
)
def _(ws, fx):
    c = export(ws, fx, fx.copy_adapter(ws), as_dtype(fx, "bfloat16"))
    c.checks = (_merged_finite(),)
    return c


@case("id-evaluate-bf16-copy", "identity", "evaluate: the adapter on a bf16 copy of its base (accepted)", ok())
def _(ws, fx):
    return evaluate(ws, fx, fx.copy_adapter(ws), model=as_dtype(fx, "bfloat16"))


@case(
    "id-export-fp16-copy",
    "identity",
    "export: into an fp16 copy of the base (fp16 rounds otherwise: another identity, refused)",
    err(ACFG, r"as_float16", r"(?i)weight values"),
)
def _(ws, fx):
    return export(ws, fx, fx.copy_adapter(ws), as_dtype(fx, "float16"))


# ================================================================ merged folders as bases
@case(
    "id-export-merged-base",
    "identity",
    "export: the adapter into its own merged model (the delta twice)",
    err(MERGED, r"gpart_merge\.json", r"run/adapter"),
    defect="merged-as-base",
)
def _(ws, fx):
    return export(ws, fx, fx.copy_adapter(ws), base=fx.merged)


@case(
    "id-export-merged-base-copy",
    "identity",
    "export: into a copy of the merged model (same provenance file)",
    err(MERGED, r"run/adapter"),
    defect="merged-as-base",
)
def _(ws, fx):
    m = Path(ws) / "m"
    shutil.copytree(fx.merged, m)
    return export(ws, fx, fx.copy_adapter(ws), base=m)


@case(
    "id-export-other-adapter-merged-base",
    "identity",
    "export: a second adapter into the first one's merged model",
    err(MERGED, r"run/adapter"),
    defect="merged-as-base",
)
def _(ws, fx):
    a = Path(ws) / "seed1"
    shutil.copytree(other_adapter(fx), a)
    return export(ws, fx, a, base=fx.merged)


@case(
    "id-evaluate-merged-base",
    "identity",
    "evaluate: --model the merged model --adapter its own adapter",
    err(MERGED, r"--model", r"run/adapter"),
    defect="merged-as-base",
)
def _(ws, fx):
    return evaluate(ws, fx, fx.copy_adapter(ws), model=fx.merged)


@case("id-evaluate-merged-alone", "identity", "evaluate: the merged model alone (what it is for: works)", ok())
def _(ws, fx):
    return evaluate(ws, fx, None, model=fx.merged)


@case(
    "id-verify-merged-as-base",
    "identity",
    "export verify: --base the merged model itself",
    err(MERGED, r"run/adapter"),
    defect="merged-as-base",
)
def _(ws, fx):
    return verify(ws, fx, fx.copy_adapter(ws), base=fx.merged)


@case(
    "id-export-checkpoint-merged-base",
    "identity",
    "export: a checkpoint folder into the merged model",
    err(MERGED, r"run/adapter"),
    defect="merged-as-base",
)
def _(ws, fx):
    return export(ws, fx, fx.copy_checkpoint(ws, 4), base=fx.merged)


@case(
    "id-verify-other-adapter",
    "identity",
    "export verify: the merged model against another adapter (seed 1): FAILED naming the adapter it was merged from",
    ok(r"(?i)merged from another adapter.*FAILED", code=1),
)
def _(ws, fx):
    a = Path(ws) / "seed1"
    shutil.copytree(other_adapter(fx), a)
    return verify(ws, fx, a)


@case(
    "id-train-on-merged-then-original",
    "identity",
    "train a new adapter on a merged model (allowed: a new base), then evaluate it on the original base",
    err(ACFG, r"(?i)merged|another model", r"(?i)trained on"),
    defect="wrong-base",
)
def _(ws, fx):
    t = train(ws, fx, {"model": {"path": str(fx.merged)}})
    return [t, evaluate(ws, fx, Path(ws) / "run" / "adapter")]


@case(
    "id-train-on-merged-evaluate-there",
    "identity",
    "train a new adapter on a merged model and evaluate it there (its own base: works)",
    ok(),
)
def _(ws, fx):
    t = train(ws, fx, {"model": {"path": str(fx.merged)}})
    return [t, evaluate(ws, fx, Path(ws) / "run" / "adapter", model=fx.merged)]


# ================================================================ resume on changed base weights
def _run_on_own_model(ws, fx, change=None):
    """The shared run copied, its checkpoints pointing at ws/model, a copy of the tiny model
    (the checkpoints' digests do not cover model.path: moved, not edited); change(model) then edits it."""
    fx.copy_run(ws)
    model = Path(ws) / "model"
    shutil.copytree(fx.model, model)
    for ck in (Path(ws) / "run" / "checkpoints").glob("step-*"):
        rc = yaml.safe_load((ck / "run_config.yaml").read_text())
        rc["model"]["path"] = str(model)
        (ck / "run_config.yaml").write_text(yaml.safe_dump(rc, sort_keys=False))
        rewrite_manifest(ck)
    if change:
        change(model)
    return model


def _scale_q_proj(model):
    from safetensors.torch import load_file, save_file

    t = load_file(str(model / "model.safetensors"))
    t["model.layers.0.self_attn.q_proj.weight"] *= 1.5
    save_file(t, str(model / "model.safetensors"), metadata={"format": "pt"})


def _becomes_merged(fx):
    def change(model):
        shutil.rmtree(model)
        shutil.copytree(fx.merged, model)

    return change


@case(
    "id-resume-base-unchanged",
    "identity",
    "train.resume=auto with the base model moved (same weights): resumes",
    ok(r"(?i)resumed from"),
)
def _(ws, fx):
    model = _run_on_own_model(ws, fx)
    return resume(ws, fx, {"model": {"path": str(model)}})


@case(
    "id-resume-base-edited",
    "identity",
    "train.resume=auto after one weight matrix of the base was changed in place",
    err(r"model\.path", r"(?i)changed in place|weight values"),
    defect="base-changed",
)
def _(ws, fx):
    model = _run_on_own_model(ws, fx, _scale_q_proj)
    return resume(ws, fx, {"model": {"path": str(model)}})


@case(
    "id-resume-base-became-merged",
    "identity",
    "train.resume=auto after the base folder was replaced by the merged model",
    err(r"model\.path", MERGED),
    defect="base-changed",
)
def _(ws, fx):
    model = _run_on_own_model(ws, fx, _becomes_merged(fx))
    return resume(ws, fx, {"model": {"path": str(model)}})


@case(
    "id-export-only-base-edited",
    "identity",
    "--export-only train.resume=auto after the base changed in place",
    err(r"model\.path", r"(?i)changed in place|weight values"),
    defect="base-changed",
)
def _(ws, fx):
    model = _run_on_own_model(ws, fx, _scale_q_proj)
    c = train(
        ws, fx, {"model": {"path": str(model)}, "train": {"resume": "auto", "max_steps": 4}}, argv=("--export-only",)
    )
    return c


@case(
    "id-resume-checkpoint-identity-edited",
    "identity",
    "train.resume=<checkpoint> whose state.json base identity was edited (manifest rewritten to match)",
    err(r"state\.json", r"base_identity", EDITED),
    defect="adapter-identity",
)
def _(ws, fx):
    ck = fx.copy_checkpoint(ws, 4)
    edit_json(ck / "state.json", lambda s: s["base_identity"].update(weights_sha256="0" * 64))
    rewrite_manifest(ck)
    return train(ws, fx, {"train": {"resume": str(ck), "max_steps": 6}})


@case(
    "id-export-checkpoint-seed-edited",
    "identity",
    "export: a checkpoint folder whose run_config.yaml seed was edited (manifest rewritten to match)",
    err(r"state\.json", r"method\.seed", EDITED),
    defect="adapter-identity",
)
def _(ws, fx):
    ck = fx.copy_checkpoint(ws, 4)
    rc = yaml.safe_load((ck / "run_config.yaml").read_text())
    rc["method"]["seed"] = 7
    (ck / "run_config.yaml").write_text(yaml.safe_dump(rc, sort_keys=False))
    rewrite_manifest(ck)
    return export(ws, fx, ck)


# ================================================================ LoRA and VeRA (PEFT folders)
def _peft_edit(method, edit, model=None):
    def build(ws, fx):
        a = copy_peft(ws, fx, method)
        if edit:
            edit(a)
        return evaluate(ws, fx, a, model=model(fx) if model else None)

    return build


for _m in ("lora", "vera"):
    case(f"id-evaluate-{_m}-ok", "identity", f"evaluate: the {_m} run's adapter on its base (works)", ok())(
        _peft_edit(_m, None)
    )
    case(
        f"id-evaluate-{_m}-r",
        "identity",
        f"evaluate: {_m} adapter_config.json with r edited",
        err(ACFG, r"'r'", EDITED),
        defect="adapter-identity",
    )(_peft_edit(_m, _acfg(lambda c: c.update(r=2))))
    case(
        f"id-evaluate-{_m}-targets",
        "identity",
        f"evaluate: {_m} adapter_config.json with target_modules cut to q_proj",
        err(ACFG, r"'target_modules'", EDITED),
        defect="adapter-identity",
    )(_peft_edit(_m, _acfg(lambda c: c.update(target_modules=[t for t in c["target_modules"] if "q_proj" in t]))))
    case(
        f"id-evaluate-{_m}-other-base",
        "identity",
        f"evaluate: the {_m} adapter on another model of the same shapes",
        err(ACFG, TINY_BASE, OTHER),
        defect="wrong-base",
    )(_peft_edit(_m, None, other_weights))
    case(
        f"id-evaluate-{_m}-merged-base",
        "identity",
        f"evaluate: the {_m} adapter on the (GPart) merged model",
        err(MERGED, r"run/adapter"),
        defect="merged-as-base",
    )(_peft_edit(_m, None, lambda fx: fx.merged))

case(
    "id-evaluate-lora-alpha",
    "identity",
    "evaluate: lora adapter_config.json with lora_alpha doubled (a silent rescale before)",
    err(ACFG, r"'lora_alpha'", EDITED),
    defect="adapter-identity",
)(_peft_edit("lora", _acfg(lambda c: c.update(lora_alpha=c["lora_alpha"] * 2))))
case(
    "id-evaluate-vera-prng-key",
    "identity",
    "evaluate: vera adapter_config.json with projection_prng_key edited",
    err(ACFG, r"'projection_prng_key'", EDITED),
    defect="adapter-identity",
)(_peft_edit("vera", _acfg(lambda c: c.update(projection_prng_key=c["projection_prng_key"] + 1))))
case(
    "id-evaluate-lora-run-identity-edited",
    "identity",
    "evaluate: lora gpart_ds_run.json with the base identity edited",
    err(r"gpart_ds_run\.json:identity", EDITED),
    defect="adapter-identity",
)(
    _peft_edit(
        "lora", lambda a: edit_json(a / "gpart_ds_run.json", lambda r: r["identity"].update(weights_sha256="0" * 64))
    )
)
case(
    "id-evaluate-lora-run-record-removed",
    "identity",
    "evaluate: lora adapter without gpart_ds_run.json (a PEFT folder from elsewhere: accepted with a warning)",
    ok(r"(?i)not written by gpart_ds"),
)(_peft_edit("lora", lambda a: (a / "gpart_ds_run.json").unlink()))


@case(
    "id-evaluate-lora-weights-from-vera",
    "identity",
    "evaluate: a lora folder whose weights file is the vera adapter's",
    err(AW, r"(?i)sha-256"),
)
def _(ws, fx):
    a = copy_peft(ws, fx, "lora")
    shutil.copy2(peft_run(fx, "vera") / "adapter" / "adapter_model.safetensors", a / "adapter_model.safetensors")
    return evaluate(ws, fx, a)
