"""What a merged Hugging Face folder holds: the base's tensors (names, shapes, order; floats
in the output dtype), config.json with that dtype, the tokenizer and template files carried
over, and the merge record; and the checks every merged value passes before it is written
(finite, every adapted tensor stored in the base files). The offline merge and the ZeRO-3
export both write through these."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .. import safetensors_io as stio
from ..errors import UserError

DTYPE_NAMES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
# Files of a model folder that a merged folder carries over unchanged.
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
)


class ExportError(UserError):
    """An export that must not start or cannot finish: says what and where."""


def check_finite(name: str, vals: torch.Tensor) -> None:
    """Refuse to write a merged tensor with NaN or inf (a diverged adapter)."""
    if vals.is_floating_point() and not bool(torch.isfinite(vals).all()):
        bad = int((~torch.isfinite(vals)).sum())
        raise ExportError(
            f"{name}: the merged values have {bad} non-finite entries (NaN or inf); "
            "the adapter diverged: nothing was written"
        )


def merged_checked(merger, name: str, first: int, w0_flat: torch.Tensor) -> torch.Tensor:
    vals = merger.merged(name, first, w0_flat)
    check_finite(name, vals)
    return vals


def check_targets_stored(merger, base: dict[str, stio.StoredTensor], base_dir: Path) -> None:
    """Every tensor the merge adapts is in the base files: a renamed key would otherwise
    be written unmerged, silently."""
    missing = [n for n in getattr(merger, "targets", {}) if n not in base]
    if missing:
        raise ExportError(
            f"{base_dir}: {len(missing)} adapted tensor(s) are not in the base model's "
            f"safetensors files (first: {missing[0]}); renamed or missing keys"
        )


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "auto"):
        return None
    if name not in DTYPE_NAMES:
        raise ExportError(f"unknown dtype {name!r}; use one of bf16, fp16, fp32")
    return DTYPE_NAMES[name]


def output_entries(base: dict[str, stio.StoredTensor], out_dtype: torch.dtype) -> list[stio.TensorEntry]:
    """The merged model's tensors: the base's names, shapes and order; floats in out_dtype."""
    return [
        stio.TensorEntry(name, out_dtype if st.entry.dtype.is_floating_point else st.entry.dtype, st.entry.shape)
        for name, st in base.items()
    ]


def read_base(base_dir: Path) -> dict[str, stio.StoredTensor]:
    """The base model folder's tensors (header only), or a clear error."""
    if not (base_dir / "config.json").is_file():
        raise ExportError(f"{base_dir}: not a Hugging Face model folder (no config.json)")
    return stio.read_model_header(base_dir)


def copy_side_files(base_dir: Path, folder: Path, out_dtype: torch.dtype, provenance: dict) -> None:
    """config.json (dtype updated), tokenizer, chat template and generation config."""
    cfg = json.loads((base_dir / "config.json").read_text())
    name = str(out_dtype).removeprefix("torch.")
    cfg["dtype"] = name
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = name
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for f in SIDE_FILES:
        if (base_dir / f).is_file():
            shutil.copy2(base_dir / f, folder / f)
    # The provenance: what this folder holds (identity.merge_record reads it, and refuses the
    # folder as a base for another merge); base_identity: the weights the delta went into.
    from ..identity import MERGE_RECORD, identity

    provenance = {**provenance, "base_identity": identity(base_dir)}
    (folder / MERGE_RECORD).write_text(json.dumps(provenance, indent=2) + "\n")
