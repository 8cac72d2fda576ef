"""The study config: method entries as method.* overrides, lr grids and units, refusals
(in-process; the launched pipeline is tests/integration/test_bench_study.py)."""

import pytest

from experiments import study
from gpart_ds.config import ConfigError


def _write(tmp_path, text):
    p = tmp_path / "s.yaml"
    p.write_text(text)
    return p


BASE = """ranks: 1
seeds: [0]
steps: 2
eval_examples: 12
test_records: 8
eval_every: 1
tasks:
  tiny: {config: CONFIG, metric: exact_match}
methods:
"""


def _study(tmp_path, methods, extra=""):
    from tests.helpers import REPO

    return _write(tmp_path, BASE.replace("CONFIG", str(REPO / "configs/tiny.yaml")) + methods + extra)


def test_an_entry_is_its_method_keys_and_a_grid(tmp_path):
    cfg = study.load_study(
        _study(
            tmp_path,
            "  g: {name: gpart, d: 1024, lr_mults: [1, 3], lr_unit: '2e-3 * sqrt(D / d)'}\n"
            "  l: {name: lora, r: 4, alpha: 8, lrs: [auto, 0.01]}\n",
        )
    )
    g, lo = cfg["methods"]["g"], cfg["methods"]["l"]
    assert study.method_overrides(g) == ["method.name=gpart", "method.d=1024"]
    assert study.method_overrides(lo) == ["method.name=lora", "method.r=4", "method.alpha=8"]
    ov = study.run_overrides(cfg, cfg["tasks"]["tiny"], lo, 0.01, 3, 2, extra=("train.adam_eps=1e-6",))
    assert ov[:3] == ["train.max_steps=2", "train.seed=3", "method.seed=3"] and ov[-2:] == [
        "train.lr=0.01",
        "train.adam_eps=1e-6",
    ]
    assert "train.eval_predictions=true" in ov and "method.r=4" in ov
    assert study.lr_unit(g, 1024 * 9, "u") == pytest.approx(2e-3 * 3)
    assert study.lr_unit({"lr_mults": [1]}, 10, "u") is None  # default: auto
    assert study.lr_unit({"lr_mults": [1], "lr_unit": 0.5}, 10, "u") == 0.5


@pytest.mark.parametrize(
    "entry, key, msg",
    [
        ("{name: gpart2, d: 8, lrs: [0.1]}", "methods.g", "name must be one of"),
        ("{name: gpart, d: 8}", "methods.g", "needs either lrs"),
        ("{name: gpart, d: 8, lrs: [0.1], lr_mults: [1]}", "methods.g", "needs either lrs"),
        ("{name: gpart, d: 8, lrs: [-1]}", "methods.g.lrs", "-1 is not a learning rate"),
        ("{name: gpart, d: 8, lr_mults: [1, 0]}", "methods.g.lr_mults", "0 is not a multiple"),
        ("{name: gpart, d: 8, lrs: [0.1], lr_unit: auto}", "methods.g.lr_unit", "goes with lr_mults"),
        ("{name: gpart, d: 8, lr_mults: [1], lr_unit: 'import os'}", "methods.g.lr_unit", "not an expression"),
        ("{name: gpart, d: 8, lr_mults: [1], lr_unit: 'open(D)'}", "methods.g.lr_unit", "only numbers"),
        ("{name: gpart, d: 8, lr_mults: [1], lr_unit: '1e-3 * sqrt(D / r)'}", "methods.g.lr_unit", "unknown name 'r'"),
    ],
)
def test_a_bad_entry_is_named_with_its_key(tmp_path, entry, key, msg):
    with pytest.raises(ConfigError, match=rf"s\.yaml: {key}: .*{msg}"):
        study.load_study(_study(tmp_path, f"  g: {entry}\n"))


def test_compare_with_must_be_an_entry(tmp_path):
    with pytest.raises(ConfigError, match="compare_with: 'lora' is not one of methods"):
        study.load_study(_study(tmp_path, "  g: {name: gpart, d: 8, lrs: [0.1]}\n", "compare_with: lora\n"))


def test_the_plan_resolves_auto_and_units_through_the_methods_own_rates(tmp_path, tiny_assets):
    from gpart_ds import methods
    from gpart_ds.config import load_config, resolved_lr

    cfg = study.load_study(
        _study(
            tmp_path, "  g: {name: gpart, d: 1024, lr_mults: [1, 10]}\n  l: {name: lora, r: 4, lrs: [auto, 0.003]}\n"
        )
    )
    plan = study.Plan(cfg, tmp_path / "out", ["tiny"], ["g", "l"])
    assert plan.D("tiny", "g") == 86_016  # tiny: 2 layers x 7 matrices
    auto_g = resolved_lr(
        load_config("configs/tiny.yaml", ["method.d=1024", "train.lr=auto"], check_files=False), 86_016
    )
    assert plan.lr_grid("tiny", "g") == [float(f"{auto_g:.4g}"), float(f"{10 * auto_g:.4g}")]
    assert plan.lr_grid("tiny", "l") == [methods.get("lora").DEFAULT_LR, 0.003]
    e = plan.sweep("tiny", "l")[1]
    assert e["out"] == tmp_path / "out" / "runs" / "tiny" / "l" / "lr0.003-s0" and "method.name=lora" in e["overrides"]


def test_probe_and_ablation_runs_log_beside_the_sweep_run_they_share_lr_and_seed_with(tmp_path):
    from experiments.study import log_name

    sweep = tmp_path / "runs" / "rotten_tomatoes" / "lora-r8" / "lr0.001-s0"
    probe = tmp_path / "probe" / "rotten_tomatoes" / "lora-r8" / "lr0.001-s0"
    ablation = tmp_path / "ablations" / "warmup-0" / "rotten_tomatoes" / "gpart-d131k" / "lr0.01059-s0"
    assert log_name(sweep, tmp_path) == "rotten_tomatoes-lora-r8-lr0.001-s0.log"  # as before
    assert log_name(probe, tmp_path) == "probe-rotten_tomatoes-lora-r8-lr0.001-s0.log"
    assert log_name(ablation, tmp_path) == "ablations-warmup-0-rotten_tomatoes-gpart-d131k-lr0.01059-s0.log"


def test_a_finished_run_of_another_configuration_is_refused_not_replaced(tmp_path):
    from experiments import study
    from gpart_ds.config import ConfigError

    out = tmp_path / "runs" / "tiny" / "gpart" / "lr0.01-s0"
    out.mkdir(parents=True)
    (out / "study_key").write_text("key-of-a-40-step-run\n")
    (out / "metrics.jsonl").write_text('{"event": "summary"}\n')
    entry = {
        "task": "tiny",
        "method": "gpart",
        "lr": 0.01,
        "seed": 0,
        "phase": "sweep",
        "config": "configs/tiny.yaml",
        "overrides": [],
        "out": out,
        "key": "key-of-an-80-step-run",
    }
    with pytest.raises(ConfigError, match="finished run of another configuration"):
        study.execute([entry], 1, tmp_path / "logs")
    assert (out / "metrics.jsonl").read_text() == '{"event": "summary"}\n'  # untouched
    assert not (tmp_path / "logs").exists()


def test_grid_narrows_an_entry_in_its_own_terms_and_names_a_bad_value(tmp_path, tiny_assets):
    cfg = study.load_study(
        _study(
            tmp_path,
            "  g: {name: gpart, d: 1024, lr_mults: [1, 3, 10]}\n  l: {name: lora, r: 4, lrs: [0.001, 0.003, 0.01]}\n",
        )
    )
    full = study.Plan(cfg, tmp_path / "out", ["tiny"], ["g", "l"])
    g_full, l_full = full.sweep("tiny", "g"), full.sweep("tiny", "l")
    study.apply_grid(cfg, ["g=3,auto", "l=0.003,auto"], ["g", "l"])
    plan = study.Plan(cfg, tmp_path / "out", ["tiny"], ["g", "l"])
    g3, g_auto = plan.sweep("tiny", "g")
    assert g_auto["lr"] == pytest.approx(plan.auto_lr("tiny", "g"), rel=1e-3)  # auto among multiples too
    assert (g3["out"], g3["key"]) == (g_full[1]["out"], g_full[1]["key"])  # the same run as the full grid's 3x
    l3, l_auto = plan.sweep("tiny", "l")
    assert (l3["out"], l3["key"]) == (l_full[1]["out"], l_full[1]["key"])
    assert l_auto["lr"] == plan.auto_lr("tiny", "l")
    for spec, msg in [
        ("x=1", "'x' is not one of the methods run"),
        ("g", "expected METHOD=V"),
        ("g=0", "'0' is not a multiple"),
        ("l=-1", "'-1' is not a learning rate"),
        ("l=0.1,nan", "'nan' is not a learning rate"),
    ]:
        with pytest.raises(ConfigError, match=rf"--grid {spec}: {msg}"):
            study.apply_grid(cfg, [spec], ["g", "l"])


def test_grid_on_the_command_line_exits_2_with_the_flag_named(tmp_path, capsys):
    code = study.cli(
        [
            "--config",
            str(_study(tmp_path, "  g: {name: gpart, d: 8, lrs: [0.1]}\n")),
            "--report-only",
            "--grid",
            "g=0",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2 and "--grid g=0: '0' is not a learning rate" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_an_unfinished_sweep_chooses_no_rate_and_says_what_waits_for_it(tmp_path, tiny_assets, capsys):
    from experiments import study_report

    cfg = study.load_study(_study(tmp_path, "  l: {name: lora, r: 4, lrs: [0.001, 0.003]}\n"))
    plan = study.Plan(cfg, tmp_path / "out", ["tiny"], ["l"])
    assert study_report.final_entries(plan, "tiny", ["l"]) == []
    assert "tiny/l: sweep incomplete, no seeds yet" in capsys.readouterr().out
    assert study_report.best_lr(plan, "tiny", "l") is None and capsys.readouterr().out == ""  # silent unasked


@pytest.mark.parametrize(
    "text, msg",
    [
        (None, "no such file"),
        ("{", "not JSON (line 1"),
        ('{"summary": []}', "not a study report (no runs, paired"),
    ],
)
def test_merge_of_a_file_that_is_no_report_exits_2_before_any_run(tmp_path, capsys, text, msg):
    f = tmp_path / "earlier.json"
    if text is not None:
        f.write_text(text)
    code = study.cli(
        [
            "--config",
            str(_study(tmp_path, "  g: {name: gpart, d: 8, lrs: [0.1]}\n")),
            "--merge",
            str(f),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2 and f"--merge {f}: {msg}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "flags, msg",
    [
        (["--seeds", "a,b"], "--seeds a,b: a non-empty list of integers >= 0, got 'a,b'"),
        (["--seeds", ""], "--seeds : a non-empty list of integers >= 0"),
        (["--seeds", "0,-1"], "--seeds 0,-1: a non-empty list of integers >= 0, got [0, -1]"),
        (["--seeds", "1,1"], "--seeds 1,1: [1, 1] names a seed twice"),
        (["--steps", "0"], "--steps: must be >= 1, got 0"),
        (["--grid", "g=1", "--grid", "g=3"], "--grid g=3: g has a --grid already: give its values in one, g=V,V"),
    ],
)
def test_bad_command_line_values_exit_2_naming_the_flag_before_any_run(tmp_path, capsys, flags, msg):
    cfg = _study(tmp_path, "  g: {name: gpart, d: 8, lr_mults: [1], lr_unit: '0.01'}\n")
    code = study.cli(["--config", str(cfg), *flags, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and msg in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("seeds", ["[]", "[0, 0]", "[-1]", "[a]", "[true]"])
def test_a_study_configs_seeds_are_distinct_integers(tmp_path, seeds):
    with pytest.raises(ConfigError, match="seeds: "):
        study.load_study(_write(tmp_path, BASE.replace("seeds: [0]", f"seeds: {seeds}") + "  g: {name: gpart, d: 8}\n"))


def test_a_runs_identity_is_its_resolved_config_not_where_it_came_from(tmp_path):
    """The same run from a copy of the run config elsewhere, with the overrides in another
    order or an evaluation-only key changed, is the same run; a training key is not."""
    import shutil

    src = "configs/study_smollm2_run.yaml"
    copy = tmp_path / "elsewhere.yaml"
    shutil.copy(src, copy)
    shutil.copy("configs/ds_zero3_cpu.json", tmp_path)  # read as content, not as a path
    ov = ["train.lr=0.01", "method.d=4096", "train.max_steps=40"]
    key = study._key(src, ov, 1)
    assert study._key(str(copy), ov[::-1], 1) == key
    assert study._key(src, ov + ["train.eval_generate=never"], 1) == key
    assert study._key(src, ov + ["train.eval_before=false"], 1) == key  # the base evaluated by another run
    assert study._key(src, ov + ["train.objective=choices_lm"], 1) != key
    assert study._key(src, ov, 2) != key
    # keys added after runs existed, at the default that reproduces those runs, are not part
    # of it (a run finished before the key existed stays finished); other values are
    cfg, _ = study.identity(src, ov, 1)
    assert not {k.split(".")[1] for k in study.NEUTRAL_AT_DEFAULT} & set(cfg["dist"])
    assert study._key(src, ov + ["dist.fault_tolerance=none", "dist.ft_max_retries=3"], 1) == key
    assert study._key(src, ov + ["dist.fault_tolerance=nodes"], 1) != key


@pytest.mark.slow
def test_the_base_model_is_evaluated_once_per_task_and_output_folder(tmp_path, tiny_assets, capsys):
    """Two methods on one task: the first run evaluates the base (step 0), the second runs
    train.eval_before=false and its report takes step 0 from the first: the same before,
    served_before and curve[0] as when it evaluates the base itself (its own --out).
    Trains 3 tiny runs through the launcher (slow)."""
    import json

    from experiments import study_report

    cfg = _study(
        tmp_path,
        "  g: {name: gpart, d: 4096, lrs: [0.05]}\n  l: {name: lora, r: 4, lrs: [0.01]}\n",
        "curve_records: 6\n",
    )
    shared, alone = tmp_path / "shared", tmp_path / "alone"
    args = ["--config", str(cfg), "--phase", "sweep"]
    rep = study.main(args + ["--out", str(shared)])
    first, second = shared / "runs/tiny/g/lr0.05-s0", shared / "runs/tiny/l/lr0.01-s0"
    assert (first / "predictions/step-000000.jsonl").is_file()  # the first run of the task
    assert not (second / "predictions/step-000000.jsonl").exists()
    assert [study_report.run_config(r)["train"]["eval_before"] for r in (first, second)] == [True, False]
    assert "the base model's evaluation is runs/tiny/g/lr0.05-s0's" in capsys.readouterr().out
    runs = {r["method"]: r for r in rep["runs"]}
    assert runs["l"]["before_from"] == "runs/tiny/g/lr0.05-s0" and "before_from" not in runs["g"]
    for k in ("before", "served_before"):
        assert runs["l"][k] is not None and runs["l"][k] == runs["g"][k], k
    assert runs["l"]["curve"][0] == runs["g"]["curve"][0] and runs["l"]["curve"][0]["step"] == 0
    assert [c["step"] for c in runs["l"]["curve"]] == [0, 1, 2]
    assert {t["b"]: t["records"] for t in rep["paired"] if t["a"] == "base"} == {"g": 8, "l": 8}
    assert "Evaluated once, by runs/tiny/g/lr0.05-s0: 1 other run(s)" in (shared / "study.md").read_text()
    # the same fields when the run evaluates the base itself (alone in its output folder)
    own = {r["method"]: r for r in study.main(args + ["--methods", "l", "--out", str(alone)])["runs"]}["l"]
    assert (alone / "runs/tiny/l/lr0.01-s0/predictions/step-000000.jsonl").is_file() and "before_from" not in own
    assert (own["before"], own["served_before"], own["curve"][0]) == (
        runs["l"]["before"],
        runs["l"]["served_before"],
        runs["l"]["curve"][0],
    )
    # eval_before is no part of a run's identity: a second invocation trains nothing
    stamps = [p.stat().st_mtime_ns for p in (first / "metrics.jsonl", second / "metrics.jsonl")]
    assert study.main(args + ["--out", str(shared)])["runs"] == rep["runs"]
    assert [p.stat().st_mtime_ns for p in (first / "metrics.jsonl", second / "metrics.jsonl")] == stamps
    # a base evaluated with other settings is not the run's: refused, naming the key
    rc = first / "run_config.yaml"
    rc.write_text(rc.read_text().replace("max_length: 64", "max_length: 48"))
    with pytest.raises(
        ConfigError,
        match=r"lr0.01-s0: trained with train.eval_before=false, but .*"
        r"data.max_length: 48 there, 64 here",
    ):
        study.main(args + ["--out", str(shared), "--report-only"])
    assert json.loads((shared / "study.json").read_text())["runs"] == rep["runs"]  # the report as it was
