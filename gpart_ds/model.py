"""Hugging Face causal LMs: checks of a model folder against the config, and the (sharded) load.

The weightless skeleton these build on is targets.skeleton (below the methods, which read it too)."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from .config import ConfigError, need_for, where_for
from .targets import ALL_LINEAR, ModelError, build_layout, linear_module_names, normalize_patterns, skeleton


def training_dtype(precision: str, device_type: str) -> torch.dtype:
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    # auto: bf16 where the accelerator computes it natively, fp32 on CPU (bf16 works
    # there but is slower than fp32 for matmuls on most CPUs).
    if device_type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def architecture_source(cfg: DictConfig, override: str | None = None) -> str:
    """Where the model's shapes come from, without needing its weights.

    An explicit `override` (--model-config), else model.path if its config.json is here,
    else model.arch_config (relative to the YAML file).
    """
    where = where_for(cfg)
    if override:
        p = Path(override)
        if not (p.is_file() or (p / "config.json").is_file()):
            raise ConfigError(f"--model-config {override!r}: neither a config.json file nor a folder holding one")
        return str(p)
    if (Path(cfg.model.path) / "config.json").is_file():
        return cfg.model.path
    arch = cfg.model.get("arch_config")
    if arch:
        p = Path(arch)
        if not p.is_absolute() and cfg.config_file:
            p = Path(cfg.config_file).parent / p
        if p.is_file() or (p / "config.json").is_file():
            return str(p)
        raise ConfigError(f"{where('model.arch_config')}: {arch!r} not found (looked at {p})")
    raise ConfigError(
        f"{where('model.path')}: no config.json in {cfg.model.path!r} and no "
        "model.arch_config: pass --model-config PATH (a Hugging Face config.json or a "
        "model folder) to describe the architecture"
    )


def check_targets(cfg: DictConfig, source: str | None = None):
    """target_modules must match something, and the method's own checks against the
    targets (GPart: d <= D) pass; returns the layout. Reads only config.json (of
    model.path, or `source`: where architecture_source found the shapes)."""
    from . import methods

    where = where_for(cfg)
    patterns = normalize_patterns(cfg.method.target_modules)
    model = skeleton(source or cfg.model.path)
    layout = build_layout(model, patterns)
    if not layout.targets:
        raise ConfigError(
            f"{where('method.target_modules')}: {patterns!r} matches no linear "
            f"layer inside the decoder blocks of {cfg.model.path}; available: "
            f"{linear_module_names(model)} or {ALL_LINEAR!r}"
        )
    methods.create(cfg.method).check_layout(layout, need_for(where))
    return layout


def check_weights(model_path: str | Path) -> None:
    """The folder's safetensors files hold every parameter its config.json builds, under
    the parameter's name and with its shape. transformers only warns about a missing key
    and starts that weight from random values: a renamed key would train (or evaluate) a
    randomly initialised layer without a word. Reads the files' headers only."""
    from .safetensors_io import read_model_header

    model_path = Path(model_path)
    model = skeleton(str(model_path))
    stored = read_model_header(model_path)  # a truncated or foreign file is named there
    prefix = getattr(model, "base_model_prefix", "") or ""

    def stored_as(name: str) -> str | None:
        # A checkpoint of the bare decoder stores "layers.0..." for "model.layers.0..."
        # (transformers maps the prefix); accept either spelling.
        for cand in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}"):
            if cand in stored:
                return cand
        return None

    groups: dict[int, tuple[torch.nn.Parameter, list[str]]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):  # tied weights share one object
        groups.setdefault(id(p), (p, []))[1].append(name)
    missing, wrong = [], []
    for p, names in groups.values():
        found = [k for k in map(stored_as, names) if k is not None]
        if not found:
            missing.append(names[0])
        for k in found:
            if tuple(stored[k].entry.shape) != tuple(p.shape):
                wrong.append(f"{k}: {list(stored[k].entry.shape)} stored, {list(p.shape)} in config.json")
    files = ", ".join(sorted({st.path.name for st in stored.values()}))
    if missing:
        unused = sorted(set(stored) - {stored_as(n) for _, ns in groups.values() for n in ns})
        raise ModelError(
            f"{model_path}: {len(missing)} weight(s) of the model are not in {files} "
            f"(first: {missing[0]}); transformers would start them from random values"
            + (f". Stored but unused: {', '.join(unused[:3])} (renamed keys?)" if unused else "")
        )
    if wrong:
        raise ModelError(
            f"{model_path}: weights in {files} whose shape disagrees with config.json: {'; '.join(wrong[:3])}"
        )


def enable_activation_checkpointing(model) -> None:
    """Recompute each block's activations in the backward, non-reentrant: reentrant
    checkpointing sees a shared trainable parameter (GPart's theta) twice per bucket under
    ZeRO-3 and fails. By the name the installed transformers gives it: 5.x renamed
    gradient_checkpointing_enable to activation_checkpointing_enable (the old name warns and
    goes in v6), while the pyproject range still admits the 5.x releases before the rename."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_model(model_path: str, dtype: torch.dtype, ds_config: dict | None):
    """Load the causal LM; under ZeRO-3 it is built inside zero.Init and loaded sharded.

    Returns (model, keepalive): keep `keepalive` (the HfDeepSpeedConfig) referenced for
    as long as the model lives, transformers reads it through a weak reference.
    """
    from transformers import AutoModelForCausalLM

    keepalive = None
    stage = (ds_config or {}).get("zero_optimization", {}).get("stage", 0)
    if stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keepalive = HfDeepSpeedConfig(ds_config)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    model.config.use_cache = False
    return model, keepalive
