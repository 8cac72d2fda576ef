"""Choice scoring equals a straightforward full-forward reference; eval CLI on a tiny model."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gpart_ds import data, evaluate


@pytest.fixture(scope="module")
def tiny(tiny_assets):
    tok = AutoTokenizer.from_pretrained(tiny_assets / "model")
    model = AutoModelForCausalLM.from_pretrained(tiny_assets / "model", dtype=torch.float32).eval()
    return tok, model


def reference_scores(model, items):
    """One unpadded forward per (item, choice); full-vocabulary log-softmax everywhere."""
    out = []
    for it in items:
        row = []
        for c in it.choices:
            ids = torch.tensor([it.prompt + c])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            row.append(sum(float(logp[len(it.prompt) - 1 + j, t]) for j, t in enumerate(c)))
        out.append(row)
    return out


@pytest.mark.parametrize(
    "choices", [[" cat", " dog"], [" sun moon cat", " fish", " red blue"], [" a b c d e f", " fish", " moon sun", " x"]]
)
def test_choice_scores_equal_reference(tiny, choices):
    tok, model = tiny
    recs = [
        ("x", {"prompt": p, "completion": choices[0], "choices": choices})
        for p in ["Reverse: cat dog\nAnswer:", "Reverse: a\nAnswer:", "Reverse: sun moon fish bird\nAnswer:"]
    ]
    items = evaluate.choice_items(recs, tok, chat_template=False)
    assert all(it.answer == 0 for it in items)
    got = evaluate.score_items(model, items, tok.pad_token_id, "cpu")
    want = reference_scores(model, items)
    torch.testing.assert_close(
        torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64), rtol=1e-4, atol=1e-4
    )


def test_multi_token_choices_read_each_prompt_once_and_score_as_the_reference(tiny):
    # records of different lengths (left padding) and choice counts in one batch, each
    # prompt's cache shared by its choices: the scores are the unpadded one-sequence ones
    tok, model = tiny
    recs = [
        ("x", {"prompt": "Reverse: cat dog\nAnswer:", "completion": " dog cat", "choices": [" dog cat", " cat"]}),
        ("x", {"prompt": "Reverse: a b c d e\nAnswer:", "completion": " e", "choices": [" e d", " e", " a b c"]}),
        ("x", {"prompt": "Answer:", "completion": " x y z", "choices": [" x y z", " q", " r s", " t u v w"]}),
    ]
    items = evaluate.choice_items(recs, tok, chat_template=False)
    forwards, kwargs = [], []
    calls = lambda **b: forwards.append(b["input_ids"].shape) or kwargs.append(set(b)) or model(**b)  # noqa: E731
    got = evaluate.score_items(calls, items, tok.pad_token_id, "cpu")
    assert len(forwards) == 2 and forwards[1][0] == 9  # the prompts, then 9 choice rows
    assert forwards[1][1] == max(len(c) for it in items for c in it.choices)  # choice tokens only
    # the cache goes back by the name this transformers returns it under, not a deprecated one
    out = model(**data.left_padded([items[0].prompt], tok.pad_token_id, "cpu"), use_cache=True)
    returned = "cache" if "cache" in out else "past_key_values"
    assert returned in kwargs[1] and ({"cache", "past_key_values"} - {returned}).isdisjoint(kwargs[1])
    want = reference_scores(model, items)
    assert [len(g) for g in got] == [2, 3, 4]
    flat = lambda rows: torch.tensor([x for r in rows for x in r], dtype=torch.float64)  # noqa: E731
    torch.testing.assert_close(flat(got), flat(want), rtol=1e-4, atol=1e-4)


def test_correct_picks_argmax():
    items = [evaluate.ChoiceItem([1], [[2], [3]], 1), evaluate.ChoiceItem([1], [[2], [3]], 0)]
    assert evaluate.correct([[-3.0, -1.0], [-3.0, -1.0]], items) == [True, False]


def test_evaluate_cli_reports_loss_and_accuracy(tiny_assets, tmp_path, capsys):
    p = tmp_path / "e.jsonl"
    p.write_text(
        "".join(
            json.dumps(
                {"prompt": f"Reverse: cat {w}\nAnswer:", "completion": f" {w} cat", "choices": [f" {w} cat", " dog"]}
            )
            + "\n"
            for w in ["sun", "moon", "red"]
        )
    )
    assert (
        evaluate.main(["--model", str(tiny_assets / "model"), "--data", str(p), "--json", str(tmp_path / "r.json")])
        == 0
    )
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["examples"] == 3 and res["scored"] == 3 and 0 <= res["accuracy"] <= 1 and res["eval_loss"] > 0


def test_eval_loss_matches_model_loss(tiny):
    tok, model = tiny
    exs = [
        data.tokenize_record({"prompt": "Reverse: cat\nAnswer:", "completion": " cat"}, "prompt_completion", tok, 32)
    ]
    s, n = evaluate.loss_sums(lambda **b: model(**b).loss, exs, [0], tok.pad_token_id, "cpu")
    ids = torch.tensor([exs[0].input_ids])
    want = model(input_ids=ids, labels=torch.tensor([exs[0].labels])).loss.item()
    assert n == sum(1 for lab in exs[0].labels[1:] if lab != data.IGNORE_INDEX)
    assert s / n == pytest.approx(want, rel=1e-6)


def test_one_forward_gives_the_loss_and_exact_match_of_the_loss_pass(tiny):
    # When every eval record is prompt + its single-token answer choice (no EOS), the
    # trainer takes loss and exact match from the choice forward: they must equal the
    # separate loss pass (label-position loss and greedy match, lm_loss.objective_forward).
    from gpart_ds.objective import objective_forward

    tok, model = tiny
    words = ["cat", "dog", "sun", "moon", "red"]
    recs = [
        (f"e:{i}", {"prompt": f"Reverse: {w} {v}\nAnswer:", "completion": f" {w}", "choices": [f" {w}", f" {v}"]})
        for i, (w, v) in enumerate(zip(words, words[1:] + words[:1]))
    ]
    assert all(len(tok(f" {w}", add_special_tokens=False)["input_ids"]) == 1 for w in words)
    exs = [data.tokenize_record(r, "prompt_completion", tok, 32, add_eos=False) for _, r in recs]
    items = evaluate.choice_items(recs, tok, chat_template=False)
    assert evaluate.label_is_the_answer_choice(exs, items)
    fwd = lambda **b: objective_forward(model, (), b, label_positions_only=True)  # noqa: E731
    s_ref, n_ref, em_ref = evaluate.loss_and_row_matches(fwd, exs, list(range(len(exs))), tok.pad_token_id, "cpu")
    scores, s, em = evaluate.score_items_with_label(lambda **b: model(**b).logits, items, tok.pad_token_id, "cpu")
    ref = evaluate.score_items(model, items, tok.pad_token_id, "cpu")
    assert sum(scores, []) == pytest.approx(sum(ref, []), abs=1e-6)
    assert n_ref == len(exs) and sorted(em_ref) == list(range(len(exs)))
    assert s == pytest.approx(s_ref, rel=1e-5) and em == [em_ref[i] for i in range(len(exs))]
    # With EOS after the answer (two predicted tokens) the trainer keeps both passes.
    with_eos = [data.tokenize_record(r, "prompt_completion", tok, 32, add_eos=True) for _, r in recs]
    assert not evaluate.label_is_the_answer_choice(with_eos, items)
    assert not evaluate.label_is_the_answer_choice(exs[:-1], items)


def test_paired_test_counts_flips_and_gives_the_exact_binomial_p_value():
    before = [{"record": f"f:{i}", "predicted": 0, "answer": 0 if i < 6 else 1} for i in range(10)]
    after = [dict(p) for p in before]
    for i in (6, 7, 8, 9):  # 4 fixed
        after[i]["predicted"] = 1
    after[0]["predicted"] = 1  # 1 broken
    r = evaluate.paired(before, after)
    assert (r["fixed"], r["broken"], r["records"]) == (4, 1, 10)
    assert r["accuracy_before"] == 0.6 and r["accuracy_after"] == 0.9
    assert r["p_value"] == pytest.approx(2 * (1 + 5) / 32)  # P(X <= 1), X ~ Bin(5, 1/2), two-sided
    assert evaluate.paired(before, before)["p_value"] == 1.0
    with pytest.raises(ValueError, match="different records"):
        evaluate.paired(before, after[:-1])


def test_cli_writes_one_prediction_per_scored_record(tiny_assets, tmp_path, capsys):
    p = tmp_path / "e.jsonl"
    p.write_text(
        "".join(
            json.dumps(
                {"prompt": f"Reverse: cat {w}\nAnswer:", "completion": f" {w} cat", "choices": [f" {w} cat", " dog"]}
            )
            + "\n"
            for w in ["sun", "moon", "red"]
        )
    )
    preds = tmp_path / "p.jsonl"
    assert (
        evaluate.main(
            [
                "--model",
                str(tiny_assets / "model"),
                "--data",
                str(p),
                "--json",
                str(tmp_path / "r.json"),
                "--predictions",
                str(preds),
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    res = json.loads((tmp_path / "r.json").read_text())
    assert [r["record"] for r in rows] == [f"{p}:{i}" for i in (1, 2, 3)]
    assert sum(r["predicted"] == r["answer"] for r in rows) / 3 == res["accuracy"]
    capsys.readouterr()
    assert evaluate.main(["paired", str(preds), str(preds)]) == 0
    assert json.loads(capsys.readouterr().out)["p_value"] == 1.0


def test_paired_cli_names_the_file_and_line_of_a_bad_prediction(tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"record": "f:1", "predicted": 0, "answer": 0}) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"record": "f:1", "predicted": 0, "answer": 0}) + "\n{not json\n")
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"record": "f:1", "predicted": 0}) + "\n")
    assert evaluate.main(["paired", str(good), str(bad)]) == 2
    assert f"{bad}:2: not a JSON object" in capsys.readouterr().err
    assert evaluate.main(["paired", str(good), str(short)]) == 2
    assert f"{short}:1: missing ['answer']" in capsys.readouterr().err
    assert evaluate.main(["paired", str(good), str(tmp_path / "absent.jsonl")]) == 2
    assert "absent.jsonl" in capsys.readouterr().err


def test_paired_judges_exact_match_lines_where_records_have_no_choices(tmp_path, capsys):
    # train.eval_predictions writes {"record", "match"} for generative records and adds
    # predicted/answer where a record has choices: then the choice decides.
    before = [{"record": f"f:{i}", "match": i < 2} for i in range(8)]
    after = [{"record": f"f:{i}", "match": i != 0} for i in range(8)]  # 6 fixed, 1 broken
    r = evaluate.paired(before, after)
    assert (r["fixed"], r["broken"], r["accuracy_after"]) == (6, 1, 7 / 8)
    assert evaluate.record_correct({"record": "x", "match": False, "predicted": 1, "answer": 1})
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(p) + "\n" for p in before))
    b.write_text("".join(json.dumps(p) + "\n" for p in after))
    assert evaluate.main(["paired", str(a), str(b)]) == 0
    assert json.loads(capsys.readouterr().out)["fixed"] == 6
    c = tmp_path / "c.jsonl"
    c.write_text(json.dumps({"record": "f:0"}) + "\n")
    assert evaluate.main(["paired", str(a), str(c)]) == 2
    assert f"{c}:1: missing ['answer', 'predicted']" in capsys.readouterr().err


def test_generative_records_get_one_exact_match_line_each_whatever_the_batching(tiny_assets, tmp_path):
    # Records without choices: one {"record", "index", "match"} line each, in file order,
    # whose mean is the reported exact match. Batches are formed shortest first; a
    # record's verdict does not depend on its batch mates (batch 1 = batch 4).
    p = tmp_path / "g.jsonl"
    words = ["cat", "sun moon fish bird", "a", "red blue", "dog cat dog", "x"]
    p.write_text(
        "".join(
            json.dumps({"prompt": f"Reverse: {w}\nAnswer:", "completion": " " + " ".join(w.split()[::-1])}) + "\n"
            for w in words
        )
    )
    runs = {}
    for bs in (1, 4):
        preds = []
        res = evaluate.evaluate_files(str(tiny_assets / "model"), str(p), batch_size=bs, predictions=preds)
        runs[bs] = (res, preds)
    (res, preds), (res4, preds4) = runs[1], runs[4]
    assert [r["record"] for r in preds] == [f"{p}:{i}" for i in range(1, 7)]
    assert [r["index"] for r in preds] == list(range(6))
    assert all(set(r) == {"record", "index", "match", "generated", "kind", "said", "answer_correct"} for r in preds)
    assert sum(r["match"] for r in preds) / 6 == res["exact_match"]
    assert preds4 == preds and res4["eval_loss"] == pytest.approx(res["eval_loss"], rel=1e-5)


@pytest.mark.parametrize("add_eos", [True, False])
def test_multi_token_answers_take_loss_and_exact_match_from_the_choice_forwards(tiny, add_eos):
    # Each example is its prompt + answer choice (+ EOS): the evaluator then reads loss and
    # exact match off the answer's row of the choice forwards, where it ran a separate loss
    # pass over the whole sequences; the results must be the loss pass's, record for record.
    from gpart_ds.methods import MethodRoot
    from gpart_ds.objective import TrainingModel

    tok, model = tiny
    recs = [
        ("x:1", {"prompt": "Reverse: cat dog\nAnswer:", "completion": " dog cat", "choices": [" dog cat", " cat"]}),
        ("x:2", {"prompt": "Reverse: a b c d e\nAnswer:", "completion": " e", "choices": [" e d", " e", " a b c"]}),
        ("x:3", {"prompt": "Answer:", "completion": " x y z", "choices": [" q", " x y z", " r s", " t u v w"]}),
        ("x:4", {"prompt": "Reverse: sun moon\nAnswer:", "completion": " moon sun", "choices": [" moon sun", " sun"]}),
    ]
    # and one whose answer is what the model says (greedy): exact match true without EOS
    prompt = "Reverse: red fish\nAnswer:"
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        for _ in range(2):
            ids = ids + [int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())]
    said = tok.decode(ids[-2:])
    assert tok(said, add_special_tokens=False)["input_ids"] == ids[-2:]
    recs.append(("x:5", {"prompt": prompt, "completion": said, "choices": [" fish", said]}))
    exs = [data.tokenize_record(r, "prompt_completion", tok, 64, add_eos=add_eos) for _, r in recs]
    items = evaluate.choice_items(recs, tok, chat_template=False)
    tails = evaluate.label_tails(exs, items)
    assert tails == [[tok.eos_token_id] if add_eos else []] * len(recs)
    trained = TrainingModel(MethodRoot(model)).eval()
    results = {}
    for path in ("choice forwards", "loss pass"):
        ev = evaluate.Evaluator(exs, recs, items, tok.pad_token_id)
        if path == "loss pass":
            ev.tails = None
        preds = []
        results[path] = (ev.run(trained, 3, 0, "cpu", preds), preds)
    (got, got_preds), (want, want_preds) = results["choice forwards"], results["loss pass"]
    assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-5)
    assert got["exact_match"] == want["exact_match"] and got["accuracy"] == want["accuracy"]
    assert [p["match"] for p in got_preds] == [p["match"] for p in want_preds]
    assert got_preds[-1]["match"] is (not add_eos)  # the greedy answer, and EOS is never greedy here
    # an example that is not its answer choice (another completion) keeps the loss pass
    other = [data.tokenize_record({**recs[0][1], "completion": " dog"}, "prompt_completion", tok, 64)] + exs[1:]
    assert evaluate.label_tails(other, items) is None
