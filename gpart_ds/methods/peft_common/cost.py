"""What the PEFT baselines cost alike: the adapter's activations, the frozen backward, the
collectives that move their trainables, the FLOPs no layer-0 q/k/v dX saves."""

from __future__ import annotations

import re

from ..cost import Cost, partitioned_traffic

FIRST_QKV = re.compile(r"(^|\.)layers\.0\.self_attn\.[qkv]_proj(\.weight)?$")


def first_block_qkv(arch) -> list[tuple[int, int]]:
    """(out, in) of the targets among layer 0's q/k/v projections."""
    return [s for s, n in zip(arch.targets, arch.target_names) if FIRST_QKV.search(n)]


def per_layer_targets(arch) -> int:
    return len(arch.targets) // max(1, arch.layers)


class PeftCost(Cost):
    def x_a_activations(self, plan, arch, ctx) -> None:
        """x @ A of every target, kept for the backward (one block's under checkpointing)."""
        plan.add(
            f"activations: {self.cfg.display} x@A per target",
            ctx.tokens * ctx.b * self.cfg.rank * per_layer_targets(arch) * (1 if ctx.grad_ckpt else arch.layers),
        )

    def projection_flops(self, arch, ctx) -> tuple[int, int]:
        """(FLOPs of x A^T then (.) B^T over every target, those of dX through layer 0's q/k/v
        A, which nothing upstream needs without checkpointing)."""
        T, r = ctx.tokens, self.cfg.rank
        proj = sum(2 * T * r * (o + i) for o, i in arch.targets)
        qkv0 = 0 if ctx.grad_ckpt else sum(2 * T * r * i for _, i in first_block_qkv(arch))
        return proj, qkv0

    def frozen_backward(self, arch, ctx, params: dict[str, int]) -> dict[str, int]:
        if ctx.grad_ckpt:
            # PEFT's own input-grad hook gives the embeddings a backward (measured).
            return {**params, **{n: k for n, k in arch.params if "embed" in n}}
        # Layer 0's q/k/v base linears have no backward: their input needs no gradient and
        # PEFT's adapter sits beside the base layer, not inside it (GPart's op holds theta).
        return {n: k for n, k in params.items() if not FIRST_QKV.search(n)}

    def step_traffic(self, traffic, arch) -> None:
        # Partitioned over the world: gathered per block for the forward and once more for
        # the recompute and backward together (measured); gradients reduce-scattered in one
        # bucket per micro-step.
        partitioned_traffic(traffic, f"{self.label} trainables", self.trainable_sizes(arch), arch.layers, 1)
