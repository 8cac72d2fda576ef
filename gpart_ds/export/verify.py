"""Verify a merged folder: its logits against base + adapter, both loaded with plain
transformers in the merge's compute dtype (`python -m gpart_ds.export verify`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .files import DTYPE_NAMES, ExportError, read_base
from .source import open_source

DEFAULT_PROMPTS = (
    "The capital of France is",
    "Review: a gorgeous, witty, seductive movie.\nSentiment:",
    "def fibonacci(n):",
)


@torch.no_grad()
def verify(merged_dir, base_dir, adapter_dir, prompts=DEFAULT_PROMPTS, atol: float | None = None) -> dict:
    """Max |logit difference| between the merged folder and base + adapter (GPart forward).

    Both load with plain transformers in the merge's compute dtype; a difference above
    atol (default 1e-3 in fp32, 0.1 in 16-bit) fails.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..model import check_weights

    merged_dir, base_dir = Path(merged_dir), Path(base_dir)
    for what, folder in (("--merged", merged_dir), ("--base", base_dir)):
        if not (folder / "config.json").is_file():
            raise ExportError(
                f"{what} {folder}: not a model folder (no config.json{'' if folder.is_dir() else '; no such folder'})"
            )
    info_path = merged_dir / "gpart_merge.json"
    try:
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        compute = str(info.get("compute_dtype", "torch.float32")).removeprefix("torch.")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise ExportError(f"{info_path}: not the merge record gpart_ds writes ({exc})") from None
    dtype = DTYPE_NAMES.get(compute, torch.float32)
    if atol is None:
        atol = 1e-3 if dtype == torch.float32 else 0.1
    src = open_source(Path(adapter_dir), base_dir)
    src.check(read_base(base_dir), base_dir)
    # Merged from another adapter of the same kind (a checkpoint and the adapter of its step
    # hold the same delta under other digests): say so, rather than a bare FAILED.
    made_from = info.get("adapter_digest") if isinstance(info, dict) else None
    if (
        made_from
        and getattr(src, "digest", None)
        and made_from != src.digest
        and info.get("adapter_kind") == getattr(src, "kind", None)
    ):
        return {
            "max_abs_logit_diff": None,
            "atol": atol,
            "ok": False,
            "prompts": 0,
            "dtype": str(dtype),
            "reason": f"--merged {merged_dir}: its {info_path.name} says it was merged from another adapter "
            f"({info.get('adapter')}, digest {made_from[:12]}) than --adapter {adapter_dir} "
            f"(digest {src.digest[:12]})",
        }
    check_weights(merged_dir)  # a missing key would load as random values and "differ" for no reason
    tok = AutoTokenizer.from_pretrained(base_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=dtype).eval()
    ref = src.attach(AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).eval())
    worst = 0.0
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        a = merged(input_ids=ids).logits.float()
        b = ref(input_ids=ids).logits.float()
        if not bool(torch.isfinite(a).all() and torch.isfinite(b).all()):
            worst = float("nan")  # max(0.0, nan) would report 0.0
            break
        worst = max(worst, float((a - b).abs().max()))
    ok = worst <= atol  # False for NaN
    return {"max_abs_logit_diff": worst, "atol": atol, "ok": ok, "prompts": len(prompts), "dtype": str(dtype)}
