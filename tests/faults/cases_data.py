"""Fault probes of kind `data`: data files (bad lines, missing keys, empty files, wrong
formats, records no label token survives) and a damaged tokenised-data cache.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.faults.cases import (
    GOOD,
    _loss_not_zero,
    case,
    data_case,
    err,
    ok,
    train,
)
from tests.faults.fixtures import (
    truncate,
)

# ================================================================ data
BAD_UTF8 = (json.dumps(GOOD) + "\n").encode() + b'{"prompt": "\xff\xfe", "completion": " x"}\n'

for _id, _title, _recs, _raw, _names, _defect in [
    (
        "data-bad-json-line",
        "line 3 is not JSON",
        [GOOD, GOOD, '{"prompt": "x", ', GOOD],
        None,
        (r"train\.jsonl:3",),
        "",
    ),
    (
        "data-missing-key",
        "line 2 has no completion",
        [GOOD, {"prompt": "x"}],
        None,
        (r"train\.jsonl:2", "completion"),
        "",
    ),
    ("data-empty-file", "an empty data file", [], b"", (r"train\.jsonl", r"(?i)empty|no records"), ""),
    ("data-blank-lines", "only blank lines", [], b"\n\n\n", (r"train\.jsonl", r"(?i)empty|no records"), ""),
    ("data-not-object", "a line that is a JSON list", ["[1, 2]"], None, (r"train\.jsonl:1",), ""),
    (
        "data-completion-number",
        "completion: 5",
        [{"prompt": "x", "completion": 5}],
        None,
        (r"train\.jsonl:1", "completion"),
        "",
    ),
    (
        "data-non-utf8",
        "bytes that are not UTF-8 on line 2",
        [],
        BAD_UTF8,
        (r"train\.jsonl(:2)?", r"(?i)utf-?8|encoding|decode"),
        "traceback",
    ),
    (
        "data-choices-bad",
        "choices that do not contain the completion",
        [dict(GOOD, choices=[" a", " b"])],
        None,
        (r"train\.jsonl:1", "choices"),
        "",
    ),
    (
        "data-chat-no-assistant",
        "chat record without an assistant turn",
        [{"messages": [{"role": "user", "content": "hi"}]}],
        None,
        (r"train\.jsonl:1", "assistant"),
        "",
    ),
]:
    case(_id, "data", _title, err(*_names), defect=_defect)(
        (lambda recs, raw: lambda ws, fx: data_case(ws, fx, recs, raw=raw))(_recs, _raw)
    )


@case(
    "data-bom",
    "data",
    "a UTF-8 byte-order mark before line 1 (what Windows tools write): read as if absent, the run trains",
    ok(r"trainable parameters"),
)
def _(ws, fx):
    return data_case(ws, fx, [], raw=b"\xef\xbb\xbf" + (json.dumps(GOOD) + "\n").encode() * 16)


@case("data-eval-bad-line", "data", "line 2 of the eval file is not JSON", err(r"eval\.jsonl:2"))
def _(ws, fx):
    return data_case(ws, fx, [GOOD, "{oops"], which="eval", name="eval.jsonl")


@case("data-unknown-ext", "data", "a .txt data file", err(r"train\.txt"))
def _(ws, fx):
    return data_case(ws, fx, [GOOD], name="train.txt")


@case("data-is-dir", "data", "data.train naming a folder", err(r"data\.train"))
def _(ws, fx):
    (ws / "folder.jsonl").mkdir()
    return train(ws, fx, {"data": {"train": str(ws / "folder.jsonl")}})


@case(
    "data-format-mismatch", "data", "data.format: chat on prompt/completion records", err(r"train\.jsonl:1", "messages")
)
def _(ws, fx):
    return data_case(ws, fx, [GOOD], changes={"data": {"format": "chat"}})


@case(
    "data-choices-objective-without-choices",
    "data",
    "train.objective: choices on records without choices",
    err(r"train\.jsonl:1", "choices"),
)
def _(ws, fx):
    return data_case(ws, fx, [GOOD, GOOD], changes={"train": {"objective": "choices"}})


@case("data-csv-missing-columns", "data", "a CSV without prompt/completion columns", err(r"train\.csv"))
def _(ws, fx):
    (ws / "train.csv").write_text("a,b\n1,2\n")
    return train(ws, fx, {"data": {"train": str(ws / "train.csv")}})


@case("data-parquet-garbage", "data", "a .parquet file that is not Parquet", err(r"train\.parquet"))
def _(ws, fx):
    (ws / "train.parquet").write_bytes(b"not parquet at all\n" * 10)
    return train(ws, fx, {"data": {"train": str(ws / "train.parquet")}})


_LONG = {"prompt": "Reverse: " + " ".join(["red cat blue dog"] * 20) + "\nAnswer:", "completion": " dog"}


@case(
    "data-all-prompts-too-long",
    "data",
    "every prompt longer than data.max_length (no label token left)",
    err(r"train\.jsonl", r"(?i)max_length|label|nothing to learn|no .*tokens"),
    defect="no-label-tokens",
)
def _(ws, fx):
    c = data_case(ws, fx, [_LONG] * 16)
    c.checks = (_loss_not_zero(),)
    return c


@case(
    "data-empty-completions-no-eos",
    "data",
    "empty completions with data.add_eos: false",
    err(r"train\.jsonl", r"(?i)completion|label|nothing to learn|no .*tokens"),
    defect="no-label-tokens",
)
def _(ws, fx):
    c = data_case(
        ws, fx, [{"prompt": "Reverse: red cat\nAnswer:", "completion": ""}] * 16, changes={"data": {"add_eos": False}}
    )
    c.checks = (_loss_not_zero(),)
    return c


@case(
    "data-eval-no-labels",
    "data",
    "every eval prompt longer than data.max_length (eval_loss would be 0.0)",
    err(r"eval\.jsonl", r"(?i)max_length|label|nothing to evaluate|no .*tokens"),
    defect="no-label-tokens",
)
def _(ws, fx):
    c = data_case(ws, fx, [_LONG] * 16, which="eval", name="eval.jsonl")
    c.checks = (_loss_not_zero(),)
    return c


def _tokcache_copy(ws, fx) -> Path:
    """This probe's own copy of the shared tokenised cache (built by the shared run)."""
    fx.base_run  # noqa: B018 - the shared run builds the cache entries
    dst = Path(ws) / "tok"
    shutil.copytree(fx.tokcache, dst, ignore=shutil.ignore_patterns("*.lock"))
    return dst


@case(
    "data-tokcache-truncated",
    "data",
    "a truncated Arrow file in the tokenised-data cache (rebuilt)",
    ok(r"(?i)rebuil|damaged|corrupt|truncated"),
    defect="traceback",
)
def _(ws, fx):
    tok = _tokcache_copy(ws, fx)
    arrow = sorted(tok.glob("train-*/data/*.arrow"))[0]
    truncate(arrow, 0.3)
    return train(ws, fx, {"data": {"cache_dir": str(tok)}}, may_change=("tok/*",))


@case(
    "data-tokcache-no-data",
    "data",
    "a tokenised-cache entry marked complete without its data (rebuilt)",
    ok(r"(?i)rebuil|damaged|corrupt|missing|incomplete"),
    defect="traceback",
    ci=False,
)
def _(ws, fx):
    tok = _tokcache_copy(ws, fx)
    shutil.rmtree(sorted(tok.glob("train-*/data"))[0])
    return train(ws, fx, {"data": {"cache_dir": str(tok)}}, may_change=("tok/*",))
