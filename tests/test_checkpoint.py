"""Checkpoint verification and fallback, without running training."""
import json
import logging

import pytest

from gpart_ds import checkpoint


def fake_ckpt(root, step, payload=b"theta"):
    d = checkpoint.step_dir(root, step)
    d.mkdir(parents=True)
    (d / "state.safetensors").write_bytes(payload * 100)
    (d / "state.json").write_text(json.dumps({"step": step}))
    files = {p.name: {"bytes": p.stat().st_size, "sha256": checkpoint._sha256(p)} for p in d.iterdir()}
    (d / checkpoint.MANIFEST).write_text(json.dumps({"step": step, "files": files}))
    return d


def test_newest_verified_checkpoint_wins(tmp_path):
    fake_ckpt(tmp_path, 2)
    fake_ckpt(tmp_path, 4)
    (tmp_path / ".step-000006.tmp").mkdir()  # an interrupted write is never a candidate
    assert checkpoint.find_resume(tmp_path).name == "step-000004"


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest", "missing"])
def test_damaged_newest_checkpoint_falls_back_and_says_so(tmp_path, caplog, damage):
    fake_ckpt(tmp_path, 2)
    bad = fake_ckpt(tmp_path, 4)
    f = bad / "state.safetensors"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:-10])
    elif damage == "flip":
        data = bytearray(f.read_bytes())
        data[7] ^= 0x01
        f.write_bytes(bytes(data))
    elif damage == "manifest":
        (bad / checkpoint.MANIFEST).unlink()
    else:
        f.unlink()
    with caplog.at_level(logging.WARNING):
        assert checkpoint.find_resume(tmp_path).name == "step-000002"
    assert "skipping checkpoint step-000004" in caplog.text


def test_no_checkpoint_means_fresh_start(tmp_path):
    assert checkpoint.find_resume(tmp_path / "none") is None


def test_drift_check_names_the_key(tiny_assets, tmp_path):
    from omegaconf import OmegaConf

    from gpart_ds.config import load_config, where_for

    cfg = load_config("tiny", [f"output_dir={tmp_path}", "method.d=2048"])
    saved = OmegaConf.to_container(load_config("tiny", [f"output_dir={tmp_path}"]), resolve=True)
    with pytest.raises(checkpoint.CheckpointError, match=r"'method\.d'.*trained with method\.d=4096"):
        checkpoint.check_drift(saved, cfg, where_for(cfg))
    same = load_config("tiny", [f"output_dir={tmp_path}", "train.max_steps=99", "data.eval=" + cfg.data.eval])
    checkpoint.check_drift(saved, same, where_for(same))  # safe changes pass
