"""One rule for every command that writes: an output never lands on an input (it may not
equal, contain or lie inside one), whatever `overwrite` says; refused before any work,
naming both, and what was there is untouched."""

import hashlib
import json
import os

import pytest

from gpart_ds import evaluate
from gpart_ds.config import ConfigError, load_config
from gpart_ds.export import cli as export_cli
from gpart_ds.fileio import overlap
from gpart_ds.runcheck import resolve_outputs


def test_equal_containing_and_inside_are_refused_siblings_are_not(tmp_path):
    model, data = tmp_path / "model", tmp_path / "data.jsonl"
    assert overlap({"--out": tmp_path / "merged"}, {"--base": model}) is None
    assert "is --base" in overlap({"--out": model}, {"--base": model})
    assert "contains --base" in overlap({"--out": tmp_path}, {"--base": model})
    assert "lies inside --base" in overlap({"--out": model / "merged"}, {"--base": model})
    assert "is --data" in overlap({"--predictions": data}, {"--data": data})
    assert overlap({"--out": None}, {"--base": model}) is None and overlap({"--out": model}, {"--base": None}) is None


def test_paths_are_compared_as_the_file_system_sees_them(tmp_path):
    (tmp_path / "model").mkdir()
    os.symlink(tmp_path / "model", tmp_path / "link")
    assert "is --base" in overlap({"--out": tmp_path / "link"}, {"--base": tmp_path / "model"})
    assert "is --base" in overlap({"--out": str(tmp_path / "x" / ".." / "model")}, {"--base": tmp_path / "model"})


def test_a_home_may_hold_an_output_but_not_be_or_sit_inside_it(tmp_path):
    run = tmp_path / "run"
    assert overlap({"export.dir": run / "merged"}, {}, {"output_dir": run}) is None
    assert "is output_dir" in overlap({"export.dir": run}, {}, {"output_dir": run})
    assert "contains output_dir" in overlap({"export.dir": tmp_path}, {}, {"output_dir": run})


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def adapter(tmp_path, tiny_assets):
    """A GPart adapter for the tiny model (theta 0: its merge is the base)."""
    import torch
    from transformers import AutoModelForCausalLM

    from gpart_ds.methods.gpart.adapter import adapter_config, save_adapter
    from gpart_ds.targets import build_layout

    model = AutoModelForCausalLM.from_pretrained(tiny_assets / "model")
    layout = build_layout(model, "all-linear")
    cfg = adapter_config(
        d=64, seed=0, target_modules="all-linear", dropout=0.0, layout=layout, base_model={"name": "tiny"}
    )
    return save_adapter(tmp_path / "adapter", torch.zeros(64), cfg)


@pytest.mark.parametrize("where", ["base", "adapter", "inside-base", "parent-of-adapter"])
def test_export_never_writes_onto_what_it_reads(where, tmp_path, tiny_assets, adapter, capsys):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_assets / "model", base)
    out = {"base": base, "adapter": adapter, "inside-base": base / "merged", "parent-of-adapter": tmp_path}[where]
    before = (_digest(base), _digest(adapter))
    rc = export_cli.main(["--base", str(base), "--adapter", str(adapter), "--out", str(out), "--overwrite"])
    err = capsys.readouterr().err
    assert rc == 2 and "--out" in err and ("--base" in err or "--adapter" in err) and "Traceback" not in err
    assert (_digest(base), _digest(adapter)) == before


def test_a_run_whose_export_or_checkpoints_land_on_its_inputs_or_its_own_folder_is_refused(tmp_path, tiny_assets):
    run = tmp_path / "run"
    common = [f"output_dir={run}", "export.merged=true"]
    cases = {
        f"export.dir={run}": "export.dir",  # the whole run replaced
        f"export.dir={tiny_assets / 'model'}": "export.dir",  # the base replaced
        f"checkpoint.dir={tmp_path}": "checkpoint.dir",  # holds the run folder
        f"output_dir={tiny_assets / 'data'}": "output_dir",  # holds the data
    }
    for override, key in cases.items():
        cfg = load_config("configs/tiny.yaml", common + [override, "export.overwrite=true"])
        with pytest.raises(ConfigError, match=rf"'{key}': {key} .*choose another folder"):
            resolve_outputs(cfg)
    resolve_outputs(load_config("configs/tiny.yaml", common))  # the defaults are fine


def test_evaluate_never_writes_its_results_onto_its_inputs(tmp_path, tiny_assets, capsys):
    data = tmp_path / "eval.jsonl"
    data.write_text((tiny_assets / "data" / "eval.jsonl").read_text())
    before = data.read_bytes()
    for flag in ("--predictions", "--json"):
        rc = evaluate.main(["--model", str(tiny_assets / "model"), "--data", str(data), flag, str(data)])
        err = capsys.readouterr().err
        assert rc == 2 and f"{flag} {str(data)!r} is --data" in err
    rc = evaluate.main(
        [
            "--model",
            str(tiny_assets / "model"),
            "--data",
            str(data),
            "--json",
            str(tmp_path / "r.json"),
            "--predictions",
            str(tmp_path / "r.json"),
        ]
    )
    assert rc == 2 and "the same file" in capsys.readouterr().err
    assert data.read_bytes() == before and not (tmp_path / "r.json").exists()
    assert json.loads(before.splitlines()[0])  # still the records


def test_resume_auto_without_a_checkpoint_never_starts_over_a_finished_run(tmp_path):
    run = tmp_path / "run"
    cfg = lambda: load_config("configs/tiny.yaml", [f"output_dir={run}", "train.resume=auto"])  # noqa: E731
    resolve_outputs(cfg())  # a new folder: a fresh start
    run.mkdir()
    (run / "run_config.yaml").write_text("x: 1\n")  # a start preempted before its first checkpoint
    (run / "metrics.jsonl").write_text(json.dumps({"event": "start"}) + "\n")
    assert resolve_outputs(cfg()).resume is None  # requeued: starts again
    (run / "adapter").mkdir()
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"event": "summary"}) + "\n")
    with pytest.raises(
        ConfigError,
        match=r"found no checkpoint in .* holds a finished run \(adapter, metrics.jsonl "
        r"with a summary\); starting over would replace it",
    ):
        resolve_outputs(cfg())
