"""The GPart linear op: y = x @ (W0 + delta)^T + b with delta regenerated, never stored.

Forward and backward walk the weight in bounded row chunks. Each chunk's effective
weight W0[r0:r1] + delta is built by one fused kernel, used, and dropped; backward saves
only x and a reference to W0 (which ZeRO-3 re-gathers before this module's backward) and
regenerates the chunk again. With `reuse_ids` the forward also keeps the chunk's group
ids (int32, 4 bytes per weight) for its backward, which then hashes nothing: a third
less GPart work per step for 4 bytes x D of memory until the backward, so it is for
models whose D is small next to the memory (the trainer's auto switch). dL/dtheta-side
gradient is a scatter-add of dL/dW into the d-length vector ts = theta * s; autograd then applies the s factor.

Knows nothing of DeepSpeed: W0 is whatever tensor the caller passes (a gathered ZeRO-3
parameter, a plain weight, a row block streamed from a file).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...targets import Target
from .kernels import KernelSet, dropout_threshold
from .partition import hash_base


@dataclass(frozen=True)
class OpConfig:
    d: int
    seed: int
    kernels: KernelSet
    chunk_elems: int = 1 << 26  # elements of W0 + delta alive at once (128 MB in bf16)
    dropout: float = 0.0
    reuse_ids: bool = False  # keep forward's int32 group ids for the backward (no dropout)

    def rows_per_chunk(self, in_features: int) -> int:
        return max(1, self.chunk_elems // max(1, in_features))


def _chunks(spec: Target, cfg: OpConfig):
    rows = cfg.rows_per_chunk(spec.in_features)
    for r0 in range(0, spec.out_features, rows):
        yield r0, min(spec.out_features, r0 + rows)


def _hash_args(cfg: OpConfig, start: int, keep_seed, device):
    """The kernels' per-slice arguments for a slice whose first global index is `start`."""
    base = torch.tensor(hash_base(cfg.seed, start), device=device)
    if keep_seed is None:
        return base, {}
    keep = torch.tensor(hash_base(keep_seed, start), device=device)
    return base, dict(keep_base=keep, threshold=dropout_threshold(cfg.dropout), keep_scale=1.0 / (1.0 - cfg.dropout))


def effective_slice(w0_flat, ts, spec: Target, first: int, cfg: OpConfig, keep_seed=None):
    """W0 + delta for flat elements [first, first + n) of a target, in W0's dtype.

    The one definition of the adapted weight: the forward's row chunks, the backward's,
    the merged exports (a ZeRO-3 shard starting mid-row, a row block streamed from a
    file) and `GPartModel.effective_weight` all come here, so they agree bit for bit.
    """
    base, kw = _hash_args(cfg, spec.offset + first, keep_seed, w0_flat.device)
    return cfg.kernels.effective_weight(w0_flat, ts, base, cfg.d, **kw)


def effective_rows(weight, ts, spec: Target, cfg: OpConfig, r0: int, r1: int, keep_seed=None):
    """(W0 + delta)[r0:r1] of a whole (gathered) weight."""
    w = effective_slice(weight[r0:r1].reshape(-1), ts, spec, r0 * spec.in_features, cfg, keep_seed)
    return w.view(r1 - r0, spec.in_features)


class GPartLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, ts, spec: Target, cfg: OpConfig, keep_seed):
        x2 = x.reshape(-1, spec.in_features)
        outs, ids = [], []
        # Only for a forward that will be differentiated (not eval, not a frozen theta).
        reuse = cfg.reuse_ids and keep_seed is None and any(ctx.needs_input_grad[:4])
        for r0, r1 in _chunks(spec, cfg):
            if reuse:
                base, _ = _hash_args(cfg, spec.offset + r0 * spec.in_features, None, weight.device)
                w, chunk_ids = cfg.kernels.effective_weight_ids(weight[r0:r1].reshape(-1), ts, base, cfg.d)
                w = w.view(r1 - r0, spec.in_features)
                ids.append(chunk_ids)
            else:
                w = effective_rows(weight, ts, spec, cfg, r0, r1, keep_seed)
            # The bias goes into the GEMM (addmm), as nn.Linear does on the merged model:
            # adding it afterwards rounds twice in bf16 and the served model would differ.
            outs.append(F.linear(x2, w, None if bias is None else bias[r0:r1]))
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        ctx.n_ids = len(ids)
        ctx.save_for_backward(x, weight, ts, *ids)
        ctx.spec, ctx.cfg, ctx.keep_seed = spec, cfg, keep_seed
        return y.view(*x.shape[:-1], spec.out_features)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, ts, *ids = ctx.saved_tensors
        spec, cfg, keep_seed = ctx.spec, ctx.cfg, ctx.keep_seed
        x2 = x.reshape(-1, spec.in_features)
        g2 = grad_out.reshape(-1, spec.out_features)
        need_x, need_ts = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        grad_x = torch.zeros_like(x2) if need_x else None
        grad_ts = torch.zeros_like(ts) if need_ts else None
        for i, (r0, r1) in enumerate(_chunks(spec, cfg)):
            g = g2[:, r0:r1]
            if ids:  # the forward's group ids: nothing to hash
                w0 = weight[r0:r1].reshape(-1)
                if need_ts:
                    dw = (g.t() @ x2).reshape(-1)
                    if need_x:
                        w, grad_ts = cfg.kernels.backward_from_ids(w0, dw, ts, grad_ts, ids[i])
                        grad_x += g @ w.view(r1 - r0, spec.in_features)
                    else:
                        grad_ts = cfg.kernels.scatter_from_ids(grad_ts, dw, ids[i])
                elif need_x:
                    w = w0 + ts[ids[i]].to(w0.dtype)
                    grad_x += g @ w.view(r1 - r0, spec.in_features)
                continue
            if need_ts:
                dw = (g.t() @ x2).reshape(-1)
                base, kw = _hash_args(cfg, spec.offset + r0 * spec.in_features, keep_seed, dw.device)
                if need_x:  # one hashing pass serves both gradients
                    w, grad_ts = cfg.kernels.backward_pass(
                        weight[r0:r1].reshape(-1), dw, ts, grad_ts, base, cfg.d, **kw
                    )
                    grad_x += g @ w.view(r1 - r0, spec.in_features)
                else:
                    grad_ts = cfg.kernels.scatter_grad(grad_ts, dw, base, cfg.d, **kw)
            elif need_x:
                grad_x += g @ effective_rows(weight, ts, spec, cfg, r0, r1, keep_seed)
        if grad_x is not None:
            grad_x = grad_x.view_as(x)
        # W0 and the bias are frozen: no gradient, no buffers.
        return grad_x, None, None, grad_ts, None, None, None


def check_frozen(weight, bias) -> None:
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise RuntimeError("GPart expects a frozen base weight and bias (requires_grad=False)")


def gpart_linear(x, weight, bias, ts, spec: Target, cfg: OpConfig, keep_seed=None):
    """Apply the op. `ts` is theta * s (fp32, length d); `keep_seed` enables dropout.
    With Triton's kernels a layer runs triton_op.triton_gpart_linear instead, which picks
    the fused Triton GEMMs or this op per shape (layer.linear_function)."""
    check_frozen(weight, bias)
    return GPartLinearFunction.apply(x, weight, bias, ts, spec, cfg, keep_seed)
