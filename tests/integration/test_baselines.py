"""The baselines (LoRA, VeRA, full fine-tuning) through the same launcher, trainer and export.

The runs are the quick benchmark's (conftest.bench_quick: one 2-rank ZeRO-3 run of 4
steps per method on the tiny model, exporting the merged model; CI time); checks that
the method trained, that its counts are the method's, and that the merged export is
exactly what the method's own artefact gives (PEFT's adapter on the base, or the
checkpointed weights for full fine-tuning).
"""

import json

import pytest
import torch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TINY = ".cache/tiny/model"


def _run(bench_out, method):
    out = bench_out / "runs" / f"{method}-2r"
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, recs[-1]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def runs(bench_quick):
    return {m: _run(bench_quick, m) for m in ("lora", "vera", "full")}


def _targets():
    from gpart_ds.targets import build_layout, skeleton

    return build_layout(skeleton(TINY), "all-linear").targets


def test_a_baseline_run_from_a_gpart_config_says_which_keys_it_ignores(bench_quick):
    # the tiny config sets GPart's d; the benchmark runs LoRA from it with method.name=lora
    # said once (rank 0), not by each of the 2 ranks
    assert (bench_quick / "logs" / "lora-2r.log").read_text().count("not read by lora (ignored): method.d=4096") == 1
    assert "not read by" not in (bench_quick / "logs" / "gpart-2r.log").read_text()


@pytest.mark.parametrize("method", ["lora", "vera"])
def test_peft_baseline_export_equals_its_adapter_on_the_base(runs, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, summary = runs[method]
    assert summary["method"] == method and summary["world"] == 2
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    targets = _targets()
    if method == "lora":  # r (in + out) per target, rank 8
        assert summary["trainable_params"] == sum(8 * (t.shape[0] + t.shape[1]) for t in targets)
    else:  # VeRA: lambda_d (r) + lambda_b (out) per target, rank 256
        assert summary["trainable_params"] == sum(256 + t.shape[0] for t in targets)
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == method.upper()
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    plain = _logits(base, ids)
    adapted = _logits(PeftModel.from_pretrained(base, out / "adapter"), ids)
    assert (adapted - plain).abs().max() > 1e-3  # the adapter changed the model
    torch.testing.assert_close(_logits(merged, ids), adapted, rtol=1e-5, atol=1e-5)


def test_full_finetuning_export_equals_its_checkpointed_weights(runs):
    from safetensors.torch import load_file

    from tests.export_helpers import read_folder

    out, summary = runs["full"]
    assert summary["method"] == "full"
    base = read_folder(TINY)
    assert summary["trainable_params"] == sum(v.numel() for v in base.values())
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert not (out / "adapter").exists()
    state = load_file(str(out / "checkpoints" / "step-000004" / "state.safetensors"))
    merged = read_folder(out / "merged")
    assert set(merged) == set(base)
    changed = 0
    for name, w in merged.items():
        ckpt = state[f"lm.{name}"].view(w.shape)
        torch.testing.assert_close(w, ckpt, rtol=0, atol=0)
        changed += int(not torch.equal(w, base[name]))
    assert changed == len(base)  # every weight trained


def test_model_state_of_the_baselines_scales_with_their_trainable_parameters(runs):
    # fp32 master + Adam's two moments + the gradient partition: 16 bytes per trainable
    # parameter in fp32, split over 2 ranks (ZeRO-3 partitions rounded up).
    for method, (_, summary) in runs.items():
        state = summary["model_state_bytes"]
        per_rank = summary["trainable_params"] / 2
        assert state["master"] >= 4 * per_rank and state["optimizer"] >= 8 * per_rank, method
        assert state["total"] < 16 * per_rank * 1.2 + 4096, (method, state)
