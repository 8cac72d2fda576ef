"""Compiled (fused) kernels agree with the eager ones: bit for bit where rounding matters."""

import pytest
import torch

from gpart_ds.methods.gpart.kernels import get_kernels
from gpart_ds.methods.gpart.partition import group_ids, hash_base

EAGER, COMPILED = get_kernels("eager"), get_kernels("compiled")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [1, 1000, 65537])
def test_compiled_effective_weight_is_bit_identical_to_eager(dtype, n):
    torch.manual_seed(0)
    d = 997
    w0 = torch.randn(n).to(dtype)
    ts = torch.randn(d) * 1e-2
    base = torch.tensor(hash_base(2**63 + 5, 2**40))
    a = EAGER.effective_weight(w0, ts, base, d)
    b = COMPILED.effective_weight(w0, ts, base, d)
    assert COMPILED.mode == "compiled", "compiled kernels fell back to eager"
    assert a.dtype == b.dtype == dtype
    assert torch.equal(a, b)
    # and it is W0 + delta rounded to W0's dtype first
    ids = group_ids(2**40, n, d, 2**63 + 5)
    assert torch.equal(a, w0 + ts[ids].to(dtype))


def test_compiled_scatter_grad_matches_eager():
    torch.manual_seed(1)
    d, n = 101, 50_000
    dw = torch.randn(n).to(torch.bfloat16)
    base = torch.tensor(hash_base(3, 77))
    a = EAGER.scatter_grad(torch.zeros(d), dw, base, d)
    b = COMPILED.scatter_grad(torch.zeros(d), dw, base, d)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    want = torch.zeros(d, dtype=torch.float64).index_add_(0, group_ids(77, n, d, 3), dw.double())
    torch.testing.assert_close(a.double(), want, rtol=1e-5, atol=1e-4)


def test_compiled_count_matches_bincount():
    d, n = 4099, 300_000
    base = torch.tensor(hash_base(9, 2**62))
    want = torch.bincount(group_ids(2**62, n, d, 9), minlength=d)
    assert torch.equal(COMPILED.count_groups(base, n, d).long(), want)
    assert torch.equal(EAGER.count_groups(base, n, d).long(), want)


@pytest.mark.parametrize("kernels", [EAGER, COMPILED], ids=["eager", "compiled"])
def test_fused_backward_pass_equals_effective_weight_plus_scatter(kernels):
    torch.manual_seed(4)
    d, n = 257, 20_000
    w0 = torch.randn(n).to(torch.bfloat16)
    dw = torch.randn(n).to(torch.bfloat16)
    ts = torch.randn(d) * 1e-2
    base = torch.tensor(hash_base(11, 5 * 10**6))
    keep = dict(keep_base=torch.tensor(hash_base(99, 5 * 10**6)), threshold=1 << 22, keep_scale=4 / 3)
    for kw in ({}, keep):
        w, g = kernels.backward_pass(w0, dw, ts, torch.zeros(d), base, d, **kw)
        assert torch.equal(w, EAGER.effective_weight(w0, ts, base, d, **kw))
        torch.testing.assert_close(g, EAGER.scatter_grad(torch.zeros(d), dw, base, d, **kw), rtol=1e-5, atol=1e-4)
