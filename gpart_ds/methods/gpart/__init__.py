"""GPart: one trained vector theta of d floats, mapped into every target weight through a
seeded isometric partition (docs/method.md). Its whole life cycle lives in this folder:

    partition.py  group ids g(k) = SplitMix64(seed + k) mod d, counts n_j, scales s_j
    kernels.py    fused hash + gather / scatter kernels (torch.compile or eager)
    op.py         the linear autograd op and `effective_slice`, the one definition of W0 + delta
    layer.py      GPartLinear / GPartModel: adapt a (ZeRO-3 sharded) model, theta on the root
    merge.py      W0 + delta for any flat slice of any target: every export writes through it
    adapter.py    the adapter file format (theta + seed + layout)
    sources.py    what an offline merge starts from: adapter, checkpoint, reference adapter
    config.py     the method.* keys it reads (GPartConfig), reuse_ids
    cost.py       what the planner counts: memory rows, FLOPs, W0 + delta builds, traffic
    __init__.py   class GPart(Method): config checks, lr rule, build, adapter, export
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ... import comm
from ...targets import Layout, normalize_patterns
from ..base import Method, Need, is_positive_number
from .config import GPartConfig, reuse_ids
from .cost import GPartCost
from .kernels import MODES as KERNEL_MODES, choose_mode, triton_unavailable
from .layer import THETA, GPartModel, apply_gpart

log = logging.getLogger(__name__)

# train.lr: auto for GPart: lr = GPART_C * (D/d) ** GPART_EXP. A weight of group j moves by
# lr / sqrt(n_j) ~ lr * sqrt(d/D) per (sign-like, Adam) step, so exponent 1/2 would move every
# weight equally far whatever d, and exponent 1 would make equal first-order progress
# (docs/lr_rule.md). The quality study's sweeps (SmolLM2-135M, 40 steps, 3 tasks x d =
# 16,384 / 131,072 / 1,048,576) put the best rate between the two: dev chose the same
# multiple of sqrt(D/d) at every d on Rotten Tomatoes (a plateau), a rate growing ~(D/d)^0.8
# on QASC and ~(D/d)^1 on arithmetic. (C, exponent) minimise the worst dev-metric loss
# against each sweep's best (python -m experiments.lr_fit docs/quality_{rt,qasc,arithmetic}.json);
# 2/3 is the round value inside the fit's flat minimum (0.65-0.75). tests/experiments/
# test_lr_fit.py checks that these constants stay the fit of the committed reports.
GPART_C = 2.2e-4
GPART_EXP = 2 / 3
# What the fit covers: the sweeps' D/d (d = 1,048,576 .. 16,384 on D = 106,168,320), and the
# largest D/d at which the tasks' best rates lay within 4x of each other, so that one rate
# was within 2x of each (lr_fit's same-D-and-d table: 1.0x, 3.3x, 10x at D/d = 101, 810, 6,480).
STUDIED_D_OVER_D = (101, 6_480)
TASK_AGNOSTIC_D_OVER_D = 810


class GPart(Method):
    name = "gpart"
    config_class = GPartConfig
    cost_class = GPartCost

    # ------------------------------------------------------------ config time
    def validate(self, need: Need) -> None:
        m = self.cfg
        need(m.d is not None, "method.d", "method gpart needs d (the number of trainable parameters)")
        need(isinstance(m.d, int) and m.d >= 1, "method.d", f"d must be >= 1, got {m.d}")
        need(m.kernel in KERNEL_MODES, "method.kernel", f"must be one of {KERNEL_MODES}, got {m.kernel!r}")
        need(m.chunk_elems >= 1, "method.chunk_elems", "must be >= 1")
        need(
            m.reuse_ids in ("auto", True, False),
            "method.reuse_ids",
            f"must be auto, true or false, got {m.reuse_ids!r}",
        )
        need(
            m.step_per_weight is None or is_positive_number(m.step_per_weight),
            "method.step_per_weight",
            f"must be a finite number > 0, got {m.step_per_weight!r}",
        )

    def check_environment(self, device: torch.device, need: Need) -> None:
        if self.cfg.kernel == "triton":
            why = triton_unavailable(device, self.cfg.d)
            need(why is None, "method.kernel", f"triton: {why}")

    def check_layout(self, layout: Layout, need: Need) -> None:
        d = self.cfg.d
        need(
            d <= layout.D,
            "method.d",
            f"d={d} exceeds D={layout.D}, the number of target weights ({len(layout.targets)} matrices)",
        )

    def auto_lr(self, D: int) -> float:
        m = self.cfg
        if D < 1 or not m.d or m.d < 1:
            raise ValueError(f"GPart's lr rule needs D >= 1 and method.d >= 1, got D={D}, d={m.d}")
        if m.step_per_weight is not None:  # each weight's step, as the user set it (lr_rule.md)
            return m.step_per_weight * (D / m.d) ** 0.5
        return GPART_C * (D / m.d) ** GPART_EXP

    def auto_lr_caveat(self, D: int) -> str | None:
        m = self.cfg
        if m.step_per_weight is not None:  # the user's own step: not the fitted rule
            return None
        q, (lo, hi) = D / m.d, STUDIED_D_OVER_D
        if not lo <= q <= hi:
            return (
                f"D/d = {q:,.0f} lies outside the {lo:,}-{hi:,} the rule was fitted on: its rate is "
                f"extrapolated (docs/lr_rule.md)"
            )
        if q > TASK_AGNOSTIC_D_OVER_D:
            return (
                f"at D/d = {q:,.0f} the best rate depends on the task (up to 10x apart at D/d = {hi:,} in "
                f"the study): a sweep from 0.3x to 3x this rate may gain a few points (docs/lr_rule.md)"
            )
        return None

    # ------------------------------------------------------------ run time
    def build(self, base: nn.Module, layout: Layout, device: torch.device) -> GPartModel:
        m = self.cfg
        self.kernel_mode = choose_mode(m.kernel, layout.D, device, m.d)
        self.layout = layout
        self.root = apply_gpart(
            base,
            d=m.d,
            seed=m.seed,
            target_modules=normalize_patterns(m.target_modules),
            dropout=m.dropout,
            kernel_mode=self.kernel_mode,
            chunk_elems=m.chunk_elems,
            count_device=device,
            reuse_ids=reuse_ids(m, layout.D),
        )
        return self.root

    def describe(self) -> str:
        d, D = self.root.d, self.layout.D
        return (
            f"gpart: d={d:,} trainable parameters over D={D:,} target weights (D/d={D / d:.0f}), "
            f"kernels={self.kernel_mode}, reuse_ids={self.root.gpart_ctx.op.reuse_ids}"
        )

    def after_engine(self) -> None:
        from ...zero3 import persist

        persist(self.root.theta)  # d floats: no re-gather per forward

    def theta(self) -> torch.Tensor:
        """The full theta on this rank (fp32, CPU), checked identical on every rank."""
        from ...zero3 import gathered

        with torch.no_grad(), gathered([self.root.theta]):
            theta = self.root.theta.detach().float().cpu().clone()
        comm.check_identical(theta, "theta")
        return theta

    def save_adapter(self, out_dir: Path, info: dict) -> Path:
        from .adapter import adapter_config, save_adapter

        theta = self.theta()
        if comm.rank() == 0:
            m = self.cfg
            config = adapter_config(
                d=m.d,
                seed=m.seed,
                target_modules=normalize_patterns(m.target_modules),
                dropout=m.dropout,
                layout=self.layout,
                base_model=info["base_model"],
                dtype=info["dtype"],
            )
            save_adapter(out_dir, theta, config)
        comm.barrier()
        return Path(out_dir)

    def shard_merger(self, compute_dtype: torch.dtype, device):
        """Every rank writes W0 + delta of its own shards: no rank gathers a weight."""
        from .merge import Merger

        g = self.root
        merger = Merger(
            self.theta(),
            g.seed,
            self.layout.targets,
            compute_dtype,
            g.gpart_ctx.op.kernels,
            scales=g.scales,
            device=device,
        )
        return merger, {
            "method": "gpart",
            "adapter_kind": "zero3-run",
            "d": merger.d,
            "seed": merger.seed,
            "targets": len(self.layout.targets),
        }

    def merge_source(self, name: str):
        """A target's weight merges to W0 + delta (effective_weight, from the full W0 and
        theta); every other tensor is the base's. The export writes shards through Merger
        instead; this serves whoever needs one merged tensor (experiments/bench/theta_grad.py)."""
        mod_name, _, attr = name.rpartition(".")
        mod = dict(self.model.named_modules()).get(mod_name)
        if attr == "weight" and getattr(mod, "gpart_spec", None) is not None:
            return [mod.weight, self.root.theta], lambda: self.root.effective_weight(mod_name)
        return super().merge_source(name)

    @classmethod
    def open_adapter(cls, path: Path, base_dir: Path):
        from .sources import open_source

        return open_source(path, base_dir)

    @classmethod
    def open_checkpoint(cls, ckpt, base_dir: Path):
        from .sources import from_checkpoint

        return from_checkpoint(ckpt, base_dir)  # refuses, by name, a checkpoint of another method


__all__ = ["GPart", "GPartConfig", "GPartCost", "GPartModel", "THETA", "apply_gpart", "reuse_ids"]
