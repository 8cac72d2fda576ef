"""What the planner knows of a run before any weight is read: the model's shapes (`Arch`,
from a config.json built on the meta device) and the method it plans (a method config,
checked by the method; methods.cost gives what the planner asks of it)."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from ..errors import UserError

_LAYER_RE = re.compile(r"(^|\.)layers\.(\d+)\.")


class PlanError(UserError):
    """The model description lacks something the plan needs."""


@dataclass(frozen=True)
class Arch:
    """What the plan needs to know about a model: parameter sizes and block shapes."""

    name: str
    params: tuple[tuple[str, int], ...]  # (name, numel) in named_parameters() order
    targets: tuple[tuple[int, int], ...]  # (out, in) of every GPart / LoRA target linear
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    target_names: tuple[str, ...] = ()

    @property
    def n_params(self) -> int:
        return sum(n for _, n in self.params)

    @property
    def D(self) -> int:
        return sum(o * i for o, i in self.targets)

    def block_linears(self) -> list[tuple[int, int]]:
        """(out, in) of every linear of one decoder block (Llama family: q, k, v, o, gate,
        up, down), whether a method adapts it or not."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]

    def units(self) -> dict[str, int]:
        """Elements per gather unit: each decoder layer, and each other module's parameters."""
        out: dict[str, int] = {}
        for name, n in self.params:
            m = _LAYER_RE.search(name)
            key = f"layer {m.group(2)}" if m else name.rsplit(".", 1)[0]
            out[key] = out.get(key, 0) + n
        return out

    @classmethod
    def from_model(cls, model, target_modules="all-linear", name: str = "") -> Arch:
        from ..targets import build_layout

        c = model.config
        missing = [
            k
            for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
            if getattr(c, k, None) is None
        ]
        if missing:
            raise PlanError(
                f"{name or type(model).__name__}: config lacks {missing}; the plan "
                "counts activations for Llama-family decoder blocks"
            )
        heads = c.num_attention_heads
        layout = build_layout(model, target_modules)
        return cls(
            name=name or type(model).__name__,
            params=tuple((n, p.numel()) for n, p in model.named_parameters()),
            targets=tuple(t.shape for t in layout.targets),
            hidden=c.hidden_size,
            intermediate=c.intermediate_size,
            layers=c.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
            vocab=c.vocab_size,
            target_names=tuple(t.name for t in layout.targets),
        )


def dtype_bytes(precision: str) -> int:
    # auto plans for the GPUs it is meant for: bf16 there (fp32 only on CPU runs).
    return 4 if precision == "fp32" else 2


def arch_for_config(cfg, model_config: str | None = None) -> tuple[Arch, str]:
    """(Arch, where its shapes came from) for a loaded run config, without any weights."""
    from ..model import architecture_source

    source = architecture_source(cfg, model_config)
    tm = cfg.method.target_modules
    return _arch(source, tm if isinstance(tm, str) else tuple(tm)), source


@functools.lru_cache(maxsize=8)
def _arch(source: str, patterns) -> Arch:
    # Building a 70B skeleton takes seconds; a planner searching over cluster sizes or a
    # test asking several questions builds it once.
    from ..targets import skeleton

    return Arch.from_model(skeleton(source), patterns if isinstance(patterns, str) else list(patterns), name=source)


def spec(name: str = "gpart", **kw):
    """A method config for the planner, e.g. spec("lora", r=8) or spec("gpart", d=2**20)."""
    from ..config import MethodConfig

    return MethodConfig(name=name, **kw)


def checked_method(m):
    """The cost (methods.cost: what the planner asks of a method) of a method config, once
    its values pass the method's checks."""
    from .. import methods

    if m.name not in methods.names():
        raise PlanError(f"method must be one of {methods.names()}, got {m.name!r}")
    problems = []
    methods.create(m).validate(lambda ok, key, msg: None if ok else problems.append(f"{key}: {msg}"))
    if problems:
        raise PlanError("; ".join(problems))
    return methods.cost(m)


def method_for(cfg, name: str | None = None):
    """The run's method config, or another method on the same targets (`name`), with the
    run's method.* values wherever that method reads them."""
    from .. import methods

    if name is None or name == cfg.method.name:
        return cfg.method
    keys = methods.get(name).config_keys
    return spec(name, **{k: cfg.method[k] for k in keys if k != "name" and k in cfg.method})
