"""experiments/lr_fit.py: judging lr = C * (D/d)^a against GPart's sweeps, on made-up reports."""

import json
import math

import pytest

from experiments import lr_fit


def _report(task, ratios, exponent, C=1e-4, mults=(0.1, 0.3, 1, 3, 10)):
    """A study report whose GPart sweeps peak (dev) at C * (D/d)^exponent, one per D/d."""
    D, rows, Ds = 10**8, [], {}
    for q in ratios:
        best = C * q**exponent
        sweep = [
            {"lr": best * m, "dev": 0.5 - 0.1 * math.log10(m) ** 2, "test": 0.4 - 0.1 * math.log10(m) ** 2}
            for m in mults
        ]
        name = f"gpart-{q}"
        rows.append({"task": task, "method": name, "name": "gpart", "trainable_params": D // q, "sweep": sweep})
        Ds[name] = D
    rows.append({"task": task, "method": "lora", "name": "lora", "trainable_params": 5, "sweep": []})
    return {"summary": rows, "D": {task: {**Ds, "lora": D}}}


def test_dev_is_interpolated_in_log_lr_and_unknown_outside_the_grid():
    pts = [(1e-3, 0.2), (1e-2, 0.6), (1e-1, 0.0)]
    assert lr_fit.dev_at(pts, 10**-2.5) == pytest.approx(0.4)
    assert lr_fit.dev_at(pts, 1e-2) == pytest.approx(0.6)
    assert lr_fit.dev_at(pts, 1e-4) is None and lr_fit.dev_at(pts, 1.0) is None


def test_the_fit_finds_the_exponent_the_sweeps_peak_at():
    sw = lr_fit.sweeps([("a.json", _report("t", [10, 1000, 100000], 0.75))])
    assert len(sw) == 3 and all(s["best_lr"] == pytest.approx(1e-4 * (s["D"] / s["d"]) ** 0.75, rel=1e-2) for s in sw)
    rows = {r["exponent"]: r for r in lr_fit.fit(sw)}
    best = min(rows.values(), key=lambda r: (r["worst_loss"], r["mean_loss"]))
    assert best["exponent"] == 0.75 and best["worst_loss"] < 0.003 and best["C"] == pytest.approx(1e-4, rel=0.05)
    assert best["within_2x"] == 3
    # the sqrt rule cannot follow these peaks: some sweep loses at any C
    assert rows[0.5]["worst_loss"] > 0.01 and rows[0.5]["within_2x"] < 3


def test_the_cli_prints_both_rules_and_refuses_reports_without_sweeps(tmp_path, capsys):
    f = tmp_path / "r.json"
    f.write_text(json.dumps(_report("t", [10, 100, 1000], 0.75)))
    out = lr_fit.main([str(f), "--C", "1e-4", "--exponent", "0.75", "--json", str(tmp_path / "fit.json")])
    text = capsys.readouterr().out
    assert "given rule: lr = 0.0001 * (D/d)^0.75" in text and "best fit:" in text
    assert all(j["loss"] == pytest.approx(0, abs=1e-9) for j in out["given"]["judged"])
    assert all(
        j["rule_test"] == pytest.approx(0.4) and j["test_loss"] == pytest.approx(0, abs=1e-9)
        for j in out["given"]["judged"]
    )
    assert "test loss against the dev-chosen rate: worst 0.0" in text
    assert json.loads((tmp_path / "fit.json").read_text())["best"]["exponent"] == 0.75
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(_report("t", [10], 0.5, mults=(1,))))
    assert lr_fit.cli([str(bare)]) == 2
    assert "no gpart sweep of >= 3 rates" in capsys.readouterr().err
    assert lr_fit.cli([str(tmp_path / "nope.json")]) == 2 and "nope.json: no such file" in capsys.readouterr().err


def test_half_a_rule_is_refused_and_another_methods_rows_can_be_fitted(tmp_path, capsys):
    f = tmp_path / "r.json"
    rep = _report("t", [10, 1000, 100000], 0.75)
    for r in rep["summary"]:
        r["name"] = "vera" if r["name"] == "gpart" else r["name"]
    f.write_text(json.dumps(rep))
    assert lr_fit.cli([str(f), "--C", "1e-4"]) == 2 and "--C and --exponent: give both" in capsys.readouterr().err
    assert lr_fit.main([str(f), "--method", "vera"])["best"]["exponent"] == 0.75


def test_the_shipped_gpart_rule_is_the_fit_of_the_committed_sweeps():
    """train.lr: auto's constants are what lr_fit makes of the study's reports in docs/: a
    change of either (new sweeps, or new constants) that breaks the other fails here."""
    from gpart_ds.methods.gpart import GPART_C, GPART_EXP
    from tests.helpers import committed_gpart_sweeps

    sw = committed_gpart_sweeps()
    assert len(sw) >= 9
    shipped, _ = lr_fit.score(lr_fit.judge(sw, GPART_C, GPART_EXP))
    best = min(r["worst_loss"] for r in lr_fit.fit(sw))
    assert shipped <= best + 0.005, (shipped, best)  # within half a point of the fit's worst-case optimum
    old, _ = lr_fit.score(lr_fit.judge(sw, 6.2e-4, 0.5))
    assert shipped < old  # and better than the sqrt rule it replaced


def test_most_within_2x_is_the_deepest_overlap_of_the_sweeps_intervals():
    sw = [{"best_lr": b, "D": 100, "d": 1} for b in (1.0, 3.0, 10.0)]  # one D/d: a = 0 and a = 1 agree
    assert lr_fit.most_within_2x(sw, 0.0) == 2  # 1 and 3 share [1.5, 2]; 10 is 3.3x from 3
    sw[2]["best_lr"] = 3.9
    assert lr_fit.most_within_2x(sw, 0.0) == 3  # [1.95, 2] lies within 2x of 1, 3 and 3.9
    # it agrees with counting at the best C found by a fine scan
    many = [{"best_lr": 1e-3 * q**0.7 * f, "D": q, "d": 1} for q, f in ((10, 1), (100, 3.5), (1000, 0.5))]
    scan = max(
        lr_fit.within_2x([{"over_best": lr_fit.rule_lr(C, 0.7, s["D"], s["d"]) / s["best_lr"]} for s in many])
        for C in (1e-4 * 1.01**i for i in range(600))
    )
    assert lr_fit.most_within_2x(many, 0.7) == scan == 2


def test_sweeps_of_one_size_whose_best_rates_are_over_4x_apart_admit_no_rule():
    sw = lr_fit.sweeps([("a.json", _report("t", [10, 1000], 0.5)), ("b.json", _report("u", [10, 1000], 0.5, C=1e-3))])
    spread = {round(g["D"] / g["d"]): g for g in lr_fit.same_size_spread(sw)}
    assert set(spread) == {10, 1000} and all(g["sweeps"] == 2 for g in spread.values())
    assert spread[10]["spread"] == pytest.approx(10) and not spread[10]["feasible"]
    assert spread[10]["lowest"][0] == "t" and spread[10]["highest"][0] == "u"
    near = lr_fit.sweeps([("a.json", _report("t", [10], 0.5)), ("b.json", _report("u", [10], 0.5, C=3e-4))])
    assert lr_fit.same_size_spread(near)[0]["feasible"]


def _with_losses(rep, task, loss_of):
    """Sweep runs (seed 0) whose training losses at lr follow loss_of(lr_over_best, step)."""
    runs = []
    for row in rep["summary"]:
        if row["name"] != "gpart":
            continue
        best = max(row["sweep"], key=lambda s: s["dev"])["lr"]
        for s in row["sweep"]:
            runs.append(
                {
                    "task": task,
                    "method": row["method"],
                    "phase": "sweep",
                    "seed": 0,
                    "lr": s["lr"],
                    "losses": [loss_of(s["lr"] / best, k) for k in range(1, 21)],
                }
            )
    return {**rep, "runs": runs, "sweep_seed": 0}


def test_a_probe_keeps_the_rate_of_lowest_training_loss_at_its_step_count(tmp_path, capsys):
    # early on the largest rate leads, from step 11 the best one; a diverged rate (the
    # first one, where a careless min() would keep it) never wins, a flat one neither
    def loss(m, k):
        if m < 0.2:
            return math.nan if k > 3 else 0.1
        if m > 5:
            return 1.0
        return 1 - 0.01 * k * m if k <= 10 else 1 - 0.05 * k * (1 - abs(math.log10(m)))

    rep = _with_losses(_report("t", [10, 1000, 100000], 0.75), "t", loss)
    sw = lr_fit.sweeps([("a.json", rep)])
    out = lr_fit.probe(sw, [5, 20, 30])
    assert len(out) == 3 and all(p["rates"] == 5 and p["steps"] == 20 for p in out)
    for p in out:
        assert p["picks"][5]["over_best"] == pytest.approx(3)  # 0.1x diverged at step 4, 10x is flat
        assert p["picks"][5]["loss"] == pytest.approx(0.1 * math.log10(3) ** 2)
        assert p["picks"][20]["over_best"] == pytest.approx(1) and p["picks"][20]["loss"] == 0
        assert p["picks"][30] is None  # the runs are shorter than 30 steps
    f = tmp_path / "r.json"
    f.write_text(json.dumps(rep))
    lr_fit.main([str(f), "--probe-steps", "5,20"])
    assert "| t | gpart-10 | 3x (2.3) | 1x (0.0) |" in capsys.readouterr().out
    assert lr_fit.cli([str(f), "--probe-steps", "5,x"]) == 2 and "--probe-steps '5,x'" in capsys.readouterr().err
    assert lr_fit.cli([str(f), "--probe-steps", "0"]) == 2 and "start at 1" in capsys.readouterr().err
