"""GPart on a causal LM: adapt the target linears in place and attach theta.

Works on a plain module and on a model built sharded under ZeRO-3; the only
distributed step is the exact count of the group sizes n_j (shard-local counts, one
all-reduce of a d-vector).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ... import comm
from ...targets import ALL_LINEAR, Layout, Target, build_layout, linear_module_names
from ..base import MethodRoot
from . import partition
from .kernels import get_kernels
from .op import OpConfig, effective_rows, gpart_linear

log = logging.getLogger(__name__)

# The name of theta on the root module: what checkpoints and adapter files call it.
THETA = "gpart_theta"


def kernel_set(mode: str):
    """The kernels of a method.kernel mode (kernels.choose_mode's answer): torch's
    (kernels.py) or, for "triton", Triton's (triton.py, imported only then: it needs the
    triton package)."""
    if mode == "triton":
        from .triton import triton_kernels

        return triton_kernels()
    return get_kernels(mode)


def linear_function(kernels):
    """The linear op a layer built with these kernels runs: op.gpart_linear, or with
    Triton's the fused Triton GEMMs or that op, whichever is faster per shape (triton_op.py)."""
    if kernels.mode == "triton":
        from .triton_op import triton_gpart_linear

        return triton_gpart_linear
    return gpart_linear


def count_groups_distributed(D: int, d: int, seed: int, kernels, device=None) -> torch.Tensor:
    """n_j over all D positions; each rank counts a contiguous 1/world of [0, D).

    g depends on k alone, so the split need not follow the parameter shards: any tiling
    of [0, D) gives the same counts after the all-reduce.
    """
    world, rank = comm.world(), comm.rank()
    per = -(-D // world)
    start, stop = min(D, rank * per), min(D, (rank + 1) * per)
    counter = kernels.count_groups if kernels.mode != "eager" else None  # compiled or triton
    counts = partition.group_counts(start, stop - start, d, seed, device=device, counter=counter)
    return comm.sum_(counts)


class GPartContext:
    """State shared by every adapted linear: op config and this forward's ts.

    Not an nn.Module on purpose: the linears hold a reference to it without ZeRO-3
    treating it as a submodule or partitioning anything in it.
    """

    def __init__(self, op: OpConfig):
        self.op = op
        self.linear = linear_function(op.kernels)  # chosen once, when the layers are built
        self.ts: torch.Tensor | None = None
        self.keep_seed: int | None = None
        self.zero = False  # theta == 0 in a no-grad forward: delta is exactly 0


class GPartLinear(nn.Linear):
    """An nn.Linear whose forward adds the regenerated GPart delta.

    Installed by swapping the class of an existing module, so its parameters, its
    ZeRO-3 hooks and its name stay exactly where they were.
    """

    gpart_spec: Target
    gpart_ctx: GPartContext

    def forward(self, x):
        ctx = self.gpart_ctx
        if ctx.ts is None:
            raise RuntimeError(
                "GPartLinear called outside GPartModel.prepare(): call the "
                "wrapping root module so theta is gathered and scaled first"
            )
        if ctx.zero:  # the pretrained model itself: skip regenerating a delta of zeros
            return nn.functional.linear(x, self.weight, self.bias)
        return ctx.linear(x, self.weight, self.bias, ctx.ts, self.gpart_spec, ctx.op, ctx.keep_seed)


class GPartModel(MethodRoot):
    """Root module: the frozen causal LM plus theta (d floats, fp32, replicated).

    theta lives on the root so that DeepSpeed sees it as the one trainable parameter,
    reduces its gradient and steps it; `prepare` computes ts = theta * s once per forward
    and hands it to every adapted linear through the shared context.
    """

    def __init__(
        self, lm: nn.Module, layout: Layout, scales: torch.Tensor, ctx: GPartContext, seed: int, target_modules
    ):
        super().__init__(lm)
        self.layout = layout
        self.seed = seed
        self.target_modules = target_modules
        self.gpart_ctx = ctx
        self.register_parameter(THETA, nn.Parameter(torch.zeros(ctx.op.d, dtype=torch.float32)))
        # Plain attribute, not a buffer: engines cast buffers to the training dtype, and
        # s must stay float32 to match the reference rounding.
        self._scales = scales.to(torch.float32)

    @property
    def theta(self) -> nn.Parameter:
        return getattr(self, THETA)

    @property
    def d(self) -> int:
        return self.gpart_ctx.op.d

    @property
    def scales(self) -> torch.Tensor:
        return self._scales

    def scaled_theta(self) -> torch.Tensor:
        theta = self.theta
        if self._scales.device != theta.device:
            self._scales = self._scales.to(theta.device)
        return theta.float() * self._scales

    def prepare(self) -> None:
        self.gpart_ctx.ts = self.scaled_theta()
        # Evaluating an untrained adapter (theta = 0) costs exactly the base model.
        self.gpart_ctx.zero = (not torch.is_grad_enabled()) and not bool(self.gpart_ctx.ts.any())
        p = self.gpart_ctx.op.dropout
        # A fresh dropout stream per forward, drawn from torch's RNG so that activation
        # checkpointing (which replays RNG state) regenerates the same mask.
        self.gpart_ctx.keep_seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0 and self.training else None

    def adapted_modules(self):
        mods = dict(self.lm.named_modules())
        return [(t, mods[t.name]) for t in self.layout.targets]

    @torch.no_grad()
    def effective_weight(self, name: str) -> torch.Tensor:
        """W0 + delta of one target (full weight; plain, non-partitioned modules only)."""
        mod = dict(self.lm.named_modules())[name]
        spec = mod.gpart_spec
        return effective_rows(mod.weight, self.scaled_theta(), spec, self.gpart_ctx.op, 0, spec.out_features)


def apply_gpart(
    model: nn.Module,
    d: int,
    seed: int,
    target_modules=ALL_LINEAR,
    dropout: float = 0.0,
    kernel_mode: str = "eager",
    chunk_elems: int = 1 << 26,
    count_device=None,
    reuse_ids: bool = False,
) -> GPartModel:
    """Freeze `model`, adapt its target linears in place and return the GPartModel root.

    Under ZeRO-3 call it after the model is built (sharded) and before
    `deepspeed.initialize`; with torch.distributed initialised the counts are computed
    shard-locally and all-reduced.
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    layout = build_layout(model, target_modules)
    if not layout.targets:
        raise ValueError(
            f"target_modules={target_modules!r} matched no linear layer inside "
            f"decoder blocks; available: {linear_module_names(model)}"
        )
    if not 1 <= d <= layout.D:
        raise ValueError(f"d must be in [1, D={layout.D}], got {d}")
    for p in model.parameters():
        p.requires_grad_(False)
    kernels = kernel_set(kernel_mode)
    op = OpConfig(
        d=d,
        seed=seed,
        kernels=kernels,
        chunk_elems=chunk_elems,
        dropout=dropout,
        reuse_ids=reuse_ids and dropout == 0.0,
    )
    counts = count_groups_distributed(layout.D, d, seed, kernels, device=count_device)
    scales = partition.scales_from_counts(counts)
    ctx = GPartContext(op)
    mods = dict(model.named_modules())
    for t in layout.targets:
        mod = mods[t.name]
        mod.__class__ = GPartLinear
        mod.gpart_spec = t
        mod.gpart_ctx = ctx
    empty = int((counts == 0).sum())
    log.info(
        "GPart group sizes n_g (exact): min %d, mean %.1f, max %d", int(counts.min()), layout.D / d, int(counts.max())
    )
    if empty:
        log.warning("GPart: %d of d=%d groups are empty (D/d=%.1f); they never train", empty, d, layout.D / d)
    return GPartModel(model, layout, scales.cpu(), ctx, seed, target_modules)
