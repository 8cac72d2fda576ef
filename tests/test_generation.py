"""Generated answers (gpart_ds/generation.py): how each kind of record is judged, and that
the evaluator's batched greedy decoding says what a plain one-prompt-at-a-time generate
loop says, record for record."""

import json

import pytest
import torch

from gpart_ds import data, evaluate, generation


def _q(reference, choices=None):
    return generation.Question("f:1", 0, [1], reference, choices, generation.kind_of(reference, choices))


@pytest.mark.parametrize(
    "answer, said, ok",
    [
        (" positive", 0, True),
        (" Positive\n\nI'm not sure", 0, True),  # case and what follows do not matter
        (" It is negative, not positive", 1, False),  # the choice named first counts
        (" A mix of", None, False),  # no choice named
        (" positively", None, False),  # whole words only
    ],
)
def test_a_choice_record_is_judged_by_the_choice_named_first(answer, said, ok):
    q = _q(" positive", [" positive", " negative"])
    assert q.kind == "choice" and generation.judge(answer, q) == (said, ok)


@pytest.mark.parametrize("choices", [[" heat", " heat energy", " light"], [" heat energy", " heat", " light"]])
def test_of_two_choices_named_at_the_same_place_the_longer_is_what_was_said(choices):
    q = _q(" heat energy", choices)
    assert generation.judge(" Heat energy.", q) == (choices.index(" heat energy"), True)
    assert generation.judge(" heat, then light", q) == (choices.index(" heat"), False)


def test_letter_choices_need_the_letter_as_a_word():
    q = _q(" B", [" A", " B", " C", " D"])
    assert generation.judge(" B", q) == (1, True)
    assert generation.judge(" B. diffusion", q) == (1, True)
    assert generation.judge(" Because", q) == (None, False)


@pytest.mark.parametrize(
    "answer, ok",
    [
        (" 109", True),
        (" 109\n", True),
        ("The answer is 109.", True),
        (" 1,09", True),
        (" -109", False),
        (" 108", False),
        (" none", False),
    ],
)
def test_a_numeric_record_is_judged_by_the_first_number(answer, ok):
    q = _q(" 109")
    assert q.kind == "number" and generation.judge(answer, q)[1] is ok
    assert generation.judge(" -64", _q(" -64"))[1] and not generation.judge(" 64", _q(" -64"))[1]


def test_a_text_record_is_judged_exactly_after_normalising_case_and_spacing():
    q = _q(" moon sun cat")
    assert q.kind == "text"
    assert generation.judge("Moon  sun\ncat ", q)[1] and not generation.judge(" moon sun", q)[1]
    assert not generation.judge(" moon sun cat dog", q)[1]


def test_questions_render_prompts_as_training_and_skip_records_without_an_answer(tiny_assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_assets / "model")
    records = [
        ("f:1", {"prompt": "Reverse: cat dog\nAnswer:", "completion": " dog cat"}),
        ("f:2", {"text": "no answer here"}),
    ]
    qs = generation.questions(records, tok, chat_template=False)
    assert [(q.where, q.index, q.kind) for q in qs] == [("f:1", 0, "text")]
    assert qs[0].prompt == data.prompt_ids(tok, "Reverse: cat dog\nAnswer:", False)
    assert (
        generation.max_new_tokens(qs, tok)
        == len(tok(" dog cat", add_special_tokens=False)["input_ids"]) + 1 + generation.EXTRA_TOKENS
    )


def _plain_loop(model, tok, prompts, new_tokens, eos):
    """One prompt at a time, no padding: what a server does for each request."""
    out = []
    for p in prompts:
        ids = model.generate(
            input_ids=torch.tensor([p]),
            attention_mask=torch.ones(1, len(p), dtype=torch.long),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=tok.pad_token_id,
        )[0, len(p) :].tolist()
        cut = next((j for j, t in enumerate(ids) if t in eos), len(ids))
        out.append(tok.decode(ids[:cut], skip_special_tokens=True))
    return out


def test_the_evaluators_answers_equal_a_plain_generate_loop_record_for_record(tiny_assets, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = [json.loads(line) for line in (tiny_assets / "data" / "eval.jsonl").read_text().splitlines()[:24]]
    p = tmp_path / "e.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in src))
    preds = []
    res = evaluate.evaluate_files(str(tiny_assets / "model"), str(p), batch_size=5, predictions=preds)
    tok = AutoTokenizer.from_pretrained(tiny_assets / "model")
    model = AutoModelForCausalLM.from_pretrained(tiny_assets / "model", dtype=torch.float32).eval()
    qs = generation.questions(data.load(p)[0], tok, False)
    want = _plain_loop(
        model, tok, [q.prompt for q in qs], generation.max_new_tokens(qs, tok), generation.stop_ids(model, tok)
    )
    assert [r["generated"] for r in preds] == want
    assert all(len(w) > 0 for w in want)  # it did generate
    assert res["answer_accuracy"] == sum(r["answer_correct"] for r in preds) / len(preds)


def test_generation_can_be_left_out_and_paired_uses_the_answers(tiny_assets, tmp_path):
    p = tiny_assets / "data" / "eval.jsonl"
    with_answers, scored_only = [], []
    evaluate.evaluate_files(str(tiny_assets / "model"), str(p), max_examples=6, predictions=with_answers)
    res = evaluate.evaluate_files(
        str(tiny_assets / "model"), str(p), max_examples=6, predictions=scored_only, generate=False
    )
    assert "answer_accuracy" not in res and all("generated" not in r for r in scored_only)
    assert evaluate.common_verdict(with_answers, with_answers) == "answer"
    assert evaluate.common_verdict(with_answers, scored_only) == "match"  # what both files have
    flipped = [dict(r, answer_correct=not r["answer_correct"]) for r in with_answers]
    r = evaluate.paired(with_answers, flipped)
    assert r["verdict"] == "answer" and r["fixed"] + r["broken"] == 6
    assert evaluate.paired(with_answers, flipped, verdict="match")["p_value"] == 1.0


def test_the_summary_table_leads_with_the_generated_answer_and_a_fall_is_named():
    from gpart_ds.metrics import answer_fell, summary_table

    s = {
        "eval_loss_before": 5.9,
        "eval_loss_after": 11.0,
        "accuracy_before": 0.773,
        "accuracy_after": 0.82,
        "exact_match_before": 0.03,
        "exact_match_after": 0.0,
        "answer_accuracy_before": 0.217,
        "answer_accuracy_after": 0.0,
        "method": "gpart",
        "trainable_params": 65536,
        "adapter_bytes": 1024,
        "world": 2,
        "steps": 30,
        "lr": 0.03,
        "median_step_time_s": 6.8,
        "wall_s": 276,
        "peak_rss_gb": 3.1,
    }
    rows = [line for line in summary_table(s, None).splitlines() if line.startswith("| ") and "%" in line]
    assert rows[0].startswith("| generated answer") and "21.7%" in rows[0] and "0.0%" in rows[0]
    assert answer_fell(s) == "the generated answers' accuracy fell from 21.7% to 0.0%"
    assert answer_fell({**s, "answer_accuracy_after": 0.8}) is None
    assert answer_fell({**s, "answer_accuracy_before": None}) is None  # resumed from an older run


def test_a_summary_without_an_evaluation_before_training_shows_dashes_and_says_why():
    from gpart_ds.metrics import answer_fell, summary_table

    s = {
        "eval_loss_before": None,
        "eval_loss_after": 5.0,
        "accuracy_before": None,
        "accuracy_after": 0.8,
        "exact_match_before": None,
        "exact_match_after": 0.5,
        "answer_accuracy_before": None,
        "answer_accuracy_after": 0.1,
        "method": "gpart",
        "trainable_params": 8,
        "adapter_bytes": 1024,
        "world": 1,
        "steps": 30,
        "lr": 0.03,
        "median_step_time_s": 1.0,
        "wall_s": 60,
        "peak_rss_gb": 3.1,
    }
    text = summary_table(s, None)  # train.eval_before=false: every *_before is null
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in text.splitlines() if line.startswith("| ")}
    assert rows["eval loss (completion tokens)"] == ["-", "5.0000 |"]
    assert rows["generated answer (greedy, as served)"] == ["-", "10.0% |"]
    assert "before: not evaluated (train.eval_before=false)" in text
    assert "not evaluated" not in summary_table({**s, "eval_loss_before": 5.9}, None)
    assert answer_fell(s) is None


def test_the_summary_says_so_when_no_step_was_timed_instead_of_a_zero_step_time():
    from gpart_ds.metrics import summary_table

    s = {
        "eval_loss_before": 5.9,
        "eval_loss_after": 5.0,
        "accuracy_before": 0.7,
        "accuracy_after": 0.8,
        "method": "gpart",
        "trainable_params": 8,
        "adapter_bytes": 1024,
        "world": 1,
        "steps": 30,
        "lr": 0.03,
        "median_step_time_s": 0.0,
        "wall_s": 60,
        "peak_rss_gb": 3.1,
    }
    assert "median step: - (no step this run)" in summary_table(s, None)
    assert "median step: 6.80 s" in summary_table({**s, "median_step_time_s": 6.8}, None)


@pytest.mark.parametrize(
    "answer, ok",
    [
        (" The Eiffel Tower.", True),
        ("eiffel  tower", True),
        (" July 1899", True),
        (" 1899", True),
        (" Tower", False),
        (" the Eiffel Tower in Paris", False),
    ],
)
def test_a_free_form_answer_is_right_when_it_is_any_accepted_span_after_squad_normalisation(answer, ok):
    q = generation.Question("f:1", 0, [1], " Eiffel Tower", None, "text", (" Eiffel Tower", " July 1899", " 1899"))
    assert generation.judge(answer, q)[1] is ok


def test_records_with_accepted_answers_are_text_and_a_bad_answers_field_names_the_record(tiny_assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_assets / "model")
    rec = {"prompt": "When?\nAnswer:", "completion": " 1899", "answers": [" 1899", " July 1899"]}
    (q,) = generation.questions([("f:3", rec)], tok, chat_template=False)
    assert q.kind == "text" and q.answers == (" 1899", " July 1899")  # not "number": "July 1899" is right too
    assert (
        generation.max_new_tokens([q], tok)
        == len(tok(" July 1899", add_special_tokens=False)["input_ids"]) + 1 + generation.EXTRA_TOKENS
    )
    with pytest.raises(data.DataError, match="f:4: 'answers' must be"):
        generation.questions([("f:4", {**rec, "answers": " 1899"})], tok, chat_template=False)
