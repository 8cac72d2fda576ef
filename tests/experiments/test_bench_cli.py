"""`python -m experiments.bench`: bad flags are refused with exit 2 naming the flag, before any
run starts (the launched pipeline: tests/integration/test_bench_study.py)."""

import pytest

from experiments.bench import compare


@pytest.mark.parametrize(
    "flags, msg",
    [
        (["--ranks", "0"], "--ranks: must be >= 1, got 0"),
        (["--steps", "-1"], "--steps: must be >= 1, got -1"),
        (["--warmup", "-1"], "--warmup: must be >= 0, got -1"),
        (["--eval-examples", "-2"], "--eval-examples: must be >= 0 (0: all records), got -2"),
        (["--quick", "--steps", "5"], "--steps: --quick sets the steps itself (3 timed after 1 warm-up)"),
        (["--methods", "gpart,gpart"], "--methods gpart,gpart: a method named twice"),
        (["--methods", ","], "--methods: unknown ','"),
        (["--methods", "gpart,nope"], "--methods: unknown ['nope']"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag_before_any_run(tmp_path, capsys, flags, msg):
    out = tmp_path / "bench"
    assert compare.cli([*flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err, err
    assert not out.exists()


def test_ratios_divide_the_subject_by_each_baseline_present():
    # The report's ratios ran only at the end of a launched bench (minutes); a broken default
    # argument (the baselines' names shadowed by another constant) failed there alone.
    row = {"step_s": 2.0, "peak_mem_gb": 1.0, "model_state_bytes": 10, "trainable_params": 4, "checkpoint_bytes": 0}
    half = {k: v / 2 for k, v in row.items()}
    out = compare.ratios({"gpart": row, "full": half}, "gpart")
    assert set(out) == {"gpart/full"}
    assert out["gpart/full"]["step_s"] == 2.0 and out["gpart/full"]["checkpoint_bytes"] is None
