"""GPart's config: the method.* keys it reads, their defaults and help text, and the
choices a key alone decides (reuse_ids)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..base import MethodConfig, dropout_option, option, seed_option, target_modules_option

# method.reuse_ids=auto keeps the forward's int32 group ids for the backward up to this
# many bytes per rank (4 x D): small models gain a third of GPart's work for memory they
# have; a 70B model would need 258 GB and regenerates instead.
REUSE_IDS_MAX_BYTES = 1 << 30


@dataclass
class GPartConfig(MethodConfig):
    name: str = option("gpart", "GPart")
    d: int | None = option(None, "length of theta, the number of trainable parameters (required)", drift=True)
    seed: int = seed_option("partition seed in [0, 2^64)")
    target_modules: Any = target_modules_option()
    dropout: float = dropout_option("dropout on delta W, elementwise")
    kernel: str = option(
        "auto",
        "auto | compiled | eager | triton (auto: compiled on GPUs and for large models, "
        "eager for tiny ones; triton: the fused Triton kernels, CUDA only, d <= 2^30)",
    )
    chunk_elems: int = option(1 << 26, "elements of W0 + delta alive at once per layer")
    reuse_ids: Any = option(
        "auto",
        "keep each layer's int32 group ids from forward to backward (4 bytes x D per "
        "rank); auto: on when 4 x D <= 1 GiB and no dropout",
    )
    step_per_weight: float | None = option(
        None,
        "with train.lr: auto, how far each weight moves per (sign-like) "
        "Adam step: lr = step_per_weight x sqrt(D / d), so changing d keeps "
        "it; unset: the rule fitted on SmolLM2-135M, GPART_C x (D / d)^GPART_EXP "
        "(docs/lr_rule.md); a numeric train.lr (e.g. an override) wins",
    )

    @property
    def label(self) -> str:
        return f"GPart d={self.d:,}" if self.d else "GPart"


def reuse_ids(m: GPartConfig, D: int) -> bool:
    """Whether the run keeps each layer's group ids from forward to backward."""
    if m.reuse_ids == "auto":
        return m.dropout == 0.0 and 4 * D <= REUSE_IDS_MAX_BYTES
    return bool(m.reuse_ids) and m.dropout == 0.0
