"""The study's analysis on hand-made run folders: test/dev split, lr choice, parity, probe."""

import json
import math

import pytest

from experiments import study_report as sr


def _run_folder(path, verdicts_by_step, steps, eval_loss=1.0, lr=0.1, final_loss=1.0, last_in_step_file=True):
    """A finished run as the trainer leaves it: metrics.jsonl, predictions/step-N.jsonl and
    (last_in_step_file=False, today's trainer) the last evaluation in eval_predictions.jsonl."""
    (path / "predictions").mkdir(parents=True)
    lines = [{"event": "start", "time": 0}]
    for step, v in verdicts_by_step.items():
        f = path / "predictions" / f"step-{step:06d}.jsonl"
        if step == steps and not last_in_step_file:
            f = path / "eval_predictions.jsonl"
        f.write_text(
            "".join(json.dumps({"record": f"e:{i + 1}", "index": i, "match": ok}) + "\n" for i, ok in enumerate(v))
        )
        lines.append({"event": "eval", "step": step, "eval_loss": eval_loss, "exact_match": sum(v) / len(v)})
    lines += [{"step": s, "loss": final_loss / s, "step_time_s": 1.0} for s in range(1, steps + 1)]
    lines.append(
        {
            "event": "summary",
            "steps": steps,
            "eval_loss_after": eval_loss,
            "trainable_params": 10,
            "adapter_bytes": 100,
            "wall_s": 60.0,
            "median_step_time_s": 1.0,
        }
    )
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return {"task": "t", "method": "m", "lr": lr, "seed": 0, "phase": "sweep", "out": path}


def test_read_run_splits_each_eval_into_test_and_dev_records(tmp_path):
    # records 0-3 test, 4-5 dev
    e = _run_folder(tmp_path / "r", {0: [0, 0, 0, 0, 1, 0], 2: [1, 1, 0, 0, 1, 1]}, steps=2)
    r = sr.read_run(e, test_records=4, metric="exact_match")
    assert [c["step"] for c in r["curve"]] == [0, 2]
    assert (r["before"], r["after"], r["dev_after"]) == (0.0, 0.5, 1.0)
    assert r["curve"][0]["dev"] == 0.5 and r["losses"] == [1.0, 0.5]
    c = sr.read_run(e, test_records=4, metric="exact_match", curve_records=2)  # curves: records 0-1
    assert [p["curve"] for p in c["curve"]] == [0.0, 1.0] and c["after"] == 0.5
    assert sr.read_run({**e, "out": tmp_path / "absent"}, 4, "exact_match") is None
    # today's trainer: the last evaluation's verdicts in eval_predictions.jsonl, same reading
    n = sr.read_run(
        _run_folder(tmp_path / "n", {0: [0, 0, 0, 0, 1, 0], 2: [1, 1, 0, 0, 1, 1]}, steps=2, last_in_step_file=False),
        test_records=4,
        metric="exact_match",
    )
    assert n["curve"] == r["curve"] and (n["after"], n["dev_after"]) == (0.5, 1.0)


def test_every_run_reports_its_generated_answers_before_and_after_whatever_the_tuned_metric(tmp_path):
    # eval_generate=final: the first and last evaluations carry the generated answers' verdicts
    e = _run_folder(tmp_path / "r", {0: [0, 0, 0, 0, 1, 0], 2: [1, 1, 0, 0, 1, 1], 4: [1, 1, 1, 0, 1, 1]}, steps=4)
    for step, ok in ((0, [1, 0, 0, 0, 0, 0]), (4, [1, 1, 0, 0, 0, 1])):
        f = e["out"] / "predictions" / f"step-{step:06d}.jsonl"
        rows = [json.loads(x) for x in f.read_text().splitlines()]
        f.write_text("".join(json.dumps({**r, "answer_correct": bool(a)}) + "\n" for r, a in zip(rows, ok)))
    r = sr.read_run(e, test_records=4, metric="exact_match")
    assert (r["after"], r["served_before"], r["served_after"]) == (0.75, 0.25, 0.5)  # test records only
    # a run without generated answers (eval_generate=never) has none, rather than a wrong 0
    n = sr.read_run(_run_folder(tmp_path / "n", {0: [0, 1], 2: [1, 1]}, steps=2), test_records=2, metric="exact_match")
    assert (n["served_before"], n["served_after"]) == (None, None)


def test_accuracy_reads_the_chosen_choice_and_exact_match_the_match_flag(tmp_path):
    # one line per record as the Evaluator writes it: a choice record has both
    f = tmp_path / "eval_predictions.jsonl"
    rows = [
        {"record": "e:1", "index": 0, "match": False, "predicted": 1, "answer": 1, "scores": [-2.0, -1.0]},
        {"record": "e:2", "index": 1, "match": True, "predicted": 0, "answer": 1, "scores": [-1.0, -2.0]},
        {"record": "e:9 example 9", "index": None, "match": True},
    ]  # not a record of the file: left out
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert sr.verdicts(tmp_path, 5, "accuracy", last=5) == {0: True, 1: False}
    assert sr.verdicts(tmp_path, 5, "exact_match", last=5) == {0: False, 1: True}
    assert sr.verdicts(tmp_path, 4, "accuracy", last=5) is None  # no step-000004.jsonl


def test_the_lr_is_chosen_on_dev_records_only_ties_by_training_loss(tmp_path):
    runs = [
        # best on test, worse on dev: must not win
        sr.read_run(_run_folder(tmp_path / "a", {0: [0] * 6, 4: [1, 1, 1, 1, 0, 0]}, 4, lr=0.1), 4, "exact_match"),
        sr.read_run(
            _run_folder(tmp_path / "b", {0: [0] * 6, 4: [0, 0, 0, 0, 1, 1]}, 4, lr=0.3, final_loss=2.0),
            4,
            "exact_match",
        ),
        sr.read_run(
            _run_folder(tmp_path / "c", {0: [0] * 6, 4: [0, 0, 0, 0, 1, 1]}, 4, lr=1.0, final_loss=1.0),
            4,
            "exact_match",
        ),
        # a diverged run (non-finite loss) never wins
        sr.read_run(
            _run_folder(
                tmp_path / "d", {0: [0] * 6, 4: [0, 0, 0, 0, 1, 1]}, 4, eval_loss=float("nan"), lr=3.0, final_loss=0.1
            ),
            4,
            "exact_match",
        ),
    ]
    assert max(runs, key=sr._dev_score)["lr"] == 1.0  # ties with 0.3 on dev, lower training loss


def test_parity_uses_the_references_seed_spread_or_the_fixed_tolerance():
    lora = {"test_mean": 0.80, "test_sd": 0.005}
    assert sr.parity("accuracy", lora, {"test_mean": 0.785})["holds"]  # 1.5 points < 2
    assert not sr.parity("accuracy", lora, {"test_mean": 0.775})["holds"]  # 2.5 points
    assert sr.parity("accuracy", {"test_mean": 0.80, "test_sd": 0.03}, {"test_mean": 0.775})["holds"]  # spread 3
    em = {"test_mean": 0.50, "test_sd": 0.01}
    assert sr.parity("exact_match", em, {"test_mean": 0.46})["holds"]  # 10% of 0.50 = 0.05
    assert not sr.parity("exact_match", em, {"test_mean": 0.44})["holds"]
    assert sr.parity("exact_match", em, {"test_mean": 0.60})["gap"] == pytest.approx(-0.10)


def test_paired_test_compares_final_test_verdicts_of_two_runs(tmp_path):
    a = sr.read_run(_run_folder(tmp_path / "a", {0: [0] * 6, 2: [1, 0, 0, 0, 1, 1]}, 2), 4, "exact_match")
    b = sr.read_run(_run_folder(tmp_path / "b", {0: [0] * 6, 2: [0, 1, 1, 1, 0, 0]}, 2), 4, "exact_match")
    t = sr.paired_test(a, b, test_records=4)
    assert (t["records"], t["fixed"], t["broken"]) == (4, 3, 1)  # dev records left out
    base = sr.paired_test(a, a, test_records=4, step_a=0)
    assert (base["fixed"], base["broken"]) == (1, 0)


def test_flat_step_is_where_the_curve_stops_rising_beyond_the_tolerance():
    curve = [{"step": s, "curve": v} for s, v in [(0, 0.5), (10, 0.7), (20, 0.78), (30, 0.79), (40, 0.785)]]
    assert sr.flat_step(curve, "curve", 0.02) == 20
    assert sr.flat_step(curve, "curve", 0.0) == 30


def test_interpolated_best_lr_is_the_peak_of_a_parabola_in_log_lr():
    sweep = [{"lr": lr, "dev_after": 1 - (math.log10(lr) + 2.2) ** 2} for lr in (1e-4, 1e-3, 1e-2, 1e-1)]
    assert sr.interpolated_best(sweep) == pytest.approx(10**-2.2, rel=1e-6)  # between grid points
    edge = [{"lr": 1e-3, "dev_after": 0.9}, {"lr": 1e-2, "dev_after": 0.5}, {"lr": 1e-1, "dev_after": 0.2}]
    assert sr.interpolated_best(edge) == 1e-3  # best at the edge: itself


def _report(methods, **over):
    """A study.json as build() writes it, one task, rows with the given (method, params, mean, sd)."""
    rows = [
        {
            "task": "t",
            "method": m,
            "name": m.split("-")[0],
            "metric": "accuracy",
            "steps": 40,
            "trainable_params": n,
            "test_mean": mean,
            "test_sd": sd,
            "best_lr": 0.01,
            "lr_over_unit": None,
            "before": 0.7,
            "adapter_bytes": 4 * n,
            "seeds": [0, 1, 2],
            "dev_best": mean,
            "auto_lr": None,
            "median_step_time_s": 1.0,
            "grid_missing": [],
            "sweep": [],
        }
        for m, n, mean, sd in methods
    ]
    rep = {
        "date": "2026-12-01",
        "machine": {"cpu": "Xeon", "cores": 2},
        "command": "python -m experiments.study",
        "ranks": 1,
        "seeds": [0, 1, 2],
        "sweep_seed": 0,
        "eval_examples": 500,
        "test_records": 300,
        "eval_every": 10,
        "curve_records": 150,
        "compare_with": "lora",
        "tasks": ["t"],
        "methods": [m[0] for m in methods],
        "D": {"t": {m[0]: 1000 for m in methods}},
        "summary": rows,
        "runs": [{"task": "t", "method": m[0], "lr": 0.01, "seed": 0, "wall_s": 60.0} for m in methods],
        "paired": [
            {
                "task": "t",
                "a": "base",
                "b": m[0],
                "seed": 0,
                "accuracy_before": 0.7,
                "accuracy_after": m[2],
                "fixed": 1,
                "broken": 0,
                "p_value": 1.0,
            }
            for m in methods
        ],
    }
    return {**rep, **over}


STUDY = {
    "ranks": 1,
    "seeds": [0, 1, 2],
    "sweep_seed": 0,
    "eval_examples": 500,
    "test_records": 300,
    "eval_every": 10,
    "curve_records": 150,
    "compare_with": "lora",
}


def test_merge_adds_the_earlier_rows_of_methods_not_run_and_recomputes_parity():
    earlier = _report([("gpart", 100, 0.79, 0.01), ("lora", 2000, 0.82, 0.01), ("vera", 300, 0.50, 0.0)])
    today = _report(
        [("vera", 300, 0.81, 0.01), ("full", 10**6, 0.83, 0.01)], date="2026-12-02", machine={"cpu": "EPYC", "cores": 2}
    )
    sr.check_merge(earlier, "docs/q.json", STUDY, ["t"], today["methods"], {"t": 40})
    rep = sr.merge(today, earlier, "docs/q.json", ["gpart", "lora", "vera", "full"])
    rows = {r["method"]: r for r in rep["summary"]}
    assert [r["method"] for r in rep["summary"]] == rep["methods"] == ["gpart", "lora", "vera", "full"]
    assert rows["vera"]["test_mean"] == 0.81 and "source" not in rows["vera"]  # today's run wins
    assert rows["lora"]["source"] == {
        "file": "docs/q.json",
        "date": "2026-12-01",
        "command": earlier["command"],
        "machine": {"cpu": "Xeon", "cores": 2},
    }
    # parity against the merged reference, for today's rows too
    assert rows["vera"]["parity"]["holds"] and rows["vera"]["parity"]["reference"] == "lora"
    assert rows["gpart"]["parity"]["gap"] == pytest.approx(0.03) and not rows["gpart"]["parity"]["holds"]
    assert "parity" not in rows["full"] and "parity" not in rows["lora"]
    assert {(t["a"], t["b"]) for t in rep["paired"]} == {("base", m) for m in rows}
    assert len(rep["runs"]) == 4 and rep["runs_min"] == 4.0 and set(rep["D"]["t"]) == set(rows)
    md = sr.format_markdown({**rep, "runs_min": 4.0})
    assert "gpart, lora: measured earlier, from docs/q.json (2026-12-01, Xeon; --merge)." in md


@pytest.mark.parametrize(
    "change, msg",
    [
        ({"test_records": 200}, "its test_records is 200, this study's 300"),
        ({"seeds": [0]}, r"its seeds is \[0\], this study's \[0, 1, 2\]"),
        ({"compare_with": "full"}, "its compare_with is 'full', this study's 'lora'"),
    ],
)
def test_merge_refuses_a_report_of_other_records_seeds_or_reference(change, msg):
    from gpart_ds.config import ConfigError

    with pytest.raises(ConfigError, match=rf"--merge e.json: {msg}"):
        sr.check_merge(_report([("lora", 2000, 0.8, 0.01)], **change), "e.json", STUDY, ["t"], [], {"t": 40})
    with pytest.raises(ConfigError, match="--merge e.json: t/lora ran 40 steps, this study 80"):
        sr.check_merge(_report([("lora", 2000, 0.8, 0.01)]), "e.json", STUDY, ["t"], [], {"t": 80})
    sr.check_merge(_report([("lora", 2000, 0.8, 0.01)]), "e.json", STUDY, ["t"], ["lora"], {"t": 80})  # not merged


def _recorded_report(**over):
    """A report whose runs are recorded: gpart's grid (0.01 chosen, 0.1) and its seed 1."""
    rep = _report([("gpart", 100, 0.79, 0.01), ("lora", 2000, 0.82, 0.01)], **over)
    run = {
        "task": "t",
        "method": "gpart",
        "metric": "accuracy",
        "steps": 40,
        "curve": [],
        "losses": [1.0],
        "before": 0.7,
        "after": 0.79,
        "dev_after": 0.8,
        "eval_loss_after": 1.0,
        "wall_s": 60.0,
    }
    rep["runs"] = [
        {**run, "lr": 0.01, "seed": 0, "phase": "sweep"},
        {**run, "lr": 0.1, "seed": 0, "phase": "sweep"},
        {**run, "lr": 0.01, "seed": 1, "phase": "final"},
        {**run, "method": "lora", "lr": 0.01, "seed": 0, "phase": "sweep"},
        {**run, "method": "lora", "lr": 0.01, "seed": 1, "phase": "final", "losses": [2.0, 1.5]},
    ]
    rep["paired"].append({"task": "t", "a": "lora", "b": "gpart", "seed": 1, "fixed": 0, "broken": 2, "p_value": 0.5})
    return rep


def test_recorded_runs_stand_in_for_missing_folders_and_keep_their_reports_tests():
    rec = sr.RecordedRuns([("docs/q.json", _recorded_report())])
    entry = {"task": "t", "method": "gpart", "lr": 0.01, "seed": 1, "phase": "final"}
    run = rec.run(entry)
    assert run["after"] == 0.79 and run["out"] is None and run["phase"] == "final"
    assert run["source"]["file"] == "docs/q.json" and run["source"]["date"] == "2026-12-01"
    assert rec.run({**entry, "lr": 0.03}) is None and rec.run({**entry, "seed": 2}) is None
    assert rec.run({**entry, "method": "lora", "lr": 0.01, "seed": 0}) is not None  # the report's lora run too
    # the report's test of the same two runs (its chosen rates) stands; of other rates, none does
    lora = {"method": "lora", "lr": 0.01, "seed": 1, "out": "here", "losses": [2.0, 1.5]}
    head = {"task": "t", "a": "lora", "b": "gpart", "seed": 1}
    assert rec.test(head, lora, run)["broken"] == 2
    assert rec.test(head, lora, rec.run({**entry, "lr": 0.1, "seed": 0})) is None
    assert rec.test({**head, "seed": 1}, {**lora, "lr": 0.003}, run) is None
    # a run here is the report's run only if it trained the same: a re-run elsewhere is not
    assert rec.test(head, {**lora, "losses": [2.0, 1.5000001]}, run) is None
    assert rec.test(head, {**lora, "seed": 2}, {**run, "seed": 2}) is None  # no such recorded run
    seed0 = rec.run({**entry, "seed": 0})  # against the base: one run
    assert rec.test({**head, "a": "base", "seed": 0}, seed0, seed0)["b"] == "gpart"


@pytest.mark.parametrize(
    "change, steps, D, msg",
    [
        ({"seeds": [0]}, 40, 1000, r"--reuse-runs e.json: its seeds is \[0\], this study's \[0, 1, 2\]"),
        ({}, 80, 1000, r"--reuse-runs e.json: t/gpart ran \[40\] steps, this study 80"),
        ({}, 40, 999, "--reuse-runs e.json: t/gpart targets 1,000 weights, this study's entry 999"),
    ],
)
def test_recorded_runs_of_other_records_steps_or_entries_are_refused(change, steps, D, msg):
    from gpart_ds.config import ConfigError

    rec = sr.RecordedRuns([("e.json", _recorded_report(**change))])
    with pytest.raises(ConfigError, match=msg):
        rec.check(STUDY, ["t"], ["gpart"], {"t": steps}, lambda task, m: D)
    if not change:  # the same report, asked for lora only (whose runs it also records) at its own budget
        rec.check(STUDY, ["t"], ["lora"], {"t": 40}, lambda task, m: 1000)


def test_merge_keeps_the_earlier_tests_of_a_row_built_from_the_same_recorded_runs():
    def today(best_lr):
        rep = _report([("gpart", 100, 0.79, 0.01)], date="2026-12-02")
        rep["summary"][0].update(runs_from={"docs/q.json": 3}, best_lr=best_lr)
        return rep

    def pairs(rep):
        return {(t["a"], t["b"], t["seed"]) for t in rep["paired"]}

    rep = sr.merge(today(0.01), _recorded_report(), "docs/q.json", ["gpart", "lora"])
    assert ("lora", "gpart", 1) in pairs(rep) and ("base", "lora", 0) in pairs(rep)
    # another rate chosen today: the earlier test is not of its runs
    rep = sr.merge(today(0.1), _recorded_report(), "docs/q.json", ["gpart", "lora"])
    assert ("lora", "gpart", 1) not in pairs(rep) and ("base", "lora", 0) in pairs(rep)


def test_reports_name_files_as_their_repository_does_not_by_this_machines_folders(tmp_path):
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "docs").mkdir()
    src = tmp_path / "docs" / "q.json"
    assert sr.repo_path(str(src)) == "docs/q.json"
    outside = tmp_path.parent / "elsewhere.json"  # in no checkout: as given
    assert sr.repo_path(str(outside)) == str(outside)
    rep = sr.merge(
        _report([("vera", 300, 0.81, 0.01)]), _report([("lora", 2000, 0.82, 0.01)]), str(src), ["lora", "vera"]
    )
    assert {r["method"]: r.get("source", {}).get("file") for r in rep["summary"]} == {
        "lora": "docs/q.json",
        "vera": None,
    }
