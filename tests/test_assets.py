"""`prepare:` recipes run only for the files a run reads."""

import pytest

from gpart_ds import assets
from gpart_ds.config import ConfigError, load_config


@pytest.fixture
def recorded(tmp_path, monkeypatch):
    built = []

    def recipe(name):
        def build(root):
            built.append(name)
            (root / "x").write_text(name)

        return build

    monkeypatch.setattr(
        assets, "RECIPES", {"model": (recipe("model"), tmp_path / "m"), "data": (recipe("data"), tmp_path / "d")}
    )
    return built, tmp_path


def _cfg(tmp_path, model, train, eval_):
    return load_config(
        "configs/tiny.yaml",
        [
            f"model.path={model}",
            f"data.train={train}",
            f"data.eval={eval_}",
            "prepare=[model,data]",
            f"output_dir={tmp_path / 'out'}",
        ],
        check_files=False,
    )


def test_recipes_run_for_the_paths_the_config_uses(recorded):
    built, tmp = recorded
    assets.prepare(_cfg(tmp, tmp / "m", tmp / "d" / "train.jsonl", tmp / "d" / "eval.jsonl"))
    assert built == ["model", "data"] and (tmp / "m" / ".complete").is_file()
    assets.prepare(_cfg(tmp, tmp / "m", tmp / "d" / "train.jsonl", tmp / "d" / "eval.jsonl"))
    assert built == ["model", "data"], "a complete recipe ran again"


def test_a_run_on_the_users_own_model_does_not_build_the_bundled_one(recorded):
    built, tmp = recorded
    used = assets.prepare(_cfg(tmp, tmp / "mine", tmp / "d" / "train.jsonl", tmp / "own.jsonl"))
    assert used == ["data"] and built == ["data"] and not (tmp / "m").exists()


def test_an_unknown_recipe_is_named(tmp_path):
    cfg = load_config("configs/tiny.yaml", ["prepare=[tiny,nope]", f"output_dir={tmp_path}"], check_files=False)
    with pytest.raises(ConfigError, match="unknown asset recipe 'nope'"):
        assets.prepare(cfg)
