"""The checks a run makes before it writes anything (gpart_ds/runcheck.py), in-process:
the output-folder guard, the resume target, max_steps against the checkpoint, and the
config-against-model checks shared by training, --dry-run, the planner and preflight.

The same behaviours end to end (exit status, message, files untouched) are the fault
probes' output-*, ckpt-*, override-resume-* and dryrun-* cases (tests/test_faults_*.py).
"""

import json
from pathlib import Path

import pytest

from gpart_ds import checkpoint, runcheck
from gpart_ds.config import ConfigError, load_config, to_yaml
from tests.test_checkpoint import _damage, fake_ckpt, rewrite_manifest


@pytest.fixture
def cfg_for(tiny_assets, tmp_path):
    def make(*overrides):
        return load_config("tiny", [f"output_dir={tmp_path / 'run'}", *overrides])

    return make


def _run_with_checkpoints(cfg, steps=(2, 4)):
    """output_dir as a finished run leaves it: checkpoints written with this config."""
    root = runcheck.checkpoint_root(cfg)
    for s in steps:
        ck = fake_ckpt(root, s)
        (ck / checkpoint.RUN_CONFIG).write_text(to_yaml(cfg))
        rewrite_manifest(ck)
    (root / checkpoint.LATEST).write_text(f"step-{steps[-1]:06d}\n")
    out = Path(cfg.output_dir)
    (out / "run_config.yaml").write_text(to_yaml(cfg))
    (out / "metrics.jsonl").write_text(json.dumps({"event": "start"}) + "\n")
    return root


def test_a_fresh_output_dir_starts_at_step_0(cfg_for):
    plan = runcheck.resolve_outputs(cfg_for())
    assert plan.resume is None and plan.replace == [] and plan.start_step == 0


def test_a_new_run_never_replaces_another_runs_results_unless_told(cfg_for):
    cfg = cfg_for()
    _run_with_checkpoints(cfg)
    with pytest.raises(
        ConfigError,
        match=r"output_dir.*already holds another run's results.*run_config\.yaml"
        r".*train\.resume=auto.*overwrite_output_dir=true",
    ):
        runcheck.resolve_outputs(cfg)
    plan = runcheck.resolve_outputs(cfg_for("overwrite_output_dir=true"))
    assert {p.name for p in plan.replace} >= {
        "run_config.yaml",
        "metrics.jsonl",
        "step-000002",
        "step-000004",
        "latest",
    }
    runcheck.remove_earlier_results(plan, cfg)
    assert checkpoint.list_checkpoints(runcheck.checkpoint_root(cfg)) == []
    assert not (Path(cfg.output_dir) / "metrics.jsonl").exists()
    with pytest.raises(ConfigError, match="contradict"):
        runcheck.resolve_outputs(cfg_for("overwrite_output_dir=true", "train.resume=auto"))


def test_resume_auto_takes_the_newest_usable_checkpoint(cfg_for):
    cfg = cfg_for("train.resume=auto")
    _run_with_checkpoints(cfg)
    plan = runcheck.resolve_outputs(cfg)
    assert plan.resume.path.name == "step-000004" and plan.start_step == 4


def test_resume_auto_refuses_to_start_over_checkpoints_it_cannot_use(cfg_for):
    cfg = cfg_for("train.resume=auto")
    root = _run_with_checkpoints(cfg)
    _damage(root / "step-000002", "truncate")
    _damage(root / "step-000004", "state-json-{}")
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"none can be resumed: step-000004: .*state\.json.*"
        r"step-000002: .*truncated",
    ):
        runcheck.resolve_outputs(cfg)


@pytest.mark.parametrize(
    "value, message",
    [
        ("Auto", r"'Auto' is neither a checkpoint folder nor a resume mode; did you mean auto"),
        ("latest", r"did you mean auto"),
        ("/no/such/ckpt", r"no such checkpoint folder '/no/such/ckpt'"),
    ],
)
def test_a_resume_target_that_is_not_there_is_named(cfg_for, value, message):
    with pytest.raises(ConfigError, match=r"command-line override 'train\.resume'.*" + message):
        runcheck.resolve_outputs(cfg_for(f"train.resume={value}"))


def test_an_explicit_checkpoint_is_verified_and_loadable(cfg_for, tmp_path):
    cfg = cfg_for()
    root = _run_with_checkpoints(cfg)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a checkpoint folder"):
        runcheck.resolve_outputs(cfg_for(f"train.resume={tmp_path / 'afile'}"))
    _damage(root / "step-000004", "state-json-{}")
    with pytest.raises(checkpoint.CheckpointError, match=r"train\.resume.*step-000004.*state\.json"):
        runcheck.resolve_outputs(cfg_for(f"train.resume={root / 'step-000004'}"))
    assert runcheck.resolve_outputs(cfg_for(f"train.resume={root / 'step-000002'}")).start_step == 2


def test_max_steps_below_the_checkpoint_is_refused_and_equal_is_nothing_to_do(cfg_for):
    cfg = cfg_for("train.resume=auto")
    _run_with_checkpoints(cfg)
    with pytest.raises(
        ConfigError,
        match=r"train\.max_steps=3 is below the step of the checkpoint it resumes, "
        r"step-000004",
    ):
        runcheck.resolve_outputs(cfg_for("train.resume=auto", "train.max_steps=3"))
    assert runcheck.resolve_outputs(cfg_for("train.resume=auto", "train.max_steps=4")).start_step == 4


def test_a_drifted_resume_is_refused_before_anything_is_written(cfg_for):
    cfg = cfg_for("train.resume=auto")
    _run_with_checkpoints(cfg)
    before = (Path(cfg.output_dir) / "run_config.yaml").read_text()
    with pytest.raises(checkpoint.CheckpointError, match=r"method\.seed"):
        runcheck.resolve_outputs(cfg_for("train.resume=auto", "method.seed=1"))
    assert (Path(cfg.output_dir) / "run_config.yaml").read_text() == before


@pytest.mark.parametrize("where", ["output_dir", "checkpoint.dir"])
def test_output_folders_that_cannot_be_folders_are_named(cfg_for, tmp_path, where):
    (tmp_path / "afile").write_text("keep")
    for path, msg in (
        (tmp_path / "afile", "is a file, not a folder"),
        (tmp_path / "afile" / "run", "lies under .*afile.*which is a file"),
    ):
        with pytest.raises(ConfigError, match=rf"{where}.*{msg}"):
            runcheck.resolve_outputs(cfg_for(f"{where}={path}"))
    assert (tmp_path / "afile").read_text() == "keep"


def test_dry_run_planner_and_training_refuse_the_same_deepspeed_config(cfg_for, tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 3}, "fp16": {"enabled": True}}))
    cfg = cfg_for(f"deepspeed={tmp_path / 'ds.json'}")
    with pytest.raises(ConfigError, match=r"command-line override 'deepspeed'.*fp16 is not supported"):
        runcheck.validate_for_run(cfg, world=2)
    checked = runcheck.validate_for_run(cfg_for(), world=2)
    assert checked.layout.D == 86016 and checked.lr == 0.05


def test_a_checkpoint_of_another_folder_does_not_start_a_run_among_another_runs_results(cfg_for, tmp_path):
    """Fine-tuning on from run A's checkpoint into a folder holding run C would mix the two,
    and a later resume=auto there would pick C's newest step."""
    a = fake_ckpt(tmp_path / "A" / "checkpoints", 4)
    cfg = cfg_for()
    (a / checkpoint.RUN_CONFIG).write_text(to_yaml(cfg))
    rewrite_manifest(a)
    assert runcheck.resolve_outputs(cfg_for(f"train.resume={a}")).start_step == 4  # an empty output_dir: fine
    _run_with_checkpoints(cfg)
    with pytest.raises(ConfigError, match=r"output_dir.*a run resumed from another folder's checkpoint would mix"):
        runcheck.resolve_outputs(cfg_for(f"train.resume={a}"))
    own = runcheck.checkpoint_root(cfg) / "step-000002"
    assert runcheck.resolve_outputs(cfg_for(f"train.resume={own}")).start_step == 2  # its own checkpoint: fine
    plan = runcheck.resolve_outputs(cfg_for(f"train.resume={a}", "overwrite_output_dir=true"))
    assert plan.start_step == 4 and plan.replace
