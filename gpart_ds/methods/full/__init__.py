"""Full fine-tuning: every base parameter trains (ZeRO-3 shards them and their Adam state).

The upper-bound baseline; it has no adapter: its merged export is the trained model.
"""
from __future__ import annotations

import torch
from torch import nn

from ...targets import Layout
from ..base import Method, MethodRoot


class Full(Method):
    name = "full"
    trains_base = True
    check_state_every_step = False   # every weight: the loss and the gradient norm are the check
    DEFAULT_LR = 5e-5   # the usual full fine-tuning rate for small LMs (docs/lr_rule.md)

    @classmethod
    def label(cls, m) -> str:
        return "full FT"

    @classmethod
    def trainable_count(cls, m, arch) -> int:
        return arch.n_params

    @classmethod
    def auto_lr(cls, m, D: int) -> float:
        return cls.DEFAULT_LR

    @classmethod
    def plan_rows(cls, plan, arch, m, ctx) -> None:
        W, b = ctx.world, ctx.b
        plan.add(f"gradients, own partition (1/{W})", ctx.shard * b)
        plan.add(f"fp32 master weights, Adam moments (1/{W})", ctx.shard * 12, on_host=ctx.off_opt)
        plan.add("transient: gradients of the gathered unit before reduce-scatter", ctx.biggest * b)

    def build(self, base: nn.Module, layout: Layout, device: torch.device) -> MethodRoot:
        for p in base.parameters():
            p.requires_grad_(True)
        self.layout = layout
        self.root = MethodRoot(base)
        return self.root
