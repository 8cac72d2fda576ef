"""Everything a merge can start from, read into one form: theta, seed, targets, dtype.

Three sources:
  - a gpart_ds adapter folder (adapter_config.json with the canonical layout);
  - a gpart_ds checkpoint folder (state.safetensors + run_config.yaml), so a merged model
    can be made from any checkpoint without resuming training;
  - an adapter written by the authors' reference implementation (a PEFT-style folder:
    adapter_config.json with peft_type GPART, d, proj_seed, target_modules; tensor
    gpart_theta_d). Only its "stateless" global partition over weights (biases excluded)
    is the same mapping as ours; any other setting is refused by name.

Every source is checked against the base model's safetensors header (names and shapes
of the target weights), so an adapter is never merged into the wrong model.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import adapter as adapter_io
from .merge import MergeTarget
from .safetensors_io import StoredTensor

REFERENCE_BACKENDS = ("stateless", "implicit_stateless_v1")
# Reference-config keys whose other values change the mapping (value we support).
REFERENCE_REQUIRED = {"projection_type": "partition", "partition_scope": "global",
                      "grouping_strategy": "random", "isometric": True, "bias": "none",
                      "fan_in_fan_out": False, "layers_to_transform": None}


@dataclass
class MergeSource:
    theta: torch.Tensor             # float32[d]
    seed: int
    targets: list[MergeTarget]
    dtype: torch.dtype | None       # training dtype if known (merges round in it)
    kind: str                       # "gpart_ds" | "checkpoint" | "reference"
    path: Path

    @property
    def d(self) -> int:
        return self.theta.numel()


def _dtype(name: str | None) -> torch.dtype | None:
    if not name:
        return None
    dt = getattr(torch, str(name).removeprefix("torch."), None)
    return dt if isinstance(dt, torch.dtype) else None


def _layout_from_base(base_dir: Path, patterns) -> list[MergeTarget]:
    from .model import skeleton
    from .transform import build_layout

    layout = build_layout(skeleton(str(base_dir)), patterns)
    return [MergeTarget(t.name, tuple(t.shape), t.offset) for t in layout.targets]


def _reference(path: Path, cfg: dict, base_dir: Path) -> MergeSource:
    cfg_path = path / adapter_io.CONFIG_NAME
    backend = cfg.get("assignment_backend", "stateless")
    if backend not in REFERENCE_BACKENDS:
        raise adapter_io.AdapterError(
            f"{cfg_path}: assignment_backend {backend!r} stores torch.randint assignments that only "
            f"the reference code can rebuild; gpart_ds merges {REFERENCE_BACKENDS[0]!r} adapters")
    for key, want in REFERENCE_REQUIRED.items():
        if cfg.get(key, want) != want:
            raise adapter_io.AdapterError(f"{cfg_path}: {key}={cfg.get(key)!r} is not supported "
                                          f"(gpart_ds implements {key}={want!r})")
    for key in ("d", "target_modules"):
        if key not in cfg:
            raise adapter_io.AdapterError(f"{cfg_path}: missing key {key!r}")
    w_path = path / adapter_io.WEIGHTS_NAME
    tensors = adapter_io.read_tensors(w_path)
    found = [k for k in tensors if k.endswith("gpart_theta_d") or ".gpart_theta_d." in k]
    if len(found) != 1:
        raise adapter_io.AdapterError(f"{w_path}: expected one gpart_theta_d tensor, found {found or list(tensors)}")
    theta = tensors[found[0]]
    if theta.shape != (cfg["d"],):
        raise adapter_io.AdapterError(f"{w_path}: {found[0]} has shape {tuple(theta.shape)}, config says d={cfg['d']}")
    tm = cfg["target_modules"]
    patterns = tm if isinstance(tm, str) else sorted(tm)
    return MergeSource(theta.float(), int(cfg.get("proj_seed", 42)), _layout_from_base(base_dir, patterns),
                       None, "reference", path)


def _checkpoint(path: Path, base_dir: Path) -> MergeSource:
    import yaml
    from safetensors.torch import load_file

    from .checkpoint import verify

    verify(path)
    run = yaml.safe_load((path / "run_config.yaml").read_text())
    m = run["method"]
    theta = load_file(str(path / "state.safetensors"))["theta"]
    prec = run.get("model", {}).get("precision", "auto")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(prec)
    return MergeSource(theta.float(), int(m["seed"]), _layout_from_base(base_dir, m["target_modules"]),
                       dtype, "checkpoint", path)


def open_source(path: str | Path, base_dir: str | Path) -> MergeSource:
    """Read an adapter, checkpoint or reference adapter folder (see the module doc)."""
    path, base_dir = Path(path), Path(base_dir)
    if not path.is_dir():
        raise adapter_io.AdapterError(f"{path}: not a folder (expected an adapter or checkpoint folder)")
    if (path / "state.safetensors").is_file() and (path / "run_config.yaml").is_file():
        return _checkpoint(path, base_dir)
    cfg_path = path / adapter_io.CONFIG_NAME
    if not cfg_path.is_file():
        raise adapter_io.AdapterError(f"{cfg_path}: missing (is {path} an adapter folder?)")
    cfg = adapter_io.read_config(cfg_path)
    if str(cfg.get("peft_type", "")).upper() == "GPART":
        return _reference(path, cfg, base_dir)
    theta, cfg = adapter_io.load_adapter(path)
    targets = [MergeTarget(name, tuple(shape), offset) for name, shape, offset in cfg["layout"]]
    return MergeSource(theta.float(), int(cfg["seed"]), targets, _dtype(cfg.get("dtype")), "gpart_ds", path)


def check_against_base(src: MergeSource, base: dict[str, StoredTensor], base_dir: Path) -> None:
    """Every target weight exists in the base with the adapter's shape, offsets tile [0, D)."""
    where = src.path / (adapter_io.CONFIG_NAME if src.kind != "checkpoint" else "run_config.yaml")
    pos = 0
    for t in src.targets:
        st = base.get(t.name + ".weight")
        if st is None:
            raise adapter_io.AdapterError(
                f"{where}: target {t.name}.weight is not in the base model {base_dir} "
                f"(wrong base model for this adapter?)")
        if tuple(st.entry.shape) != tuple(t.shape):
            raise adapter_io.AdapterError(
                f"{where}: target {t.name}.weight has shape {list(t.shape)} in the adapter but "
                f"{list(st.entry.shape)} in {st.path} (wrong base model for this adapter?)")
        if t.offset != pos:
            raise adapter_io.AdapterError(f"{where}: target {t.name} has offset {t.offset}, expected {pos} "
                                          "(the layout is not the canonical flattening)")
        pos += t.shape[0] * t.shape[1]
    if src.d > pos:
        raise adapter_io.AdapterError(f"{where}: d={src.d} exceeds D={pos}")
