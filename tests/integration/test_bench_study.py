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
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
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
    assert res["gpart"]["trainable_params"] == 4096                       # d of configs/tiny.yaml
    assert res["gpart"]["trainable_params"] < res["lora"]["trainable_params"] < res["full"]["trainable_params"]
    assert res["gpart"]["model_state_bytes"] < 0.05 * res["full"]["model_state_bytes"]
    assert set(rep["ratios"]) == {"gpart/lora", "gpart/full"}
    assert all(r["timed_steps"] == 3 for r in res.values())
    assert rep["ratios"]["gpart/full"]["step_s"] == pytest.approx(res["gpart"]["step_s"] / res["full"]["step_s"])
    assert set(rep["scaling"]) == {"1", "2"} and rep["scaling"]["1"]["world"] == 1
    pj = rep["projections"]["per_gpu"]
    assert set(pj) == {"gpart", "lora", "full"} and set(pj["gpart"]) == {"8", "16", "64"}
    assert pj["full"]["8"]["gpu_gib"] > pj["gpart"]["8"]["gpu_gib"]       # 70B full FT needs more per GPU
    assert set(rep["layer"]["layers"]) == {"frozen", "trainable", "lora", "gpart_eager", "gpart_compiled",
                                           "gpart_compiled_reuse_ids"}
    assert len(rep["targets"]) == 5 and all("met" in t for t in rep["targets"])
    md = (out / "report.md").read_text()
    assert "| GPart |" in md and "gpart/lora" in md and "Planner projection" in md
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_refuses_a_bad_override_before_any_run(tmp_path, tiny_assets):
    proc = subprocess.run([sys.executable, "-m", "experiments.bench", "--quick", "--out", str(tmp_path),
                           "train.lr=-1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "train.lr" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_study_quick_writes_table_and_plot_and_reuses_finished_runs(tmp_path):
    # The pipeline on the tiny model (the real study's runs are SmolLM2's, minutes each;
    # the real model under ZeRO-3 is test_real_model's job).
    out = tmp_path / "study"
    args = ["experiments.study", "--config", "tests/assets/study_tiny.yaml", "--quick", "--out", str(out)]
    _run(args)
    rep = json.loads((out / "study.json").read_text())
    assert rep["tasks"] == ["tiny"] and rep["methods"] == ["gpart-d4k", "lora-r4"]
    rows = {r["method"]: r for r in rep["rows"]}
    g, lo = rows["gpart-d4k"], rows["lora-r4"]
    assert g["trainable_params"] == 4096 and lo["trainable_params"] > g["trainable_params"]
    assert g["metric"] == "exact_match" and 0 <= g["after"] <= 1 and 0 <= lo["after"] <= 1
    assert g["before"] == lo["before"]                   # same eval records, same base model
    # GPart's lr follows D/d: 0.0109 * sqrt(86,016 / 4,096) (tiny: 2 layers x 7 matrices)
    assert g["lr"] == pytest.approx(0.0109 * (86016 / 4096) ** 0.5, rel=1e-4)
    assert lo["lr"] == 0.01
    assert all(len(r["losses"]) == 1 for r in rep["runs"])
    md = (out / "study.md").read_text()
    assert "## tiny (exact match)" in md and "gpart-d4k" in md
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A second invocation finds both runs complete and trains nothing.
    logs = sorted((out / "runs").glob("*/metrics.jsonl"))
    stamps = [p.stat().st_mtime_ns for p in logs]
    _run(args, timeout=300)
    assert [p.stat().st_mtime_ns for p in logs] == stamps and len(logs) == 2
    assert json.loads((out / "study.json").read_text())["rows"] == rep["rows"]


def test_the_real_study_config_plans_every_run_before_training(tmp_path):
    # configs/study_smollm2.yaml itself: tasks, methods, lr rule and overrides validate.
    from experiments import study

    cfg = study.load_study("configs/study_smollm2.yaml")
    assert set(cfg["tasks"]) == {"rotten_tomatoes", "qasc"}
    D = 106_168_320                                      # SmolLM2-135M, all linear layers
    ov = study.run_overrides(cfg, cfg["tasks"]["rotten_tomatoes"], cfg["methods"]["gpart-d64k"], 0, D)
    assert f"train.lr={1.24e-4 * (D / 65536) ** 0.5:.6g}" in ov and "method.d=65536" in ov
    from gpart_ds.config import load_config

    for t in cfg["tasks"].values():                      # every run's config and overrides load
        for m in cfg["methods"].values():
            load_config(f"configs/{t['config']}", study.run_overrides(cfg, t, m, 0, D), check_files=False)
