"""Prompt/completion data: errors with file and line, exact loss masks, batch order."""

import json

import pytest
from transformers import AutoTokenizer

from gpart_ds import data


@pytest.fixture(scope="module")
def tok(tiny_assets):
    return AutoTokenizer.from_pretrained(tiny_assets / "model")


def write(tmp_path, lines):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.mark.parametrize(
    "line,msg",
    [
        ('{"prompt": "a", ', "not valid JSON"),
        ('["prompt", "completion"]', "expected a JSON object, got list"),
        ('{"prompt": "a"}', "missing key 'completion'"),
        ('{"prompt": "a", "completion": 3}', "'completion' must be a string, got int"),
    ],
)
def test_malformed_record_names_file_and_line(tmp_path, line, msg):
    p = write(tmp_path, ['{"prompt": "x", "completion": "y"}', "", line])
    with pytest.raises(data.DataError, match=rf"d\.jsonl:3: {msg}"):
        data.load(p)


def test_empty_file_is_an_error(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n\n")
    with pytest.raises(data.DataError, match="empty.jsonl: no records"):
        data.load(p)


def test_loss_mask_covers_completion_and_eos_only(tok):
    rec = {"prompt": "Reverse: cat dog\nAnswer:", "completion": " dog cat"}
    ex = data.tokenize_record(rec, "prompt_completion", tok, max_length=64)
    p = tok(rec["prompt"])["input_ids"]
    c = tok(rec["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex.input_ids == p + c
    assert ex.labels == [data.IGNORE_INDEX] * len(p) + c


def _long_and_short(tok, choices=False):
    recs = [
        {"prompt": "Reverse: cat dog\nAnswer:", "completion": " dog cat"},
        {"prompt": "Reverse: " + "cat " * 50 + "\nAnswer:", "completion": " dog"},
        {"prompt": "Reverse: dog\nAnswer:", "completion": " dog"},
    ]
    if choices:
        for r in recs:
            r["choices"] = [r["completion"], " fish"]
    return [
        (
            f"d.jsonl:{i + 1}",
            data.tokenize_record(
                r, "prompt_completion", tok, 16, where=f"d.jsonl:{i + 1}", choice_loss=choices, add_eos=not choices
            ),
        )
        for i, r in enumerate(recs)
    ]


def test_over_long_records_stop_the_run_by_default_naming_the_first_and_the_count(tok):
    with pytest.raises(
        data.DataError,
        match=r"d\.jsonl:2: 1 of 3 records in d\.jsonl are longer than "
        r"data\.max_length=16.*data\.too_long=skip",
    ):
        data.limit_lengths(_long_and_short(tok), 16, "error", "d.jsonl")


def test_over_long_records_can_be_skipped(tok):
    exs, dropped = data.limit_lengths(_long_and_short(tok), 16, "skip", "d.jsonl")
    assert dropped == 1 and len(exs) == 2 and all(len(e.input_ids) <= 16 for e in exs)


@pytest.mark.parametrize("choices", [False, True])
def test_truncate_left_keeps_the_completion_and_moves_the_decision(tok, choices):
    full = _long_and_short(tok, choices)
    exs, dropped = data.limit_lengths(full, 16, "truncate_left", "d.jsonl")
    assert dropped == 0 and len(exs) == 3
    long_full, long_cut = full[1][1], exs[1]
    assert long_cut.input_ids == long_full.input_ids[-16:]
    # every label of the completion survives; the window's first token is never predicted
    assert [x for x in long_cut.labels if x != -100] == [x for x in long_full.labels if x != -100]
    assert long_cut.labels[0] == -100
    if choices:
        cut = len(long_full.input_ids) - 16
        assert long_cut.choices == [[long_full.choices[0][0] - cut] + long_full.choices[0][1:]]
        assert long_cut.input_ids[long_cut.choices[0][0]] == long_full.choices[0][1]


def test_collate_pads_without_loss(tok):
    exs = [data.Example([1, 2, 3], [-100, 2, 3]), data.Example([4], [4])]
    b = data.collate(exs, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert b["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_global_batch_is_the_same_for_any_world_size():
    n, mb, steps = 37, 3, 5
    one = data.GlobalBatchOrder(n, mb, grad_accum=4, world=1, seed=7)
    two = data.GlobalBatchOrder(n, mb, grad_accum=2, world=2, seed=7)
    four = data.GlobalBatchOrder(n, mb, grad_accum=1, world=4, seed=7)
    for s in range(steps):
        a = sorted(i for k in range(4) for i in one.indices(s, k, 0))
        b = sorted(i for k in range(2) for r in range(2) for i in two.indices(s, k, r))
        c = sorted(i for r in range(4) for i in four.indices(s, 0, r))
        assert a == b == c


def test_every_record_seen_once_per_epoch():
    order = data.GlobalBatchOrder(24, 2, grad_accum=3, world=2, seed=1)
    seen = [i for s in range(2) for k in range(3) for r in range(2) for i in order.indices(s, k, r)]
    assert sorted(seen) == list(range(24))
    assert order.epoch_of(2) == 1.0


def test_shard_evenly_gives_every_rank_the_same_count():
    n, mb, world = 10, 3, 3
    per_rank = [list(data.shard_evenly(n, mb, world, r)) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1
    flat = sorted(i for b in per_rank for idx in b for i in idx)
    assert flat == list(range(n))


# ---------------------------------------------------------------- formats and files
RECS = [{"prompt": f"Reverse: cat dog {i}\nAnswer:", "completion": " dog cat"} for i in range(5)]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_jsonl_csv_and_parquet_read_the_same_records(tmp_path, suffix):
    import pandas as pd

    p = tmp_path / f"d{suffix}"
    if suffix == ".jsonl":
        p.write_text("".join(json.dumps(r) + "\n" for r in RECS))
    elif suffix == ".csv":
        pd.DataFrame(RECS).to_csv(p, index=False)
    else:
        pd.DataFrame(RECS).to_parquet(p)
    records, fmt = data.load(p)
    assert fmt == "prompt_completion"
    assert [r for _, r in records] == RECS


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_byte_order_mark_at_the_start_is_not_part_of_the_first_record(tmp_path, suffix):
    # what Windows editors and spreadsheet exports write first; json.loads refused line 1
    import pandas as pd

    p = tmp_path / f"d{suffix}"
    if suffix == ".jsonl":
        p.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in RECS).encode())
    else:
        pd.DataFrame(RECS).to_csv(p, index=False, encoding="utf-8-sig")
    assert p.read_bytes().startswith(b"\xef\xbb\xbf")
    assert [r for _, r in data.load(p)[0]] == RECS
    # only at the start: one inside the file is a character of that line, refused as such
    if suffix == ".jsonl":
        p.write_bytes(p.read_bytes() + b"\xef\xbb\xbf" + json.dumps(RECS[0]).encode() + b"\n")
        with pytest.raises(data.DataError, match=rf"{p.name}:6: not valid JSON"):
            data.load(p)


def test_csv_row_errors_name_the_line(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("prompt,completion\nhello,world\nbye,\n")
    with pytest.raises(data.DataError, match=r"d\.csv line 3: 'completion' must be a string, got NoneType"):
        data.load(p)


def test_unknown_file_type_and_format_are_errors(tmp_path):
    p = tmp_path / "d.txt"
    p.write_text("x")
    with pytest.raises(data.DataError, match="unknown data file type '.txt'"):
        data.load(p)
    q = tmp_path / "d.jsonl"
    q.write_text('{"question": "a"}\n')
    with pytest.raises(data.DataError, match=r"d\.jsonl:1: cannot tell the record format"):
        data.load(q)


def test_choices_must_contain_the_completion(tmp_path):
    p = write(tmp_path, ['{"prompt": "a", "completion": " x", "choices": [" y", " z"]}'])
    with pytest.raises(data.DataError, match="d.jsonl:1: 'completion' must be one of 'choices'"):
        data.load(p)


def test_text_format_trains_on_every_token_but_the_first(tok):
    (ex,) = [data.tokenize_record({"text": "cat dog sun"}, "text", tok, 64)]
    assert ex.input_ids[-1] == tok.eos_token_id
    assert ex.labels == [data.IGNORE_INDEX] + ex.input_ids[1:]


CHATML = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


@pytest.fixture
def chat_tok(tiny_assets):
    t = AutoTokenizer.from_pretrained(tiny_assets / "model")
    t.chat_template = CHATML
    return t


def test_chat_loss_covers_assistant_turns_only(chat_tok):
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "cat dog"},
        {"role": "assistant", "content": "dog cat"},
        {"role": "user", "content": "sun moon"},
        {"role": "assistant", "content": "moon sun"},
    ]
    ex = data.tokenize_record({"messages": msgs}, "chat", chat_tok, 512)

    def render(m, gen=False):
        return chat_tok.apply_chat_template(m, add_generation_prompt=gen, tokenize=True, return_dict=False)

    want = [data.IGNORE_INDEX] * len(ex.input_ids)
    for i in (2, 4):
        a, b = len(render(msgs[:i], gen=True)), len(render(msgs[: i + 1]))
        want[a:b] = ex.input_ids[a:b]
    assert ex.labels == want
    learned = chat_tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != data.IGNORE_INDEX])
    assert "dog cat" in learned and "moon sun" in learned
    assert "cat dog" not in learned and "be brief" not in learned and "sun moon" not in learned


def test_chat_records_are_validated(tmp_path):
    p = write(tmp_path, ['{"messages": [{"role": "user", "content": "hi"}]}'])
    with pytest.raises(data.DataError, match="d.jsonl:1: no assistant message"):
        data.load(p)
    p = write(tmp_path, ['{"messages": [{"role": "user"}]}'])
    with pytest.raises(data.DataError, match=r"messages\[0\] must be"):
        data.load(p)


# ---------------------------------------------------------------- packing
def test_packing_keeps_examples_apart(tok, tiny_assets):
    """Logits of each example inside a packed row equal its logits alone."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_assets / "model", dtype=torch.float32).eval()
    recs = [
        {"prompt": "Reverse: cat dog sun\nAnswer:", "completion": " sun dog cat"},
        {"prompt": "Reverse: fish\nAnswer:", "completion": " fish"},
        {"prompt": "Reverse: red blue green tree\nAnswer:", "completion": " tree green blue red"},
    ]
    exs = [data.tokenize_record(r, "prompt_completion", tok, 64) for r in recs]
    packed = data.pack(exs, max_length=64)
    assert len(packed) == 1 and packed[0].input_ids == sum((e.input_ids for e in exs), [])
    batch = data.collate(packed + [data.Example([5, 6], [-100, 6], [0, 1])], pad_id=0)
    assert "attention_mask" not in batch
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        at = 0
        for e in exs:
            alone = model(input_ids=torch.tensor([e.input_ids])).logits[0]
            torch.testing.assert_close(logits[at : at + len(e.input_ids)], alone, rtol=1e-4, atol=1e-4)
            at += len(e.input_ids)


def test_pack_respects_max_length_and_order():
    exs = [data.Example([i] * n, [i] * n) for i, n in enumerate([3, 4, 2, 5, 1])]
    packed = data.pack(exs, max_length=6)
    assert [len(p.input_ids) for p in packed] == [3, 6, 6]
    assert packed[1].position_ids == [0, 1, 2, 3, 0, 1]
    assert sum((p.input_ids for p in packed), []) == sum((e.input_ids for e in exs), [])


# ---------------------------------------------------------------- the shared cache
def test_tokenized_cache_is_built_once_and_keyed_by_content(tmp_path, tok, tiny_assets):
    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in RECS))
    cache = tmp_path / "cache"
    a = data.tokenized(src, tok, tiny_assets / "model", max_length=32, cache_dir=cache)
    built = sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))
    assert len(built) == 1 and len(a) == 5
    stamp = (cache / built[0] / "meta.json").stat().st_mtime_ns
    b = data.tokenized(src, tok, tiny_assets / "model", max_length=32, cache_dir=cache)
    assert (cache / built[0] / "meta.json").stat().st_mtime_ns == stamp, "rebuilt a complete cache"
    assert [b[i].input_ids for i in range(5)] == [a[i].input_ids for i in range(5)]
    src.write_text("".join(json.dumps(r) + "\n" for r in RECS[:3]))
    c = data.tokenized(src, tok, tiny_assets / "model", max_length=32, cache_dir=cache)
    assert len(c) == 3
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]


def test_sentencepiece_tokenizer_model_works(tmp_path):
    """A Llama-2 style tokenizer.model, trained here, tokenises records like sentencepiece does."""
    import sentencepiece as spm

    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(["the cat sat on the mat", "reverse the words please", "dog sun moon"] * 40))
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(tmp_path / "m"), vocab_size=64, model_type="bpe", minloglevel=2
    )
    tdir = tmp_path / "tok"
    tdir.mkdir()
    (tmp_path / "m.model").rename(tdir / "tokenizer.model")
    (tdir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    t = AutoTokenizer.from_pretrained(tdir)
    sp = spm.SentencePieceProcessor(model_file=str(tdir / "tokenizer.model"))
    ex = data.tokenize_record({"prompt": "the cat", "completion": " sat on the mat"}, "prompt_completion", t, 64)
    completion = [i for i, lab in zip(ex.input_ids, ex.labels) if lab != data.IGNORE_INDEX]
    assert completion[-1] == t.eos_token_id == sp.eos_id()
    assert sp.decode(completion[:-1]).strip() == "sat on the mat"
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps({"prompt": "the cat", "completion": " sat"}) + "\n")
    assert len(data.tokenized(src, t, tdir, max_length=16, cache_dir=tmp_path / "c")) == 1


def test_count_tokens_counts_real_tokens_of_packed_and_padded_batches():
    exs = [data.Example([1, 2, 3], [-100, 2, 3], None), data.Example([4], [4], None)]
    assert data.count_tokens(exs) == 4
    packed = data.pack(exs, max_length=8)
    assert data.count_tokens(packed) == 4 and len(data.collate(packed, 0)["input_ids"][0]) == 4


def test_choices_objective_records_the_decision_position_and_candidate_tokens(tok):
    rec = {"prompt": "Reverse: cat dog\nAnswer:", "completion": " dog cat", "choices": [" cat dog", " dog cat"]}
    ex = data.tokenize_record(rec, "prompt_completion", tok, max_length=64, add_eos=False, choice_loss=True)
    p = tok(rec["prompt"])["input_ids"]
    firsts = [tok(c, add_special_tokens=False)["input_ids"][0] for c in rec["choices"]]
    assert ex.choices == [[len(p)] + firsts]
    assert ex.input_ids[len(p)] == ex.labels[len(p)] == firsts[1]
    b = data.collate([ex, ex], 0)
    assert b["choice_index"].tolist() == [[0, len(p)], [1, len(p)]]
    assert b["choice_ids"].tolist() == [firsts, firsts]


@pytest.mark.parametrize(
    "rec,msg",
    [
        ({"prompt": "a", "completion": " dog"}, "needs a 'choices' list"),
        (
            {"prompt": "a", "completion": " dog cat", "choices": [" dog cat", " dog fish"]},
            "do not differ in their first token",
        ),
    ],
)
def test_choices_objective_rejects_records_it_cannot_score(tok, rec, msg):
    with pytest.raises(data.DataError, match=f"d.jsonl:4: .*{msg}"):
        data.tokenize_record(rec, "prompt_completion", tok, max_length=16, where="d.jsonl:4", choice_loss=True)
