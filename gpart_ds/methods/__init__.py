"""The registry: the single list of fine-tuning methods.

GPart is the method; LoRA, VeRA and full fine-tuning are the baselines it is measured
against, run through the same data, loop, logging, checkpoints and export. Each lives in
its own folder behind the `Method` interface (base.py); adding one means a folder and a
line here.
"""
from __future__ import annotations

from pathlib import Path

from .base import Method, MethodRoot
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
    """A method instance for a validated `method` config section."""
    return get(m.name)(m)


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


__all__ = ["Method", "MethodRoot", "REGISTRY", "names", "get", "create", "open_adapter", "open_checkpoint"]
