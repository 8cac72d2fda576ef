"""What the method folders' unit tests share: a method built on a plain (non-DeepSpeed)
model, a fixed prompt, and a merged export written in this process (world of one)."""

from __future__ import annotations

import torch

from gpart_ds import methods
from gpart_ds.plan import spec
from gpart_ds.targets import build_layout

IDS = torch.tensor([[1, 5, 7, 9, 11, 2]])


def build(name: str, model: torch.nn.Module, targets="all-linear", **keys):
    """The method `name` with these method.* keys, built on `model` (adapted in place)."""
    method = methods.create(spec(name, **keys))
    method.build(model, build_layout(model, targets), torch.device("cpu"))
    return method


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def randomize(params, seed: int = 0, scale: float = 0.5) -> None:
    """New values for trainable parameters, as training would leave them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * scale)


def export_run(method, base_dir, out) -> dict[str, torch.Tensor]:
    """The method's merged export of base_dir (export.zero3.export_run, one process), read back."""
    from gpart_ds.export.zero3 import export_run
    from tests.export_helpers import read_folder

    export_run(method, base_dir, out, torch.float32)
    return read_folder(out)
