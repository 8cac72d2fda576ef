"""W0 + delta for any flat slice of any target weight: what every GPart export writes.

The merged value of element k is exactly what the training forward used, because both
go through `op.effective_slice` with the same kernels and the compute (training) dtype.
Slices are flat element ranges of one weight in row-major order, so the same call serves
a ZeRO-3 shard (which starts anywhere, even mid-row), a row block streamed from a file,
or a whole tensor. Knows nothing of DeepSpeed or of files.
"""

from __future__ import annotations

import torch

from ...targets import Target
from . import partition
from .kernels import KernelSet, get_kernels
from .op import OpConfig, effective_slice


class Merger:
    """theta, seed and the canonical layout -> merged slices of target weights."""

    def __init__(
        self,
        theta: torch.Tensor,
        seed: int,
        targets: list[Target],
        compute_dtype: torch.dtype,
        kernels: KernelSet | None = None,
        scales: torch.Tensor | None = None,
        device=None,
    ):
        kernels = kernels or get_kernels("eager")
        self.op = OpConfig(d=theta.numel(), seed=seed, kernels=kernels)
        self.device = torch.device(device or "cpu")
        self.compute_dtype = compute_dtype
        self.targets = {t.weight_name: t for t in targets}
        self.D = sum(t.numel for t in targets)
        if scales is None:
            counter = kernels.count_groups if kernels.mode != "eager" else None
            counts = partition.group_counts(
                0, self.D, self.d, seed, device=self.device, chunk=self._piece(), counter=counter
            )
            scales = partition.scales_from_counts(counts)
        # ts = theta * s in float32, as the training forward forms it.
        self.ts = theta.detach().to(self.device, torch.float32) * scales.to(self.device, torch.float32)

    @property
    def d(self) -> int:
        return self.op.d

    @property
    def seed(self) -> int:
        return self.op.seed

    def _piece(self) -> int:
        """Elements hashed at once: the eager hash makes ~10 int64 temporaries per element
        (2^18 -> ~20 MB); the compiled kernel fuses them away and takes large pieces."""
        return (1 << 24) if self.op.kernels.mode != "eager" else (1 << 18)

    def is_target(self, tensor_name: str) -> bool:
        return tensor_name in self.targets

    def merged(self, tensor_name: str, first: int, w0_flat: torch.Tensor) -> torch.Tensor:
        """W0 + delta for elements [first, first + n) of a target, in compute_dtype."""
        t = self.targets[tensor_name]
        w = w0_flat.to(self.device, self.compute_dtype).reshape(-1)
        out = torch.empty_like(w)
        step = self._piece()
        for c0 in range(0, w.numel(), step):
            c1 = min(w.numel(), c0 + step)
            out[c0:c1] = effective_slice(w[c0:c1], self.ts, t, first + c0, self.op)
        return out
