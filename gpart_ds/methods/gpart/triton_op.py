"""The GPart op with Triton kernels (method.kernel=triton): fused or split, per shape.

Two implementations of op.gpart_linear, same math, same rounding of W0 + delta:
  fused  the forward and dL/dx GEMMs build W0 + delta tiles in registers, the dL/dW GEMM
         scatters its tiles into theta's gradient (triton.fused_*);
  split  op.GPartLinearFunction (torch's GEMMs, i.e. cuBLAS) with the one-pass Triton
         elementwise kernels (triton.TritonKernelSet).
The fused one re-hashes each weight once per token tile in the forward and dL/dx GEMMs,
so it wins at few tokens and loses at many; where the line falls depends on the GPU.
GPART_TRITON_PATH picks:
  auto   (default) on CUDA: time both once per (device, shape, token bucket, dtype, d,
         dropout, grad) on the call's own tensors and keep the faster for the process;
         under the interpreter: fused up to 64 tokens, split above
  fused | split   always that one (benchmarks, tests, bit-reproducible runs)
Knows nothing of DeepSpeed, like op.py.
"""

from __future__ import annotations

import logging
import os
import statistics
import warnings

import torch

from ...targets import Target
from . import triton as tk
from .op import GPartLinearFunction, OpConfig, check_frozen

log = logging.getLogger(__name__)

PATHS = ("fused", "split")
ENV = "GPART_TRITON_PATH"
# Under the interpreter (no timing): the fused GEMMs up to this many tokens.
FUSED_MAX_TOKENS = 64

_CHOICE: dict[tuple, str] = {}


class FusedGPartLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, ts, spec: Target, cfg: OpConfig, keep_seed):
        x2 = x.reshape(-1, spec.in_features)
        hash_kw = dict(seed=cfg.seed, offset=spec.offset, d=cfg.d, keep_seed=keep_seed, dropout=cfg.dropout)
        y = tk.fused_forward(x2, weight, bias, ts, **hash_kw)
        ctx.save_for_backward(x, weight, ts)
        ctx.spec, ctx.hash_kw = spec, hash_kw
        return y.view(*x.shape[:-1], spec.out_features)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, ts = ctx.saved_tensors
        spec = ctx.spec
        g2 = grad_out.reshape(-1, spec.out_features)
        grad_x = grad_ts = None
        if ctx.needs_input_grad[0]:
            grad_x = tk.fused_grad_x(g2, weight, ts, **ctx.hash_kw).view_as(x)
        if ctx.needs_input_grad[3]:
            grad_ts = tk.fused_grad_ts(g2, x.reshape(-1, spec.in_features), torch.zeros_like(ts), **ctx.hash_kw)
        return grad_x, None, None, grad_ts, None, None, None


def _apply(path: str, x, weight, bias, ts, spec, cfg, keep_seed):
    fn = FusedGPartLinear if path == "fused" else GPartLinearFunction
    return fn.apply(x, weight, bias, ts, spec, cfg, keep_seed)


def _fused_possible(x, weight, ts, cfg: OpConfig) -> bool:
    """The fused GEMMs take one dtype for x and W0 and run on Triton's devices."""
    on_device = tk.INTERPRET or (x.is_cuda and weight.is_cuda and ts.is_cuda)
    return on_device and x.dtype == weight.dtype and cfg.d <= tk.MAX_D


def _time_path(path: str, x, weight, bias, ts, spec, cfg, keep_seed, train: bool, repeat: int = 3) -> float:
    """Median seconds of one forward (+ backward when training) on detached copies."""
    gy = torch.randn(*x.shape[:-1], spec.out_features, dtype=x.dtype, device=x.device) if train else None

    def run():
        with torch.enable_grad() if train else torch.no_grad():
            xi = x.detach().requires_grad_(train)
            ti = ts.detach().requires_grad_(train)
            y = _apply(path, xi, weight, bias, ti, spec, cfg, keep_seed)
            if train:
                y.backward(gy)

    run()  # compiles and autotunes the Triton kernels: not timed
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def choose_path(x, weight, bias, ts, spec: Target, cfg: OpConfig, keep_seed, train: bool) -> str:
    want = os.environ.get(ENV, "auto")
    if want not in PATHS + ("auto",):
        raise ValueError(f"{ENV} must be one of {PATHS + ('auto',)}, got {want!r}")
    if not _fused_possible(x, weight, ts, cfg):
        return "split"
    if want != "auto":
        return want
    tokens = x.numel() // spec.in_features
    if not x.is_cuda:
        return "fused" if tokens <= FUSED_MAX_TOKENS else "split"
    key = (
        x.device.index,
        tk.m_bucket(tokens),
        spec.out_features,
        spec.in_features,
        x.dtype,
        cfg.d,
        keep_seed is not None,
        cfg.reuse_ids,
        train,
    )
    if key not in _CHOICE:
        times = {}
        for p in PATHS:
            try:
                times[p] = _time_path(p, x, weight, bias, ts, spec, cfg, keep_seed, train)
            except Exception as exc:  # a Triton that cannot build the fused GEMMs: the other path
                if p == "split":
                    raise
                warnings.warn(f"GPart: fused Triton GEMMs failed ({exc!r}); using the split path")
                times[p] = float("inf")
        _CHOICE[key] = min(times, key=times.get)
        log.info(
            "GPart Triton: %d x %d, %d tokens, %s: fused %.3f ms, split %.3f ms -> %s",
            spec.out_features,
            spec.in_features,
            tokens,
            x.dtype,
            1e3 * times["fused"],
            1e3 * times["split"],
            _CHOICE[key],
        )
    return _CHOICE[key]


def triton_gpart_linear(x, weight, bias, ts, spec: Target, cfg: OpConfig, keep_seed=None):
    """The linear op of a layer built with Triton's kernels (layer.linear_function): the
    fused GEMMs or op.gpart_linear's function, whichever is faster per shape."""
    check_frozen(weight, bias)
    if cfg.kernels.mode != "triton":  # the Triton kernels fell back to the compiled ones (triton._guarded)
        return GPartLinearFunction.apply(x, weight, bias, ts, spec, cfg, keep_seed)
    train = torch.is_grad_enabled() and (x.requires_grad or ts.requires_grad)
    path = choose_path(x, weight, bias, ts, spec, cfg, keep_seed, train)
    return _apply(path, x, weight, bias, ts, spec, cfg, keep_seed)
