"""VeRA's config: the method.* keys it reads (drift order: r, seed, target_modules)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..base import dropout_option, option, seed_option, target_modules_option
from ..peft_common.config import PeftConfig


@dataclass
class VeRAConfig(PeftConfig):
    name: str = option("vera", "VeRA of rank r")
    r: int | None = option(None, "rank (default 256)", drift=True)
    seed: int = seed_option("projection seed")  # its frozen projections' PRNG key
    target_modules: Any = target_modules_option()
    dropout: float = dropout_option("their own dropout")
    default_rank = 256
    display = "VeRA"
