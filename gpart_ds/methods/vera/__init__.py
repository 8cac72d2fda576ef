"""VeRA (PEFT) of rank r on GPart's targets: the random-projection baseline.

Frozen random projections A (r x max in) and B (max out x r), shared by every target
and regenerated from method.seed; trained per target: lambda_d (r) and lambda_b (out).
"""
from __future__ import annotations

from ..peft_common import PeftMethod, first_block_qkv, per_layer_targets


class VeRA(PeftMethod):
    name = "vera"
    default_rank = 256
    config_keys = PeftMethod.config_keys | {"seed"}   # its frozen projections' PRNG key
    drift_keys = ("name", "r", "seed", "target_modules")
    DEFAULT_LR = 1e-2   # VeRA's scaling vectors take ~10x LoRA's rate (the VeRA paper's settings)

    @classmethod
    def label(cls, m) -> str:
        return f"VeRA r={cls.rank(m)}"

    @classmethod
    def trainable_sizes(cls, m, arch) -> list[int]:
        r = cls.rank(m)
        return [n for o, _ in arch.targets for n in (r, o)]   # lambda_d (r), lambda_b (out)

    @classmethod
    def step_flops(cls, m, arch, ctx) -> dict[str, int]:
        # x A^T and (.) B^T with the shared projections sliced to each target; they are
        # buffers, so the backward has no weight gradient, only dX through B and then A.
        # lambda_b scales B's output, which is saved for its gradient: the recompute runs
        # every projection (no early stop as for LoRA's last B).
        T, r = ctx.tokens, cls.rank(m)
        proj = sum(2 * T * r * (o + i) for o, i in arch.targets)
        # Without checkpointing nothing upstream of layer 0's q/k/v needs a gradient: no dX through their A.
        qkv0 = 0 if ctx.grad_ckpt else sum(2 * T * r * i for _, i in first_block_qkv(arch))
        return {"forward": proj, "recompute": proj if ctx.grad_ckpt else 0, "dx": proj - qkv0}

    @classmethod
    def plan_rows(cls, plan, arch, m, ctx) -> None:
        r, W, b = cls.rank(m), ctx.world, ctx.b
        vec = cls.trainable_count(m, arch)
        max_o, max_i = max(o for o, _ in arch.targets), max(i for _, i in arch.targets)
        plan.add("VeRA shared projections A, B (every rank)", r * (max_o + max_i) * b)
        plan.add(f"VeRA scaling vectors, grads, fp32 master, Adam moments (1/{W})", -(-vec // W) * (2 * b + 12),
                 on_host=ctx.off_opt)
        plan.add("activations: VeRA x@A per target", ctx.tokens * b * r * per_layer_targets(arch) *
                 (1 if ctx.grad_ckpt else arch.layers))

    def peft_config(self, target_names: list[str]):
        from peft import VeraConfig

        m = self.cfg
        # The shared projections are sized by the largest adapted shape and regenerated
        # from projection_prng_key; saved with the adapter for portability.
        return VeraConfig(r=self.rank(m), vera_dropout=m.dropout, target_modules=target_names,
                          projection_prng_key=m.seed, save_projection=True, task_type="CAUSAL_LM")
