"""The bundled task recipes: deterministic, disjoint splits in the trainer's formats."""

import json

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


def _fake_bigbench(tmp_path, subtasks, per=40):
    """A BIG-bench sdist holding only arithmetic task.json files (the real one is 358 MB)."""
    import io
    import tarfile

    sdist = tmp_path / "dl" / tasks.BIGBENCH_SDIST
    sdist.parent.mkdir(parents=True)
    ops = {"addition": ("plus", lambda a, b: a + b), "subtraction": ("minus", lambda a, b: a - b),
           "multiplication": ("times", lambda a, b: a * b)}
    with tarfile.open(sdist, "w:gz") as tar:
        for i, sub in enumerate(subtasks):
            word, f = ops[sub.split("_")[-1]]
            exs = [{"input": f"What is {a} {word} {a + i + 1}?", "target": str(f(a, a + i + 1))} for a in range(per)]
            exs.append(dict(exs[0]))              # BIG-bench repeats some questions
            blob = json.dumps({"canary": "canary GUID test", "examples": exs}).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/arithmetic/{sub}/task.json")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return sdist.parent


def test_arithmetic_recipe_mixes_subtasks_into_disjoint_exact_answer_records(tmp_path):
    subs = ("2_digit_addition", "2_digit_subtraction", "1_digit_multiplication")
    dl = _fake_bigbench(tmp_path, subs)
    tasks.build_arithmetic(tmp_path / "a", n_eval=30, download_dir=dl, subtasks=subs)
    tasks.build_arithmetic(tmp_path / "b", n_eval=30, download_dir=dl, subtasks=subs)
    assert _lines(tmp_path / "a" / "eval.jsonl") == _lines(tmp_path / "b" / "eval.jsonl")   # seeded split
    train, evals = _lines(tmp_path / "a" / "train.jsonl"), _lines(tmp_path / "a" / "eval.jsonl")
    assert len(evals) == 30 and len(train) == 3 * 40 - 30          # the repeated question kept once
    prompts = lambda lines: {json.loads(x)["prompt"] for x in lines}  # noqa: E731
    assert not prompts(train) & prompts(evals)
    records, fmt = data.load(tmp_path / "a" / "eval.jsonl")
    assert fmt == "prompt_completion"
    for _, r in records:                                           # the answer is the arithmetic
        a, op, b = r["prompt"].removeprefix("Question: What is ").removesuffix("?\nAnswer:").split()
        want = {"plus": int(a) + int(b), "minus": int(a) - int(b), "times": int(a) * int(b)}[op]
        assert r["completion"] == f" {want}"
    assert {r["prompt"].split()[4] for _, r in records} == {"plus", "minus", "times"}   # mixed before the split
    assert "canary" in (tmp_path / "a" / "CANARY").read_text()


def test_arithmetic_recipe_refuses_an_unexpected_question_or_a_missing_subtask(tmp_path):
    with pytest.raises(ValueError, match="unexpected arithmetic question"):
        tasks.arithmetic_record({"input": "Compute 2 plus 2", "target": "4"})
    dl = _fake_bigbench(tmp_path, ("2_digit_addition",))
    with pytest.raises(FileNotFoundError, match="3_digit_addition"):
        tasks.build_arithmetic(tmp_path / "x", n_eval=5, download_dir=dl,
                               subtasks=("2_digit_addition", "3_digit_addition"))


@pytest.mark.slow
def test_arithmetic_from_bigbench():
    """The real recipe on the cached sdist: 4,300 questions, 500 held out."""
    import tempfile
    from pathlib import Path

    if not (tasks.DOWNLOADS / tasks.BIGBENCH_SDIST).is_file():
        pytest.skip("the BIG-bench sdist is not downloaded here (test_qasc_from_bigbench downloads it)")
    with tempfile.TemporaryDirectory() as d:
        tasks.build_arithmetic(Path(d))
        assert len(_lines(Path(d) / "eval.jsonl")) == 500 and len(_lines(Path(d) / "train.jsonl")) == 3800
