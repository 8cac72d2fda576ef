"""Values a loaded configuration implies: the learning rate `train.lr: auto` resolves to
(the method's own rule, methods/), and where the merged export goes."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from .. import methods


def resolved_lr(cfg: DictConfig, D: int) -> float:
    """train.lr as a number: `auto` asks the method for its calibrated rate at this D."""
    if cfg.train.lr == "auto":
        return float(methods.create(cfg.method).auto_lr(D))
    return float(cfg.train.lr)


def auto_lr_caveat(cfg: DictConfig, D: int) -> str | None:
    """Where a run at train.lr: auto lies outside the evidence behind the method's rate
    (None for a numeric train.lr: the user's own)."""
    return methods.create(cfg.method).auto_lr_caveat(D) if cfg.train.lr == "auto" else None


def export_dir(cfg: DictConfig) -> Path:
    return Path(cfg.export.dir) if cfg.export.dir else Path(cfg.output_dir) / "merged"
