"""Apply GPart to a causal LM: find targets, lay them out canonically, attach theta.

Works on a plain module and on a model built sharded under ZeRO-3 (shapes come from
`ds_shape` when a parameter is partitioned). The only DeepSpeed-aware line is the
shape lookup; counting is distributed through torch.distributed when it is initialised.

Layout: target weights in `named_modules()` order, row-major inside each weight; the
global index of element (i, j) of target t is offset(t) + i * in + j.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from . import partition
from .kernels import get_kernels
from .lm_loss import objective_forward
from .ops import LayerSpec, OpConfig, effective_rows, gpart_linear

log = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"
# Decoder blocks of Llama, Mistral, Qwen2, Gemma...: "model.layers.<i>." in HF naming.
_BLOCK_RE = re.compile(r"(^|\.)layers\.\d+\.")


@dataclass(frozen=True)
class Target:
    name: str                 # module name in named_modules()
    shape: tuple[int, int]    # (out, in)
    offset: int               # global index of the first element

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass
class Layout:
    targets: list[Target] = field(default_factory=list)

    @property
    def D(self) -> int:
        return sum(t.numel for t in self.targets)

    def to_json(self) -> list:
        return [[t.name, list(t.shape), t.offset] for t in self.targets]


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The parameter's logical shape, also while ZeRO-3 has it partitioned."""
    return tuple(getattr(param, "ds_shape", param.shape))


def _matches(name: str, patterns) -> bool:
    if patterns == ALL_LINEAR or patterns == [ALL_LINEAR]:
        return True
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    # PEFT convention: a list entry matches the module name or its dotted suffix.
    return any(name == p or name.endswith("." + p) for p in patterns)


def find_targets(model: nn.Module, patterns) -> list[tuple[str, nn.Linear]]:
    """Linear layers inside decoder blocks whose names match `patterns`, in order.

    `patterns`: "all-linear", a list of module-name suffixes (["q_proj", "v_proj"]), or a
    regex string matched against the full module name.
    """
    found = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and _BLOCK_RE.search(name) and _matches(name, patterns):
            found.append((name, mod))
    return found


def build_layout(model: nn.Module, patterns) -> Layout:
    layout, offset = Layout(), 0
    for name, mod in find_targets(model, patterns):
        shape = full_shape(mod.weight)
        layout.targets.append(Target(name, (int(shape[0]), int(shape[1])), offset))
        offset += shape[0] * shape[1]
    return layout


def linear_module_names(model: nn.Module) -> list[str]:
    """Suffixes of all linear layers in decoder blocks: what a pattern could match."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) and _BLOCK_RE.search(n)})


def count_groups_distributed(D: int, d: int, seed: int, kernels, device=None) -> torch.Tensor:
    """n_j over all D positions; each rank counts a contiguous 1/world of [0, D).

    g depends on k alone, so the split need not follow the parameter shards: any tiling
    of [0, D) gives the same counts after the all-reduce.
    """
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    per = -(-D // world)
    start, stop = min(D, rank * per), min(D, (rank + 1) * per)
    counter = kernels.count_groups if kernels.mode != "eager" else None   # compiled or triton
    counts = partition.group_counts(start, stop - start, d, seed, device=device, counter=counter)
    if world > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return counts


class GPartContext:
    """State shared by every adapted linear: op config and this forward's ts.

    Not an nn.Module on purpose: the linears hold a reference to it without ZeRO-3
    treating it as a submodule or partitioning anything in it.
    """

    def __init__(self, op: OpConfig):
        self.op = op
        self.ts: torch.Tensor | None = None
        self.keep_seed: int | None = None
        self.zero = False   # theta == 0 in a no-grad forward: delta is exactly 0


class GPartLinear(nn.Linear):
    """An nn.Linear whose forward adds the regenerated GPart delta.

    Installed by swapping the class of an existing module, so its parameters, its
    ZeRO-3 hooks and its name stay exactly where they were.
    """

    gpart_spec: LayerSpec
    gpart_ctx: GPartContext

    def forward(self, x):
        ctx = self.gpart_ctx
        if ctx.ts is None:
            raise RuntimeError("GPartLinear called outside GPartModel.forward: call the "
                               "wrapping GPartModel so theta is gathered and scaled first")
        if ctx.zero:  # the pretrained model itself: skip regenerating a delta of zeros
            return nn.functional.linear(x, self.weight, self.bias)
        return gpart_linear(x, self.weight, self.bias, ctx.ts, self.gpart_spec, ctx.op, ctx.keep_seed)


class GPartModel(nn.Module):
    """Root module: the frozen base model plus theta (d floats, fp32, replicated).

    theta lives on the root so that DeepSpeed sees it as the one trainable parameter,
    reduces its gradient and steps it; forward computes ts = theta * s once and hands it
    to every adapted linear through the shared context.
    """

    def __init__(self, base: nn.Module, layout: Layout, scales: torch.Tensor,
                 ctx: GPartContext, seed: int, target_modules):
        super().__init__()
        self.base_model = base
        self.layout = layout
        self.seed = seed
        self.target_modules = target_modules
        self.gpart_ctx = ctx
        self.gpart_theta = nn.Parameter(torch.zeros(ctx.op.d, dtype=torch.float32))
        # Plain attribute, not a buffer: engines cast buffers to the training dtype, and
        # s must stay float32 to match the reference rounding.
        self._scales = scales.to(torch.float32)
        # With labels, run the vocabulary head only at label positions (see lm_loss);
        # callers that need logits call without labels.
        self.label_positions_only = True

    @property
    def d(self) -> int:
        return self.gpart_ctx.op.d

    @property
    def scales(self) -> torch.Tensor:
        return self._scales

    def scaled_theta(self) -> torch.Tensor:
        theta = self.gpart_theta
        if self._scales.device != theta.device:
            self._scales = self._scales.to(theta.device)
        return theta.float() * self._scales

    def _prepare(self):
        self.gpart_ctx.ts = self.scaled_theta()
        # Evaluating an untrained adapter (theta = 0) costs exactly the base model.
        self.gpart_ctx.zero = (not torch.is_grad_enabled()) and not bool(self.gpart_ctx.ts.any())
        p = self.gpart_ctx.op.dropout
        # A fresh dropout stream per forward, drawn from torch's RNG so that activation
        # checkpointing (which replays RNG state) regenerates the same mask.
        self.gpart_ctx.keep_seed = (int(torch.randint(0, 2**62, (1,)).item())
                                    if p > 0 and self.training else None)

    def forward(self, *args, **kwargs):
        self._prepare()
        return objective_forward(self.base_model, args, kwargs, self.label_positions_only)

    @torch.no_grad()
    def generate(self, *args, **kwargs):
        self._prepare()
        return self.base_model.generate(*args, **kwargs)

    def adapted_modules(self):
        mods = dict(self.base_model.named_modules())
        return [(t, mods[t.name]) for t in self.layout.targets]

    @torch.no_grad()
    def effective_weight(self, name: str) -> torch.Tensor:
        """W0 + delta of one target (full weight; plain, non-partitioned modules only)."""
        mod = dict(self.base_model.named_modules())[name]
        spec = mod.gpart_spec
        return effective_rows(mod.weight, self.scaled_theta(), spec, self.gpart_ctx.op,
                              0, spec.out_features)


def apply_gpart(model: nn.Module, d: int, seed: int, target_modules=ALL_LINEAR,
                dropout: float = 0.0, kernel_mode: str = "eager",
                chunk_elems: int = 1 << 26, count_device=None, reuse_ids: bool = False) -> GPartModel:
    """Freeze `model`, adapt its target linears in place and return the GPartModel root.

    Under ZeRO-3 call it after the model is built (sharded) and before
    `deepspeed.initialize`; with torch.distributed initialised the counts are computed
    shard-locally and all-reduced.
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    layout = build_layout(model, target_modules)
    if not layout.targets:
        raise ValueError(f"target_modules={target_modules!r} matched no linear layer inside "
                         f"decoder blocks; available: {linear_module_names(model)}")
    if not 1 <= d <= layout.D:
        raise ValueError(f"d must be in [1, D={layout.D}], got {d}")
    for p in model.parameters():
        p.requires_grad_(False)
    kernels = get_kernels(kernel_mode)
    op = OpConfig(d=d, seed=seed, kernels=kernels, chunk_elems=chunk_elems, dropout=dropout,
                  reuse_ids=reuse_ids and dropout == 0.0)
    counts = count_groups_distributed(layout.D, d, seed, kernels, device=count_device)
    scales = partition.scales_from_counts(counts)
    ctx = GPartContext(op)
    mods = dict(model.named_modules())
    for t in layout.targets:
        mod = mods[t.name]
        mod.__class__ = GPartLinear
        mod.gpart_spec = LayerSpec(t.offset, t.shape[0], t.shape[1])
        mod.gpart_ctx = ctx
    empty = int((counts == 0).sum())
    log.info("GPart group sizes n_g (exact): min %d, mean %.1f, max %d", int(counts.min()),
             layout.D / d, int(counts.max()))
    if empty:
        log.warning("GPart: %d of d=%d groups are empty (D/d=%.1f); they never train",
                    empty, d, layout.D / d)
    return GPartModel(model, layout, scales.cpu(), ctx, seed, target_modules)
