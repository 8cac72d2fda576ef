"""The SLURM job's fail-fast checks, run in-process (no cluster needed)."""

from gpart_ds import preflight


def _run(tmp_path, *args, out=None):
    return preflight.main(
        [
            "--config",
            "configs/tiny.yaml",
            "--tag",
            "t",
            "--wait-s",
            "0.5",
            *args,
            f"output_dir={out or tmp_path / 'out'}",
        ]
    )


def test_a_healthy_cpu_node_passes_and_leaves_its_probe(tmp_path, tiny_assets, capsys):
    assert _run(tmp_path, "--nodes", "1", "--tasks-per-node", "2", "--device", "cpu") == 0
    assert "preflight ok" in capsys.readouterr().out
    assert len(list((tmp_path / "out" / ".preflight" / "t").iterdir())) == 1


def test_an_output_folder_other_nodes_cannot_see_is_refused(tmp_path, tiny_assets, capsys):
    # Two nodes expected, only this one's probe ever appears: not a shared file system.
    assert _run(tmp_path, "--nodes", "2", "--tasks-per-node", "2", "--device", "cpu") == 3
    assert "is not shared" in capsys.readouterr().err


def test_missing_gpus_are_refused_before_any_rank_starts(tmp_path, tiny_assets, capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert _run(tmp_path, "--nodes", "1", "--tasks-per-node", "8", "--device", "cuda") == 3
    assert "CUDA device(s) visible, 8 ranks per node need 8" in capsys.readouterr().err


def test_a_bad_config_fails_with_the_key_named(tmp_path, tiny_assets, capsys):
    assert _run(tmp_path, "--nodes", "1", "--tasks-per-node", "2", "--device", "cpu", "method.d=0") == 2
    assert "method.d" in capsys.readouterr().err


def test_files_a_prepare_recipe_creates_wait_for_it_but_the_users_own_are_checked(
    tmp_path, tiny_assets, capsys, monkeypatch
):
    from gpart_ds import assets

    # the recipe's folder does not exist yet (a fresh machine): nothing under it is checked
    fresh = tmp_path / "fresh"
    monkeypatch.setitem(assets.RECIPES, "tiny", (assets.RECIPES["tiny"][0], fresh))
    paths = [f"model.path={fresh}/model", f"data.train={fresh}/data/train.jsonl", f"data.eval={fresh}/data/eval.jsonl"]
    node = ["--nodes", "1", "--tasks-per-node", "2", "--device", "cpu", "prepare=[tiny]"]
    assert _run(tmp_path, *node, *paths) == 0, capsys.readouterr().err
    # a file of the user's own beside the recipe's is checked now, not once the ranks start
    own = tmp_path / "mine.jsonl"
    assert _run(tmp_path, *node, *paths[:2], f"data.eval={own}") == 2
    assert f"data.eval': data file '{own}' not found" in capsys.readouterr().err
