"""train.lr: auto: each method's calibrated rate (Method.auto_lr, in its own folder), and
config.resolved_lr, the one entry point the trainer, the run checks and the study call."""

import pytest

from gpart_ds import methods
from gpart_ds.config import load_config, resolved_lr
from gpart_ds.methods.gpart import GPART_C, GPART_EXP
from gpart_ds.plan import spec

D = 106_168_320  # SmolLM2-135M, all linear layers


def test_gpart_rate_follows_the_fitted_power_of_D_over_d():
    for d in (16_384, 131_072):
        assert methods.create(spec("gpart", d=d)).auto_lr(D) == pytest.approx(GPART_C * (D / d) ** GPART_EXP)
    # Fewer trained numbers per weight -> a larger rate, by the fitted exponent.
    ratio = methods.create(spec("gpart", d=16_384)).auto_lr(D) / methods.create(spec("gpart", d=131_072)).auto_lr(D)
    assert ratio == pytest.approx(8**GPART_EXP) and ratio > 1
    with pytest.raises(ValueError, match="d >= 1"):
        methods.create(spec("gpart", d=0)).auto_lr(D)


@pytest.mark.parametrize("name", ["lora", "vera", "full"])
def test_the_baselines_take_their_usual_rate_whatever_D(name):
    cls = methods.get(name)
    method = methods.create(spec(name))
    assert 0 < method.auto_lr(D) == method.auto_lr(1000) == cls.DEFAULT_LR < 1


def test_resolved_lr_passes_numbers_through_and_fills_auto_per_method():
    cfg = load_config("configs/tiny.yaml", ["train.lr=3e-3"], check_files=False)
    assert resolved_lr(cfg, D) == 3e-3
    cfg = load_config("configs/tiny.yaml", ["train.lr=auto"], check_files=False)  # gpart, d = 4096
    assert resolved_lr(cfg, D) == pytest.approx(GPART_C * (D / 4096) ** GPART_EXP)
    for name in ("lora", "vera", "full"):
        cfg = load_config("configs/tiny.yaml", [f"method.name={name}", "train.lr=auto"], check_files=False)
        assert resolved_lr(cfg, D) == methods.get(name).DEFAULT_LR


def test_step_per_weight_is_each_weights_step_and_replaces_the_constant():
    step = 3.95e-6
    for d in (2**19, 2**21):
        lr = methods.create(spec("gpart", d=d, step_per_weight=step)).auto_lr(D)
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
    assert resolved_lr(half, D70) == pytest.approx(2**0.5 * resolved_lr(cfg, D70))
    # A numeric lr on the command line is the user's choice: it wins over the config's step.
    assert resolved_lr(load_config("configs/llama70b.yaml", ["train.lr=3e-4"], check_files=False), D70) == 3e-4


@pytest.mark.parametrize(
    "overrides, msg",
    [
        (["train.lr=auto", "method.step_per_weight=0"], "must be a finite number > 0, got 0.0"),
        (["train.lr=auto", "method.step_per_weight=inf"], "must be a finite number > 0, got inf"),
    ],
)
def test_a_bad_step_per_weight_is_refused_naming_the_key(overrides, msg):
    from gpart_ds.config import ConfigError

    with pytest.raises(ConfigError, match=rf"method\.step_per_weight': {msg}"):
        load_config("configs/tiny.yaml", overrides, check_files=False)


def test_auto_says_where_the_run_lies_outside_the_fits_evidence():
    from gpart_ds.methods.gpart import STUDIED_D_OVER_D, TASK_AGNOSTIC_D_OVER_D

    lo, hi = STUDIED_D_OVER_D
    note = lambda q, **kw: methods.create(spec("gpart", d=round(D / q), **kw)).auto_lr_caveat(D)  # noqa: E731
    assert note(lo * 1.1) is None and note(TASK_AGNOSTIC_D_OVER_D * 0.9) is None
    assert "depends on the task" in note(TASK_AGNOSTIC_D_OVER_D * 2) and "0.3x to 3x" in note(hi * 0.9)
    assert "extrapolated" in note(hi * 2) and "extrapolated" in note(lo / 2)
    assert note(hi * 2, step_per_weight=1e-5) is None  # the user's own step: nothing fitted
    assert all(methods.create(spec(n)).auto_lr_caveat(D) is None for n in ("lora", "vera", "full"))


def test_the_caveats_bounds_are_what_the_committed_sweeps_cover():
    """The bounds come from lr_fit on docs/quality_*.json: the sweeps' D/d, and the largest
    D/d at which the tasks' best rates left one rate within 2x of all of them."""
    from experiments import lr_fit
    from gpart_ds.methods.gpart import STUDIED_D_OVER_D, TASK_AGNOSTIC_D_OVER_D
    from tests.helpers import committed_gpart_sweeps

    sw = committed_gpart_sweeps()
    qs = [s["D"] / s["d"] for s in sw]
    assert (round(min(qs)), round(max(qs))) == STUDIED_D_OVER_D
    groups = lr_fit.same_size_spread(sw)
    assert round(max(g["D"] / g["d"] for g in groups if g["feasible"])) == TASK_AGNOSTIC_D_OVER_D
    assert not all(g["feasible"] for g in groups)  # else the second caveat would say nothing true


def test_the_run_checks_log_the_caveat_beside_the_rate(caplog):
    import logging

    from gpart_ds.runcheck import validate_for_run

    cfg = load_config("configs/tiny.yaml", ["train.lr=auto", "method.d=1"], check_files=False)
    with caplog.at_level(logging.INFO, logger="gpart_ds"):
        checked = validate_for_run(cfg)
    assert f"train.lr: auto = {checked.lr:.3g}; D/d = {checked.layout.D:,}" in caplog.text
    assert "extrapolated" in caplog.text
    caplog.clear()
    cfg = load_config("configs/tiny.yaml", ["train.lr=1e-3", "method.d=1"], check_files=False)
    with caplog.at_level(logging.INFO, logger="gpart_ds"):
        validate_for_run(cfg)
    assert "train.lr: auto" not in caplog.text  # a number is the user's own
