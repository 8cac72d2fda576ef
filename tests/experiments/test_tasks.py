"""The bundled task recipes: deterministic, disjoint splits in the trainer's formats."""

import pytest

from experiments import tasks
from gpart_ds import data


def _lines(p):
    return p.read_text().splitlines()


def test_rotten_tomatoes_is_deterministic_balanced_and_scorable(tmp_path):
    tasks.build_rotten_tomatoes(tmp_path / "a", n_eval=200)
    tasks.build_rotten_tomatoes(tmp_path / "b", n_eval=200)
    assert _lines(tmp_path / "a" / "eval.jsonl") == _lines(tmp_path / "b" / "eval.jsonl")
    train, evals = _lines(tmp_path / "a" / "train.jsonl"), _lines(tmp_path / "a" / "eval.jsonl")
    assert len(evals) == 200 and not set(train) & set(evals)
    records, fmt = data.load(tmp_path / "a" / "eval.jsonl")
    assert fmt == "prompt_completion"
    labels = [r["completion"] for _, r in records]
    assert 0.35 < labels.count(" negative") / len(labels) < 0.65
    assert all(r["prompt"].startswith("Review: ") and r["prompt"].endswith("\nSentiment:") for _, r in records)


def test_chatterbot_pairs_become_prompt_completion(tmp_path):
    tasks.build_chatterbot(tmp_path, n_eval=50)
    records, fmt = data.load(tmp_path / "train.jsonl")
    assert fmt == "prompt_completion" and len(records) > 1000
    r = records[0][1]
    assert r["prompt"].startswith("Question: ") and r["completion"].startswith(" ")


def test_missing_asset_package_says_how_to_install():
    with pytest.raises(FileNotFoundError, match="pip install --no-deps nope==1"):
        tasks.package_dir("no_such_package_here", "nope==1")


@pytest.mark.slow
def test_qasc_from_bigbench(tmp_path):
    """Downloads the BIG-bench sdist once (358 MB, cached in ~/.cache/gpart_ds)."""
    tasks.build_qasc(tmp_path, n_eval=100, n_train=500)
    records, fmt = data.load(tmp_path / "eval.jsonl")
    assert fmt == "prompt_completion" and len(records) == 100
    assert "Question:" in records[0][1]["prompt"]
    assert "canary" in (tmp_path / "CANARY").read_text()
    assert len(_lines(tmp_path / "train.jsonl")) == 500
