"""Everything a GPart merge can start from, read into one form: theta, seed, targets, dtype.

Three sources:
  - a gpart_ds adapter folder (adapter_config.json with the canonical layout);
  - a gpart_ds checkpoint (read by checkpoint.read, which the caller does: the methods sit
    below the checkpoint format), so a merged model can be made from any checkpoint
    without resuming training;
  - an adapter written by the authors' reference implementation (a PEFT-style folder:
    adapter_config.json with peft_type GPART, d, proj_seed, target_modules; tensor
    gpart_theta_d). Only its "stateless" global partition over weights (biases excluded,
    no extra trained modules) is the same mapping as ours; anything else is refused by name.

Every source is checked against the base model's safetensors header (names and shapes
of the target weights) and, where it records one, against the base identity it was
trained on (identity.py: the weights' fingerprint; a merged folder is refused as a base),
so an adapter is never merged into the wrong model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ... import identity as ident
from ...safetensors_io import StoredTensor
from ...targets import Target, build_layout, skeleton
from .adapter import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterError,
    check_finite,
    load_adapter,
    parse_dtype_name,
    read_config,
    read_tensors,
)
from .kernels import choose_mode
from .layer import THETA, apply_gpart, kernel_set
from .merge import Merger

# Assignment backends of the reference code whose mapping is SplitMix64 (ours). Adapters
# written before the key existed (before 2026-07-22) used torch.randint assignments that
# only the reference code can rebuild: a missing key is refused, never assumed.
REFERENCE_BACKENDS = ("stateless", "implicit_stateless_v1")
# Reference-config keys whose other values change the mapping (value we support).
REFERENCE_REQUIRED = {
    "projection_type": "partition",
    "partition_scope": "global",
    "grouping_strategy": "random",
    "isometric": True,
    "bias": "none",
    "fan_in_fan_out": False,
    "layers_to_transform": None,
}


@dataclass
class MergeSource:
    theta: torch.Tensor  # float32[d]
    seed: int
    targets: list[Target]
    dtype: torch.dtype | None  # training dtype if known (merges round in it)
    kind: str  # "gpart_ds" | "checkpoint" | "reference"
    path: Path
    config_file: Path  # the file that described it (for error messages)
    patterns: object = None  # its target_modules, to recompute the base's layout
    base_identity: dict | None = None  # the identity of the base it was trained on (None: not recorded)
    trained_on: str | None = None  # that base's recorded path or name (for messages)
    digest: str | None = None  # the SHA-256 of its definition (identity.digest), for the merge record

    @property
    def d(self) -> int:
        return self.theta.numel()

    # -- what the offline export and verify ask of any method's adapter source
    def check(self, base: dict[str, StoredTensor], base_dir: Path, label: str = "--base") -> None:
        check_against_base(self, base, base_dir)
        ident.check_base(base_dir, self.base_identity, self.config_file, label, self.trained_on)

    def compute_dtype(self, base: dict[str, StoredTensor]) -> torch.dtype:
        """Round as training did: in the training dtype if the source records it, else in
        the base's dtype (what the reference implementation's merge does)."""
        return self.dtype or base[self.targets[0].weight_name].entry.dtype

    def merger(self, compute_dtype: torch.dtype, kernel: str = "auto", device=None) -> Merger:
        mode = choose_mode(kernel, sum(t.numel for t in self.targets), device or "cpu", self.d)
        return Merger(self.theta, self.seed, self.targets, compute_dtype, kernel_set(mode), device=device)

    def provenance(self) -> dict:
        return {
            "method": "gpart",
            "adapter": str(self.path),
            "adapter_kind": self.kind,
            "d": self.d,
            "seed": self.seed,
            "targets": len(self.targets),
            "adapter_digest": self.digest,
        }

    def attach(self, model):
        """The adapter applied to a plain (non-sharded) model: its GPartModel root."""
        g = apply_gpart(model, d=self.d, seed=self.seed, target_modules=[t.name for t in self.targets])
        with torch.no_grad():
            g.theta.copy_(self.theta)
        return g


def _layout_from_base(base_dir: Path, patterns) -> list[Target]:
    return build_layout(skeleton(str(base_dir)), patterns).targets


def _reference(path: Path, cfg: dict, base_dir: Path) -> MergeSource:
    cfg_path = path / CONFIG_NAME
    backend = cfg.get("assignment_backend")
    if backend is None:
        raise AdapterError(
            f"{cfg_path}: no 'assignment_backend' key: reference adapters written before it existed "
            "(2026-07-22) store torch.randint assignments that only the reference code can rebuild; "
            f"re-export it with the reference code's {REFERENCE_BACKENDS[0]!r} backend"
        )
    if backend not in REFERENCE_BACKENDS:
        raise AdapterError(
            f"{cfg_path}: assignment_backend {backend!r} stores torch.randint assignments that only "
            f"the reference code can rebuild; gpart_ds merges {REFERENCE_BACKENDS[0]!r} adapters"
        )
    for key, want in REFERENCE_REQUIRED.items():
        if cfg.get(key, want) != want:
            raise AdapterError(
                f"{cfg_path}: {key}={cfg.get(key)!r} is not supported (gpart_ds implements {key}={want!r})"
            )
    if cfg.get("modules_to_save"):
        raise AdapterError(
            f"{cfg_path}: modules_to_save={cfg['modules_to_save']!r}: the adapter also trained "
            "whole modules beside theta, which a GPart merge does not carry; merge it with the "
            "reference code's merge_and_unload"
        )
    for key in ("d", "target_modules"):
        if key not in cfg:
            raise AdapterError(f"{cfg_path}: missing key {key!r}")
    w_path = path / WEIGHTS_NAME
    tensors = read_tensors(w_path)
    found = [k for k in tensors if k.endswith("gpart_theta_d") or ".gpart_theta_d." in k]
    if len(found) != 1 or len(tensors) != 1:
        raise AdapterError(f"{w_path}: expected exactly one tensor, gpart_theta_d; found {list(tensors)}")
    theta = tensors[found[0]]
    if theta.shape != (cfg["d"],):
        raise AdapterError(f"{w_path}: {found[0]} has shape {tuple(theta.shape)}, config says d={cfg['d']}")
    check_finite(theta, w_path)
    seed = cfg.get("proj_seed", 42)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise AdapterError(f"{cfg_path}: proj_seed must be an integer in [0, 2^64), got {seed!r}")
    tm = cfg["target_modules"]
    patterns = tm if isinstance(tm, str) else sorted(tm)
    return MergeSource(
        theta.float(), seed, _layout_from_base(base_dir, patterns), None, "reference", path, cfg_path, patterns
    )


def from_checkpoint(ckpt, base_dir: Path) -> MergeSource:
    """A checkpoint.Checkpoint (already read and verified) of a GPart run as a merge source."""
    path, base_dir = ckpt.path, Path(base_dir)
    m = ckpt.run_config.get("method", {})
    if m.get("name") != "gpart" or THETA not in ckpt.tensors:
        raise AdapterError(
            f"{path}: a checkpoint of method {m.get('name')!r}, not a GPart run; "
            "export it with `launch/train.py --export-only` from its run"
        )
    theta = ckpt.tensors[THETA]
    check_finite(theta, ckpt.state_file)
    seed = m.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64 or "target_modules" not in m:
        raise AdapterError(
            f"{ckpt.run_config_file}: method.seed / method.target_modules missing or invalid (seed {seed!r})"
        )
    dig = ckpt.state.get("digest")
    return MergeSource(
        theta.float(),
        seed,
        _checkpoint_targets(ckpt, m, base_dir),
        ckpt.dtype,
        "checkpoint",
        path,
        ckpt.state_json_file,
        m["target_modules"],
        base_identity=ckpt.state.get("base_identity"),
        trained_on=str(ckpt.run_config.get("model", {}).get("path") or "") or None,
        digest=dig.get("sha256") if isinstance(dig, dict) else None,
    )


def _checkpoint_targets(ckpt, m: dict, base_dir: Path) -> list[Target]:
    """The targets theta was trained for: recorded in state.json (since the layout was
    saved there), else rebuilt from the run's own model.path; never guessed from the base
    it is being merged into, which would let it merge into a model of another shape."""
    import logging

    rows = ckpt.state.get("layout")
    if rows is not None:
        try:
            return [Target(name, tuple(shape), offset) for name, shape, offset in rows]
        except (TypeError, ValueError) as exc:
            raise AdapterError(
                f"{ckpt.path}/state.json: 'layout' is not a list of [name, [out, in], offset] ({exc})"
            ) from None
    trained_on = Path(str(ckpt.run_config.get("model", {}).get("path", "")))
    if (trained_on / "config.json").is_file():
        return _layout_from_base(trained_on, m["target_modules"])
    logging.getLogger(__name__).warning(
        "%s records no layout and its model %s is not here: cannot check that %s is the model it was trained on",
        ckpt.path,
        trained_on,
        base_dir,
    )
    return _layout_from_base(base_dir, m["target_modules"])


def open_source(path: str | Path, base_dir: str | Path) -> MergeSource:
    """Read an adapter or reference adapter folder (see the module doc; a checkpoint folder
    comes through from_checkpoint, read by the caller)."""
    path, base_dir = Path(path), Path(base_dir)
    if not path.is_dir():
        raise AdapterError(f"{path}: not a folder (expected an adapter or checkpoint folder)")
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise AdapterError(f"{cfg_path}: missing (is {path} an adapter or checkpoint folder?)")
    cfg = read_config(cfg_path)
    if str(cfg.get("peft_type", "")).upper() == "GPART":
        return _reference(path, cfg, base_dir)
    theta, cfg = load_adapter(path)
    targets = [Target(name, tuple(shape), offset) for name, shape, offset in cfg["layout"]]
    base = cfg.get("base_model") if isinstance(cfg.get("base_model"), dict) else {}
    dig = cfg.get("digest")
    return MergeSource(
        theta.float(),
        int(cfg["seed"]),
        targets,
        parse_dtype_name(cfg.get("dtype")),
        "gpart_ds",
        path,
        cfg_path,
        cfg["target_modules"],
        base_identity=base.get("identity"),
        trained_on=base.get("path") or base.get("name"),
        digest=dig.get("sha256") if isinstance(dig, dict) else None,
    )


def check_against_base(src: MergeSource, base: dict[str, StoredTensor], base_dir: Path) -> None:
    """The adapter's targets are exactly the base model's targets under the same
    target_modules (names, shapes, order: nothing missing, nothing extra), each stored
    in the base files, and d <= D."""
    where = src.config_file
    for t in src.targets:
        st = base.get(t.weight_name)
        if st is None:
            raise AdapterError(
                f"{where}: target {t.weight_name} is not in the base model {base_dir} "
                "(wrong base model for this adapter?)"
            )
        if tuple(st.entry.shape) != tuple(t.shape):
            raise AdapterError(
                f"{where}: target {t.weight_name} has shape {list(t.shape)} in the adapter but "
                f"{list(st.entry.shape)} in {st.path} (wrong base model for this adapter?)"
            )
    expected = _layout_from_base(base_dir, src.patterns)
    if expected != src.targets:
        i = next(
            (i for i, (a, b) in enumerate(zip(expected, src.targets)) if a != b), min(len(expected), len(src.targets))
        )
        ours = src.targets[i] if i < len(src.targets) else None
        theirs = expected[i] if i < len(expected) else None
        raise AdapterError(
            f"{where}: the adapter's {len(src.targets)} targets differ from the base model's "
            f"{len(expected)} (first difference at target {i}: adapter "
            f"{ours and [ours.name, list(ours.shape), ours.offset]} vs base "
            f"{theirs and [theirs.name, list(theirs.shape), theirs.offset]}); it was trained on "
            f"another model than {base_dir}"
        )
    D = sum(t.numel for t in src.targets)
    if src.d > D:
        raise AdapterError(f"{where}: d={src.d} exceeds D={D}")
