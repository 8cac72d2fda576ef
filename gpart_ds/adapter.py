"""Adapter files: theta (d floats) and what is needed to regenerate delta from it.

    adapter/adapter_model.safetensors   {"gpart_theta": float32[d]}
    adapter/adapter_config.json         d, seed, hash, targets, canonical layout, base model

Written atomically: into a temporary sibling folder, then renamed over the old one.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from . import __version__
from .partition import HASH_NAME, HASH_VERSION

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
THETA_KEY = "gpart_theta"
FORMAT = "gpart_ds.adapter"
FORMAT_VERSION = 1


class AdapterError(ValueError):
    """An adapter folder that cannot be used: says which file and what is wrong."""


def adapter_config(*, d: int, seed: int, target_modules, dropout: float, layout,
                   base_model: dict, dtype: torch.dtype | None = None) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": "gpart",
        "d": d,
        "seed": seed,
        "hash": {"name": HASH_NAME, "version": HASH_VERSION},
        "target_modules": target_modules,
        "dropout": dropout,
        "bias": "none",
        "D": layout.D,
        "layout": layout.to_json(),  # [name, [out, in], offset] in canonical order
        "base_model": base_model,
        # The dtype W0 + delta was formed in during training: merged exports round in it.
        "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "gpart_ds_version": __version__,
    }


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place; an old one is kept until the new one is in."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_adapter(out_dir: str | Path, theta: torch.Tensor, config: dict) -> Path:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if theta.shape != (config["d"],):
        raise AdapterError(f"theta has shape {tuple(theta.shape)}, expected ({config['d']},)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file({THETA_KEY: theta.detach().to("cpu", torch.float32).contiguous()},
                  str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "d": str(config["d"])})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def read_config(cfg_path: Path) -> dict:
    """An adapter_config.json; a syntax error names the file and line."""
    try:
        return json.loads(Path(cfg_path).read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{cfg_path}:{exc.lineno}: not valid JSON ({exc.msg})") from None


def read_tensors(w_path: Path) -> dict[str, torch.Tensor]:
    """An adapter's safetensors file; a truncated or corrupt one names the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(w_path))
    except (SafetensorError, OSError) as exc:
        raise AdapterError(f"{w_path}: unreadable safetensors file ({exc})") from None


def load_adapter(adapter_dir: str | Path) -> tuple[torch.Tensor, dict]:
    """(theta, config) after checking the files agree with each other."""
    adapter_dir = Path(adapter_dir)
    cfg_path, w_path = adapter_dir / CONFIG_NAME, adapter_dir / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise AdapterError(f"{p}: missing (is {adapter_dir} an adapter folder?)")
    config = read_config(cfg_path)
    if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise AdapterError(f"{cfg_path}: unknown adapter format "
                           f"{config.get('format')!r} v{config.get('format_version')!r}")
    h = config.get("hash", {})
    if (h.get("name"), h.get("version")) != (HASH_NAME, HASH_VERSION):
        raise AdapterError(f"{cfg_path}: hash {h!r} is not supported "
                           f"(this version knows {HASH_NAME} v{HASH_VERSION})")
    theta = read_tensors(w_path).get(THETA_KEY)
    if theta is None or theta.shape != (config["d"],):
        got = None if theta is None else tuple(theta.shape)
        raise AdapterError(f"{w_path}: expected tensor {THETA_KEY!r} of shape ({config['d']},), got {got}")
    return theta, config


def attach_adapter(model, adapter_dir: str | Path, kernel_mode: str = "eager"):
    """Apply a saved adapter to a plain (non-sharded) model: returns the GPartModel.

    The canonical layout recorded in the adapter must match the model's, or the seed
    would scatter theta over the wrong weights.
    """
    from .transform import apply_gpart, build_layout

    theta, cfg = load_adapter(adapter_dir)
    tm = cfg["target_modules"]
    layout = build_layout(model, tm).to_json()
    if layout != cfg["layout"]:
        first = next((i for i, (a, b) in enumerate(zip(layout, cfg["layout"])) if a != b),
                     min(len(layout), len(cfg["layout"])))
        raise AdapterError(f"{Path(adapter_dir) / CONFIG_NAME}: its layout does not match this model "
                           f"(first difference at target {first}: adapter "
                           f"{cfg['layout'][first] if first < len(cfg['layout']) else None} vs model "
                           f"{layout[first] if first < len(layout) else None}); "
                           f"was it trained on {cfg.get('base_model', {}).get('name')!r}?")
    g = apply_gpart(model, d=cfg["d"], seed=cfg["seed"], target_modules=tm,
                    dropout=cfg.get("dropout", 0.0), kernel_mode=kernel_mode)
    with torch.no_grad():
        g.gpart_theta.copy_(theta)
    return g
