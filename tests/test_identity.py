"""The base model's identity and the digest of a delta's definition (gpart_ds/identity.py),
and the readers that check them: GPart adapters, LoRA/VeRA records, checkpoints."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpart_ds import identity as ident
from gpart_ds.export.offline import merge_offline
from gpart_ds.identity import IdentityError
from tests.export_helpers import make_adapter, make_base


@pytest.fixture
def tok_dir(tiny_assets):
    return tiny_assets / "model"


def _rewrite(folder, fn, dtype=None):
    p = folder / "model.safetensors"
    t = load_file(str(p))
    fn(t)
    save_file(t, str(p), metadata={"format": "pt"})


def _adapter_with_identity(folder, base, **kw):
    """make_adapter, recording the base's identity as training does."""
    from gpart_ds.methods.gpart import adapter as adapter_io
    from gpart_ds.targets import build_layout, skeleton

    layout = build_layout(skeleton(str(base)), "all-linear")
    cfg = adapter_io.adapter_config(
        d=16,
        seed=0,
        target_modules="all-linear",
        dropout=0.0,
        layout=layout,
        base_model={"name": base.name, "path": str(base), "identity": ident.identity(base)},
        dtype=torch.float32,
        **kw,
    )
    adapter_io.save_adapter(folder, torch.randn(16) * 0.1, cfg)
    return folder


# ---------------------------------------------------------------- identity
def test_identity_is_stable_and_sees_names_shapes_and_values(tmp_path, tok_dir):
    a = make_base(tmp_path / "a", tok_dir)
    one = ident.identity(a)
    assert one == ident.identity(a) and ident.differs(one, ident.identity(a)) is None
    assert one["tensors"] > 0 and one["dtype"] == "float32"
    # a copy elsewhere is the same model
    shutil.copytree(a, tmp_path / "copy")
    assert ident.differs(one, ident.identity(tmp_path / "copy")) is None
    # values changed in place (same names and shapes)
    _rewrite(tmp_path / "copy", lambda t: t["model.layers.0.self_attn.q_proj.weight"].mul_(1.5))
    assert "other weight values" in ident.differs(one, ident.identity(tmp_path / "copy"))
    # a renamed tensor
    shutil.copytree(a, tmp_path / "renamed")
    _rewrite(tmp_path / "renamed", lambda t: t.__setitem__("model.norm.w", t.pop("model.norm.weight")))
    assert "names or shapes" in ident.differs(one, ident.identity(tmp_path / "renamed"))
    # another model of the same architecture
    b = make_base(tmp_path / "b", tok_dir, seed=1)
    assert "other weight values" in ident.differs(one, ident.identity(b))


def test_dtype_copies_bf16_same_fp16_other(tmp_path, tok_dir):
    """The documented decision: the weights are compared at bf16 precision."""
    a = make_base(tmp_path / "a", tok_dir)
    for name, dt, same in (("bf16", torch.bfloat16, True), ("fp16", torch.float16, False)):
        shutil.copytree(a, tmp_path / name)
        _rewrite(tmp_path / name, lambda t, dt=dt: t.update({k: v.to(dt) for k, v in t.items()}))
        got = ident.differs(ident.identity(a), ident.identity(tmp_path / name))
        assert (got is None) == same, (name, got)
    # and back: a bf16 base and its fp32 copy
    assert ident.differs(ident.identity(tmp_path / "bf16"), ident.identity(a)) is None


def test_bytes_read_per_file_are_bounded(tmp_path, monkeypatch):
    """A file of many tensors: at most MAX_WINDOWS_PER_FILE windows of WINDOW elements are read."""
    from gpart_ds import safetensors_io as stio

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    save_file({f"t{i:05d}": torch.randn(300) for i in range(3000)}, str(folder / "model.safetensors"))
    reads = []
    real = stio.read_elements
    monkeypatch.setattr(stio, "read_elements", lambda st, first, n, fd=None: reads.append(n) or real(st, first, n, fd))
    ident.identity(folder)
    assert len(reads) <= ident.MAX_WINDOWS_PER_FILE and sum(reads) * 4 <= ident.MAX_WINDOWS_PER_FILE * ident.WINDOW * 8


# ---------------------------------------------------------------- digest
def test_digest_names_the_edited_field():
    fields = {"seed": 0, "d": 16, "layout": [["a", [2, 2], 0]]}
    rec = ident.digest(fields)
    ident.check_digest(rec, fields, "X/adapter_config.json", missing_ok=False)
    with pytest.raises(IdentityError, match=r"X/adapter_config\.json: 'seed' \(now 1\) differs.*edited"):
        ident.check_digest(rec, {**fields, "seed": 1}, "X/adapter_config.json", missing_ok=False)
    with pytest.raises(IdentityError, match="'digest' is missing"):
        ident.check_digest(None, fields, "X", missing_ok=False)
    with pytest.raises(IdentityError, match="digest itself was edited"):
        ident.check_digest({**rec, "sha256": "0" * 64}, fields, "X", missing_ok=False)
    ident.check_digest(None, fields, "X", missing_ok=True)  # an earlier version's record: a warning


@pytest.mark.parametrize(
    "field,value", [("seed", 1), ("d", 8), ("dtype", "bfloat16"), ("target_modules", ["q_proj"]), ("method", "lora")]
)
def test_an_edited_gpart_adapter_is_refused_naming_the_field(tmp_path, tok_dir, field, value):
    base = make_base(tmp_path / "base", tok_dir)
    make_adapter(tmp_path / "ad", base, d=16, seed=0)
    cfg_path = tmp_path / "ad" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg[field] = value
    if field == "d":  # theta's length too, as a careful forger would
        t = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
        save_file(
            {"gpart_theta": t["gpart_theta"][:8].contiguous()}, str(tmp_path / "ad" / "adapter_model.safetensors")
        )
        from gpart_ds.fileio import sha256_file

        cfg["weights_sha256"] = sha256_file(tmp_path / "ad" / "adapter_model.safetensors")
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(IdentityError, match=rf"adapter_config\.json: '{field}'"):
        merge_offline(base, tmp_path / "ad", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_version_1_adapter_is_accepted_with_a_warning(tmp_path, tok_dir, caplog):
    base = make_base(tmp_path / "base", tok_dir)
    make_adapter(tmp_path / "ad", base, d=16, seed=0)
    cfg_path = tmp_path / "ad" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["format_version"] = 1
    del cfg["digest"]
    cfg_path.write_text(json.dumps(cfg))
    merge_offline(base, tmp_path / "ad", tmp_path / "out")
    assert "no digest" in caplog.text


def test_an_adapter_is_merged_only_into_its_own_base(tmp_path, tok_dir):
    a = make_base(tmp_path / "a", tok_dir)
    b = make_base(tmp_path / "b", tok_dir, seed=5)  # same shapes, other weights
    _adapter_with_identity(tmp_path / "ad", a)
    with pytest.raises(IdentityError, match=rf"trained on the base model {a}.*--base {b} is another model"):
        merge_offline(b, tmp_path / "ad", tmp_path / "out")
    stats = merge_offline(a, tmp_path / "ad", tmp_path / "out")
    assert stats["files"] == 1
    prov = json.loads((tmp_path / "out" / ident.MERGE_RECORD).read_text())
    assert prov["base_identity"] == ident.identity(a) and prov["adapter_digest"]
    # the merged folder as a base: refused as such, naming the adapter it holds
    with pytest.raises(IdentityError, match=rf"is a merged model \(gpart_merge.json\).*adapter {tmp_path / 'ad'}"):
        merge_offline(tmp_path / "out", tmp_path / "ad", tmp_path / "out2")
    # an adapter trained on the merged model (its identity recorded) merges into it
    _adapter_with_identity(tmp_path / "ad2", tmp_path / "out")
    merge_offline(tmp_path / "out", tmp_path / "ad2", tmp_path / "out2")


def test_checkpoint_digest_and_base_check(tmp_path, tok_dir):
    from types import SimpleNamespace

    from gpart_ds import checkpoint

    base = make_base(tmp_path / "a", tok_dir)
    run = {
        "method": {"name": "gpart", "d": 16, "seed": 0, "target_modules": "all-linear"},
        "model": {"path": str(base)},
    }
    state = {"dtype": "float32", "layout": [["x", [2, 2], 0]], "base_identity": ident.identity(base)}
    state["digest"] = ident.digest(checkpoint.delta_fields(state, run))
    ident.check_digest(state["digest"], checkpoint.delta_fields(state, run), "ck", missing_ok=False)
    edited = {**run, "method": {**run["method"], "seed": 3}}
    with pytest.raises(IdentityError, match="'method.seed'"):
        ident.check_digest(state["digest"], checkpoint.delta_fields(state, edited), "ck", missing_ok=False)
    summary = SimpleNamespace(state=state, path=tmp_path / "step-000004")
    checkpoint.check_base(summary, base, lambda k: k)
    _rewrite(base, lambda t: t["model.layers.0.mlp.up_proj.weight"].mul_(2))
    with pytest.raises(checkpoint.CheckpointError, match=r"model\.path.*step-000004.*changed in place"):
        checkpoint.check_base(summary, base, lambda k: k)
