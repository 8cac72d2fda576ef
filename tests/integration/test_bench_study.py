"""The benchmark and the quality study run end to end and write well-formed reports.

Not timed tests: they check the pipelines (real launcher, real trainer, every method)
and the reports' structure; the numbers themselves are the benchmark's job.
"""

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _run(args, timeout=900):
    proc = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def test_bench_quick_writes_report_with_every_method_ratio_scaling_and_projection(bench_quick):
    out = bench_quick
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["results"]) == {"gpart", "lora", "vera", "full"}
    assert rep["warmup"] == 1 and rep["steps"] == 3
    for m, r in rep["results"].items():
        assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["peak_mem_gb"] > 0, m
        assert r["trainable_params"] > 0 and r["checkpoint_bytes"] > 0 and r["model_state_bytes"] > 0, m
    res = rep["results"]
    assert res["gpart"]["trainable_params"] == 4096  # d of configs/tiny.yaml
    assert res["gpart"]["trainable_params"] < res["lora"]["trainable_params"] < res["full"]["trainable_params"]
    assert res["gpart"]["model_state_bytes"] < 0.05 * res["full"]["model_state_bytes"]
    assert set(rep["ratios"]) == {"gpart/lora", "gpart/full"}
    assert all(r["timed_steps"] == 3 for r in res.values())
    assert rep["ratios"]["gpart/full"]["step_s"] == pytest.approx(res["gpart"]["step_s"] / res["full"]["step_s"])
    assert set(rep["scaling"]) == {"1", "2"} and rep["scaling"]["1"]["world"] == 1
    pj = rep["projections"]["per_gpu"]
    assert set(pj) == {"gpart", "lora", "full"} and set(pj["gpart"]) == {"8", "16", "64"}
    assert pj["full"]["8"]["gpu_gib"] > pj["gpart"]["8"]["gpu_gib"]  # 70B full FT needs more per GPU
    assert set(rep["layer"]["layers"]) == {
        "frozen",
        "trainable",
        "lora",
        "gpart_eager",
        "gpart_compiled",
        "gpart_compiled_reuse_ids",
    }
    assert len(rep["targets"]) == 5 and all("met" in t for t in rep["targets"])
    md = (out / "report.md").read_text()
    assert "| GPart |" in md and "gpart/lora" in md and "Planner projection" in md
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_refuses_a_bad_override_before_any_run(tmp_path, tiny_assets):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench", "--quick", "--out", str(tmp_path), "train.lr=-1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "train.lr" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_study_quick_sweeps_chooses_on_dev_reruns_seeds_and_reuses_finished_runs(tmp_path):
    # The pipeline on the tiny model, 1 rank (the real study's runs are SmolLM2's, minutes
    # each; the real model under ZeRO-3 is test_real_model's job).
    out = tmp_path / "study"
    args = ["experiments.study", "--config", "tests/assets/study_tiny.yaml", "--quick", "--out", str(out)]
    _run(args)
    rep = json.loads((out / "study.json").read_text())
    assert rep["tasks"] == ["tiny"] and rep["methods"] == ["gpart-d4k", "lora-r4"]
    rows = {r["method"]: r for r in rep["summary"]}
    g, lo = rows["gpart-d4k"], rows["lora-r4"]
    # GPart's grid: multiples of its lr_unit "0.0109 * sqrt(D / d)" (tiny: 2 layers x 7 matrices)
    unit = 0.0109 * (86016 / 4096) ** 0.5
    assert [s["lr"] for s in g["sweep"]] == [pytest.approx(unit, rel=1e-3), pytest.approx(30 * unit, rel=1e-3)]
    assert g["best_lr"] in [s["lr"] for s in g["sweep"]] and lo["best_lr"] == 0.01
    assert g["lr_over_unit"] in (pytest.approx(1, rel=1e-3), pytest.approx(30, rel=1e-3))
    assert g["auto_lr"] > 0 and lo["auto_lr"] == 1e-3  # what train.lr=auto gives each
    assert g["trainable_params"] == 4096 and lo["trainable_params"] > g["trainable_params"]
    # the best lr on both seeds; seed 0 is the sweep's own run (its folder, not a second one)
    assert g["seeds"] == [0, 1] and lo["seeds"] == [0, 1]
    dirs = sorted(p.parent.relative_to(out).as_posix() for p in (out / "runs").glob("*/*/*/metrics.jsonl"))
    assert len(dirs) == 2 + 1 + 2, dirs  # 3 sweep runs + 1 new seed each
    for r in rep["runs"]:  # verdicts every step; the curve's 6 records at each, test (8) and dev (4) before/after
        assert [c["step"] for c in r["curve"]] == [0, 1, 2]
        assert all(0 <= c["curve"] <= 1 for c in r["curve"])
        assert r["curve"][1]["dev"] is None and 0 <= r["curve"][2]["dev"] <= 1 and 0 <= r["after"] <= 1
    assert g["before"] == lo["before"]  # same records, same base model
    pairs = {(t["a"], t["b"], t["seed"]) for t in rep["paired"]}
    assert {("base", "gpart-d4k", 0), ("lora-r4", "gpart-d4k", 0), ("lora-r4", "gpart-d4k", 1)} <= pairs
    assert all(t["records"] == 8 and 0 <= t["p_value"] <= 1 for t in rep["paired"])
    assert g["parity"]["reference"] == "lora-r4" and "eligible" in g["parity"] and "parity" not in lo
    md = (out / "study.md").read_text()
    assert "## tiny (answer accuracy, 2 steps)" in md and "Paired tests" in md and "gpart-d4k" in md
    for png in ("study_frontier.png", "study_curves.png", "study_lr.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Rows measured elsewhere (--merge): GPart's report of today beside LoRA's row of an
    # earlier report; parity recomputed, the earlier paired tests kept, nothing trained.
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps(rep))
    _run(
        [
            "experiments.study",
            "--config",
            "tests/assets/study_tiny.yaml",
            "--quick",
            "--report-only",
            "--methods",
            "gpart-d4k",
            "--merge",
            str(earlier),
            "--out",
            str(out),
        ],
        timeout=300,
    )
    merged = json.loads((out / "study.json").read_text())
    mrows = {r["method"]: r for r in merged["summary"]}
    assert mrows["lora-r4"]["source"]["file"] == str(earlier) and "source" not in mrows["gpart-d4k"]
    assert mrows["gpart-d4k"]["parity"] == g["parity"] and merged["methods"] == ["gpart-d4k", "lora-r4"]
    assert {(t["a"], t["b"]) for t in merged["paired"]} == {("base", "gpart-d4k"), ("base", "lora-r4")}
    assert f"lora-r4: measured earlier, from {earlier}" in (out / "study.md").read_text()
    # A second invocation finds every run complete and trains nothing.
    logs = sorted((out / "runs").glob("*/*/*/metrics.jsonl"))
    stamps = [p.stat().st_mtime_ns for p in logs]
    _run(args, timeout=300)
    assert [p.stat().st_mtime_ns for p in logs] == stamps
    assert json.loads((out / "study.json").read_text())["summary"] == rep["summary"]
    # Ablations around GPart's chosen lr: one knob each; the unchanged run is the sweep's own.
    _run(["experiments.study", "--config", "tests/assets/study_tiny.yaml", "--quick", "--ablations", "--out", str(out)])
    ab = json.loads((out / "ablations.json").read_text())
    by = {r["variant"]: r for r in ab["runs"]}
    assert set(by) == {"baseline", "eps-lr-x2"}
    assert by["eps-lr-x2"]["overrides"] == ["train.adam_eps=1e-6"] and by["baseline"]["overrides"] == []
    assert by["eps-lr-x2"]["lr"] == pytest.approx(2 * g["best_lr"], rel=1e-3)
    assert by["baseline"]["lr"] == pytest.approx(g["best_lr"], rel=1e-3)
    assert [p.stat().st_mtime_ns for p in logs] == stamps  # the baseline was reused
    assert "eps-lr-x2" in (out / "ablations.md").read_text() and (out / "ablations.png").is_file()
    # A grid with a rate not run yet: no choice (and no seeds) until it is, unless
    # --partial, which chooses among the finished rates and names the missing one.
    wider = tmp_path / "wider.yaml"
    wider.write_text(
        (REPO / "tests/assets/study_tiny.yaml")
        .read_text()
        .replace("../../configs/tiny.yaml", str(REPO / "configs/tiny.yaml"))
        .replace("lr_mults: [1, 30]", "lr_mults: [1, 30, 3]")
    )
    base = ["experiments.study", "--config", str(wider), "--quick", "--report-only", "--out", str(out)]
    _run(base, timeout=300)
    assert [r["method"] for r in json.loads((out / "study.json").read_text())["summary"]] == ["lora-r4"]
    _run(base + ["--partial"], timeout=300)
    part = {r["method"]: r for r in json.loads((out / "study.json").read_text())["summary"]}
    assert part["gpart-d4k"]["best_lr"] == g["best_lr"] and part["gpart-d4k"]["seeds"] == [0, 1]
    assert part["gpart-d4k"]["grid_missing"] == [pytest.approx(3 * unit, rel=1e-3)]
    assert part["lora-r4"]["grid_missing"] == []
    assert "gpart-d4k: lr chosen among 2 of the grid's 3 rates (--partial)" in (out / "study.md").read_text()
    assert [p.stat().st_mtime_ns for p in logs] == stamps  # reports only: nothing trained
    # Runs an earlier report records stand in for folders this machine lacks (--reuse-runs):
    # a fresh output folder reports the same rows without training anything, and the wider
    # grid trains only its new rate.
    fresh = tmp_path / "fresh"
    _run(
        [
            "experiments.study",
            "--config",
            "tests/assets/study_tiny.yaml",
            "--quick",
            "--report-only",
            "--reuse-runs",
            str(earlier),
            "--out",
            str(fresh),
        ],
        timeout=300,
    )
    again = json.loads((fresh / "study.json").read_text())
    assert [{k: v for k, v in r.items() if k != "runs_from"} for r in again["summary"]] == rep["summary"]
    assert {r["method"]: r["runs_from"] for r in again["summary"]} == {
        "gpart-d4k": {str(earlier): 3},
        "lora-r4": {str(earlier): 2},
    }
    assert (
        not (fresh / "runs").exists()
        and f"3 of its runs trained earlier, recorded in {earlier}" in (fresh / "study.md").read_text()
    )
    _run(
        [
            "experiments.study",
            "--config",
            str(wider),
            "--quick",
            "--phase",
            "sweep",
            "--reuse-runs",
            str(earlier),
            "--out",
            str(fresh),
        ]
    )
    trained = [p.parent.name for p in (fresh / "runs").glob("*/*/*/metrics.jsonl")]
    assert trained == [f"lr{3 * unit:.4g}-s0"], trained  # the new rate alone
    wide = {r["method"]: r for r in json.loads((fresh / "study.json").read_text())["summary"]}["gpart-d4k"]
    assert len(wide["sweep"]) == 3 and wide["grid_missing"] == []
    assert wide["runs_from"] == {str(earlier): 1 + len(wide["seeds"])}  # 2 rates, and seed 1 if still chosen
    # every run keeps its own log: the variant's beside the sweep's, not in its place
    names = {p.name for p in (out / "logs").iterdir()}
    assert len(names) == 2 + 1 + 2 + 1, names
    assert any(n.startswith("ablations-eps-lr-x2-tiny-gpart-d4k-") for n in names), names


def test_study_refuses_a_bad_study_config_with_exit_2(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text((REPO / "tests/assets/study_tiny.yaml").read_text().replace("test_records: 8", "test_records: 12"))
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.study", "--config", str(bad), "--out", str(tmp_path / "o")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {bad}: test_records")
    assert not (tmp_path / "o").exists()


def test_the_real_study_config_plans_every_run_before_training(tmp_path):
    # configs/study_smollm2.yaml itself: tasks, grids, units and overrides validate, and
    # every run's config loads (the plan, without building an asset or training).
    from experiments import study
    from gpart_ds.config import load_config

    cfg = study.load_study("configs/study_smollm2.yaml")
    assert set(cfg["tasks"]) == {"rotten_tomatoes", "sciq", "arithmetic", "jeopardy_topic", "squad"}
    assert cfg["ranks"] == 1 and len(cfg["seeds"]) >= 3 and cfg["test_records"] >= 300
    D = 106_168_320  # SmolLM2-135M, all linear layers
    for name, m in cfg["methods"].items():  # the study's learning-rate grids
        if m.get("lr_mults"):
            unit = study.lr_unit(m, D, name)
            assert unit == pytest.approx(1.24e-4 * (D / m["d"]) ** 0.5)  # the rule before the study
            assert len(m["lr_mults"]) >= 6 and min(m["lr_mults"]) <= 0.3 and max(m["lr_mults"]) >= 30, name
        else:
            assert len(m["lrs"]) >= 4 and max(m["lrs"]) / min(m["lrs"]) >= 10, name
    for t in cfg["tasks"].values():  # every run's config and overrides load
        for m in cfg["methods"].values():
            ov = study.run_overrides(cfg, t, m, 1e-3, 0, t["steps"])
            run = load_config(f"configs/{t['config']}", ov, check_files=False)
            assert run.train.eval_predictions and run.train.eval_examples == 500
            assert run.method.name == m["name"] and run.train.lr == 1e-3
