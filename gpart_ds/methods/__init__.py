"""The registry: the single list of fine-tuning methods.

GPart is the method; LoRA, VeRA and full fine-tuning are the baselines it is measured
against, run through the same data, loop, logging, checkpoints and export. Each lives in
its own folder: its config (config.py: the method.* keys it reads), its cost (cost.py:
what the planner counts) and its run and export (a `Method`, base.py); adding one means a
folder and a line here. The run schema's `method:` section is assembled from these
configs (config/schema.py).
"""

from __future__ import annotations

from pathlib import Path

from .base import Method, MethodConfig, MethodRoot
from .cost import Cost
from .full import Full
from .gpart import GPart
from .lora import LoRA
from .vera import VeRA

REGISTRY: dict[str, type[Method]] = {m.name: m for m in (GPart, LoRA, VeRA, Full)}


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise KeyError(f"unknown method {name!r}; choose one of {names()}")
    return REGISTRY[name]


def create(m) -> Method:
    """The method of a `method:` section (a loaded run's, or plan.spec(...)), bound to its
    own config: config-time checks, the run, the export."""
    return get(m.name)(m)


def cost(m) -> Cost:
    """What the planner asks of the method of a `method:` section, bound to its own config."""
    cls = get(m.name)
    return cls.cost_class(cls.config_class.of(m))


def configs() -> dict[str, type[MethodConfig]]:
    """Each method's config class, in registry order: what the schema's `method:` section
    is assembled from."""
    return {name: cls.config_class for name, cls in REGISTRY.items()}


def open_adapter(path: Path, base_dir: Path):
    """An adapter folder as a merge source, by whichever method reads it."""
    from ..errors import UserError

    for cls in REGISTRY.values():
        src = cls.open_adapter(path, base_dir)
        if src is not None:
            return src
    raise UserError(f"{path}: no method can merge this folder offline")


def open_checkpoint(ckpt, base_dir: Path):
    """A checkpoint (checkpoint.Checkpoint, read by the caller) as a merge source, by
    whichever method reads it."""
    from ..errors import UserError

    for cls in REGISTRY.values():
        src = cls.open_checkpoint(ckpt, base_dir)
        if src is not None:
            return src
    raise UserError(f"{ckpt.path}: no method can merge this checkpoint offline")


__all__ = [
    "Cost",
    "Method",
    "MethodConfig",
    "MethodRoot",
    "REGISTRY",
    "names",
    "get",
    "create",
    "cost",
    "configs",
    "open_adapter",
    "open_checkpoint",
]
