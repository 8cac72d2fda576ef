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


def _choice_records(path):
    import json

    recs = [
        {"prompt": "Reverse: cat dog\nAnswer:", "completion": " dog cat", "choices": [" dog cat", " cat", " a b c"]},
        {"prompt": "Reverse: a b c d e\nAnswer:", "completion": " e", "choices": [" e d", " e"]},
        {"prompt": "Answer:", "completion": " x y z", "choices": [" x y z", " q", " r s", " t u v w"]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs * 2))
    return path


@pytest.mark.parametrize("gpart_d", [0, 64])
def test_scoring_bench_times_two_scorers_that_agree(tiny_assets, tmp_path, capsys, gpart_d):
    # the baseline (one whole sequence per choice) and the cached scorer score the same
    # records alike, plain and under GPart with a nonzero theta; else the bench exits 1
    import json

    from experiments.bench import scoring

    data = _choice_records(tmp_path / "eval.jsonl")
    flags = ["--model", str(tiny_assets / "model"), "--data", str(data), "--records", "6", "--batch", "4"]
    rc = scoring.main([*flags, "--repeats", "1", "--gpart-d", str(gpart_d), "--json", str(tmp_path / "r.json")])
    res = json.loads((tmp_path / "r.json").read_text())
    assert rc == 0, capsys.readouterr().out
    assert res["records"] == 6 and res["choices_per_record"] == 3.0 and res["gpart_d"] == gpart_d
    assert res["max_abs_score_diff"] <= 1e-3 and res["speedup"] > 0


@pytest.mark.parametrize(
    "flags, msg",
    [
        (["--records", "0"], "--records: must be >= 1, got 0"),
        (["--batch", "0"], "--batch: must be >= 1, got 0"),
        (["--gpart-d", "-1"], "--gpart-d: must be >= 0"),
        (["--data", "nope.jsonl"], "--data nope.jsonl: not found"),
    ],
)
def test_scoring_bench_refuses_bad_flags_with_exit_2(tiny_assets, capsys, flags, msg):
    from experiments.bench import scoring

    with pytest.raises(SystemExit) as e:
        scoring.main(["--model", str(tiny_assets / "model"), *flags])
    assert e.value.code == 2 and msg in capsys.readouterr().err
