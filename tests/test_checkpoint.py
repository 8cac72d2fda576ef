"""Checkpoint verification and fallback, without running training."""

import json
import logging

import pytest
import torch

from gpart_ds import checkpoint


def fake_ckpt(root, step, d=16):
    """A checkpoint folder as checkpoint.save writes it (no engine needed to read one)."""
    from safetensors.torch import save_file

    ck = checkpoint.step_dir(root, step)
    ck.mkdir(parents=True)
    theta = torch.full((d,), float(step))
    save_file(
        {"theta": theta, **{f"theta::{k}": theta.clone() for k in ("master", "exp_avg", "exp_avg_sq")}},
        str(ck / checkpoint.STATE_FILE),
    )
    save_file({"cpu": torch.get_rng_state()}, str(ck / "rng-rank0.safetensors"))
    (ck / checkpoint.STATE_JSON).write_text(
        json.dumps({"step": step, "adam_step": step, "world": 1, "global_steps": step})
    )
    (ck / checkpoint.RUN_CONFIG).write_text("method: {name: gpart, d: 16}\n")
    rewrite_manifest(ck)
    return ck


def rewrite_manifest(ck):
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": checkpoint._sha256(p)}
        for p in sorted(ck.iterdir())
        if p.name != checkpoint.MANIFEST
    }
    (ck / checkpoint.MANIFEST).write_text(json.dumps({"step": int(ck.name[5:]), "files": files}))


def test_newest_verified_checkpoint_wins(tmp_path):
    fake_ckpt(tmp_path, 2)
    fake_ckpt(tmp_path, 4)
    (tmp_path / ".step-000006.tmp").mkdir()  # an interrupted write is never a candidate
    found, skipped = checkpoint.find_resume(tmp_path)
    assert found.path.name == "step-000004" and found.step == 4 and skipped == []


def _damage(ck, how):
    f = ck / checkpoint.STATE_FILE
    if how == "truncate":
        f.write_bytes(f.read_bytes()[:-10])
    elif how == "flip":
        data = bytearray(f.read_bytes())
        data[-7] ^= 0x01
        f.write_bytes(bytes(data))
    elif how == "no-manifest":
        (ck / checkpoint.MANIFEST).unlink()
    elif how == "missing":
        f.unlink()
    elif how == "manifest-{}":
        (ck / checkpoint.MANIFEST).write_text("{}")
    elif how == "manifest-[]":
        (ck / checkpoint.MANIFEST).write_text("[]")
    elif how == "manifest-no-sha":
        m = json.loads((ck / checkpoint.MANIFEST).read_text())
        for v in m["files"].values():
            v.pop("sha256")
        (ck / checkpoint.MANIFEST).write_text(json.dumps(m))
    elif how == "manifest-lists-nothing":
        (ck / checkpoint.MANIFEST).write_text(json.dumps({"files": {}}))
    elif how == "state-json-{}":  # passes its checksums, cannot be resumed
        (ck / checkpoint.STATE_JSON).write_text("{}")
        rewrite_manifest(ck)
    elif how == "no-moments":
        from safetensors.torch import save_file

        save_file({"theta": torch.zeros(16)}, str(f))
        rewrite_manifest(ck)


DAMAGES = [
    "truncate",
    "flip",
    "no-manifest",
    "missing",
    "manifest-{}",
    "manifest-[]",
    "manifest-no-sha",
    "manifest-lists-nothing",
    "state-json-{}",
    "no-moments",
]


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_newest_checkpoint_falls_back_and_says_so(tmp_path, caplog, damage):
    """Anything that keeps a checkpoint from being resumed (bytes, manifest, content that
    verifies but was not written by this code) skips it by name; nothing raises."""
    fake_ckpt(tmp_path, 2)
    _damage(fake_ckpt(tmp_path, 4), damage)
    with caplog.at_level(logging.WARNING):
        found, skipped = checkpoint.find_resume(tmp_path)
    assert found.path.name == "step-000002"
    assert "skipping checkpoint step-000004" in caplog.text and skipped[0].startswith("step-000004: ")


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_checkpoint_read_directly_is_a_named_error(tmp_path, damage):
    """What export and an explicit train.resume see: a CheckpointError naming the folder."""
    ck = fake_ckpt(tmp_path, 4)
    _damage(ck, damage)
    with pytest.raises(checkpoint.CheckpointError, match="step-000004"):
        checkpoint.read(ck)


def test_no_checkpoint_means_fresh_start(tmp_path):
    assert checkpoint.find_resume(tmp_path / "none") == (None, [])


def test_drift_check_names_the_key(tiny_assets, tmp_path):
    from omegaconf import OmegaConf

    from gpart_ds.config import load_config, where_for

    cfg = load_config("tiny", [f"output_dir={tmp_path}", "method.d=2048"])
    saved = OmegaConf.to_container(load_config("tiny", [f"output_dir={tmp_path}"]), resolve=True)
    with pytest.raises(checkpoint.CheckpointError, match=r"'method\.d'.*trained with method\.d=4096"):
        checkpoint.check_drift(saved, cfg, where_for(cfg))
    same = load_config("tiny", [f"output_dir={tmp_path}", "train.max_steps=99", "data.eval=" + cfg.data.eval])
    checkpoint.check_drift(saved, same, where_for(same))  # safe changes pass


def test_drift_keys_are_the_keys_each_method_reads(tiny_assets, tmp_path):
    """Full fine-tuning reads no method.target_modules: changing it must not refuse a resume,
    while for an adapter the targets decide what its saved tensors mean."""
    from omegaconf import OmegaConf

    from gpart_ds.config import load_config, where_for

    def cfgs(method):
        base = [f"output_dir={tmp_path}", f"method.name={method}"]
        saved = OmegaConf.to_container(load_config("tiny", base), resolve=True)
        return saved, load_config("tiny", base + ["method.target_modules=[q_proj]"])

    saved, now = cfgs("full")
    checkpoint.check_drift(saved, now, where_for(now))
    assert checkpoint.drift_keys("full") == ("method.name", "model.path")
    for method in ("gpart", "lora", "vera"):
        saved, now = cfgs(method)
        with pytest.raises(checkpoint.CheckpointError, match=r"method\.target_modules"):
            checkpoint.check_drift(saved, now, where_for(now))


def test_drift_keys_are_keys_the_method_reads():
    """A key a method does not read cannot change what its checkpoint means: every method's
    drift_keys lie inside its config_keys (a new method that forgets this refuses resumes
    over settings it ignores)."""
    from gpart_ds import methods

    for name in methods.names():
        cls = methods.get(name)
        assert set(cls.drift_keys) <= cls.config_keys, (name, set(cls.drift_keys) - cls.config_keys)


def test_a_stopped_writers_temporaries_go_once_a_newer_checkpoint_is_published(tmp_path):
    fake_ckpt(tmp_path, 10)
    older, same, newer = (checkpoint.temp_sibling(checkpoint.step_dir(tmp_path, s)) for s in (10, 20, 30))
    for t in (older, same, newer):
        (t / "sub").mkdir(parents=True)
        (t / "sub" / "theta.safetensors").write_bytes(b"x" * 64)
    (tmp_path / ".step-x.tmp").mkdir()  # not a checkpoint temporary: not ours to remove
    assert checkpoint.remove_stale_temporaries(tmp_path, 20) == [older]
    # the temporary of the step being published and of later steps may still be written
    assert not older.exists() and same.is_dir() and newer.is_dir() and (tmp_path / ".step-x.tmp").is_dir()
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-000010"]
    assert checkpoint.remove_stale_temporaries(tmp_path / "absent", 20) == []
