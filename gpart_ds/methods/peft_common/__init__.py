"""What the PEFT baselines (LoRA, VeRA) share at run time: injection on GPart's targets,
the adapter folder, and the merged value of an adapted weight (config.py: the rank and the
label; cost.py: what the planner counts alike).

PEFT injects its layers in place: the base model's modules keep their names, so the
root's `lm` is the base model itself and merged exports map one to one onto the base
checkpoint's tensors. ZeRO-3 partitions the new (trainable) layers at initialize, like
GPart's theta.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ... import comm
from ...fileio import atomic_dir, sha256_file
from ...identity import IdentityError, check_base, check_digest, digest
from ...targets import Layout
from ...zero3 import gathered
from ..base import Method, MethodRoot, Need

ADAPTER_NAME = "default"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# gpart_ds's record beside PEFT's files: the method, the base model (name, path, identity),
# the training dtype, the weights' SHA-256 and the digest of all that defines the delta.
RUN_RECORD = "gpart_ds_run.json"
# adapter_config.json keys that do not define the delta: where the base was (its identity
# is checked instead), PEFT's own bookkeeping. Every other key is covered by the digest,
# so any hand edit of r, lora_alpha, projection_prng_key, target_modules, ... is named.
NOT_DIGESTED = ("base_model_name_or_path", "revision", "inference_mode")


class PeftRoot(MethodRoot):
    """The base model with PEFT layers injected; the PeftModel is kept out of the module
    tree (it wraps the same modules) for its adapter utilities."""

    def __init__(self, lm: nn.Module, peft_model):
        super().__init__(lm)
        self.__dict__["peft_model"] = peft_model


class PeftMethod(Method):
    """LoRA or VeRA through PEFT, on exactly the modules GPart would adapt."""

    def validate(self, need: Need) -> None:
        r = self.cfg.r
        need(r is None or r >= 1, "method.r", f"rank must be >= 1, got {r}")

    def peft_config(self, target_names: list[str]):
        raise NotImplementedError

    def build(self, base: nn.Module, layout: Layout, device: torch.device) -> PeftRoot:
        from peft import get_peft_model

        for p in base.parameters():
            p.requires_grad_(False)
        self.layout = layout
        peft_model = get_peft_model(base, self.peft_config([t.name for t in layout.targets]))
        self.root = PeftRoot(base, peft_model)
        return self.root

    def describe(self) -> str:
        return f"{self.label} on {len(self.layout.targets)} matrices, {self.trainable_params():,} trainable parameters"

    def save_adapter(self, out_dir: Path, info: dict) -> Path:
        """A standard PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        peft_model = self.root.peft_model
        named = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
        with torch.no_grad(), gathered(list(named.values())):
            full = {n: p.detach().cpu().clone() for n, p in named.items()} if comm.rank() == 0 else None
        if comm.rank() == 0:
            # Buffers (VeRA's shared projections) are never partitioned.
            full.update({n: b.detach().cpu() for n, b in peft_model.named_buffers(remove_duplicate=False)})
            sd = get_peft_model_state_dict(peft_model, state_dict=full, adapter_name=ADAPTER_NAME)
            with atomic_dir(out_dir) as tmp:
                save_file(
                    {k: v.contiguous() for k, v in sd.items()},
                    str(tmp / "adapter_model.safetensors"),
                    metadata={"format": "pt"},
                )
                cfg = peft_model.peft_config[ADAPTER_NAME]
                cfg.base_model_name_or_path = info["base_model"].get("path")
                cfg.save_pretrained(str(tmp))
                run = {
                    "method": self.name,
                    **info["base_model"],
                    "dtype": dtype_name(info.get("dtype")),
                    "weights_sha256": sha256_file(tmp / "adapter_model.safetensors"),
                }
                run["digest"] = digest(delta_fields(json.loads((tmp / CONFIG_NAME).read_text()), run))
                (tmp / RUN_RECORD).write_text(json.dumps(run, indent=2) + "\n")
        comm.barrier()
        return Path(out_dir)

    def merge_source(self, name: str):
        from peft.tuners.tuners_utils import BaseTunerLayer

        mod_name, _, attr = name.rpartition(".")
        mod = dict(self.model.named_modules()).get(mod_name)
        if isinstance(mod, BaseTunerLayer) and attr == "weight":
            base = mod.get_base_layer().weight
            params = [base] + [p for p in mod.parameters() if p is not base]

            def merged():
                w0 = base.detach()
                delta = mod.get_delta_weight(ADAPTER_NAME)
                return (w0.float() + delta.float()).to(w0.dtype)

            return params, merged
        if isinstance(mod, BaseTunerLayer):  # the bias of an adapted linear
            p = getattr(mod.get_base_layer(), attr, None)
            return ([p], lambda: p.detach()) if isinstance(p, nn.Parameter) else None
        return super().merge_source(name)


def dtype_name(dtype) -> str | None:
    return str(dtype).removeprefix("torch.") if dtype is not None else None


def delta_fields(peft_config: dict, run: dict) -> dict:
    """What defines a LoRA / VeRA adapter's delta (its digest covers these): every key of
    PEFT's adapter_config.json but NOT_DIGESTED, the training dtype, the weights' SHA-256
    and the base model's identity."""
    fields = {k: v for k, v in sorted(peft_config.items()) if k not in NOT_DIGESTED}
    fields.update(
        {
            f"{RUN_RECORD}:dtype": run.get("dtype"),
            f"{RUN_RECORD}:weights_sha256": run.get("weights_sha256"),
            f"{RUN_RECORD}:identity": run.get("identity"),
        }
    )
    return fields


def check_adapter(folder: Path, base_dir: Path, label: str = "--model") -> None:
    """Every check a LoRA / VeRA adapter folder passes before it is applied to `base_dir`:
    its weights are the ones recorded, its config is the one it was written with (the
    digest), and the base is the one it was trained on. A PEFT folder that gpart_ds did not
    write (no gpart_ds_run.json) has nothing to check against: accepted with a warning."""
    import logging

    folder = Path(folder)
    cfg_path, w_path, run_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME, folder / RUN_RECORD
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise IdentityError(f"{p}: missing (is {folder} an adapter folder?)")
    try:
        peft_config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IdentityError(f"{cfg_path}: not valid JSON ({exc})") from None
    if not run_path.is_file():
        logging.getLogger(__name__).warning(
            "%s: no %s (not written by gpart_ds): its settings and base model cannot be checked", folder, RUN_RECORD
        )
        return
    try:
        run = json.loads(run_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IdentityError(f"{run_path}: not valid JSON ({exc})") from None
    if not isinstance(peft_config, dict) or not isinstance(run, dict):
        raise IdentityError(f"{cfg_path if not isinstance(peft_config, dict) else run_path}: expected a JSON object")
    # Written before digests existed: its record has no weights SHA-256 either (accepted, as
    # for GPart's version 1 adapters: adapter.READ_VERSIONS says why).
    old = "digest" not in run and "weights_sha256" not in run
    want = run.get("weights_sha256")
    if want is not None and sha256_file(w_path) != want:
        raise IdentityError(
            f"{w_path}: SHA-256 differs from the one recorded in {RUN_RECORD} (corrupted, or "
            "the weights of another adapter)"
        )
    check_digest(run.get("digest"), delta_fields(peft_config, run), cfg_path, missing_ok=old)
    check_base(base_dir, run.get("identity"), cfg_path, label, run.get("path") or run.get("name"))
