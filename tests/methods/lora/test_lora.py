"""LoRA's own code (gpart_ds/methods/lora, peft_common): where it injects, what trains, the
delta (alpha / r) B A its merge writes, its defaults and the checks of its keys."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from gpart_ds.config import ConfigError, load_config
from gpart_ds.identity import IdentityError
from gpart_ds.methods.peft_common import check_adapter
from tests.export_helpers import make_base
from tests.helpers import micro_llama
from tests.methods.helpers import build, export_run, logits, randomize

ATTN = "model.layers.0.self_attn"


def _factors(method, target: str):
    mod = dict(method.model.named_modules())[target]
    return mod, mod.lora_A["default"].weight, mod.lora_B["default"].weight


def test_only_the_factors_of_the_layout_targets_train():
    base = micro_llama()
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    m = build("lora", base, ["q_proj", "v_proj"], r=4)
    targets = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert sorted(m.trainable()) == sorted(f"lm.{t}.lora_{f}.default.weight" for t in targets for f in "AB")
    for t in targets:  # A: r x in, B: out x r
        mod, a, b = _factors(m, t)
        assert a.shape == (4, mod.in_features) and b.shape == (mod.out_features, 4)
    assert m.trainable_params() == sum(4 * (16 + out) for out in (16, 8) for _ in range(2))
    # every base weight is frozen and unchanged by the injection
    base_params = {n.replace(".base_layer", ""): p for n, p in m.model.named_parameters() if "lora_" not in n}
    assert base_params.keys() == frozen.keys()
    assert all(not p.requires_grad and torch.equal(p, frozen[n]) for n, p in base_params.items())


def test_zero_init_gives_the_base_models_output():
    base = micro_llama()
    ref = copy.deepcopy(base)
    m = build("lora", base, r=4)
    _, a, b = _factors(m, f"{ATTN}.q_proj")
    assert a.abs().sum() > 0 and torch.count_nonzero(b) == 0  # B = 0: delta = 0, A random
    assert torch.equal(logits(m.root), logits(ref))


@pytest.mark.parametrize("r,alpha,scale", [(4, None, 2.0), (4, 2.0, 0.5), (2, 16.0, 8.0)])
def test_merged_weight_is_w0_plus_alpha_over_r_times_B_A(r, alpha, scale):
    m = build("lora", micro_llama(), ["q_proj", "down_proj"], r=r, alpha=alpha)
    randomize(m.trainable().values())
    for t in (f"{ATTN}.q_proj", "model.layers.1.mlp.down_proj"):
        mod, a, b = _factors(m, t)
        w0 = mod.get_base_layer().weight
        params, merged = m.merge_source(f"{t}.weight")
        assert {id(p) for p in params} == {id(w0), id(a), id(b)}  # what a ZeRO-3 export gathers
        # (summed in fp32 whatever the weights' dtype: exact to fp32's rounding)
        torch.testing.assert_close(merged(), w0 + scale * (b @ a), rtol=1e-6, atol=1e-6)


def test_merged_weight_gives_the_adapted_layers_output():
    m = build("lora", micro_llama(), r=4, alpha=8.0)
    randomize(m.trainable().values(), seed=1)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    for t in (f"{ATTN}.q_proj", f"{ATTN}.k_proj", "model.layers.1.mlp.up_proj"):
        mod = dict(m.model.named_modules())[t]
        with torch.no_grad():
            torch.testing.assert_close(F.linear(x, m.merge_source(f"{t}.weight")[1]()), mod(x), rtol=1e-5, atol=1e-5)
    # the whole model: the base with every merged weight written in gives the adapted logits
    plain = micro_llama()
    with torch.no_grad():
        for n, p in plain.named_parameters():
            src = m.merge_source(n)
            p.copy_(src[1]() if src else dict(m.model.named_parameters())[n])
    torch.testing.assert_close(logits(plain), logits(m.root), rtol=1e-5, atol=1e-5)


def test_default_rank_and_alpha():
    m = build("lora", micro_llama(), ["q_proj"])
    mod, a, _ = _factors(m, f"{ATTN}.q_proj")
    assert a.shape[0] == 8 and mod.scaling["default"] == 2.0  # r = 8, alpha = 2 r


@pytest.mark.parametrize(
    "override,message",
    [
        ("method.r=0", r"'method\.r'.*rank must be >= 1, got 0"),
        ("method.r=-3", r"'method\.r'.*rank must be >= 1, got -3"),
        ("method.alpha=0", r"'method\.alpha'.*must be > 0, got 0"),
        ("method.alpha=-1", r"'method\.alpha'.*must be > 0, got -1"),
    ],
)
def test_the_config_refuses_a_bad_rank_or_alpha_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/tiny.yaml", ["method.name=lora", override], check_files=False)
    load_config("configs/tiny.yaml", ["method.name=lora", "method.r=1", "method.alpha=0.5"], check_files=False)


@pytest.fixture
def base_dir(tmp_path, tiny_assets):
    return make_base(tmp_path / "base", tiny_assets / "model", hidden=16, inter=24)


def test_the_merged_export_is_the_base_plus_each_targets_delta(tmp_path, base_dir):
    from transformers import AutoModelForCausalLM

    from tests.export_helpers import read_folder

    m = build(
        "lora",
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
        ["q_proj", "up_proj"],
        r=4,
        alpha=4.0,
    )
    randomize(m.trainable().values(), scale=0.2)
    got, w0 = export_run(m, base_dir, tmp_path / "merged"), read_folder(base_dir)
    assert got.keys() == w0.keys()
    for name, w in w0.items():
        target = name.endswith(("q_proj.weight", "up_proj.weight"))
        if target:
            mod, a, b = _factors(m, name.removesuffix(".weight"))
            torch.testing.assert_close(got[name], w + 1.0 * (b @ a).detach(), rtol=0, atol=1e-6)
            assert not torch.equal(got[name], w)
        else:
            assert torch.equal(got[name], w), name


def test_the_adapter_folder_is_peft_s_own_and_refuses_an_edited_alpha(tmp_path, base_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from gpart_ds.identity import identity

    m = build("lora", AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), r=4, alpha=8.0)
    randomize(m.trainable().values(), scale=0.2)
    out = m.save_adapter(
        tmp_path / "adapter",
        {"base_model": {"name": "base", "path": str(base_dir), "identity": identity(base_dir)}, "dtype": torch.float32},
    )
    check_adapter(out, base_dir)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", 4, 8.0)
    # PEFT itself, loading the folder onto the base, gives the trained model's logits
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), out)
    torch.testing.assert_close(logits(peft.eval()), logits(m.root), rtol=0, atol=1e-5)
    cfg["lora_alpha"] = 16.0  # twice the delta: the digest names the edit
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(IdentityError, match="lora_alpha"):
        check_adapter(out, base_dir)
