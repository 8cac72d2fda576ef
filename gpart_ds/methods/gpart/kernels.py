"""Elementwise GPart kernels: regenerate ids and gather, add or scatter in one pass.

Each kernel takes a flat slice of one weight, described by the int64 `base` of its
first global index (see partition.hash_base), and never materialises ids when
compiled: torch.compile fuses hash + gather + cast + add into one loop (about 10x the
eager throughput on CPU, and a fused Triton kernel on GPUs). The eager versions are the
same Python functions run op by op: the fallback where no compiler is available.

Dropout on delta is stateless too: a second SplitMix64 stream keyed by a per-call seed
decides keep/drop for each element, so backward regenerates the same mask.
"""

from __future__ import annotations

import logging
import warnings

import torch

from .partition import ids_from_positions, mix

log = logging.getLogger(__name__)

# Dropout keeps element k when the top 24 bits of its hash are >= threshold.
_KEEP_BITS = 24


def dropout_threshold(p: float) -> int:
    return int(round(p * (1 << _KEEP_BITS)))


def _keep_mask(keep_base, pos, threshold: int):
    bits = (mix(pos + keep_base) >> (64 - _KEEP_BITS)) & ((1 << _KEEP_BITS) - 1)
    return bits >= threshold


def _delta(ts, base, pos, d: int, keep_base, threshold: int, keep_scale: float):
    delta = ts[ids_from_positions(base, pos, d)]
    if keep_base is not None:
        delta = torch.where(_keep_mask(keep_base, pos, threshold), delta * keep_scale, 0.0)
    return delta


def effective_weight(w0_flat, ts, base, d: int, keep_base=None, threshold: int = 0, keep_scale: float = 1.0):
    """W0 + delta for one flat slice, delta rounded to W0's dtype before the add."""
    pos = torch.arange(w0_flat.numel(), dtype=torch.int64, device=w0_flat.device)
    delta = _delta(ts, base, pos, d, keep_base, threshold, keep_scale)
    return w0_flat + delta.to(w0_flat.dtype)


def delta_values(ts, base, n: int, d: int, keep_base=None, threshold: int = 0, keep_scale: float = 1.0):
    """delta for n consecutive positions, in ts's dtype (fp32)."""
    pos = torch.arange(n, dtype=torch.int64, device=ts.device)
    return _delta(ts, base, pos, d, keep_base, threshold, keep_scale)


def scatter_grad(grad_ts, dw_flat, base, d: int, keep_base=None, threshold: int = 0, keep_scale: float = 1.0):
    """grad_ts[g(k)] += dW_k * mask_k (in grad_ts's dtype); returns the new grad_ts."""
    pos = torch.arange(dw_flat.numel(), dtype=torch.int64, device=dw_flat.device)
    vals = dw_flat.to(grad_ts.dtype)
    if keep_base is not None:
        vals = torch.where(_keep_mask(keep_base, pos, threshold), vals * keep_scale, 0.0)
    return grad_ts.index_add(0, ids_from_positions(base, pos, d), vals)


def backward_pass(
    w0_flat, dw_flat, ts, grad_ts, base, d: int, keep_base=None, threshold: int = 0, keep_scale: float = 1.0
):
    """Backward of one chunk in one pass over its positions: hash once, then both
    scatter dL/dW into grad_ts and rebuild W0 + delta for dL/dx.

    Returns (effective weight, new grad_ts); equal to effective_weight + scatter_grad.
    """
    pos = torch.arange(w0_flat.numel(), dtype=torch.int64, device=w0_flat.device)
    ids = ids_from_positions(base, pos, d)
    delta = ts[ids]
    vals = dw_flat.to(grad_ts.dtype)
    if keep_base is not None:
        keep = _keep_mask(keep_base, pos, threshold)
        delta = torch.where(keep, delta * keep_scale, 0.0)
        vals = torch.where(keep, vals * keep_scale, 0.0)
    return w0_flat + delta.to(w0_flat.dtype), grad_ts.index_add(0, ids, vals)


def effective_weight_ids(w0_flat, ts, base, d: int):
    """effective_weight, and the slice's group ids as int32 for the backward to reuse."""
    pos = torch.arange(w0_flat.numel(), dtype=torch.int64, device=w0_flat.device)
    ids = ids_from_positions(base, pos, d).to(torch.int32)
    return w0_flat + ts[ids].to(w0_flat.dtype), ids


def backward_from_ids(w0_flat, dw_flat, ts, grad_ts, ids):
    """backward_pass with the forward's ids: no hashing. Returns (W0 + delta, new grad_ts)."""
    return w0_flat + ts[ids].to(w0_flat.dtype), grad_ts.index_add(0, ids, dw_flat.to(grad_ts.dtype))


def scatter_from_ids(grad_ts, dw_flat, ids):
    return grad_ts.index_add(0, ids, dw_flat.to(grad_ts.dtype))


def count_groups(base, n: int, d: int):
    """n_j over n < 2^31 consecutive positions, as int32.

    int32, not int64: CPU atomics on 64-bit integers are ~6x slower; callers sum the
    per-chunk counts into int64.
    """
    if n >= 2**31:
        raise ValueError(f"count_groups counts at most 2^31 - 1 positions per call, got {n}")
    pos = torch.arange(n, dtype=torch.int64, device=base.device)
    ones = torch.ones(n, dtype=torch.int32, device=base.device)
    return torch.zeros(d, dtype=torch.int32, device=base.device).index_add(0, ids_from_positions(base, pos, d), ones)


_KERNELS = (
    "effective_weight",
    "delta_values",
    "scatter_grad",
    "backward_pass",
    "count_groups",
    "effective_weight_ids",
    "backward_from_ids",
    "scatter_from_ids",
)


class KernelSet:
    """The kernels in one mode: "eager" or "compiled" (torch.compile, dynamic shapes).

    A compiled kernel that fails (no C++ compiler, unsupported device) warns once and
    falls back to eager for the rest of the process.
    """

    def __init__(self, mode: str):
        if mode not in ("eager", "compiled"):
            raise ValueError(f"kernel mode must be 'eager' or 'compiled', got {mode!r}")
        self.mode = mode
        for name in _KERNELS:
            fn = globals()[name]
            setattr(self, name, fn if mode == "eager" else self._guarded(name, fn))

    def _guarded(self, name, fn):
        # emulate_precision_casts: keep the rounding of delta to W0's dtype before the
        # add. Inductor otherwise fuses bf16 casts away and computes W0 + delta in fp32,
        # which would make the trained model differ from its merged export.
        compiled = torch.compile(fn, dynamic=True, options={"emulate_precision_casts": True})

        def call(*args, **kwargs):
            if self.mode == "eager":
                return fn(*args, **kwargs)
            try:
                return compiled(*args, **kwargs)
            except Exception as exc:  # compilation is an optimisation, never a failure
                warnings.warn(f"GPart: compiled kernel {name} failed ({exc!r}); falling back to eager kernels")
                self.mode = "eager"
                return fn(*args, **kwargs)

        return call


_CACHE: dict[str, KernelSet] = {}

# Below this many target weights the compile time of the fused kernels (seconds) is
# larger than what they save; eager kernels run tiny models faster.
COMPILE_MIN_D = 1 << 24
MODES = ("auto", "compiled", "eager", "triton")


# method.kernel=auto picks the Triton kernels on CUDA only once they have been checked on
# a GPU (launch/gpu_check.sh); until then they are opt-in (method.kernel: triton): their
# correctness is tested in Triton's interpreter on CPU and their sm_90 compile, not on a GPU.
AUTO_TRITON = False


def choose_mode(mode: str, D: int, device, d: int | None = None) -> str:
    """method.kernel=auto -> compiled on GPUs (Triton once AUTO_TRITON) and for large
    models, else eager."""
    if mode != "auto":
        return mode
    device = torch.device(device)
    if AUTO_TRITON and device.type == "cuda" and triton_unavailable(device, d) is None:
        return "triton"
    return "compiled" if (device.type == "cuda" or D >= COMPILE_MIN_D) else "eager"


def get_kernels(mode: str) -> KernelSet:
    """torch's kernels of `mode` ("eager" or "compiled"), one set per mode and process.
    The same functions as one-pass Triton kernels are triton.triton_kernels(), which
    builds on these (layer.kernel_set picks by any mode)."""
    if mode == "triton":
        raise ValueError("the Triton kernels are triton.triton_kernels(); layer.kernel_set(mode) picks by mode")
    if mode not in _CACHE:
        _CACHE[mode] = KernelSet(mode)
    return _CACHE[mode]


def triton_unavailable(device, d: int | None = None) -> str | None:
    """Why method.kernel=triton cannot run on `device` (None: it can)."""
    import importlib.util
    import os

    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (pip install -e '.[triton]')"
    if torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"Triton kernels run on CUDA devices; this run's device is {device}"
    if d is not None and d > 1 << 30:
        return f"the Triton kernels take d <= 2^30, got d={d}"
    return None
