"""VeRA's own code (gpart_ds/methods/vera, peft_common): shared frozen random projections
regenerated from method.seed, only the scaling vectors train, and the merged weight
W0 + (lambda_b B)(lambda_d A) its export writes equals the adapted layer."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from gpart_ds.config import ConfigError, load_config
from gpart_ds.identity import IdentityError, identity
from gpart_ds.methods.peft_common import check_adapter
from tests.export_helpers import make_base, read_folder
from tests.helpers import micro_llama
from tests.methods.helpers import build, export_run, logits, randomize

Q, V, DOWN = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj"


def _mod(method, target: str):
    return dict(method.model.named_modules())[target]


def _projections(method, target: str):
    mod = _mod(method, target)
    return mod.vera_A["default"], mod.vera_B["default"]


def _delta(mod) -> torch.Tensor:
    """(lambda_b * B[:out]) @ (lambda_d * A[:, :in]), from the layer's own tensors."""
    a = mod.vera_A["default"][:, : mod.in_features]
    b = mod.vera_B["default"][: mod.out_features, :]
    lam_b, lam_d = mod.vera_lambda_b["default"], mod.vera_lambda_d["default"]
    return (lam_b[:, None] * b) @ (lam_d[:, None] * a)


def test_only_the_scaling_vectors_train_and_the_projections_are_frozen_and_shared():
    base = micro_llama()
    m = build("vera", base, ["q_proj", "v_proj", "down_proj"], r=4, seed=3)
    targets = [
        f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    ]
    assert sorted(m.trainable()) == sorted(f"lm.{t}.vera_lambda_{v}.default" for t in targets for v in "bd")
    for t in targets:  # lambda_b: one per output row, lambda_d: one per rank
        mod = _mod(m, t)
        assert mod.vera_lambda_b["default"].shape == (mod.out_features,)
        assert mod.vera_lambda_d["default"].shape == (4,)
    assert m.trainable_params() == sum(out + 4 for out in (16, 8, 16) for _ in range(2))
    # one pair of projections for every target, sized by the largest in and out, not trained
    a, b = _projections(m, Q)
    assert all(_projections(m, t)[0] is a and _projections(m, t)[1] is b for t in targets)
    assert a.shape == (4, 24) and b.shape == (16, 4)  # in: down_proj's 24; out: q_proj's 16
    assert not a.requires_grad and not b.requires_grad
    assert not any(p is a or p is b for p in m.trainable().values())
    assert all(not p.requires_grad for n, p in m.model.named_parameters() if "vera_lambda" not in n)


def test_the_projections_regenerate_from_the_seed():
    a3, b3 = _projections(build("vera", micro_llama(seed=0), r=4, seed=3), Q)
    again = build("vera", micro_llama(seed=1), r=4, seed=3)  # other base weights, same seed
    assert torch.equal(_projections(again, Q)[0], a3) and torch.equal(_projections(again, Q)[1], b3)
    a4, b4 = _projections(build("vera", micro_llama(seed=0), r=4, seed=4), Q)
    assert not torch.equal(a4, a3) and not torch.equal(b4, b3)
    assert a3.abs().sum() > 0 and b3.abs().sum() > 0


def test_zero_init_gives_the_base_models_output():
    base = micro_llama()
    ref = copy.deepcopy(base)
    m = build("vera", base, r=4)
    assert all(torch.count_nonzero(_mod(m, t).vera_lambda_b["default"]) == 0 for t in (Q, V, DOWN))
    assert torch.equal(logits(m.root), logits(ref))


def test_merged_weight_is_w0_plus_the_scaled_projections_and_gives_the_layers_output():
    m = build("vera", micro_llama(), r=4, seed=7)
    randomize(m.trainable().values())
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    for t in (Q, V, DOWN):
        mod = _mod(m, t)
        w0 = mod.get_base_layer().weight
        params, merged = m.merge_source(f"{t}.weight")
        assert {id(p) for p in params} == {id(w0), id(mod.vera_lambda_b["default"]), id(mod.vera_lambda_d["default"])}
        # (summed in fp32 whatever the weights' dtype: exact to fp32's rounding)
        torch.testing.assert_close(merged(), w0 + _delta(mod), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(merged(), w0)
        xin = x if mod.in_features == 16 else torch.randn(3, 5, mod.in_features, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(F.linear(xin, merged()), mod(xin), rtol=1e-5, atol=1e-5)


def test_default_rank():
    m = build("vera", micro_llama(), ["q_proj"])
    assert _mod(m, Q).vera_lambda_d["default"].shape == (256,) and _projections(m, Q)[0].shape[0] == 256


@pytest.mark.parametrize(
    "override,message",
    [
        ("method.r=0", r"'method\.r'.*rank must be >= 1, got 0"),
        ("method.seed=-1", r"'method\.seed'.*seed must be in \[0, 2\^64\), got -1"),
        ("method.dropout=1.0", r"'method\.dropout'.*dropout must be in \[0, 1\), got 1\.0"),
    ],
)
def test_the_config_refuses_a_bad_rank_seed_or_dropout_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/tiny.yaml", ["method.name=vera", "method.d=null", override], check_files=False)


@pytest.fixture
def base_dir(tmp_path, tiny_assets):
    return make_base(tmp_path / "base", tiny_assets / "model", hidden=16, inter=24)


def test_the_merged_export_and_the_adapter_folder_hold_the_trained_delta(tmp_path, base_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    m = build(
        "vera", AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), ["q_proj", "up_proj"], r=4, seed=5
    )
    randomize(m.trainable().values(), scale=0.2)
    got, w0 = export_run(m, base_dir, tmp_path / "merged"), read_folder(base_dir)
    assert got.keys() == w0.keys()
    for name, w in w0.items():
        if name.endswith(("q_proj.weight", "up_proj.weight")):
            delta = _delta(_mod(m, name.removesuffix(".weight"))).detach()
            torch.testing.assert_close(got[name], w + delta, rtol=0, atol=1e-6)
            assert not torch.equal(got[name], w)
        else:
            assert torch.equal(got[name], w), name
    # the adapter folder: PEFT's own (projections saved with it), checked against its base
    out = m.save_adapter(
        tmp_path / "adapter",
        {"base_model": {"name": "base", "path": str(base_dir), "identity": identity(base_dir)}, "dtype": torch.float32},
    )
    check_adapter(out, base_dir)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["projection_prng_key"], cfg["save_projection"]) == ("VERA", 4, 5, True)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), out)
    torch.testing.assert_close(logits(peft.eval()), logits(m.root), rtol=0, atol=1e-5)
    cfg["projection_prng_key"] = 6  # other projections: the digest names the edit
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(IdentityError, match="projection_prng_key"):
        check_adapter(out, base_dir)
