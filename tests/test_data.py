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


@pytest.mark.parametrize("line,msg", [
    ('{"prompt": "a", ', "not valid JSON"),
    ('["prompt", "completion"]', "expected a JSON object, got list"),
    ('{"prompt": "a"}', "missing key 'completion'"),
    ('{"prompt": "a", "completion": 3}', "'completion' must be a string, got int"),
])
def test_malformed_record_names_file_and_line(tmp_path, line, msg):
    p = write(tmp_path, ['{"prompt": "x", "completion": "y"}', "", line])
    with pytest.raises(data.DataError, match=rf"d\.jsonl:3: {msg}"):
        data.read_jsonl(p)


def test_empty_file_is_an_error(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n\n")
    with pytest.raises(data.DataError, match="empty.jsonl: no records"):
        data.read_jsonl(p)


def test_loss_mask_covers_completion_and_eos_only(tok):
    rec = {"prompt": "Reverse: cat dog\nAnswer:", "completion": " dog cat"}
    (ex,) = data.tokenize([rec], tok, max_length=64)
    p = tok(rec["prompt"])["input_ids"]
    c = tok(rec["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex.input_ids == p + c
    assert ex.labels == [data.IGNORE_INDEX] * len(p) + c


def test_over_long_records_are_truncated(tok):
    rec = {"prompt": "Reverse: " + "cat " * 50, "completion": " dog" * 50}
    (ex,) = data.tokenize([rec], tok, max_length=16)
    assert len(ex.input_ids) == len(ex.labels) == 16


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


def test_eval_batches_give_every_rank_the_same_count():
    n, mb, world = 10, 3, 3
    per_rank = [list(data.eval_batches(n, mb, world, r)) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1
    flat = sorted(i for b in per_rank for idx in b for i in idx)
    assert flat == list(range(n))
