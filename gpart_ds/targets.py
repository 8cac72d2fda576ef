"""Which weights a method adapts, and where each sits in the canonical flattening.

Every method (GPart, LoRA, VeRA) adapts the same targets: the `nn.Linear` layers inside
decoder blocks whose names match `method.target_modules`. GPart also needs their
canonical order: target weights in `named_modules()` order, row-major inside each, so
that element (i, j) of target t has global index offset(t) + i * in + j. `Target` is the
one value type for that, used by the training op, the merge and the adapter files.

Works on a plain module and on a model built sharded under ZeRO-3 (shapes come from
`ds_shape` while a parameter is partitioned). Knows nothing else of DeepSpeed.
`skeleton` builds the model these walk from a config.json alone (meta device, no weights).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import UserError

ALL_LINEAR = "all-linear"
# Decoder blocks of Llama, Mistral, Qwen2, Gemma...: "model.layers.<i>." in HF naming.
_BLOCK_RE = re.compile(r"(^|\.)layers\.\d+\.")


@dataclass(frozen=True)
class Target:
    name: str  # module name in named_modules(); its weight is name + ".weight"
    shape: tuple[int, int]  # (out, in)
    offset: int  # global index of element [0, 0]

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def weight_name(self) -> str:
        return self.name + ".weight"


@dataclass
class Layout:
    targets: list[Target] = field(default_factory=list)

    @property
    def D(self) -> int:
        return sum(t.numel for t in self.targets)

    def to_json(self) -> list:
        """[name, [out, in], offset] per target: how adapters record it."""
        return [[t.name, list(t.shape), t.offset] for t in self.targets]

    @classmethod
    def from_json(cls, rows) -> Layout:
        return cls([Target(str(n), (int(s[0]), int(s[1])), int(o)) for n, s, o in rows])

    def by_weight_name(self) -> dict[str, Target]:
        return {t.weight_name: t for t in self.targets}


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The parameter's logical shape, also while ZeRO-3 has it partitioned."""
    return tuple(getattr(param, "ds_shape", param.shape))


def numel(param: torch.Tensor) -> int:
    """The parameter's logical size, also while ZeRO-3 has it partitioned."""
    return int(getattr(param, "ds_numel", param.numel()))


def normalize_patterns(target_modules):
    """The config value as the matchers take it: a string, or a list of strings."""
    return target_modules if isinstance(target_modules, str) else list(target_modules)


def check_patterns(patterns) -> str | None:
    """Why `patterns` cannot be used (an invalid regex), or None."""
    if isinstance(patterns, str) and patterns != ALL_LINEAR:
        try:
            re.compile(patterns)
        except re.error as exc:
            return f"{patterns!r} is not a valid regular expression ({exc})"
    return None


def _matches(name: str, patterns) -> bool:
    if patterns == ALL_LINEAR or patterns == [ALL_LINEAR]:
        return True
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    # PEFT convention: a list entry matches the module name or its dotted suffix.
    return any(name == p or name.endswith("." + p) for p in patterns)


def find_targets(model: nn.Module, patterns) -> list[tuple[str, nn.Linear]]:
    """Linear layers inside decoder blocks whose names match `patterns`, in order.

    `patterns`: "all-linear", a list of module-name suffixes (["q_proj", "v_proj"]), or a
    regex string matched against the full module name.
    """
    return [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and _BLOCK_RE.search(name) and _matches(name, patterns)
    ]


def build_layout(model: nn.Module, patterns) -> Layout:
    layout, offset = Layout(), 0
    for name, mod in find_targets(model, normalize_patterns(patterns)):
        shape = full_shape(mod.weight)
        layout.targets.append(Target(name, (int(shape[0]), int(shape[1])), offset))
        offset += shape[0] * shape[1]
    return layout


def linear_module_names(model: nn.Module) -> list[str]:
    """Suffixes of all linear layers in decoder blocks: what a pattern could match."""
    return sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) and _BLOCK_RE.search(n)}
    )


class ModelError(UserError):
    """A model folder that cannot be read: names the folder and what is wrong."""


def skeleton(model_path: str):
    """The model built on the meta device: names and shapes, no memory, no weights read.

    `model_path`: a Hugging Face model folder, or just its config.json.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        hf_cfg = AutoConfig.from_pretrained(model_path)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_cfg)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(
            f"{model_path}: not a causal-LM config.json transformers can build "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
