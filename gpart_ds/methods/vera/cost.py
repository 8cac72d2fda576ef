"""What VeRA costs, from shapes: shared frozen projections, two scaling vectors per target."""

from __future__ import annotations

from ..peft_common.cost import PeftCost


class VeRACost(PeftCost):
    def trainable_sizes(self, arch) -> list[int]:
        r = self.cfg.rank
        return [n for o, _ in arch.targets for n in (r, o)]  # lambda_d (r), lambda_b (out)

    def step_flops(self, arch, ctx) -> dict[str, int]:
        # x A^T and (.) B^T with the shared projections sliced to each target; they are
        # buffers, so the backward has no weight gradient, only dX through B and then A.
        # lambda_b scales B's output, which is saved for its gradient: the recompute runs
        # every projection (no early stop as for LoRA's last B).
        proj, qkv0 = self.projection_flops(arch, ctx)
        return {"forward": proj, "recompute": proj if ctx.grad_ckpt else 0, "dx": proj - qkv0}

    def plan_rows(self, plan, arch, ctx) -> None:
        r, W, b = self.cfg.rank, ctx.world, ctx.b
        vec = self.trainable_count(arch)
        max_o, max_i = max(o for o, _ in arch.targets), max(i for _, i in arch.targets)
        plan.add("VeRA shared projections A, B (every rank)", r * (max_o + max_i) * b)
        plan.add(
            f"VeRA scaling vectors, grads, fp32 master, Adam moments (1/{W})",
            -(-vec // W) * (2 * b + 12),
            on_host=ctx.off_opt,
        )
        self.x_a_activations(plan, arch, ctx)
