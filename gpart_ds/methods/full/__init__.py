"""Full fine-tuning: every base parameter trains (ZeRO-3 shards them and their Adam state).

The upper-bound baseline; it has no adapter: its merged export is the trained model.
config.py: its keys (name only); cost.py: what the planner counts; here: the run.
"""

from __future__ import annotations

import torch
from torch import nn

from ...targets import Layout
from ..base import Method, MethodRoot
from .config import FullConfig
from .cost import FullCost


class Full(Method):
    name = "full"
    config_class = FullConfig
    cost_class = FullCost
    check_state_every_step = False  # every weight: the loss and the gradient norm are the check
    DEFAULT_LR = 5e-5  # the usual full fine-tuning rate for small LMs (docs/lr_rule.md)

    def build(self, base: nn.Module, layout: Layout, device: torch.device) -> MethodRoot:
        for p in base.parameters():
            p.requires_grad_(True)
        self.layout = layout
        self.root = MethodRoot(base)
        return self.root
