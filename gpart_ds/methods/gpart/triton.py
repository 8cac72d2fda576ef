"""GPart's Triton kernels: SplitMix64 on 32-bit halves, inside GEMMs or in one fast pass.

Two ways to run the GPart op on a GPU, both bit-identical in their group ids to
partition.py and in W0 + delta to kernels.effective_weight:

- fused GEMMs (`fused_forward`, `fused_grad_x`, `fused_grad_ts`): the weight tile of
  the forward and dL/dx GEMMs is W0 + delta built in registers from the W0 tile (ids
  hashed, theta * s gathered, rounded as the spec says), so W0 + delta never reaches
  memory; the dL/dW GEMM reduces each dW tile into theta's gradient in its epilogue,
  so dW never exists either. The price: the forward and dL/dx GEMMs re-hash every
  weight once per token tile (ceil(tokens / BLOCK_M) times).
- one-pass elementwise kernels (`TritonKernelSet`, the interface of kernels.KernelSet)
  for the op in op.py, whose GEMMs are torch's (cuBLAS): W0 + delta per row chunk,
  and one pass that both rebuilds it and scatters dL/dW in the backward. Each weight is
  hashed once per pass whatever the token count.
triton_op.py picks the faster per shape.

The hash never uses 64-bit integers: z = (hi, lo) in uint32 halves, the multiplies by
SplitMix64's constants as 32-bit multiply-low/high, and z mod d by a Barrett reduction
with m = floor((2^64 - 1) / d) that needs only the low 32 bits of the quotient (see
_group_of). That bounds d to 2^30.

Rounding (kernels.effective_weight): delta = ts[g] is rounded to W0's dtype, added to
W0 in fp32 (fp64 for fp64 weights) and rounded once. Under TRITON_INTERPRET=1 (CPU
tests) the bf16 casts are done with integer arithmetic, because the interpreter's own
fp32 -> bf16 cast truncates, and 16-bit dot operands are widened to fp32 first, because
its dot multiplies their raw bits; on GPUs the native casts and MMAs run.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
import triton
import triton.language as tl

from .kernels import dropout_threshold, get_kernels
from .partition import _MUL1, _MUL2, hash_base

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_D = 1 << 30  # the Barrett reduction below needs 4 d <= 2^32

_MASK32 = (1 << 32) - 1
M1_HI = tl.constexpr(_MUL1 >> 32)
M1_LO = tl.constexpr(_MUL1 & _MASK32)
M2_HI = tl.constexpr(_MUL2 >> 32)
M2_LO = tl.constexpr(_MUL2 & _MASK32)


# ----------------------------------------------------------------------------- hash
@triton.jit
def _xorshift(hi, lo, S: tl.constexpr):
    """z ^= z >> S on (hi, lo), 0 < S < 32."""
    lo = lo ^ ((lo >> S) | (hi << (32 - S)))
    hi = hi ^ (hi >> S)
    return hi, lo


@triton.jit
def _mul_const(hi, lo, C_HI: tl.constexpr, C_LO: tl.constexpr):
    """z * C mod 2^64 on (hi, lo): three 32-bit multiply-lows and one multiply-high."""
    c_hi = tl.full((), C_HI, tl.uint32)
    c_lo = tl.full((), C_LO, tl.uint32)
    return tl.umulhi(lo, c_lo) + lo * c_hi + hi * c_lo, lo * c_lo


@triton.jit
def _splitmix(pos, b_hi, b_lo):
    """SplitMix64 of base + pos: base as uint32 halves (hash_base), pos uint32."""
    lo = b_lo + pos
    hi = b_hi + (lo < pos).to(tl.uint32)  # carry
    hi, lo = _xorshift(hi, lo, 30)
    hi, lo = _mul_const(hi, lo, M1_HI, M1_LO)
    hi, lo = _xorshift(hi, lo, 27)
    hi, lo = _mul_const(hi, lo, M2_HI, M2_LO)
    return _xorshift(hi, lo, 31)


@triton.jit
def _group_of(hi, lo, d, m_hi, m_lo):
    """z mod d as int32, for d <= 2^30 and m = floor((2^64 - 1) / d) = (m_hi, m_lo).

    Barrett: floor(z m / 2^64) is floor(z / d) or one less. Dropping the low partial
    products (and their carries) loses at most 2 more, so q below is the low word of an
    estimate 0..3 under the quotient and r = z - q d lies in [0, 4 d): exact in 32 bits,
    brought under d by two conditional subtractions (unsigned min of r and r - k d).
    """
    q = hi * m_hi + tl.umulhi(hi, m_lo) + tl.umulhi(lo, m_hi)
    r = lo - q * d
    r = tl.minimum(r, r - 2 * d)
    r = tl.minimum(r, r - d)
    return r.to(tl.int32, bitcast=True)


@triton.jit
def _split64(v):
    """An int64 scalar as (hi, lo) uint32."""
    return (v >> 32).to(tl.uint32), (v & 0xFFFFFFFF).to(tl.uint32)


@triton.jit
def _add64(hi, lo, k):
    """(hi, lo) + k for a non-negative int64 scalar k (a row block's first position)."""
    k_hi, k_lo = _split64(k.to(tl.int64))
    new_lo = lo + k_lo
    return hi + k_hi + (new_lo < lo).to(tl.uint32), new_lo


# ------------------------------------------------------------------------- rounding
@triton.jit
def _bf16_bits_to_f32(x):
    return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _f32_to_bf16_rne(x):
    """Round to nearest even, NaN kept quiet: c10::BFloat16's rounding in integers."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    out = tl.where(nan, (bits >> 16) | 0x40, rounded)
    return out.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _widen(x, dtype: tl.constexpr, INTERP: tl.constexpr):
    """x as dtype (at least as wide as x's)."""
    if INTERP and x.dtype == tl.bfloat16:
        return _bf16_bits_to_f32(x).to(dtype)
    return x.to(dtype)


@triton.jit
def _add_delta(w0, delta, INTERP: tl.constexpr):
    """W0 + delta with delta rounded to W0's dtype first (kernels.effective_weight)."""
    if w0.dtype == tl.bfloat16:
        # 64-bit ts goes through fp32 like c10's double -> bfloat16 conversion.
        d32 = delta.to(tl.float32)
        if INTERP:
            return _f32_to_bf16_rne(_bf16_bits_to_f32(w0) + _bf16_bits_to_f32(_f32_to_bf16_rne(d32)))
        return (w0.to(tl.float32) + d32.to(tl.bfloat16).to(tl.float32)).to(tl.bfloat16)
    elif w0.dtype == tl.float16:
        return (w0.to(tl.float32) + delta.to(tl.float32).to(tl.float16).to(tl.float32)).to(tl.float16)
    else:
        return w0 + delta.to(w0.dtype)


@triton.jit
def _dot(a, b, acc, INTERP: tl.constexpr, PREC: tl.constexpr):
    if INTERP:  # the interpreter's dot reads 16-bit operands as raw bits
        return tl.dot(_widen(a, acc.dtype, INTERP), _widen(b, acc.dtype, INTERP), acc, input_precision="ieee")
    if a.dtype == tl.float32 or a.dtype == tl.float64:
        return tl.dot(a, b, acc, input_precision=PREC)
    return tl.dot(a, b, acc)


# -------------------------------------------------------------------------- scatter
@triton.jit
def _run_sum(v1, g1, v2, g2):
    # Sums of runs of equal groups: associative on sorted group ids.
    return tl.where(g1 == g2, v1 + v2, v2), g2


@triton.jit
def _scatter(grad_ptr, g, v, mask, d, PREAGG: tl.constexpr):
    """grad[g] += v for the lanes in mask (1-D). PREAGG: sort the (group, value) pairs
    of the block and add each run of one group with a single atomic; pays when the block
    is large next to d (many lanes per group), costs a sort otherwise. 32-bit v only."""
    if PREAGG:
        d = d.to(tl.int32)
        g = tl.where(mask, g, d)  # masked lanes: a group nobody owns
        bits = v.to(tl.uint32, bitcast=True).to(tl.uint64)
        key = tl.sort((g.to(tl.uint64) << 32) | bits)
        g = (key >> 32).to(tl.int32)
        v = (key & 0xFFFFFFFF).to(tl.uint32).to(v.dtype, bitcast=True)
        v, _ = tl.associative_scan((v, g), 0, _run_sum)
        left, _ = tl.associative_scan((tl.full(g.shape, 1, tl.int32), g), 0, _run_sum, reverse=True)
        tl.atomic_add(grad_ptr + g, v, mask=(left == 1) & (g < d), sem="relaxed")
    else:
        tl.atomic_add(grad_ptr + g, v, mask=mask, sem="relaxed")


# ---------------------------------------------------------------- one-pass kernels
@triton.jit(do_not_specialize=["n", "d", "m_hi", "m_lo", "threshold"])
def _elementwise_kernel(
    ts_ptr,
    base_ptr,
    keep_ptr,
    scale_ptr,
    w0_ptr,
    out_ptr,
    dw_ptr,
    grad_ptr,
    ids_ptr,
    n,
    d,
    m_hi,
    m_lo,
    threshold,
    W: tl.constexpr,  # 0: none, 1: out = W0 + delta, 2: out = delta
    SCATTER: tl.constexpr,  # grad[g] += dW (* mask)
    COUNT: tl.constexpr,  # grad[g] += 1 (int32 counts)
    IDS: tl.constexpr,  # 0: hash, 1: read ids, 2: hash and write ids
    KEEP: tl.constexpr,
    PREAGG: tl.constexpr,
    INTERP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    m_hi = m_hi.to(tl.uint32, bitcast=True)
    m_lo = m_lo.to(tl.uint32, bitcast=True)
    dd = d.to(tl.uint32)
    if IDS == 1:
        g = tl.load(ids_ptr + offs, mask=mask, other=0)
    else:
        b_hi, b_lo = _split64(tl.load(base_ptr))
        hi, lo = _splitmix(offs.to(tl.uint32), b_hi, b_lo)
        g = _group_of(hi, lo, dd, m_hi, m_lo)
        if IDS == 2:
            tl.store(ids_ptr + offs, g, mask=mask)
    if KEEP:
        k_hi, k_lo = _split64(tl.load(keep_ptr))
        kh, _ = _splitmix(offs.to(tl.uint32), k_hi, k_lo)
        keep = (kh >> 8).to(tl.int32) >= threshold  # the hash's top 24 bits
        scale = tl.load(scale_ptr)
    if COUNT:
        _scatter(grad_ptr, g, tl.full((BLOCK,), 1, tl.int32), mask, d, PREAGG)
    if W != 0:
        delta = tl.load(ts_ptr + g, mask=mask, other=0)
        if KEEP:
            delta = tl.where(keep, delta * scale, 0.0)
        if W == 1:
            w0 = tl.load(w0_ptr + offs, mask=mask, other=0)
            tl.store(out_ptr + offs, _add_delta(w0, delta, INTERP), mask=mask)
        else:
            tl.store(out_ptr + offs, delta, mask=mask)
    if SCATTER:
        v = _widen(tl.load(dw_ptr + offs, mask=mask, other=0), grad_ptr.dtype.element_ty, INTERP)
        if KEEP:
            v = tl.where(keep, v * scale, 0.0)
        _scatter(grad_ptr, g, v, mask, d, PREAGG)


# --------------------------------------------------------------------- fused GEMMs
@triton.jit
def _weight_tile(
    w0_ptr,
    ts_ptr,
    rn,
    rk,
    N,
    K,
    stride_wn,
    stride_wk,
    row0,
    b_hi,
    b_lo,
    k_hi,
    k_lo,
    scale,
    d,
    m_hi,
    m_lo,
    threshold,
    KEEP: tl.constexpr,
    INTERP: tl.constexpr,
):
    """(W0 + delta)[rn, rk] in W0's dtype; rows rn start at row0 (positions relative to
    the hash base of row0's first element, so they fit 32 bits)."""
    mask = (rn[:, None] < N) & (rk[None, :] < K)
    w0 = tl.load(w0_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk, mask=mask, other=0)
    pos = ((rn - row0)[:, None] * K + rk[None, :]).to(tl.uint32)
    hi, lo = _splitmix(pos, b_hi, b_lo)
    delta = tl.load(ts_ptr + _group_of(hi, lo, d, m_hi, m_lo), mask=mask, other=0)
    if KEEP:
        kh, _ = _splitmix(pos, k_hi, k_lo)
        delta = tl.where((kh >> 8).to(tl.int32) >= threshold, delta * scale, 0.0)
    return tl.where(mask, _add_delta(w0, delta, INTERP), 0)


@triton.jit
def _hash_args(base, keep_base, scale_ptr, d, m_hi, m_lo, KEEP: tl.constexpr):
    b_hi, b_lo = _split64(base.to(tl.int64))
    k_hi, k_lo = _split64(keep_base.to(tl.int64))
    scale = 1.0
    if KEEP:
        scale = tl.load(scale_ptr)
    return (
        b_hi,
        b_lo,
        k_hi,
        k_lo,
        scale,
        d.to(tl.uint32),
        m_hi.to(tl.uint32, bitcast=True),
        m_lo.to(tl.uint32, bitcast=True),
    )


@triton.jit
def _grouped(pid, n_a, n_b, GROUP: tl.constexpr):
    """Tile (a, b) of program pid, GROUP rows of a at a time (L2 reuse of b's operand)."""
    width = GROUP * n_b
    first = (pid // width) * GROUP
    size = tl.minimum(n_a - first, GROUP)
    return first + (pid % width) % size, (pid % width) // size


@triton.jit(do_not_specialize=["base", "keep_base", "d", "m_hi", "m_lo", "threshold"])
def _forward_kernel(
    x_ptr,
    w0_ptr,
    ts_ptr,
    bias_ptr,
    y_ptr,
    scale_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ym,
    stride_yn,
    base,
    keep_base,
    d,
    m_hi,
    m_lo,
    threshold,
    M_BUCKET,
    HAS_BIAS: tl.constexpr,
    KEEP: tl.constexpr,
    INTERP: tl.constexpr,
    PREC: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
):
    """y = x @ (W0 + delta)^T (+ b): x (M, K), W0 (N, K), y (M, N)."""
    pid_m, pid_n = _grouped(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP)
    b_hi, b_lo, k_hi, k_lo, scale, d, m_hi, m_lo = _hash_args(base, keep_base, scale_ptr, d, m_hi, m_lo, KEEP)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row0 = pid_n * BLOCK_N
    rn = row0 + tl.arange(0, BLOCK_N)
    t_hi, t_lo = _add64(b_hi, b_lo, tl.cast(row0, tl.int64) * K)
    u_hi, u_lo = _add64(k_hi, k_lo, tl.cast(row0, tl.int64) * K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
            mask=(rm[:, None] < M) & (rk[None, :] < K),
            other=0,
        )
        w = _weight_tile(
            w0_ptr,
            ts_ptr,
            rn,
            rk,
            N,
            K,
            stride_wn,
            stride_wk,
            row0,
            t_hi,
            t_lo,
            u_hi,
            u_lo,
            scale,
            d,
            m_hi,
            m_lo,
            threshold,
            KEEP,
            INTERP,
        )
        acc = _dot(x, tl.trans(w), acc, INTERP, PREC)
    if HAS_BIAS:
        acc += _widen(tl.load(bias_ptr + rn, mask=rn < N, other=0), ACC, INTERP)[None, :]
    if INTERP and y_ptr.dtype.element_ty == tl.bfloat16:
        out = _f32_to_bf16_rne(acc)
    else:
        out = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, out, mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit(do_not_specialize=["base", "keep_base", "d", "m_hi", "m_lo", "threshold"])
def _grad_x_kernel(
    g_ptr,
    w0_ptr,
    ts_ptr,
    dx_ptr,
    scale_ptr,
    M,
    N,
    K,
    stride_gm,
    stride_gn,
    stride_wn,
    stride_wk,
    stride_xm,
    stride_xk,
    base,
    keep_base,
    d,
    m_hi,
    m_lo,
    threshold,
    M_BUCKET,
    KEEP: tl.constexpr,
    INTERP: tl.constexpr,
    PREC: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
):
    """dx = G @ (W0 + delta): G (M, N), W0 (N, K), dx (M, K)."""
    pid_m, pid_k = _grouped(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP)
    b_hi, b_lo, k_hi, k_lo, scale, d, m_hi, m_lo = _hash_args(base, keep_base, scale_ptr, d, m_hi, m_lo, KEEP)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        g = tl.load(
            g_ptr + rm[:, None] * stride_gm + rn[None, :] * stride_gn,
            mask=(rm[:, None] < M) & (rn[None, :] < N),
            other=0,
        )
        t_hi, t_lo = _add64(b_hi, b_lo, tl.cast(n0, tl.int64) * K)
        u_hi, u_lo = _add64(k_hi, k_lo, tl.cast(n0, tl.int64) * K)
        w = _weight_tile(
            w0_ptr,
            ts_ptr,
            rn,
            rk,
            N,
            K,
            stride_wn,
            stride_wk,
            n0,
            t_hi,
            t_lo,
            u_hi,
            u_lo,
            scale,
            d,
            m_hi,
            m_lo,
            threshold,
            KEEP,
            INTERP,
        )
        acc = _dot(g, w, acc, INTERP, PREC)
    if INTERP and dx_ptr.dtype.element_ty == tl.bfloat16:
        out = _f32_to_bf16_rne(acc)
    else:
        out = acc.to(dx_ptr.dtype.element_ty)
    tl.store(
        dx_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, out, mask=(rm[:, None] < M) & (rk[None, :] < K)
    )


@triton.jit(do_not_specialize=["base", "keep_base", "d", "m_hi", "m_lo", "threshold"])
def _grad_ts_kernel(
    g_ptr,
    x_ptr,
    grad_ptr,
    scale_ptr,
    M,
    N,
    K,
    stride_gm,
    stride_gn,
    stride_xm,
    stride_xk,
    base,
    keep_base,
    d,
    m_hi,
    m_lo,
    threshold,
    M_BUCKET,
    KEEP: tl.constexpr,
    PREAGG: tl.constexpr,
    INTERP: tl.constexpr,
    PREC: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
):
    """grad_ts[g(n, k)] += (G^T @ x)[n, k] (* mask): one dW tile per program, reduced into
    theta's gradient in the epilogue; dW is never written."""
    pid_n, pid_k = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K), GROUP)
    b_hi, b_lo, k_hi, k_lo, scale, d, m_hi, m_lo = _hash_args(base, keep_base, scale_ptr, d, m_hi, m_lo, KEEP)
    row0 = pid_n * BLOCK_N
    rn = row0 + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
    for m0 in range(0, M, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        g = tl.load(
            g_ptr + rm[:, None] * stride_gm + rn[None, :] * stride_gn,
            mask=(rm[:, None] < M) & (rn[None, :] < N),
            other=0,
        )
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
            mask=(rm[:, None] < M) & (rk[None, :] < K),
            other=0,
        )
        acc = _dot(tl.trans(g), x, acc, INTERP, PREC)
    t_hi, t_lo = _add64(b_hi, b_lo, tl.cast(row0, tl.int64) * K)
    pos = ((rn - row0)[:, None] * K + rk[None, :]).to(tl.uint32)
    hi, lo = _splitmix(pos, t_hi, t_lo)
    g_ids = _group_of(hi, lo, d, m_hi, m_lo)
    vals = acc.to(grad_ptr.dtype.element_ty)
    if KEEP:
        u_hi, u_lo = _add64(k_hi, k_lo, tl.cast(row0, tl.int64) * K)
        kh, _ = _splitmix(pos, u_hi, u_lo)
        vals = tl.where((kh >> 8).to(tl.int32) >= threshold, vals * scale, 0.0)
    mask = (rn[:, None] < N) & (rk[None, :] < K)
    _scatter(
        grad_ptr,
        tl.reshape(g_ids, [BLOCK_N * BLOCK_K]),
        tl.reshape(vals, [BLOCK_N * BLOCK_K]),
        tl.reshape(mask, [BLOCK_N * BLOCK_K]),
        d,
        PREAGG,
    )


# ------------------------------------------------------------------- launch helpers
def _i32(v: int) -> int:
    """An unsigned 32-bit value as the signed int32 Triton receives for scalar arguments."""
    v &= _MASK32
    return v - (1 << 32) if v >= (1 << 31) else v


def barrett(d: int) -> tuple[int, int]:
    """(m_hi, m_lo) of m = floor((2^64 - 1) / d), as launch arguments."""
    if not 1 <= d <= MAX_D:
        raise ValueError(f"Triton kernels need 1 <= d <= 2^30, got d={d}")
    m = ((1 << 64) - 1) // d
    return _i32(m >> 32), _i32(m)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _precision(dtype: torch.dtype) -> str:
    # fp32 GEMMs as torch runs them: TF32 only where torch allows it.
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not INTERPRET:
        return "tf32"
    return "ieee"


def _preagg(d: int, block: int, dtype: torch.dtype) -> bool:
    """Sort-and-reduce before the atomics when a block holds two or more lanes per group
    (small d: few addresses, contended atomics); with d in the tens of thousands and up a
    block's lanes hit distinct groups and the sort would only cost (~800 SASS per lane)."""
    return dtype in (torch.float32, torch.int32) and d <= block // 2


_ELEM_BLOCK = 1024 if INTERPRET else 2048
# The interpreter runs tl.sort's bitonic network op by op (seconds per 1024 lanes).
_PREAGG_BLOCK = 128 if INTERPRET else 2048
# No FMA contraction: delta * keep_scale + W0 must round like the eager kernels' two ops.
_LAUNCH = {} if INTERPRET else {"enable_fp_fusion": False}


def _dummy(device):
    return torch.empty(1, device=device, dtype=torch.float32)


def _launch_elementwise(
    n: int,
    ts,
    base,
    d: int,
    *,
    w0=None,
    out=None,
    dw=None,
    grad=None,
    ids=None,
    ids_mode: int = 0,
    w_mode: int = 0,
    count: bool = False,
    keep_base=None,
    threshold: int = 0,
    keep_scale: float = 1.0,
):
    if n == 0:
        return
    if n >= 1 << 31:
        raise ValueError(f"one Triton elementwise pass takes < 2^31 elements, got {n}")
    dev = (w0 if w0 is not None else dw if dw is not None else ts).device
    m_hi, m_lo = barrett(d)
    keep = keep_base is not None
    scale = torch.tensor([keep_scale], dtype=ts.dtype, device=dev) if keep else _dummy(dev)
    preagg = grad is not None and _preagg(d, _PREAGG_BLOCK, grad.dtype)
    block = _PREAGG_BLOCK if preagg else _ELEM_BLOCK
    dummy = _dummy(dev)
    _elementwise_kernel[(triton.cdiv(n, block),)](
        ts,
        base if base is not None else torch.zeros((), dtype=torch.int64, device=dev),
        keep_base if keep else torch.zeros((), dtype=torch.int64, device=dev),
        scale,
        w0 if w0 is not None else dummy,
        out if out is not None else dummy,
        dw if dw is not None else dummy,
        grad if grad is not None else dummy,
        ids if ids is not None else torch.empty(1, dtype=torch.int32, device=dev),
        n,
        d,
        m_hi,
        m_lo,
        threshold,
        W=w_mode,
        SCATTER=dw is not None,
        COUNT=count,
        IDS=ids_mode,
        KEEP=keep,
        PREAGG=preagg,
        INTERP=INTERPRET,
        BLOCK=block,
        num_warps=8,
        **_LAUNCH,
    )


# ------------------------------------------------------- the KernelSet interface
def _on_triton(*tensors) -> bool:
    return INTERPRET or all(t.is_cuda for t in tensors)


def _guarded(method):
    """Run the Triton version where it can run; else, or once it has failed (an older
    Triton, an unsupported GPU), the compiled kernel of the same name, which computes
    the same values. Like KernelSet's compiled mode, a failure warns once and switches
    the set (mode becomes "compiled"); under the interpreter (tests) it raises."""
    name = method.__name__

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if self.mode == "triton" and _on_triton(*(a for a in args if torch.is_tensor(a))):
            try:
                return method(self, *args, **kwargs)
            except Exception as exc:
                if INTERPRET:
                    raise
                warnings.warn(f"GPart: Triton kernel {name} failed ({exc!r}); using the compiled kernels")
                self.mode = "compiled"
        return getattr(self._fallback, name)(*args, **kwargs)

    return call


class TritonKernelSet:
    """kernels.KernelSet's functions as one-pass Triton kernels (mode "triton").

    Tensors that are not on a CUDA device (a CPU merge) go to the compiled kernels,
    which compute the same values; under TRITON_INTERPRET=1 everything runs here.
    """

    def __init__(self):
        self.mode = "triton"
        self._fallback = get_kernels("compiled")

    @_guarded
    def effective_weight(self, w0_flat, ts, base, d: int, keep_base=None, threshold: int = 0, keep_scale: float = 1.0):
        w0_flat = w0_flat.contiguous()
        out = torch.empty_like(w0_flat)
        _launch_elementwise(
            w0_flat.numel(),
            ts,
            base,
            d,
            w0=w0_flat,
            out=out,
            w_mode=1,
            keep_base=keep_base,
            threshold=threshold,
            keep_scale=keep_scale,
        )
        return out

    @_guarded
    def delta_values(self, ts, base, n: int, d: int, keep_base=None, threshold: int = 0, keep_scale: float = 1.0):
        out = torch.empty(n, dtype=ts.dtype, device=ts.device)
        _launch_elementwise(
            n, ts, base, d, out=out, w_mode=2, keep_base=keep_base, threshold=threshold, keep_scale=keep_scale
        )
        return out

    @_guarded
    def scatter_grad(self, grad_ts, dw_flat, base, d: int, keep_base=None, threshold: int = 0, keep_scale: float = 1.0):
        grad_ts = grad_ts.clone()
        _launch_elementwise(
            dw_flat.numel(),
            grad_ts,
            base,
            d,
            dw=dw_flat.contiguous(),
            grad=grad_ts,
            keep_base=keep_base,
            threshold=threshold,
            keep_scale=keep_scale,
        )
        return grad_ts

    @_guarded
    def backward_pass(
        self, w0_flat, dw_flat, ts, grad_ts, base, d: int, keep_base=None, threshold: int = 0, keep_scale: float = 1.0
    ):
        w0_flat = w0_flat.contiguous()
        out, grad_ts = torch.empty_like(w0_flat), grad_ts.clone()
        _launch_elementwise(
            w0_flat.numel(),
            ts,
            base,
            d,
            w0=w0_flat,
            out=out,
            w_mode=1,
            dw=dw_flat.contiguous(),
            grad=grad_ts,
            keep_base=keep_base,
            threshold=threshold,
            keep_scale=keep_scale,
        )
        return out, grad_ts

    @_guarded
    def effective_weight_ids(self, w0_flat, ts, base, d: int):
        w0_flat = w0_flat.contiguous()
        out = torch.empty_like(w0_flat)
        ids = torch.empty(w0_flat.numel(), dtype=torch.int32, device=w0_flat.device)
        _launch_elementwise(w0_flat.numel(), ts, base, d, w0=w0_flat, out=out, w_mode=1, ids=ids, ids_mode=2)
        return out, ids

    @_guarded
    def backward_from_ids(self, w0_flat, dw_flat, ts, grad_ts, ids):
        w0_flat = w0_flat.contiguous()
        out, grad_ts = torch.empty_like(w0_flat), grad_ts.clone()
        _launch_elementwise(
            w0_flat.numel(),
            ts,
            None,
            ts.numel(),
            w0=w0_flat,
            out=out,
            w_mode=1,
            dw=dw_flat.contiguous(),
            grad=grad_ts,
            ids=ids,
            ids_mode=1,
        )
        return out, grad_ts

    @_guarded
    def scatter_from_ids(self, grad_ts, dw_flat, ids):
        grad_ts = grad_ts.clone()
        _launch_elementwise(
            dw_flat.numel(), grad_ts, None, grad_ts.numel(), dw=dw_flat.contiguous(), grad=grad_ts, ids=ids, ids_mode=1
        )
        return grad_ts

    @_guarded
    def count_groups(self, base, n: int, d: int):
        if n >= 2**31:
            raise ValueError(f"count_groups counts at most 2^31 - 1 positions per call, got {n}")
        counts = torch.zeros(d, dtype=torch.int32, device=base.device)
        _launch_elementwise(n, counts, base, d, grad=counts, count=True)
        return counts


@functools.cache
def triton_kernels() -> TritonKernelSet:
    """The process's one Triton kernel set (a kernel that fails switches it, for good, to
    the compiled kernels: see _guarded)."""
    return TritonKernelSet()


# ------------------------------------------------------------------ fused GEMMs
def _gemm_configs(kind: str):
    """Tile shapes to try on GPUs (autotuned per shape); one small tile when interpreting."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP": 4})]
    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). Weight tiles built in registers hold the
    # hash state of every element: narrow K steps keep them from spilling.
    if kind == "grad_ts":  # tiles of dW (N, K), reduced over tokens; the hash only in the epilogue
        shapes = [(64, 128, 128, 8, 3), (64, 64, 64, 4, 3), (32, 64, 64, 4, 4)]
    elif kind == "grad_x":  # tiles of dx (M, K), a (BLOCK_N, BLOCK_K) weight tile per step
        shapes = [(128, 32, 128, 8, 3), (64, 32, 64, 4, 4), (32, 32, 64, 4, 4)]
    else:  # tiles of y (M, N), a (BLOCK_N, BLOCK_K) weight tile per step
        shapes = [(128, 128, 32, 8, 3), (64, 64, 32, 4, 4), (32, 64, 32, 4, 4)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP": 8}, num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]


def _tuned(kernel, kind: str, **kw):
    if INTERPRET:
        return kernel, _gemm_configs(kind)[0].kwargs
    return triton.autotune(_gemm_configs(kind), key=["M_BUCKET", "N", "K"], **kw)(kernel), {}


_FORWARD, _FORWARD_META = _tuned(_forward_kernel, "forward")
_GRAD_X, _GRAD_X_META = _tuned(_grad_x_kernel, "grad_x")
# The autotuner runs each candidate on the real arguments: restore theta's gradient.
_GRAD_TS, _GRAD_TS_META = _tuned(_grad_ts_kernel, "grad_ts", restore_value=["grad_ptr"])


def m_bucket(m: int) -> int:
    """Token counts share tuned tiles by power of two."""
    return max(16, 1 << max(0, m - 1).bit_length())


def _hash_launch_args(seed: int, offset: int, d: int, keep_seed, dropout: float, dtype, device):
    m_hi, m_lo = barrett(d)
    keep = keep_seed is not None
    return dict(
        base=hash_base(seed, offset),
        keep_base=hash_base(keep_seed, offset) if keep else 0,
        d=d,
        m_hi=m_hi,
        m_lo=m_lo,
        threshold=dropout_threshold(dropout) if keep else 0,
        KEEP=keep,
    ), (torch.tensor([1.0 / (1.0 - dropout)], dtype=dtype, device=device) if keep else _dummy(device))


def fused_forward(x2, w0, bias, ts, *, seed: int, offset: int, d: int, keep_seed=None, dropout: float = 0.0):
    """y = x2 @ (W0 + delta)^T + bias for x2 (M, K), W0 (N, K); y in x2's dtype."""
    M, K = x2.shape
    N = w0.shape[0]
    y = torch.empty(M, N, dtype=x2.dtype, device=x2.device)
    if M == 0:
        return y
    args, scale = _hash_launch_args(seed, offset, d, keep_seed, dropout, ts.dtype, x2.device)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _FORWARD[grid](
        x2,
        w0,
        ts,
        bias if bias is not None else _dummy(x2.device),
        y,
        scale,
        M,
        N,
        K,
        x2.stride(0),
        x2.stride(1),
        w0.stride(0),
        w0.stride(1),
        y.stride(0),
        y.stride(1),
        M_BUCKET=m_bucket(M),
        HAS_BIAS=bias is not None,
        INTERP=INTERPRET,
        PREC=_precision(x2.dtype),
        ACC=_acc_dtype(x2.dtype),
        **args,
        **_FORWARD_META,
        **_LAUNCH,
    )
    return y


def fused_grad_x(g2, w0, ts, *, seed: int, offset: int, d: int, keep_seed=None, dropout: float = 0.0):
    """dx = G @ (W0 + delta) for G (M, N), W0 (N, K)."""
    M, N = g2.shape
    K = w0.shape[1]
    dx = torch.empty(M, K, dtype=g2.dtype, device=g2.device)
    if M == 0:
        return dx
    args, scale = _hash_launch_args(seed, offset, d, keep_seed, dropout, ts.dtype, g2.device)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)  # noqa: E731
    _GRAD_X[grid](
        g2,
        w0,
        ts,
        dx,
        scale,
        M,
        N,
        K,
        g2.stride(0),
        g2.stride(1),
        w0.stride(0),
        w0.stride(1),
        dx.stride(0),
        dx.stride(1),
        M_BUCKET=m_bucket(M),
        INTERP=INTERPRET,
        PREC=_precision(g2.dtype),
        ACC=_acc_dtype(g2.dtype),
        **args,
        **_GRAD_X_META,
        **_LAUNCH,
    )
    return dx


def fused_grad_ts(g2, x2, grad_ts, *, seed: int, offset: int, d: int, keep_seed=None, dropout: float = 0.0):
    """grad_ts[g(k)] += (G^T x)_k (* mask) in place, for G (M, N), x (M, K)."""
    M, N = g2.shape
    K = x2.shape[1]
    if M == 0:
        return grad_ts
    args, scale = _hash_launch_args(seed, offset, d, keep_seed, dropout, grad_ts.dtype, g2.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]),)  # noqa: E731
    # A dW tile holds >= 2^11 weights on GPUs (32 x 64), 2^8 when interpreting (16 x 16).
    _GRAD_TS[grid](
        g2,
        x2,
        grad_ts,
        scale,
        M,
        N,
        K,
        g2.stride(0),
        g2.stride(1),
        x2.stride(0),
        x2.stride(1),
        M_BUCKET=m_bucket(M),
        PREAGG=_preagg(d, 256 if INTERPRET else 2048, grad_ts.dtype),
        INTERP=INTERPRET,
        PREC=_precision(g2.dtype),
        ACC=_acc_dtype(g2.dtype),
        **args,
        **_GRAD_TS_META,
        **_LAUNCH,
    )
    return grad_ts
