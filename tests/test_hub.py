"""Hub-style model names already in the Hugging Face cache load like local folders, offline."""

import json
import shutil

import pytest

from gpart_ds import evaluate, hub
from gpart_ds.config import ConfigError, load_config
from gpart_ds.export import cli as export_cli
from tests.export_helpers import make_adapter


@pytest.fixture
def hf_cache(tmp_path, tiny_assets, monkeypatch):
    """The tiny model laid out as the hub cache stores a download of acme/tiny-llama."""
    cache = tmp_path / "hf" / "hub"
    root = cache / "models--acme--tiny-llama"
    snap = root / "snapshots" / "0123abcd"
    shutil.copytree(tiny_assets / "model", snap)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return snap


def test_names_resolve_to_the_cached_snapshot_and_nothing_else(hf_cache, tiny_assets):
    assert hub.resolve("acme/tiny-llama") == str(hf_cache)
    assert hub.resolve("acme/tiny-llama@0123abcd") == str(hf_cache)  # a pinned revision
    assert hub.resolve("acme/tiny-llama@feedbeef") == "acme/tiny-llama@feedbeef"  # not cached
    assert hub.resolve("acme/other") == "acme/other"
    assert hub.resolve(str(tiny_assets / "model")) == str(tiny_assets / "model")  # folders win
    assert hub.display_name(hf_cache) == "acme/tiny-llama"
    assert hub.display_name(tiny_assets / "model") == "model"


def test_config_model_path_takes_a_cached_name(hf_cache, tiny_assets):
    cfg = load_config("configs/tiny.yaml", ["model.path=acme/tiny-llama"])
    assert cfg.model.path == str(hf_cache)


def test_a_name_not_in_the_cache_says_where_it_looked(hf_cache):
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", ["model.path=acme/missing"])
    msg = str(err.value)
    assert "model.path" in msg and "acme/missing" in msg and str(hf_cache.parents[2]) in msg
    assert "nothing is downloaded" in msg


def test_evaluate_and_export_clis_take_a_cached_name(hf_cache, tiny_assets, tmp_path):
    data = tiny_assets / "data" / "eval.jsonl"
    by_name = evaluate.evaluate_files("acme/tiny-llama", data, max_examples=4)
    by_dir = evaluate.evaluate_files(str(tiny_assets / "model"), data, max_examples=4)
    assert by_name["eval_loss"] == by_dir["eval_loss"]
    make_adapter(tmp_path / "adapter", tiny_assets / "model", d=512, seed=3)
    assert (
        export_cli.main(
            ["--base", "acme/tiny-llama", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]
        )
        == 0
    )
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["num_hidden_layers"] == 2
    assert (
        export_cli.main(
            [
                "verify",
                "--merged",
                str(tmp_path / "merged"),
                "--base",
                "acme/tiny-llama",
                "--adapter",
                str(tmp_path / "adapter"),
            ]
        )
        == 0
    )
