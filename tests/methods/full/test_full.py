"""Full fine-tuning's own code (gpart_ds/methods/full): every base weight trains and nothing
is added, it has no adapter, and its merged export is the trained weights themselves."""

import copy

import torch

from tests.export_helpers import make_base, read_folder
from tests.helpers import micro_llama
from tests.methods.helpers import IDS, build, export_run, logits


def test_every_base_weight_trains_and_nothing_is_added():
    base = micro_llama()
    ref = copy.deepcopy(base)
    for p in base.parameters():  # frozen as a loaded base arrives, whatever the targets say
        p.requires_grad_(False)
    m = build("full", base, ["q_proj"])
    assert m.model is base
    assert m.trainable().keys() == {f"lm.{n}" for n, _ in ref.named_parameters()}
    assert all(p.requires_grad for p in base.parameters())
    assert m.trainable_params() == sum(p.numel() for p in ref.parameters())
    assert torch.equal(logits(m.root), logits(ref))  # built, not changed
    assert m.state_finite() is None  # every weight: the loss and the gradient norm are the check


def test_a_step_moves_weights_beyond_the_targets():
    m = build("full", micro_llama(), ["q_proj"])
    before = {n: p.detach().clone() for n, p in m.trainable().items()}
    out = m.root(input_ids=IDS, labels=IDS)
    out.loss.backward()
    torch.optim.SGD(m.trainable().values(), lr=0.1).step()
    moved = {n for n, p in m.trainable().items() if not torch.equal(p, before[n])}
    assert {
        "lm.model.embed_tokens.weight",
        "lm.model.layers.0.mlp.down_proj.weight",
        "lm.lm_head.weight",
        "lm.model.norm.weight",
    } <= moved


def test_it_has_no_adapter(tmp_path):
    m = build("full", micro_llama())
    assert m.save_adapter(tmp_path / "adapter", {"base_model": {}, "dtype": torch.float32}) is None
    assert not (tmp_path / "adapter").exists()
    assert m.shard_merger(torch.float32, None) is None  # gathered through rank 0


def test_the_merged_export_is_the_trained_weights(tmp_path, tiny_assets):
    from transformers import AutoModelForCausalLM

    base_dir = make_base(tmp_path / "base", tiny_assets / "model", hidden=16, inter=24)
    m = build("full", AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # as training leaves them: every weight moved
        for p in m.trainable().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    trained = {n.removeprefix("lm."): p.detach().clone() for n, p in m.trainable().items()}
    got, w0 = export_run(m, base_dir, tmp_path / "merged"), read_folder(base_dir)
    assert got.keys() == w0.keys() == trained.keys()
    for name, w in trained.items():
        assert torch.equal(got[name], w), name
        assert not torch.equal(got[name], w0[name]), name
