"""The Triton kernels (method.kernel=triton) against the spec and the eager kernels.

Without a GPU they run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET
before anything imports them): small shapes, seconds. The `gpu` tests run the compiled
kernels on CUDA at larger shapes (launch/gpu_check.sh). `test_kernels_compile_for_sm90`
compiles every kernel for Hopper with Triton's own LLVM and ptxas, no GPU needed.
"""

import json
import os
import random
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from gpart_ds.methods.gpart import partition, triton as tk, triton_op
from gpart_ds.methods.gpart.kernels import get_kernels, triton_unavailable
from gpart_ds.methods.gpart.layer import kernel_set, linear_function
from gpart_ds.methods.gpart.op import OpConfig, effective_rows
from gpart_ds.targets import Target
from tests.helpers import REPO

EAGER = get_kernels("eager")
TRITON = kernel_set("triton")


def gpart_linear(x, w0, b, ts, spec, cfg, keep_seed=None):
    """What a layer built with cfg's kernels runs (layer.linear_function: with Triton's,
    triton_op's fused or split path)."""
    return linear_function(cfg.kernels)(x, w0, b, ts, spec, cfg, keep_seed)


DEV = "cuda" if torch.cuda.is_available() else "cpu"
PATHS = ["fused", "split"]


@triton.jit
def _ids_kernel(base_ptr, out_ptr, n, d, m_hi, m_lo, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    b_hi, b_lo = tk._split64(tl.load(base_ptr))
    hi, lo = tk._splitmix(offs.to(tl.uint32), b_hi, b_lo)
    g = tk._group_of(hi, lo, d.to(tl.uint32), m_hi.to(tl.uint32, bitcast=True), m_lo.to(tl.uint32, bitcast=True))
    tl.store(out_ptr + offs, g, mask=offs < n)


@triton.jit
def _mod_kernel(hi_ptr, lo_ptr, out_ptr, d, m_hi, m_lo, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    hi = tl.load(hi_ptr + offs).to(tl.uint32, bitcast=True)
    lo = tl.load(lo_ptr + offs).to(tl.uint32, bitcast=True)
    g = tk._group_of(hi, lo, d.to(tl.uint32), m_hi.to(tl.uint32, bitcast=True), m_lo.to(tl.uint32, bitcast=True))
    tl.store(out_ptr + offs, g)


def _triton_ids(seed, start, n, d, device=DEV):
    out = torch.empty(n, dtype=torch.int32, device=device)
    base = torch.tensor(partition.hash_base(seed, start), device=device)
    _ids_kernel[(triton.cdiv(n, 1024),)](base, out, n, d, *tk.barrett(d), BLOCK=1024)
    return out.long()


D_EDGES = [1, 2, 3, 17, 997, 1 << 16, (1 << 21) + 1, (1 << 30) - 1, 1 << 30]


@pytest.mark.parametrize("d", D_EDGES)
def test_group_ids_are_bit_identical_to_the_spec(d):
    for seed, start in ((0, 0), (2**63 + 5, 2**40), (2**64 - 1, 2**62 - 7)):
        got = _triton_ids(seed, start, 3000, d)
        assert torch.equal(got.cpu(), partition.group_ids(start, 3000, d, seed)), (seed, start)


def test_barrett_reduction_at_the_edges_of_z_and_d():
    """z mod d for z next to multiples of d and to 2^64, where a short quotient shows."""
    rng = random.Random(0)
    for d in D_EDGES + [rng.randrange(1, 1 << 30) for _ in range(6)]:
        zs = [0, 1, d - 1, d, d + 1, 2**64 - 1, 2**64 - d, 2**32 - 1, 2**32, 2**63]
        q_top = (2**64 - 1) // d
        zs += [k * d + e for k in (q_top, q_top - 1, rng.randrange(q_top + 1)) for e in (-1, 0, 1)]
        zs += [rng.randrange(2**64) for _ in range(64 - len(zs))]
        zs = [z % 2**64 for z in zs][:64]
        to_i32 = lambda v: v - (1 << 32) if v >= (1 << 31) else v  # noqa: E731
        hi = torch.tensor([to_i32(z >> 32) for z in zs], dtype=torch.int32, device=DEV)
        lo = torch.tensor([to_i32(z & 0xFFFFFFFF) for z in zs], dtype=torch.int32, device=DEV)
        out = torch.empty(64, dtype=torch.int32, device=DEV)
        _mod_kernel[(1,)](hi, lo, out, d, *tk.barrett(d), BLOCK=64)
        assert out.tolist() == [z % d for z in zs], d


def test_d_above_two_to_the_thirty_is_refused():
    with pytest.raises(ValueError, match="d <= 2\\^30"):
        tk.barrett((1 << 30) + 1)
    assert "2^30" in triton_unavailable("cpu", (1 << 30) + 1)


KEEP = dict(keep_base=torch.tensor(partition.hash_base(99, 5 * 10**6)), threshold=1 << 22, keep_scale=4 / 3)


def _to(kw, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in kw.items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("dropout", [False, True])
def test_effective_weight_is_bit_identical_to_eager(dtype, dropout):
    torch.manual_seed(0)
    d, n = 997, 3000
    w0 = torch.randn(n).to(dtype)
    ts = torch.randn(d, dtype=torch.float64 if dtype == torch.float64 else torch.float32) * 1e-2
    base = torch.tensor(partition.hash_base(2**63 + 5, 2**40))
    kw = KEEP if dropout else {}
    want = EAGER.effective_weight(w0, ts, base, d, **kw)
    got = TRITON.effective_weight(w0.to(DEV), ts.to(DEV), base.to(DEV), d, **_to(kw, DEV))
    assert got.dtype == dtype and torch.equal(got.cpu(), want)
    delta = TRITON.delta_values(ts.to(DEV), base.to(DEV), n, d, **_to(kw, DEV))
    assert torch.equal(delta.cpu(), EAGER.delta_values(ts, base, n, d, **kw))


def test_bf16_rounding_is_to_nearest_even_at_ties_and_keeps_specials():
    """W0 + delta where the fp32 sum sits exactly between two bf16 values, and inf/NaN."""
    w0 = torch.tensor([1.0, 1.0, 1.0, float("inf"), float("nan"), 3.0e38], dtype=torch.bfloat16)
    # 2^-8 and 3 * 2^-8 are exact ties for bf16 next to 1.0 (ulp 2^-7): 1 -> 1, 1 + 2^-7 -> 1 + 2^-6
    ts = torch.tensor([2.0**-8, 3 * 2.0**-8, 2.0**-9, 1.0, 1.0, 1.0e38])
    ids = torch.arange(6, dtype=torch.int32)
    got, _ = TRITON.backward_from_ids(
        w0.to(DEV),
        torch.zeros(6, dtype=torch.bfloat16, device=DEV),
        ts.to(DEV),
        torch.zeros(6, device=DEV),
        ids.to(DEV),
    )
    got, want = got.cpu(), w0 + ts.to(torch.bfloat16)
    assert got.float()[:3].tolist() == [1.0, 1.0 + 2.0**-6, 1.0]
    assert torch.equal(got[[0, 1, 2, 3, 5]], want[[0, 1, 2, 3, 5]]) and got[4].isnan()
    assert got[5].isinf()  # 3e38 + 1e38 overflows bf16 as it does in torch


@pytest.mark.parametrize("d", [5, 997])  # pre-aggregated before the atomics, and not
@pytest.mark.parametrize("dropout", [False, True])
def test_scatter_and_one_pass_backward_match_eager(d, dropout):
    torch.manual_seed(4)
    n = 300
    w0, dw = torch.randn(n).to(torch.bfloat16), torch.randn(n).to(torch.bfloat16)
    ts = torch.randn(d) * 1e-2
    base = torch.tensor(partition.hash_base(11, 5 * 10**6))
    kw = KEEP if dropout else {}
    want_g = EAGER.scatter_grad(torch.zeros(d), dw, base, d, **kw)
    got_g = TRITON.scatter_grad(torch.zeros(d, device=DEV), dw.to(DEV), base.to(DEV), d, **_to(kw, DEV))
    torch.testing.assert_close(got_g.cpu(), want_g, rtol=1e-5, atol=1e-5)
    w, g = TRITON.backward_pass(
        w0.to(DEV), dw.to(DEV), ts.to(DEV), torch.zeros(d, device=DEV), base.to(DEV), d, **_to(kw, DEV)
    )
    assert torch.equal(w.cpu(), EAGER.effective_weight(w0, ts, base, d, **kw))
    torch.testing.assert_close(g.cpu(), want_g, rtol=1e-5, atol=1e-5)


def test_scatter_keeps_what_grad_held_and_returns_a_new_tensor():
    d, n = 7, 50
    dw = torch.ones(n, device=DEV)
    start = torch.full((d,), 2.0, device=DEV)
    base = torch.tensor(partition.hash_base(1, 0), device=DEV)
    out = TRITON.scatter_grad(start, dw, base, d)
    assert torch.equal(start, torch.full((d,), 2.0, device=DEV))
    assert out.sum().item() == 2.0 * d + n


@pytest.mark.parametrize("d", [7, 4099])
def test_count_groups_equals_bincount(d):
    n = 500 if d < 64 else 3000  # small d: pre-aggregated (slow in the interpreter)
    base = torch.tensor(partition.hash_base(9, 2**62), device=DEV)
    want = torch.bincount(partition.group_ids(2**62, n, d, 9), minlength=d)
    got = TRITON.count_groups(base, n, d)
    assert got.dtype == torch.int32 and torch.equal(got.cpu().long(), want)


def test_reuse_ids_kernels_match_the_hashing_ones():
    torch.manual_seed(5)
    d, n = 997, 2500
    w0, dw = torch.randn(n).to(torch.bfloat16).to(DEV), torch.randn(n).to(torch.bfloat16).to(DEV)
    ts = (torch.randn(d) * 1e-2).to(DEV)
    base = torch.tensor(partition.hash_base(3, 12345), device=DEV)
    w, ids = TRITON.effective_weight_ids(w0, ts, base, d)
    assert ids.dtype == torch.int32 and torch.equal(ids.cpu().long(), partition.group_ids(12345, n, d, 3))
    assert torch.equal(w, TRITON.effective_weight(w0, ts, base, d))
    w2, g2 = TRITON.backward_from_ids(w0, dw, ts, torch.zeros(d, device=DEV), ids)
    w3, g3 = TRITON.backward_pass(w0, dw, ts, torch.zeros(d, device=DEV), base, d)
    assert torch.equal(w2, w3)
    torch.testing.assert_close(g2, g3, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(TRITON.scatter_from_ids(torch.zeros(d, device=DEV), dw, ids), g3, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ the op
D_PAD = 37


@pytest.fixture
def path(request, monkeypatch):
    monkeypatch.setenv(triton_op.ENV, request.param)
    return request.param


def _dense_case(out_f, in_f, d, seed, batch=(2, 5)):
    D = D_PAD + out_f * in_f + 23
    P = partition.dense_projection(D, d, seed)
    scales = partition.scales_from_counts(torch.bincount(partition.group_ids(0, D, d, seed), minlength=d)).double()
    x = torch.randn(*batch, in_f, dtype=torch.float64)
    w0 = torch.randn(out_f, in_f, dtype=torch.float64)
    theta = torch.randn(d, dtype=torch.float64)
    return P, scales, x, w0, theta


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("chunk_elems", [1 << 20, 3 * 11])
@pytest.mark.parametrize("reuse_ids", [False, True])
def test_op_matches_dense_projection_float64(path, with_bias, chunk_elems, reuse_ids):
    """Invariant 2 of docs/method.md for both Triton paths (shapes off the tile grid)."""
    torch.manual_seed(0)
    out_f, in_f, d, seed = 13, 11, 17, 99
    P, scales, x, w0, theta = _dense_case(out_f, in_f, d, seed)
    b = torch.randn(out_f, dtype=torch.float64) if with_bias else None
    x, theta = x.to(DEV).requires_grad_(True), theta.to(DEV).requires_grad_(True)
    w0, b, P, scales = w0.to(DEV), (b.to(DEV) if b is not None else None), P.to(DEV), scales.to(DEV)
    cfg = OpConfig(d=d, seed=seed, kernels=TRITON, chunk_elems=chunk_elems, reuse_ids=reuse_ids)
    y = gpart_linear(x, w0, b, theta * scales, Target("t", (out_f, in_f), D_PAD), cfg)
    g = torch.randn_like(y)
    gx, gt = torch.autograd.grad(y, (x, theta), g)
    delta = (P @ theta)[D_PAD : D_PAD + w0.numel()].view_as(w0)
    y_ref = torch.nn.functional.linear(x, w0 + delta, b)
    gx_ref, gt_ref = torch.autograd.grad(y_ref, (x, theta), g)
    for a, e in ((y, y_ref), (gx, gx_ref), (gt, gt_ref)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_op_with_dropout_matches_dense_projection_float64(path):
    torch.manual_seed(1)
    out_f, in_f, d, seed, p, keep_seed = 16, 8, 5, 3, 0.3, 123
    D = out_f * in_f
    P = partition.dense_projection(D, d, seed)
    scales = partition.scales_from_counts(torch.bincount(partition.group_ids(0, D, d, seed), minlength=d)).double()
    x = torch.randn(7, in_f, dtype=torch.float64, device=DEV, requires_grad=True)
    w0 = torch.randn(out_f, in_f, dtype=torch.float64, device=DEV)
    theta = torch.randn(d, dtype=torch.float64, device=DEV, requires_grad=True)
    cfg = OpConfig(d=d, seed=seed, kernels=TRITON, chunk_elems=3 * in_f, dropout=p)
    y = gpart_linear(x, w0, None, theta * scales.to(DEV), Target("t", (out_f, in_f), 0), cfg, keep_seed)
    g = torch.randn_like(y)
    gx, gt = torch.autograd.grad(y, (x, theta), g)
    mask = EAGER.delta_values(
        torch.ones(d, dtype=torch.float64),
        torch.tensor(partition.hash_base(seed, 0)),
        D,
        d,
        keep_base=torch.tensor(partition.hash_base(keep_seed, 0)),
        threshold=int(round(p * (1 << 24))),
        keep_scale=1 / (1 - p),
    ).to(DEV)
    assert 0.5 < (mask != 0).double().mean().item() < 0.9
    y_ref = x @ (w0 + ((P.to(DEV) @ theta) * mask).view(out_f, in_f)).T
    gx_ref, gt_ref = torch.autograd.grad(y_ref, (x, theta), g)
    for a, e in ((y, y_ref), (gx, gx_ref), (gt, gt_ref)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def _bf16_case(out_f, in_f, tokens, d, device=DEV, seed=8):
    torch.manual_seed(3)
    w0 = (torch.randn(out_f, in_f) * 0.05).to(device, torch.bfloat16)
    x = torch.randn(tokens, in_f).to(device, torch.bfloat16)
    ts = (torch.randn(d) * 1e-2).to(device)
    return w0, x, ts, OpConfig(d=d, seed=seed, kernels=TRITON, chunk_elems=in_f * 5)


def test_split_path_bf16_forward_equals_linear_with_merged_weight(monkeypatch):
    """The split path's GEMM is torch's: exactly F.linear with the merged bf16 weight."""
    monkeypatch.setenv(triton_op.ENV, "split")
    w0, x, ts, cfg = _bf16_case(64, 32, 3, 50)
    spec = Target("t", (64, 32), 1000)
    merged = effective_rows(w0.cpu(), ts.cpu(), spec, OpConfig(d=50, seed=8, kernels=EAGER), 0, 64)
    assert torch.equal(effective_rows(w0, ts, spec, cfg, 0, 64).cpu(), merged)
    assert torch.equal(gpart_linear(x, w0, None, ts, spec, cfg), torch.nn.functional.linear(x, merged.to(DEV)))


def _fwd_bwd(path, monkeypatch, x, w0, b, ts, spec, cfg):
    monkeypatch.setenv(triton_op.ENV, path)
    xi, ti = x.clone().requires_grad_(True), ts.clone().requires_grad_(True)
    y = gpart_linear(xi, w0, b, ti, spec, cfg)
    gy = torch.ones_like(y)
    return (y, *torch.autograd.grad(y, (xi, ti), gy))


def test_fused_bf16_agrees_with_split_and_with_fp64(monkeypatch):
    """bf16: the fused GEMMs (fp32 accumulation, dW never rounded) against the split path,
    both against the same math in float64 on the same bf16 effective weight."""
    out_f, in_f, tokens, d = 40, 24, 21, 200
    w0, x, ts, cfg = _bf16_case(out_f, in_f, tokens, d)
    b = (torch.randn(out_f) * 0.1).to(DEV, torch.bfloat16)
    spec = Target("t", (out_f, in_f), 123)
    fused = _fwd_bwd("fused", monkeypatch, x, w0, b, ts, spec, cfg)
    split = _fwd_bwd("split", monkeypatch, x, w0, b, ts, spec, cfg)
    w = effective_rows(w0, ts, spec, cfg, 0, out_f).double()
    y64 = x.double() @ w.T + b.double()
    gx64 = torch.ones(tokens, out_f, dtype=torch.float64, device=DEV) @ w
    dw64 = torch.ones(tokens, out_f, dtype=torch.float64, device=DEV).T @ x.double()
    ids = partition.group_ids(123, out_f * in_f, d, 8).to(DEV)
    gt64 = torch.zeros(d, dtype=torch.float64, device=DEV).index_add_(0, ids, dw64.reshape(-1))
    # The split path rounds dW to bf16 (2^-9 relative) before the scatter: bound per group.
    dw_bound = torch.zeros(d, dtype=torch.float64, device=DEV).index_add_(0, ids, dw64.abs().reshape(-1)) * 2.0**-8
    for name, (y, gx, gt) in (("fused", fused), ("split", split)):
        torch.testing.assert_close(y.double(), y64, rtol=1.6e-2, atol=2e-2, msg=name)
        torch.testing.assert_close(gx.double(), gx64, rtol=1.6e-2, atol=2e-2, msg=name)
        assert ((gt.double() - gt64).abs() <= dw_bound + 1e-4).all(), name
    # the fused path keeps dW in fp32 until the scatter: nearer to fp64 than the split path
    assert (fused[2].double() - gt64).abs().max() < 1e-4 < (split[2].double() - gt64).abs().max()


@pytest.mark.parametrize("d", [5, 997])  # pre-aggregated in the epilogue, and not
def test_fused_grad_ts_scatters_dw_tiles_like_eager(d):
    torch.manual_seed(6)
    tokens, out_f, in_f, seed, offset = 9, 16, 16, 4, 2**40 + 3
    g2, x2 = torch.randn(tokens, out_f, device=DEV), torch.randn(tokens, in_f, device=DEV)
    got = tk.fused_grad_ts(g2, x2, torch.zeros(d, device=DEV), seed=seed, offset=offset, d=d)
    base = torch.tensor(partition.hash_base(seed, offset))
    want = EAGER.scatter_grad(torch.zeros(d), (g2.T @ x2).reshape(-1).cpu(), base, d)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


def test_path_choice(monkeypatch):
    x, w0, ts = torch.zeros(3, 4, device=DEV), torch.zeros(5, 4, device=DEV), torch.zeros(7, device=DEV)
    cfg = OpConfig(d=7, seed=0, kernels=TRITON)
    spec = Target("t", (5, 4), 0)
    choose = lambda xx: triton_op.choose_path(xx, w0, None, ts, spec, cfg, None, train=True)  # noqa: E731
    monkeypatch.setenv(triton_op.ENV, "fused")
    assert choose(x) == "fused"
    assert choose(x.double()) == "split"  # x and W0 of different dtypes: only torch's GEMM
    monkeypatch.setenv(triton_op.ENV, "split")
    assert choose(x) == "split"
    monkeypatch.setenv(triton_op.ENV, "fastest")
    with pytest.raises(ValueError, match="GPART_TRITON_PATH must be one of"):
        choose(x)
    if not torch.cuda.is_available():
        monkeypatch.setenv(triton_op.ENV, "auto")
        assert choose(torch.zeros(64, 4)) == "fused" and choose(torch.zeros(65, 4)) == "split"


def test_method_kernel_triton_needs_triton_and_a_device(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "CUDA" in triton_unavailable("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_unavailable("cpu") is None
    assert triton_unavailable("cuda") is None


def test_cpu_tensors_outside_the_interpreter_use_the_compiled_kernels(monkeypatch):
    """A merge on CPU with the triton kernel set (the trainer's) gets the same values."""
    monkeypatch.setattr(tk, "INTERPRET", False)
    if torch.cuda.is_available():
        pytest.skip("checks the CPU fallback; on CUDA the Triton kernels run")
    w0, ts = torch.randn(100).to(torch.bfloat16), torch.randn(13) * 1e-2
    base = torch.tensor(partition.hash_base(1, 2))
    assert torch.equal(TRITON.effective_weight(w0, ts, base, 13), EAGER.effective_weight(w0, ts, base, 13))


def test_a_failing_triton_kernel_warns_and_the_set_falls_back_to_compiled(monkeypatch):
    """What an older Triton on a GPU box would do: values from the compiled kernels, once
    warned, and mode "compiled" so that triton_op takes the plain op from then on."""

    def broken(*args, **kwargs):
        raise RuntimeError("PTX too new for this driver")

    monkeypatch.setattr(tk, "INTERPRET", False)
    monkeypatch.setattr(tk, "_on_triton", lambda *t: True)
    monkeypatch.setattr(tk, "_launch_elementwise", broken)
    kernels = tk.TritonKernelSet()
    w0, ts = torch.randn(100).to(torch.bfloat16), torch.randn(13) * 1e-2
    base = torch.tensor(partition.hash_base(1, 2))
    with pytest.warns(UserWarning, match="Triton kernel effective_weight failed"):
        got = kernels.effective_weight(w0, ts, base, 13)
    assert kernels.mode == "compiled" and torch.equal(got, EAGER.effective_weight(w0, ts, base, 13))


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Every kernel and tile shape lowers to a Hopper cubin (the interpreter checks no types)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "tests/methods/gpart/triton_sm90_compile.py"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = [json.loads(ln)["kernel"].split(" ")[0] for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert set(names) == {
        "effective_weight",
        "effective_weight_dropout",
        "backward_pass",
        "scatter_preagg",
        "count_groups",
        "backward_pass_fp16_fp64",
        "forward",
        "grad_x",
        "grad_ts",
    }, proc.stdout
    assert names.count("forward") >= 2, "several tile shapes for the autotuner"


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("d", [65536, 1 << 21])
def test_gpu_ids_and_effective_weight_bit_identical_at_scale(d):
    n = 1 << 24
    seed, start = 7, 3 * 10**9
    got = _triton_ids(seed, start, n, d, device="cuda")
    assert torch.equal(got, partition.group_ids(start, n, d, seed, device="cuda"))
    w0 = torch.randn(n, device="cuda").to(torch.bfloat16)
    ts = torch.randn(d, device="cuda") * 1e-3
    base = torch.tensor(partition.hash_base(seed, start), device="cuda")
    compiled = get_kernels("compiled").effective_weight(w0, ts, base, d)
    assert torch.equal(TRITON.effective_weight(w0, ts, base, d), compiled)
    assert TRITON.mode == "triton", "a Triton kernel failed and fell back to the compiled ones"


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [16, 300, 2048])
def test_gpu_fused_and_split_agree_on_a_mlp_shape(tokens, monkeypatch):
    out_f, in_f, d = 1536, 576, 65536
    w0, x, ts, _ = _bf16_case(out_f, in_f, tokens, d, device="cuda")
    cfg = OpConfig(d=d, seed=8, kernels=TRITON)
    spec = Target("t", (out_f, in_f), 10**7)
    fused = _fwd_bwd("fused", monkeypatch, x, w0, None, ts, spec, cfg)
    split = _fwd_bwd("split", monkeypatch, x, w0, None, ts, spec, cfg)
    compiled = _fwd_bwd(
        "split", monkeypatch, x, w0, None, ts, spec, OpConfig(d=d, seed=8, kernels=get_kernels("compiled"))
    )
    assert torch.equal(split[0], compiled[0]) and torch.equal(split[1], compiled[1])
    for a, b in zip(fused, split):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
    assert TRITON.mode == "triton", "a Triton kernel failed and fell back to the compiled ones"
