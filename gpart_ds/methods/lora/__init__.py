"""LoRA (PEFT) of rank r on GPart's targets: the low-rank baseline.

delta W = (alpha / r) B A with A (r x in), B (out x r); r (in + out) trainable numbers
per target weight.
"""
from __future__ import annotations

from ..base import Need
from ..peft_common import PeftMethod, first_block_qkv, per_layer_targets


class LoRA(PeftMethod):
    name = "lora"
    default_rank = 8
    config_keys = PeftMethod.config_keys | {"alpha"}
    drift_keys = ("name", "r", "alpha", "target_modules")
    # The rate PEFT's examples and most fine-tuning recipes start from (docs/lr_rule.md).
    DEFAULT_LR = 1e-3

    @classmethod
    def validate(cls, m, need: Need) -> None:
        super().validate(m, need)
        need(m.alpha is None or m.alpha > 0, "method.alpha", f"must be > 0, got {m.alpha}")

    @classmethod
    def label(cls, m) -> str:
        return f"LoRA r={cls.rank(m)}"

    @classmethod
    def trainable_sizes(cls, m, arch) -> list[int]:
        r = cls.rank(m)
        return [n for o, i in arch.targets for n in (r * i, o * r)]   # A (r x in), B (out x r)

    @classmethod
    def step_flops(cls, m, arch, ctx) -> dict[str, int]:
        # x A^T, then (x A^T) B^T per target; backward: dB, d(xA^T), dA and dX through A.
        T, r = ctx.tokens, cls.rank(m)
        lora = sum(2 * T * r * (o + i) for o, i in arch.targets)
        # Without checkpointing nothing upstream of layer 0's q/k/v needs a gradient: no dX through their A.
        qkv0 = 0 if ctx.grad_ckpt else sum(2 * T * r * i for _, i in first_block_qkv(arch))
        # torch's non-reentrant checkpointing stops recomputing a block once the last tensor
        # saved for backward is rebuilt: B of the block's last target (down_proj) produces
        # an output nothing saves, so it is not recomputed (the base layer runs before it).
        last_b = (2 * T * r * arch.targets[-1][0] * arch.layers
                  if arch.target_names and arch.target_names[-1].endswith("down_proj") else 0)
        return {"forward": lora, "recompute": (lora - last_b) if ctx.grad_ckpt else 0, "dx": lora - qkv0,
                "dw": lora}

    @classmethod
    def plan_rows(cls, plan, arch, m, ctx) -> None:
        r, W, b = cls.rank(m), ctx.world, ctx.b
        n = cls.trainable_count(m, arch)
        plan.add(f"LoRA A/B weights, own partition (1/{W})", -(-n // W) * b)
        plan.add(f"LoRA grads, fp32 master, Adam moments (1/{W})", -(-n // W) * (b + 12), on_host=ctx.off_opt)
        plan.add("activations: LoRA x@A per target", ctx.tokens * b * r * per_layer_targets(arch) *
                 (1 if ctx.grad_ckpt else arch.layers))

    def peft_config(self, target_names: list[str]):
        from peft import LoraConfig

        m, r = self.cfg, self.rank(self.cfg)
        return LoraConfig(r=r, lora_alpha=m.alpha or 2 * r, lora_dropout=m.dropout, target_modules=target_names,
                          bias="none", task_type="CAUSAL_LM")
