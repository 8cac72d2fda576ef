"""Fine-tuning methods behind one interface: GPart and the baselines it is measured against.

Each method turns the loaded (ZeRO-3 sharded) base model into the root module that the
engine trains, names its trainable parameters, saves its adapter and says how a base
tensor is merged for export. The trainer uses nothing else, so two runs that differ in
`method.name` differ only in the method: same data order, loop, loss, logging,
checkpoints and export.

    gpart  theta (d floats); the partition is regenerated on the fly (transform.py)
    lora   PEFT LoRA of rank r (default 8), alpha (default 2r), on the same targets
    vera   PEFT VeRA of rank r (default 256): shared frozen random projections, trained
           per-layer scaling vectors, on the same targets
    full   every base parameter trains (ZeRO-3 shards them and their optimizer state)

Knows nothing of data or of the training loop.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .adapter import replace_dir
from .lm_loss import objective_forward
from .transform import GPartModel, apply_gpart, build_layout
from .zero3 import gathered

LORA_DEFAULT_RANK = 8
VERA_DEFAULT_RANK = 256
ADAPTER_NAME = "default"


def numel(p: torch.Tensor) -> int:
    """A parameter's logical size, also while ZeRO-3 has it partitioned."""
    return int(getattr(p, "ds_numel", p.numel()))


class LMRoot(nn.Module):
    """Root for the baselines: the (PEFT-injected or plain) causal LM with GPart's loss path.

    The same objective_forward as GPartModel: label-position loss, the choices objective,
    logits when called without labels.
    """

    def __init__(self, model: nn.Module, peft_model=None):
        super().__init__()
        self.lm = model
        # Kept out of the module tree: it wraps `model` itself (same parameters).
        self.__dict__["peft_model"] = peft_model
        self.label_positions_only = True

    def forward(self, *args, **kwargs):
        return objective_forward(self.lm, args, kwargs, self.label_positions_only)

    @torch.no_grad()
    def generate(self, *args, **kwargs):
        return self.lm.generate(*args, **kwargs)


class Method:
    name = "?"

    def __init__(self, root: nn.Module, layout):
        self.root = root
        self.layout = layout

    @property
    def model(self) -> nn.Module:
        """The causal LM whose module names match the base checkpoint's tensor names."""
        return self.root.lm

    def trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.root.named_parameters() if p.requires_grad}

    def trainable_params(self) -> int:
        return sum(numel(p) for p in self.trainable().values())

    def describe(self) -> str:
        return f"{self.name}: {self.trainable_params():,} trainable parameters"

    def save_adapter(self, out_dir: Path, rank: int, info: dict) -> Path | None:
        """Collective. Writes the adapter on rank 0; None where the method has none."""
        return None

    def merge_source(self, name: str):
        """(parameters to gather, fn() -> merged tensor) for base tensor `name`, or None
        when the model holds no parameter of that name (read it from the base file)."""
        mod_name, _, attr = name.rpartition(".")
        mod = dict(self.model.named_modules()).get(mod_name)
        p = getattr(mod, attr, None) if mod is not None else None
        if not isinstance(p, nn.Parameter):
            return None
        return [p], lambda: p.detach()


class GPartMethod(Method):
    name = "gpart"

    @property
    def model(self) -> nn.Module:
        return self.root.base_model

    def describe(self) -> str:
        d, D = self.root.d, self.layout.D
        return f"gpart: d={d:,} trainable parameters over D={D:,} target weights (D/d={D / d:.0f})"


class PeftMethod(Method):
    """LoRA or VeRA through PEFT, on exactly the modules GPart would adapt."""

    def __init__(self, root: LMRoot, layout, name: str):
        super().__init__(root, layout)
        self.name = name

    def describe(self) -> str:
        c = self.root.peft_model.peft_config[ADAPTER_NAME]
        alpha = f", alpha {c.lora_alpha}" if self.name == "lora" else ""
        return (f"{self.name}: rank {c.r}{alpha} on {len(self.layout.targets)} matrices, "
                f"{self.trainable_params():,} trainable parameters")

    def save_adapter(self, out_dir: Path, rank: int, info: dict) -> Path | None:
        """A standard PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        peft_model = self.root.peft_model
        named = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
        with torch.no_grad(), gathered(list(named.values())):
            full = {n: p.detach().cpu().clone() for n, p in named.items()} if rank == 0 else None
        if rank != 0:
            return None
        # Buffers (VeRA's shared projections) are never partitioned.
        full.update({n: b.detach().cpu() for n, b in peft_model.named_buffers(remove_duplicate=False)})
        sd = get_peft_model_state_dict(peft_model, state_dict=full, adapter_name=ADAPTER_NAME)
        out_dir = Path(out_dir)
        tmp = out_dir.with_name(f".{out_dir.name}.tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        cfg = peft_model.peft_config[ADAPTER_NAME]
        cfg.base_model_name_or_path = info.get("path")
        cfg.save_pretrained(str(tmp))
        (tmp / "gpart_ds_run.json").write_text(json.dumps({"method": self.name, **info}, indent=2) + "\n")
        replace_dir(tmp, out_dir)
        return out_dir

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
        if isinstance(mod, BaseTunerLayer):   # the bias of an adapted linear
            p = getattr(mod.get_base_layer(), attr, None)
            return ([p], lambda: p.detach()) if isinstance(p, nn.Parameter) else None
        return super().merge_source(name)


class FullMethod(Method):
    name = "full"


# method.reuse_ids=auto keeps the forward's int32 group ids for the backward up to this
# many bytes per rank (4 x D): small models gain a third of GPart's work for memory they
# have; a 70B model would need 258 GB and regenerates instead.
REUSE_IDS_MAX_BYTES = 1 << 30


def reuse_ids(m, D: int) -> bool:
    if m.get("reuse_ids", "auto") == "auto":
        return m.dropout == 0.0 and 4 * D <= REUSE_IDS_MAX_BYTES
    return bool(m.reuse_ids) and m.dropout == 0.0


def build(method_cfg, base: nn.Module, *, kernel_mode: str = "eager", count_device=None) -> Method:
    """Apply `method_cfg` (config.MethodConfig) to the loaded base model."""
    m = method_cfg
    tm = m.target_modules if isinstance(m.target_modules, str) else list(m.target_modules)
    layout = build_layout(base, tm)
    if not layout.targets:
        raise ValueError(f"target_modules={tm!r} matched no linear layer inside decoder blocks")
    if m.name == "gpart":
        g: GPartModel = apply_gpart(base, d=m.d, seed=m.seed, target_modules=tm, dropout=m.dropout,
                                    kernel_mode=kernel_mode, chunk_elems=m.chunk_elems,
                                    count_device=count_device, reuse_ids=reuse_ids(m, layout.D))
        return GPartMethod(g, layout)
    if m.name == "full":
        for p in base.parameters():
            p.requires_grad_(True)
        return FullMethod(LMRoot(base), layout)
    if m.name in ("lora", "vera"):
        return PeftMethod(LMRoot(base, _peft(base, m, [t.name for t in layout.targets])), layout, m.name)
    raise ValueError(f"unknown method {m.name!r}")


def _peft(base: nn.Module, m, names: list[str]):
    """Inject PEFT layers in place; returns the PeftModel (its model is `base`, changed)."""
    from peft import LoraConfig, VeraConfig, get_peft_model

    for p in base.parameters():
        p.requires_grad_(False)
    if m.name == "lora":
        r = m.r or LORA_DEFAULT_RANK
        cfg = LoraConfig(r=r, lora_alpha=m.alpha or 2 * r, lora_dropout=m.dropout, target_modules=names,
                         bias="none", task_type="CAUSAL_LM")
    else:
        # VeRA's shared projections are sized by the largest adapted shape and are
        # regenerated from projection_prng_key; saved with the adapter for portability.
        cfg = VeraConfig(r=m.r or VERA_DEFAULT_RANK, vera_dropout=m.dropout, target_modules=names,
                         projection_prng_key=m.seed, save_projection=True, task_type="CAUSAL_LM")
    peft_model = get_peft_model(base, cfg)
    # ZeRO-3 partitions whatever is a parameter at initialize(); PEFT's new layers are
    # created outside zero.Init and are converted there, like GPart's theta.
    return peft_model
