"""GPart applied to a plain (non-DeepSpeed) Llama: layout, identity at 0, exact delta."""

import pytest
import torch

from gpart_ds.methods.gpart import partition
from gpart_ds.methods.gpart.layer import apply_gpart
from gpart_ds.targets import build_layout
from tests.helpers import micro_llama

LLAMA_ORDER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_layout_is_canonical_llama_order_with_running_offsets():
    layout = build_layout(micro_llama(), "all-linear")
    names = [t.name for t in layout.targets]
    assert names == [
        f"model.layers.{i}.{blk}.{p}"
        for i in range(2)
        for p in LLAMA_ORDER
        for blk in (["self_attn"] if p in LLAMA_ORDER[:4] else ["mlp"])
    ]
    offsets = [t.offset for t in layout.targets]
    assert offsets == [sum(t.numel for t in layout.targets[:i]) for i in range(len(offsets))]
    assert layout.targets[0].shape == (16, 16) and layout.targets[1].shape == (8, 16)
    assert layout.D == 2 * (256 + 128 + 128 + 256 + 3 * 384)


@pytest.mark.parametrize(
    "patterns,expected",
    [
        (["q_proj", "v_proj"], ["q_proj", "v_proj"]),
        (r".*\.mlp\.(gate|up)_proj", ["gate_proj", "up_proj"]),
        (["down_proj"], ["down_proj"]),
    ],
)
def test_target_patterns(patterns, expected):
    layout = build_layout(micro_llama(), patterns)
    assert sorted({t.name.rsplit(".", 1)[1] for t in layout.targets}) == expected
    assert not any("lm_head" in t.name or "embed" in t.name for t in layout.targets)


def test_apply_rejects_patterns_matching_nothing_and_d_out_of_range():
    with pytest.raises(ValueError, match="matched no linear layer.*available"):
        apply_gpart(micro_llama(), d=4, seed=0, target_modules=["qkv"])
    with pytest.raises(ValueError, match=r"d must be in \[1, D="):
        apply_gpart(micro_llama(), d=10**9, seed=0)
    with pytest.raises(ValueError, match="dropout"):
        apply_gpart(micro_llama(), d=4, seed=0, dropout=1.0)


def test_only_theta_trains_and_step_zero_is_the_pretrained_model():
    ref = micro_llama()
    ids = torch.randint(0, 50, (2, 7))
    want = ref(input_ids=ids).logits
    g = apply_gpart(micro_llama(), d=64, seed=1)
    assert [n for n, p in g.named_parameters() if p.requires_grad] == ["gpart_theta"]
    assert torch.equal(g(input_ids=ids).logits, want)


def test_model_output_equals_model_with_dense_delta_added():
    """Whole model, float64: GPart forward/backward == a copy with W0 + (P theta) slices."""
    g = apply_gpart(micro_llama(), d=64, seed=5, target_modules="all-linear")
    D = g.layout.D
    torch.manual_seed(1)
    with torch.no_grad():
        g.gpart_theta.copy_(torch.randn(64) * 0.1)
    theta = g.gpart_theta.detach().double().clone().requires_grad_(True)
    P = partition.dense_projection(D, 64, 5)

    dense = micro_llama()
    flat = P @ theta
    params = dict(dense.named_parameters())
    for t in g.layout.targets:
        w = params[f"{t.name}.weight"]
        delattr(dict(dense.named_modules())[t.name], "weight")
        dict(dense.named_modules())[t.name].weight = w.detach() + flat[t.offset : t.offset + t.numel].view(t.shape)

    ids = torch.randint(0, 50, (2, 9))
    y = g(input_ids=ids).logits
    y_ref = dense(input_ids=ids).logits
    # ts = theta * s is computed in float32 (as in training): float32-level agreement
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-7)
    grad = torch.randn_like(y)
    (gt,) = torch.autograd.grad(y, g.gpart_theta, grad)
    (gt_ref,) = torch.autograd.grad(y_ref, theta, grad)
    # theta is fp32 in the model; compare the gradient at float32 precision
    torch.testing.assert_close(gt.double(), gt_ref, rtol=1e-5, atol=1e-7)


def test_projection_of_a_small_model_is_isometric():
    """Build P column by column through the model's own merge path: P^T P = I."""
    d, seed = 24, 11
    g = apply_gpart(micro_llama(layers=1), d=d, seed=seed)
    w0 = {t.name: dict(g.lm.named_modules())[t.name].weight.detach().clone() for t in g.layout.targets}
    cols = []
    for j in range(d):
        with torch.no_grad():
            g.gpart_theta.zero_()
            g.gpart_theta[j] = 1.0
        cols.append(torch.cat([(g.effective_weight(t.name) - w0[t.name]).reshape(-1) for t in g.layout.targets]))
    P = torch.stack(cols, dim=1)
    assert P.shape == (g.layout.D, d)
    assert ((P != 0).sum(dim=1) == 1).all(), "each weight belongs to exactly one group"
    torch.testing.assert_close(P.T @ P, torch.eye(d, dtype=P.dtype), rtol=0, atol=1e-6)


def test_dropout_is_active_in_train_mode_only():
    g = apply_gpart(micro_llama(), d=64, seed=0, dropout=0.5)
    with torch.no_grad():
        g.gpart_theta.fill_(0.5)
    ids = torch.randint(0, 50, (1, 5))
    g.eval()
    a, b = g(input_ids=ids).logits, g(input_ids=ids).logits
    assert torch.equal(a, b)
    g.train()
    torch.manual_seed(0)
    c = g(input_ids=ids).logits
    torch.manual_seed(1)
    e = g(input_ids=ids).logits
    assert not torch.equal(c, e) and not torch.equal(c, a)


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_other_decoder_families_adapt_all_linears_and_start_at_the_pretrained_model(arch):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        arch,
        vocab_size=50,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).double().eval()
    ids = torch.randint(0, 50, (1, 6))
    want = model(input_ids=ids).logits
    g = apply_gpart(model, d=32, seed=3)
    assert len(g.layout.targets) == 14
    assert torch.equal(g(input_ids=ids).logits, want)
    with torch.no_grad():
        g.gpart_theta.fill_(0.01)
    assert not torch.equal(g(input_ids=ids).logits, want)
    if arch == "qwen2":  # q/k/v carry biases: they stay frozen and outside D
        q = dict(g.lm.named_modules())["model.layers.0.self_attn.q_proj"]
        assert q.bias is not None and not q.bias.requires_grad
        assert g.layout.D == 2 * (256 + 128 + 128 + 256 + 3 * 384)


def test_no_grad_forward_with_zero_theta_skips_the_delta_and_matches():
    g = apply_gpart(micro_llama(), d=64, seed=0)
    ids = torch.randint(0, 50, (1, 5))
    with torch.no_grad():
        a = g(input_ids=ids).logits
        assert g.gpart_ctx.zero
        g.gpart_theta[3] = 0.1
        b = g(input_ids=ids).logits
        assert not g.gpart_ctx.zero and not torch.equal(a, b)
    c = g(input_ids=ids).logits  # with grad: the op runs even at theta = 0 elsewhere
    assert not g.gpart_ctx.zero and torch.equal(b, c.detach())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_biased_model_forward_equals_the_merged_model_bit_for_bit(dtype):
    """Qwen2 puts biases on q/k/v: the GPart forward must round like the merged model's
    nn.Linear (bias fused into the GEMM), so the served model is the trained one."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    base = Qwen2ForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)  # biases that matter at bf16 precision
    merged = Qwen2ForCausalLM(cfg).to(dtype).eval()
    merged.load_state_dict(base.state_dict())
    assert base.model.layers[0].self_attn.q_proj.bias is not None
    g = apply_gpart(base, d=96, seed=11)
    with torch.no_grad():
        g.theta.copy_(torch.randn(96, generator=torch.Generator().manual_seed(4)) * 0.2)
        mods = dict(merged.named_modules())
        for t in g.layout.targets:
            mods[t.name].weight.copy_(g.effective_weight(t.name))
        ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))
        assert torch.equal(g(input_ids=ids).logits, merged(input_ids=ids).logits)
