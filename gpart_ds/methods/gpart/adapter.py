"""GPart adapter files: theta (d floats) and what is needed to regenerate delta from it.

    adapter/adapter_model.safetensors   {"gpart_theta": float32[d]}
    adapter/adapter_config.json         d, seed, hash, targets, canonical layout, base model
                                        (name, path, identity: identity.py), training dtype,
                                        SHA-256 of the weights file, digest of all of these

The only home of this format: written by `save_adapter`, read (and checked) by
`load_adapter`. Written atomically: a temporary sibling folder renamed over the old one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ... import __version__, identity as ident
from ...errors import UserError
from ...fileio import atomic_dir, sha256_file
from ...targets import Layout
from .layer import THETA
from .partition import HASH_NAME, HASH_VERSION

# PEFT's file names: every adapter folder, whatever the method, uses them.
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "gpart_ds.adapter"
# 2: the digest (identity.digest of delta_fields) and the base identity. Version 1 adapters
# (written before digests existed) are still read: refusing them would strand every adapter
# trained so far, and their weights SHA-256 and layout checks still hold; they are accepted
# with a warning that their settings cannot be checked. A version 2 adapter without its
# digest is refused (the digest was removed by hand).
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)


class AdapterError(UserError):
    """An adapter folder that cannot be used: says which file and what is wrong."""


def adapter_config(
    *,
    d: int,
    seed: int,
    target_modules,
    dropout: float,
    layout: Layout,
    base_model: dict,
    dtype: torch.dtype | None = None,
) -> dict:
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
        "dtype": dtype_name(dtype),
        "gpart_ds_version": __version__,
    }


def delta_fields(cfg: dict) -> dict:
    """Everything that defines the delta an adapter folder applies: what its digest covers
    (the weights' SHA-256 binds theta to these settings; dropout does not change the delta)."""
    base = cfg.get("base_model")
    return {
        "method": cfg.get("method"),
        "format_version": cfg.get("format_version"),
        "d": cfg.get("d"),
        "seed": cfg.get("seed"),
        "hash": cfg.get("hash"),
        "D": cfg.get("D"),
        "layout": cfg.get("layout"),
        "target_modules": cfg.get("target_modules"),
        "dtype": cfg.get("dtype"),
        "weights_sha256": cfg.get("weights_sha256"),
        "base_identity": base.get("identity") if isinstance(base, dict) else base,
    }


def dtype_name(dtype: torch.dtype | None) -> str | None:
    return str(dtype).removeprefix("torch.") if dtype is not None else None


def parse_dtype_name(name: str | None) -> torch.dtype | None:
    if not name:
        return None
    dt = getattr(torch, str(name).removeprefix("torch."), None)
    return dt if isinstance(dt, torch.dtype) else None


def save_adapter(out_dir: str | Path, theta: torch.Tensor, config: dict) -> Path:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if theta.shape != (config["d"],):
        raise AdapterError(f"theta has shape {tuple(theta.shape)}, expected ({config['d']},)")
    if not bool(torch.isfinite(theta).all()):
        raise AdapterError(
            f"{out_dir}: theta has non-finite values; not writing an adapter that would merge into a broken model"
        )
    with atomic_dir(out_dir) as tmp:
        save_file(
            {THETA: theta.detach().to("cpu", torch.float32).contiguous()},
            str(tmp / WEIGHTS_NAME),
            metadata={"format": "pt", "d": str(config["d"])},
        )
        config = {**config, "weights_sha256": sha256_file(tmp / WEIGHTS_NAME)}
        config["digest"] = ident.digest(delta_fields(config))
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def read_config(cfg_path: Path) -> dict:
    """An adapter_config.json; a syntax error names the file and line."""
    try:
        cfg = json.loads(Path(cfg_path).read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{cfg_path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    except UnicodeDecodeError:
        raise AdapterError(f"{cfg_path}: not a text file") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def read_tensors(w_path: Path) -> dict[str, torch.Tensor]:
    """An adapter's safetensors file; a truncated or corrupt one names the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(w_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{w_path}: unreadable safetensors file ({exc})") from None


def _int(cfg: dict, key: str, where: Path, lo: int, hi: int) -> int:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, int):
        raise AdapterError(f"{where}: {key!r} must be an integer, got {v!r}")
    if not lo <= v < hi:
        raise AdapterError(f"{where}: {key}={v} is outside [{lo}, {hi})")
    return v


def _check_config(cfg: dict, cfg_path: Path) -> Layout:
    """Every field a merge relies on is present, typed and consistent; returns the layout."""
    if cfg.get("format") != FORMAT or cfg.get("format_version") not in READ_VERSIONS:
        raise AdapterError(f"{cfg_path}: unknown adapter format {cfg.get('format')!r} v{cfg.get('format_version')!r}")
    h = cfg.get("hash", {})
    if not isinstance(h, dict) or (h.get("name"), h.get("version")) != (HASH_NAME, HASH_VERSION):
        raise AdapterError(f"{cfg_path}: hash {h!r} is not supported (this version knows {HASH_NAME} v{HASH_VERSION})")
    _int(cfg, "seed", cfg_path, 0, 2**64)
    rows = cfg.get("layout")
    try:
        layout = Layout.from_json(rows)
    except (TypeError, ValueError, IndexError):
        raise AdapterError(
            f"{cfg_path}: 'layout' must be a list of [name, [out, in], offset] (got {str(rows)[:80]!r})"
        ) from None
    if not layout.targets:
        raise AdapterError(f"{cfg_path}: 'layout' is empty: the adapter names no target weight")
    pos = 0
    for t in layout.targets:
        if t.offset != pos or min(t.shape) < 1:
            raise AdapterError(
                f"{cfg_path}: target {t.name} has offset {t.offset} and shape {list(t.shape)}; "
                f"the canonical layout puts it at {pos} (corrupted layout)"
            )
        pos += t.numel
    _int(cfg, "D", cfg_path, 1, 2**63)
    if cfg["D"] != layout.D:
        raise AdapterError(f"{cfg_path}: D={cfg['D']} but its layout covers {layout.D} weights")
    _int(cfg, "d", cfg_path, 1, layout.D + 1)
    return layout


def load_adapter(adapter_dir: str | Path) -> tuple[torch.Tensor, dict]:
    """(theta, config) after checking the files agree with each other."""
    adapter_dir = Path(adapter_dir)
    cfg_path, w_path = adapter_dir / CONFIG_NAME, adapter_dir / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise AdapterError(f"{p}: missing (is {adapter_dir} an adapter folder?)")
    config = read_config(cfg_path)
    _check_config(config, cfg_path)
    want = config.get("weights_sha256")
    if want is not None and sha256_file(w_path) != want:
        raise AdapterError(f"{w_path}: SHA-256 differs from the one recorded in {CONFIG_NAME} (corrupted)")
    theta = read_tensors(w_path).get(THETA)
    if theta is None or theta.shape != (config["d"],):
        got = None if theta is None else tuple(theta.shape)
        raise AdapterError(f"{w_path}: expected tensor {THETA!r} of shape ({config['d']},), got {got}")
    check_finite(theta, w_path)
    # Last: a value that is invalid in itself is named by the checks above; this one catches
    # a valid value that is not the one the weights were trained with (an edited seed).
    ident.check_digest(config.get("digest"), delta_fields(config), cfg_path, missing_ok=config["format_version"] == 1)
    return theta, config


def check_base(config: dict, base_dir: str | Path, where, label: str = "--base") -> None:
    """The adapter is applied to the base it was trained on (identity.check_base)."""
    base = config.get("base_model") if isinstance(config.get("base_model"), dict) else {}
    ident.check_base(base_dir, base.get("identity"), where, label, base.get("path") or base.get("name"))


def check_finite(theta: torch.Tensor, where) -> None:
    bad = int((~torch.isfinite(theta)).sum())
    if bad:
        raise AdapterError(f"{where}: theta has {bad} non-finite values (NaN or inf); refusing to use it")


def attach_adapter(model, adapter_dir: str | Path, kernel_mode: str = "eager"):
    """Apply a saved adapter to a plain (non-sharded) model: returns the GPartModel.

    The canonical layout recorded in the adapter must match the model's, or the seed
    would scatter theta over the wrong weights.
    """
    from ...targets import build_layout
    from .layer import apply_gpart

    theta, cfg = load_adapter(adapter_dir)
    tm = cfg["target_modules"]
    layout = build_layout(model, tm).to_json()
    if layout != cfg["layout"]:
        first = next(
            (i for i, (a, b) in enumerate(zip(layout, cfg["layout"])) if a != b), min(len(layout), len(cfg["layout"]))
        )
        raise AdapterError(
            f"{Path(adapter_dir) / CONFIG_NAME}: its layout does not match this model "
            f"(first difference at target {first}: adapter "
            f"{cfg['layout'][first] if first < len(cfg['layout']) else None} vs model "
            f"{layout[first] if first < len(layout) else None}); "
            f"was it trained on {cfg.get('base_model', {}).get('name')!r}?"
        )
    g = apply_gpart(
        model, d=cfg["d"], seed=cfg["seed"], target_modules=tm, dropout=cfg.get("dropout", 0.0), kernel_mode=kernel_mode
    )
    with torch.no_grad():
        g.theta.copy_(theta)
    return g
