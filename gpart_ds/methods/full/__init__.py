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
    config_keys = Method.config_keys   # every weight trains: no targets, seed or dropout of its own

    @classmethod
    def label(cls, m) -> str:
        return "full FT"

    @classmethod
    def trainable_sizes(cls, m, arch) -> list[int]:
        return [n for _, n in arch.params]

    @classmethod
    def step_flops(cls, m, arch, ctx) -> dict[str, int]:
        T = ctx.tokens
        linears = arch.block_linears()
        o_last, i_last = linears[-1]
        # torch's non-reentrant checkpointing stops recomputing a block once the last tensor
        # saved for backward is rebuilt: down_proj's input (saved for its weight gradient)
        # exists before down_proj runs, so that matmul is not recomputed.
        skip = 2 * T * arch.layers * o_last * i_last if ctx.grad_ckpt else 0
        dw = 2 * T * arch.layers * sum(o * i for o, i in linears) + 2 * ctx.head * arch.hidden * arch.vocab
        return {"recompute": -skip, "dw": dw}

    @classmethod
    def step_traffic(cls, traffic, arch, m) -> None:
        c = traffic.ctx
        sizes = cls.trainable_sizes(m, arch)
        units = arch.layers + 3   # the blocks, embeddings, final norm, LM head
        gathered = traffic.gathered(sizes, c.world)
        # The base itself trains, over the world: gathered for the forward and once more
        # for the recompute and backward together (measured), every gradient reduce-scattered.
        traffic.add("weights: forward gathers", "all_gather", c.world, c.micro_steps * gathered * c.dtype_bytes,
                    c.micro_steps * units, True)
        traffic.add("weights: recompute + backward gathers", "all_gather", c.world,
                    c.micro_steps * gathered * c.dtype_bytes, c.micro_steps * units, True)
        traffic.add("weights: gradient reduce-scatter", "reduce_scatter", c.world,
                    c.micro_steps * traffic.padded(sizes, c.world) * c.comm_bytes, c.micro_steps * units, True)

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
