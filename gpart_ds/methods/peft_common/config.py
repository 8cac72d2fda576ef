"""What the PEFT baselines' configs share: the rank with its per-method default, the label."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..base import MethodConfig


@dataclass
class PeftConfig(MethodConfig):
    """A PEFT method's config; each declares its own fields (r, target_modules, dropout, ...:
    their help texts differ, and their order is the method's drift order)."""

    default_rank: ClassVar[int] = 8
    display: ClassVar[str] = "?"  # the name in labels: LoRA, VeRA

    @property
    def rank(self) -> int:
        return self.r or self.default_rank

    @property
    def label(self) -> str:
        return f"{self.display} r={self.rank}"
