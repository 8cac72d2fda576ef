"""Full fine-tuning's config: it reads no method.* key beyond `name` (every weight trains:
no targets, seed or dropout of its own)."""

from __future__ import annotations

from dataclasses import dataclass

from ..base import MethodConfig, option


@dataclass
class FullConfig(MethodConfig):
    name: str = option("full", "full fine-tuning")
    trains_base = True

    @property
    def label(self) -> str:
        return "full FT"
