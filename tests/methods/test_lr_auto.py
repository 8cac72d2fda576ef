"""train.lr: auto: each method's calibrated rate (Method.auto_lr, in its own folder), and
config.resolved_lr, the one entry point the trainer, the run checks and the study call."""
import pytest

from gpart_ds import methods
from gpart_ds.config import load_config, resolved_lr
from gpart_ds.methods.gpart import GPART_C, GPART_EXP
from gpart_ds.plan import spec

D = 106_168_320                                    # SmolLM2-135M, all linear layers


def test_gpart_rate_follows_the_fitted_power_of_D_over_d():
    G = methods.get("gpart")
    for d in (16_384, 131_072):
        assert G.auto_lr(spec("gpart", d=d), D) == pytest.approx(GPART_C * (D / d) ** GPART_EXP)
    # Fewer trained numbers per weight -> a larger rate, by the fitted exponent.
    ratio = G.auto_lr(spec("gpart", d=16_384), D) / G.auto_lr(spec("gpart", d=131_072), D)
    assert ratio == pytest.approx(8 ** GPART_EXP) and ratio > 1
    with pytest.raises(ValueError, match="d >= 1"):
        G.auto_lr(spec("gpart", d=0), D)


@pytest.mark.parametrize("name", ["lora", "vera", "full"])
def test_the_baselines_take_their_usual_rate_whatever_D(name):
    cls = methods.get(name)
    assert 0 < cls.auto_lr(spec(name), D) == cls.auto_lr(spec(name), 1000) == cls.DEFAULT_LR < 1


def test_resolved_lr_passes_numbers_through_and_fills_auto_per_method():
    cfg = load_config("configs/tiny.yaml", ["train.lr=3e-3"], check_files=False)
    assert resolved_lr(cfg, D) == 3e-3
    cfg = load_config("configs/tiny.yaml", ["train.lr=auto"], check_files=False)   # gpart, d = 4096
    assert resolved_lr(cfg, D) == pytest.approx(GPART_C * (D / 4096) ** GPART_EXP)
    for name in ("lora", "vera", "full"):
        cfg = load_config("configs/tiny.yaml", [f"method.name={name}", "train.lr=auto"], check_files=False)
        assert resolved_lr(cfg, D) == methods.get(name).DEFAULT_LR


def test_step_per_weight_is_each_weights_step_and_replaces_the_constant():
    G = methods.get("gpart")
    step = 3.95e-6
    for d in (2**19, 2**21):
        lr = G.auto_lr(spec("gpart", d=d, step_per_weight=step), D)
        # The RMS step of a weight is lr * s_j = lr / sqrt(D/d): the key itself, whatever d.
        assert lr / (D / d) ** 0.5 == pytest.approx(step)
    cfg = load_config("configs/tiny.yaml", ["train.lr=auto", "method.step_per_weight=1e-3"], check_files=False)
    assert resolved_lr(cfg, D) == pytest.approx(1e-3 * (D / 4096) ** 0.5)


def test_llama70b_takes_the_authors_step_and_rescales_it_with_d():
    """configs/llama70b.yaml: lr auto at the authors' 7-8B per-weight step (2e-4 at D/d = 2,560),
    so a user who only sets method.d keeps each weight's step."""
    from gpart_ds.plan import arch_for_config

    cfg = load_config("configs/llama70b.yaml", check_files=False)
    D70 = arch_for_config(cfg)[0].D
    assert cfg.train.lr == "auto" and resolved_lr(cfg, D70) == pytest.approx(2e-4 * (32_640 / 2_560) ** 0.5, rel=1e-3)
    half = load_config("configs/llama70b.yaml", ["method.d=1048576"], check_files=False)
    assert resolved_lr(half, D70) == pytest.approx(2 ** 0.5 * resolved_lr(cfg, D70))
    # A numeric lr on the command line is the user's choice: it wins over the config's step.
    assert resolved_lr(load_config("configs/llama70b.yaml", ["train.lr=3e-4"], check_files=False), D70) == 3e-4


@pytest.mark.parametrize("overrides, msg", [
    (["train.lr=auto", "method.step_per_weight=0"], "must be a finite number > 0, got 0.0"),
    (["train.lr=auto", "method.step_per_weight=inf"], "must be a finite number > 0, got inf"),
])
def test_a_bad_step_per_weight_is_refused_naming_the_key(overrides, msg):
    from gpart_ds.config import ConfigError

    with pytest.raises(ConfigError, match=rf"method\.step_per_weight': {msg}"):
        load_config("configs/tiny.yaml", overrides, check_files=False)
