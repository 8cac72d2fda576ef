"""What full fine-tuning costs, from shapes: every base parameter trains."""

from __future__ import annotations

from ..cost import Cost, partitioned_traffic


class FullCost(Cost):
    def trainable_sizes(self, arch) -> list[int]:
        return [n for _, n in arch.params]

    def step_flops(self, arch, ctx) -> dict[str, int]:
        T = ctx.tokens
        linears = arch.block_linears()
        o_last, i_last = linears[-1]
        # torch's non-reentrant checkpointing stops recomputing a block once the last tensor
        # saved for backward is rebuilt: down_proj's input (saved for its weight gradient)
        # exists before down_proj runs, so that matmul is not recomputed.
        skip = 2 * T * arch.layers * o_last * i_last if ctx.grad_ckpt else 0
        dw = 2 * T * arch.layers * sum(o * i for o, i in linears) + 2 * ctx.head * arch.hidden * arch.vocab
        return {"recompute": -skip, "dw": dw}

    def step_traffic(self, traffic, arch) -> None:
        # The base itself trains, over the world: every unit (the blocks, embeddings, final
        # norm, LM head) gathered twice and its gradient reduce-scattered.
        units = arch.layers + 3
        partitioned_traffic(traffic, "weights", self.trainable_sizes(arch), units, units)

    def plan_rows(self, plan, arch, ctx) -> None:
        W, b = ctx.world, ctx.b
        plan.add(f"gradients, own partition (1/{W})", ctx.shard * b)
        plan.add(f"fp32 master weights, Adam moments (1/{W})", ctx.shard * 12, on_host=ctx.off_opt)
        plan.add("transient: gradients of the gathered unit before reduce-scatter", ctx.biggest * b)
