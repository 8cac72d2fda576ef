"""The fused GPart op against autograd through a dense P (float64)."""

import pytest
import torch

from gpart_ds.methods.gpart import partition
from gpart_ds.methods.gpart.kernels import delta_values, dropout_threshold, get_kernels
from gpart_ds.methods.gpart.op import OpConfig, effective_rows, gpart_linear
from gpart_ds.targets import Target

D_PAD = 37  # the layer does not start at global index 0


def _dense_reference(x, w0, b, theta, P, offset):
    """y = x @ (W0 + (P theta)[offset: offset + numel].view(W0))^T + b, plain autograd."""
    delta = (P @ theta)[offset : offset + w0.numel()].view_as(w0)
    return torch.nn.functional.linear(x, w0 + delta, b)


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("chunk_elems", [1 << 20, 3 * 11, 11])  # one chunk, 3 rows, 1 row
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("reuse_ids", [False, True])
def test_fused_op_matches_dense_projection_float64(mode, chunk_elems, with_bias, reuse_ids):
    torch.manual_seed(0)
    out_f, in_f, d, seed = 13, 11, 17, 99
    D = D_PAD + out_f * in_f + 23
    P = partition.dense_projection(D, d, seed)
    counts = torch.bincount(partition.group_ids(0, D, d, seed), minlength=d)
    scales = partition.scales_from_counts(counts).double()
    x = torch.randn(2, 5, in_f, dtype=torch.float64, requires_grad=True)
    w0 = torch.randn(out_f, in_f, dtype=torch.float64)
    b = torch.randn(out_f, dtype=torch.float64) if with_bias else None
    theta = torch.randn(d, dtype=torch.float64, requires_grad=True)

    cfg = OpConfig(d=d, seed=seed, kernels=get_kernels(mode), chunk_elems=chunk_elems, reuse_ids=reuse_ids)
    y = gpart_linear(x, w0, b, theta * scales, Target("t", (out_f, in_f), D_PAD), cfg)
    g = torch.randn_like(y)
    gx, gt = torch.autograd.grad(y, (x, theta), g)

    y_ref = _dense_reference(x, w0, b, theta, P, D_PAD)
    gx_ref, gt_ref = torch.autograd.grad(y_ref, (x, theta), g)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gt, gt_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_dropout_mask_is_regenerated_identically_in_backward(mode):
    torch.manual_seed(1)
    out_f, in_f, d, seed, p = 16, 8, 5, 3, 0.3
    D = out_f * in_f
    P = partition.dense_projection(D, d, seed)
    scales = partition.scales_from_counts(torch.bincount(partition.group_ids(0, D, d, seed), minlength=d)).double()
    x = torch.randn(7, in_f, dtype=torch.float64, requires_grad=True)
    w0 = torch.randn(out_f, in_f, dtype=torch.float64)
    theta = torch.randn(d, dtype=torch.float64, requires_grad=True)
    cfg = OpConfig(d=d, seed=seed, kernels=get_kernels(mode), chunk_elems=3 * in_f, dropout=p)
    keep_seed = 123
    y = gpart_linear(x, w0, None, theta * scales, Target("t", (out_f, in_f), 0), cfg, keep_seed)
    g = torch.randn_like(y)
    gx, gt = torch.autograd.grad(y, (x, theta), g)

    # Reference: the same mask from the kernel on an all-ones ts, applied densely.
    ones = torch.ones(d, dtype=torch.float64)
    mask = delta_values(
        ones,
        torch.tensor(partition.hash_base(seed, 0)),
        D,
        d,
        keep_base=torch.tensor(partition.hash_base(keep_seed, 0)),
        threshold=dropout_threshold(p),
        keep_scale=1 / (1 - p),
    )
    kept = (mask != 0).double().mean().item()
    assert 0.5 < kept < 0.9, kept  # about 1 - p of the entries survive
    delta = ((P @ theta) * mask).view(out_f, in_f)
    y_ref = x @ (w0 + delta).T
    gx_ref, gt_ref = torch.autograd.grad(y_ref, (x, theta), g)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gt, gt_ref, rtol=1e-12, atol=1e-12)


def test_effective_rows_round_delta_to_weight_dtype_before_adding():
    torch.manual_seed(2)
    d, seed = 7, 5
    w0 = torch.randn(4, 6).to(torch.bfloat16)
    ts = torch.randn(d) * 1e-2
    cfg = OpConfig(d=d, seed=seed, kernels=get_kernels("eager"))
    got = effective_rows(w0, ts, Target("t", (4, 6), 100), cfg, 0, 4)
    ids = partition.group_ids(100, 24, d, seed)
    want = w0 + ts[ids].to(torch.bfloat16).view(4, 6)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)


def test_op_refuses_trainable_base_weight():
    cfg = OpConfig(d=3, seed=0, kernels=get_kernels("eager"))
    w = torch.randn(2, 2, requires_grad=True)
    with pytest.raises(RuntimeError, match="frozen base weight"):
        gpart_linear(torch.randn(1, 2), w, None, torch.zeros(3), Target("t", (2, 2), 0), cfg)


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_bf16_forward_equals_linear_with_merged_weight(mode):
    """What training computes is exactly F.linear with the merged bf16 weight."""
    torch.manual_seed(3)
    d, seed = 50, 8
    w0 = torch.randn(64, 32).to(torch.bfloat16)
    x = torch.randn(3, 32).to(torch.bfloat16)
    ts = torch.randn(d) * 1e-2
    cfg = OpConfig(d=d, seed=seed, kernels=get_kernels(mode), chunk_elems=32 * 5)
    spec = Target("t", (64, 32), 1000)
    y = gpart_linear(x, w0, None, ts, spec, cfg)
    merged = effective_rows(w0, ts, spec, OpConfig(d=d, seed=seed, kernels=get_kernels("eager")), 0, 64)
    assert torch.equal(y, torch.nn.functional.linear(x, merged))


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reusing_forward_ids_in_backward_changes_nothing(mode, dtype):
    """reuse_ids trades memory for hashing: outputs and gradients are the same numbers."""
    torch.manual_seed(1)
    out_f, in_f, d = 48, 40, 64
    x = torch.randn(3, 7, in_f).to(dtype)
    w0 = torch.randn(out_f, in_f).to(dtype)
    ts = torch.randn(d) * 0.1
    results = []
    for reuse in (False, True):
        cfg = OpConfig(d=d, seed=5, kernels=get_kernels(mode), chunk_elems=5 * in_f, reuse_ids=reuse)
        xi, ti = x.clone().requires_grad_(True), ts.clone().requires_grad_(True)
        y = gpart_linear(xi, w0, None, ti, Target("t", (out_f, in_f), 1000), cfg)
        gx, gt = torch.autograd.grad(y, (xi, ti), torch.ones_like(y))
        results.append((y, gx, gt))
    (y0, gx0, gt0), (y1, gx1, gt1) = results
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1)
    torch.testing.assert_close(gt0, gt1, rtol=1e-5, atol=1e-5)  # scatter order may differ
