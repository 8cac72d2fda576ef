"""LoRA (PEFT) of rank r on GPart's targets: the low-rank baseline.

delta W = (alpha / r) B A with A (r x in), B (out x r); r (in + out) trainable numbers
per target weight. config.py: its keys; cost.py: what the planner counts; here: the run.
"""

from __future__ import annotations

from ..base import Need
from ..peft_common import PeftMethod
from .config import LoRAConfig
from .cost import LoRACost


class LoRA(PeftMethod):
    name = "lora"
    config_class = LoRAConfig
    cost_class = LoRACost
    # The rate PEFT's examples and most fine-tuning recipes start from (docs/lr_rule.md).
    DEFAULT_LR = 1e-3

    def validate(self, need: Need) -> None:
        super().validate(need)
        a = self.cfg.alpha
        need(a is None or a > 0, "method.alpha", f"must be > 0, got {a}")

    def peft_config(self, target_names: list[str]):
        from peft import LoraConfig

        m, r = self.cfg, self.cfg.rank
        return LoraConfig(
            r=r,
            lora_alpha=m.alpha or 2 * r,
            lora_dropout=m.dropout,
            target_modules=target_names,
            bias="none",
            task_type="CAUSAL_LM",
        )
