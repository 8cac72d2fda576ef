"""What LoRA costs, from shapes: A (r x in) and B (out x r) per target."""

from __future__ import annotations

from ..peft_common.cost import PeftCost


class LoRACost(PeftCost):
    def trainable_sizes(self, arch) -> list[int]:
        r = self.cfg.rank
        return [n for o, i in arch.targets for n in (r * i, o * r)]  # A (r x in), B (out x r)

    def step_flops(self, arch, ctx) -> dict[str, int]:
        # x A^T, then (x A^T) B^T per target; backward: dB, d(xA^T), dA and dX through A.
        lora, qkv0 = self.projection_flops(arch, ctx)
        # torch's non-reentrant checkpointing stops recomputing a block once the last tensor
        # saved for backward is rebuilt: B of the block's last target (down_proj) produces
        # an output nothing saves, so it is not recomputed (the base layer runs before it).
        last_b = (
            2 * ctx.tokens * self.cfg.rank * arch.targets[-1][0] * arch.layers
            if arch.target_names and arch.target_names[-1].endswith("down_proj")
            else 0
        )
        return {"forward": lora, "recompute": (lora - last_b) if ctx.grad_ckpt else 0, "dx": lora - qkv0, "dw": lora}

    def plan_rows(self, plan, arch, ctx) -> None:
        W, b = ctx.world, ctx.b
        n = self.trainable_count(arch)
        plan.add(f"LoRA A/B weights, own partition (1/{W})", -(-n // W) * b)
        plan.add(f"LoRA grads, fp32 master, Adam moments (1/{W})", -(-n // W) * (b + 12), on_host=ctx.off_opt)
        self.x_a_activations(plan, arch, ctx)
