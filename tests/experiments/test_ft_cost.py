"""`python -m experiments.ft_cost`: refusals before any run (the measurement itself, four
simulated-node runs of a few minutes, is run by hand: docs/fault_tolerance.md)."""

import pytest

from experiments import ft_cost


@pytest.mark.parametrize(
    "flags, msg",
    [
        (["--nodes", "1"], "--nodes must be >= 2"),
        (["--per-node", "0"], "--per-node >= 1"),
        (["--steps", "0"], "got --steps 0 --every 20 --kill-at 30"),
        (["--every", "0"], "got --steps 120 --every 0 --kill-at 30"),
        (["--kill-at", "120"], "--kill-at in (0, --steps=120)"),
        (["--kill-at", "0"], "--kill-at in (0, --steps=120)"),
    ],
)
def test_bad_flags_exit_2_before_any_run(tmp_path, capsys, flags, msg):
    out = tmp_path / "ftc"
    assert ft_cost.main([*flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err, err
    assert not out.exists()


def test_a_failed_run_is_no_measurement(tmp_path):
    from gpart_ds.errors import RunFailed

    ft_cost._succeeded("ft", {0: 0, 1: 0}, tmp_path)
    with pytest.raises(RunFailed, match=r"the ft-kill run failed \(exit statuses by node \{0: 0, 1: 1\}\)"):
        ft_cost._succeeded("ft-kill", {0: 0, 1: 1}, tmp_path)
