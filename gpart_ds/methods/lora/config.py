"""LoRA's config: the method.* keys it reads (drift order: r, alpha, target_modules)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..base import dropout_option, option, target_modules_option
from ..peft_common.config import PeftConfig


@dataclass
class LoRAConfig(PeftConfig):
    name: str = option("lora", "LoRA of rank r")
    r: int | None = option(None, "rank (default 8)", drift=True)
    alpha: float | None = option(None, "alpha (default 2 x r)", drift=True)
    target_modules: Any = target_modules_option()
    dropout: float = dropout_option("their own dropout")
    default_rank = 8
    display = "LoRA"
