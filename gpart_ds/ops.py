"""The GPart linear op: y = x @ (W0 + delta)^T + b with delta regenerated, never stored.

Forward and backward walk the weight in bounded row chunks. Each chunk's effective
weight W0[r0:r1] + delta is built by one fused kernel, used, and dropped; backward saves
only x and a reference to W0 (which ZeRO-3 re-gathers before this module's backward) and
regenerates the chunk again. With `reuse_ids` the forward also keeps the chunk's group
ids (int32, 4 bytes per weight) for its backward, which then hashes nothing: a third
less GPart work per step for 4 bytes x D of memory until the backward, so it is for
models whose D is small next to the memory (the trainer's auto switch). dL/dtheta-side gradient is a scatter-add of dL/dW into the
d-length vector ts = theta * s; autograd then applies the s factor.

Knows nothing of DeepSpeed: W0 is whatever tensor the caller passes (a gathered ZeRO-3
parameter, a plain weight, a row block streamed from a file).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels import KernelSet, dropout_threshold
from .partition import hash_base


@dataclass(frozen=True)
class LayerSpec:
    """Where one target weight sits in the canonical flattening."""
    offset: int        # global index of element [0, 0]
    out_features: int
    in_features: int


@dataclass(frozen=True)
class OpConfig:
    d: int
    seed: int
    kernels: KernelSet
    chunk_elems: int = 1 << 26   # elements of W0 + delta alive at once (128 MB in bf16)
    dropout: float = 0.0
    reuse_ids: bool = False      # keep forward's int32 group ids for the backward (no dropout)

    def rows_per_chunk(self, in_features: int) -> int:
        return max(1, self.chunk_elems // max(1, in_features))


def _chunks(spec: LayerSpec, cfg: OpConfig):
    rows = cfg.rows_per_chunk(spec.in_features)
    for r0 in range(0, spec.out_features, rows):
        yield r0, min(spec.out_features, r0 + rows)


def _chunk_args(spec: LayerSpec, cfg: OpConfig, r0: int, keep_seed, device):
    start = spec.offset + r0 * spec.in_features
    base = torch.tensor(hash_base(cfg.seed, start), device=device)
    if keep_seed is None:
        return base, {}
    keep = torch.tensor(hash_base(keep_seed, start), device=device)
    return base, dict(keep_base=keep, threshold=dropout_threshold(cfg.dropout),
                      keep_scale=1.0 / (1.0 - cfg.dropout))


def effective_rows(weight, ts, spec: LayerSpec, cfg: OpConfig, r0: int, r1: int, keep_seed=None):
    """(W0 + delta)[r0:r1] in W0's dtype: the rows the forward uses, bit for bit."""
    base, kw = _chunk_args(spec, cfg, r0, keep_seed, weight.device)
    w0 = weight[r0:r1].reshape(-1)
    return cfg.kernels.effective_weight(w0, ts, base, cfg.d, **kw).view(r1 - r0, spec.in_features)


class GPartLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, ts, spec: LayerSpec, cfg: OpConfig, keep_seed):
        x2 = x.reshape(-1, spec.in_features)
        outs, ids = [], []
        # Only for a forward that will be differentiated (not eval, not a frozen theta).
        reuse = cfg.reuse_ids and keep_seed is None and any(ctx.needs_input_grad[:4])
        for r0, r1 in _chunks(spec, cfg):
            if reuse:
                base, _ = _chunk_args(spec, cfg, r0, None, weight.device)
                w, chunk_ids = cfg.kernels.effective_weight_ids(weight[r0:r1].reshape(-1), ts, base, cfg.d)
                w = w.view(r1 - r0, spec.in_features)
                ids.append(chunk_ids)
            else:
                w = effective_rows(weight, ts, spec, cfg, r0, r1, keep_seed)
            outs.append(x2 @ w.t())
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        if bias is not None:
            y = y + bias
        ctx.n_ids = len(ids)
        ctx.save_for_backward(x, weight, ts, *ids)
        ctx.spec, ctx.cfg, ctx.keep_seed = spec, cfg, keep_seed
        ctx.has_bias = bias is not None
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
            if ids:   # the forward's group ids: nothing to hash
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
                base, kw = _chunk_args(spec, cfg, r0, keep_seed, dw.device)
                if need_x:  # one hashing pass serves both gradients
                    w, grad_ts = cfg.kernels.backward_pass(weight[r0:r1].reshape(-1), dw, ts, grad_ts,
                                                           base, cfg.d, **kw)
                    grad_x += g @ w.view(r1 - r0, spec.in_features)
                else:
                    grad_ts = cfg.kernels.scatter_grad(grad_ts, dw, base, cfg.d, **kw)
            elif need_x:
                grad_x += g @ effective_rows(weight, ts, spec, cfg, r0, r1, keep_seed)
        if grad_x is not None:
            grad_x = grad_x.view_as(x)
        # W0 and the bias are frozen: no gradient, no buffers.
        return grad_x, None, None, grad_ts, None, None, None


def gpart_linear(x, weight, bias, ts, spec: LayerSpec, cfg: OpConfig, keep_seed=None):
    """Apply the op. `ts` is theta * s (fp32, length d); `keep_seed` enables dropout."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise RuntimeError("GPart expects a frozen base weight and bias (requires_grad=False)")
    if cfg.kernels.mode == "triton":   # hook (issue 17): fused Triton GEMMs or this op, per shape
        from .triton_op import triton_gpart_linear

        return triton_gpart_linear(x, weight, bias, ts, spec, cfg, keep_seed)
    return GPartLinearFunction.apply(x, weight, bias, ts, spec, cfg, keep_seed)
