"""The real SmolLM2-135M-Instruct, offline, under ZeRO-3 on 2 CPU ranks (slow; CI runs it)."""

import json

import pytest

from gpart_ds import assets
from gpart_ds.evaluate import evaluate_files
from gpart_ds.export.offline import merge_offline
from gpart_ds.export.verify import verify
from tests.helpers import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.fixture(scope="module")
def real_assets():
    model = assets.ensure("smollm2")
    rt = assets.ensure("rotten_tomatoes")
    return model, rt


def test_conversion_from_gguf_was_verified(real_assets):
    model, _ = real_assets
    check = json.loads((model / "conversion.json").read_text())
    assert check["max_abs_logit_diff"] == 0.0
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576 and "quantization_config" not in cfg
    assert (model / "chat_template.jinja").is_file() or "chat_template" in (model / "tokenizer_config.json").read_text()


def test_rotten_tomatoes_split_is_deterministic_and_disjoint(real_assets):
    _, rt = real_assets
    train = (rt / "train.jsonl").read_text().splitlines()
    evals = (rt / "eval.jsonl").read_text().splitlines()
    assert len(evals) == 500 and len(train) > 10_000
    assert not set(train) & set(evals)
    first = json.loads(evals[0])
    assert first["choices"] == [" positive", " negative"] and first["completion"] in first["choices"]


def test_gpart_under_zero3_lowers_held_out_loss_on_the_real_model(real_assets, tmp_path):
    out = tmp_path / "run"
    run_ranks(
        2,
        "launch/train.py",
        "--config",
        "configs/smollm2_rt.yaml",
        f"output_dir={out}",
        "train.max_steps=4",
        "train.micro_batch_size=2",
        "train.eval_examples=16",
        "train.eval_micro_batch_size=8",
        "train.warmup_ratio=0",
        f"data.cache_dir={tmp_path / 'tok'}",
        "export.merged=true",
        timeout=1200,
    )
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    s = recs[-1]
    assert s["event"] == "summary" and s["world"] == 2
    assert s["eval_loss_after"] < s["eval_loss_before"] - 0.5, s
    assert s["accuracy_before"] is not None and s["accuracy_after"] is not None

    # The saved adapter, applied to the plain model in one process, evaluates the same.
    res = evaluate_files(
        str(real_assets[0]),
        real_assets[1] / "eval.jsonl",
        adapter=str(out / "adapter"),
        max_length=128,
        batch_size=8,
        max_examples=16,
    )
    assert res["eval_loss"] == pytest.approx(s["eval_loss_after"], rel=1e-4)
    assert res["accuracy"] == pytest.approx(s["accuracy_after"])
    assert res["answer_accuracy"] == pytest.approx(s["answer_accuracy_after"])  # the generated answers too

    # The merged folder written shard by shard by the 2 ranks is the trained model for
    # plain transformers, and byte-identical to the offline streaming merge.
    merged = out / "merged"
    check = verify(merged, real_assets[0], out / "adapter")
    assert check["ok"], check
    served = evaluate_files(str(merged), real_assets[1] / "eval.jsonl", max_length=128, batch_size=8, max_examples=16)
    assert served["eval_loss"] == pytest.approx(s["eval_loss_after"], rel=1e-4)
    merge_offline(real_assets[0], out / "adapter", tmp_path / "offline")
    assert (merged / "model.safetensors").read_bytes() == (tmp_path / "offline" / "model.safetensors").read_bytes()
