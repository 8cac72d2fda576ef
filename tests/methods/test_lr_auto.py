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
