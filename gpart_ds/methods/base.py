"""The Method interface, split by audience the way PEFT splits a tuner:

    config   a dataclass per method (methods/<name>/config.py, on `MethodConfig` here):
             the method.* keys it reads, their defaults and help text; the run schema's
             `method:` section is assembled from these (config/schema.py), so a method's keys
             are written down once, in its own folder
    cost     what the planner asks of it from shapes alone (methods/cost.py: `Cost`)
    method   the run and the export (`Method` below)

Each is an instance bound to the method's own config (`methods.create(section)`,
`methods.cost(section)` build them from a run's `method:` section); every hook a caller
uses is declared here or in cost.py, with a default where one makes sense. Adding a method
means a folder under methods/ and a line in the registry (methods/__init__.py).

Config time (no weights, no process group):
    validate(need)                value checks of the method.* keys it reads
    check_environment(device, need)  what this machine must offer (e.g. Triton on CUDA)
    check_layout(layout, need)    checks against the model's target weights
    auto_lr(D), auto_lr_caveat(D) the learning rate `train.lr: auto` resolves to, and where
                                  this run lies outside the evidence behind it
    label                         (the config's) short name for tables and plots
Run time (on every rank):
    build(base, layout, device) -> MethodRoot   adapt the (ZeRO-3 sharded) base model
    trainable()                   name -> parameter the optimizer steps and checkpoints hold
    after_engine()                anything to do once DeepSpeed owns the parameters
    state_finite()                this rank's trainables finite (None: not checked every step)
    save_adapter(out, info)       collective; the adapter folder (None: the method has none)
    shard_merger(dtype, device)   collective; how the merged Hugging Face folder is written
                                  (export.zero3.export_run writes it): None gathers (merge_source)
Export tools (classmethods: they start from a folder, not a config):
    open_adapter(path, base)      an adapter folder as a merge source for the offline export
    open_checkpoint(ckpt, base)   a checkpoint (read by the caller) as such a source
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..targets import Layout, check_patterns, numel

Need = Callable[[bool, str, str], None]  # need(condition, "method.key", message)


def is_positive_number(x) -> bool:
    """A finite number > 0 (a bool is not a number here): rates and steps."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


# ------------------------------------------------------------------ config
def option(default: Any = None, help: str = "", *, drift: bool = False, check=None):
    """A method.* key of a method's config: its default and help text (docs/configuration.md
    is generated from them); `drift`: a change makes a checkpoint's trainable state mean
    something else (a resume is refused, checkpoint.check_drift); `check(value) -> message
    or None`: a check of the value that holds whichever method runs (it is a key of the
    shared `method:` section)."""
    return dataclasses.field(default=default, metadata={"help": help, "drift": drift, "check": check})


def _check_seed(v) -> str | None:
    return None if isinstance(v, int) and 0 <= v < 2**64 else f"seed must be in [0, 2^64), got {v}"


def _check_dropout(v) -> str | None:
    return None if 0.0 <= v < 1.0 else f"dropout must be in [0, 1), got {v}"


def _check_target_modules(tm) -> str | None:
    from omegaconf import OmegaConf

    ok = (
        isinstance(tm, str)
        or (OmegaConf.is_list(tm) or isinstance(tm, (list, tuple)))
        and len(tm) > 0
        and all(isinstance(x, str) for x in tm)
    )
    if not ok:
        return "must be 'all-linear', a regex string, or a non-empty list of module names"
    return check_patterns(tm) if isinstance(tm, str) else None


# The keys several methods read, one definition each (the help text is the method's own).
def seed_option(help: str, drift: bool = True):
    return option(0, help, drift=drift, check=_check_seed)


def dropout_option(help: str):
    return option(0.0, help, check=_check_dropout)


def target_modules_option():
    return option(
        "all-linear",
        "'all-linear' (every linear in the decoder blocks), a list of module-name "
        "suffixes (e.g. [q_proj, v_proj]), or a regex over full module names",
        drift=True,
        check=_check_target_modules,
    )


@dataclass
class MethodConfig:
    """A method's own config: the method.* keys it reads (`name` and its subclass's fields).
    A run's `method:` section holds the keys of every method (config/schema.py assembles
    it); `of(section)` takes this method's."""

    name: str = option("?", "the method (methods/ registry)")
    # True when the base weights themselves train: no frozen base, so the planner counts
    # their optimizer state and the base is partitioned over the world whatever
    # dist.frozen_partition says.
    trains_base: ClassVar[bool] = False

    @classmethod
    def of(cls, section) -> MethodConfig:
        """This method's config from a `method:` section (a loaded run's, `plan.spec(...)`, or
        one of this class): the keys it reads, their defaults where the section lacks them."""
        if isinstance(section, cls):
            return section
        return cls(**{f.name: getattr(section, f.name, f.default) for f in dataclasses.fields(cls)})

    @classmethod
    def keys(cls) -> frozenset[str]:
        """The method.* keys this method reads; another set away from its default is named at
        start-up and in dry runs (config.unread_method_keys), not refused."""
        return frozenset(f.name for f in dataclasses.fields(cls))

    @classmethod
    def drift_keys(cls) -> tuple[str, ...]:
        """method.* keys whose change makes a checkpoint's trainable state mean something
        else: `name` and the keys marked drift (a key a method does not read is no reason
        to refuse a resume)."""
        return ("name",) + tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("drift"))

    @property
    def label(self) -> str:
        """Short name for tables and plots, e.g. 'LoRA r=8'."""
        return self.name


# ------------------------------------------------------------------ run time
class MethodRoot(nn.Module):
    """What a method hands to the engine: the causal LM `lm` (its module names match the
    base checkpoint's tensor names) with the method's trainable parameters attached.

    `prepare()` runs before every forward (GPart forms theta * s there); the training
    objective (objective.TrainingModel) wraps any root the same way.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def prepare(self) -> None:
        pass

    def forward(self, *args, **kwargs):
        self.prepare()
        return self.lm(*args, **kwargs)

    @torch.no_grad()
    def generate(self, *args, **kwargs):
        self.prepare()
        return self.lm.generate(*args, **kwargs)


class Method:
    """The run and export protocol (and the config-time checks), bound to the method's own
    config (`self.cfg`, a `config_class`)."""

    name: ClassVar[str] = "?"
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    cost_class: ClassVar[type] = None  # the planner's protocol (methods/cost.py: Cost)
    # Set from config_class (see __init_subclass__): what callers read without a config.
    config_keys: ClassVar[frozenset[str]] = frozenset({"name"})
    drift_keys: ClassVar[tuple[str, ...]] = ("name",)
    trains_base: ClassVar[bool] = False
    # The rate `train.lr: auto` gives a method whose rate does not depend on D (docs/lr_rule.md).
    DEFAULT_LR: ClassVar[float | None] = None
    # Check the trained parameters for NaN/inf after every step (this rank's ZeRO-3
    # partitions: cheap for a few trainable parameters). False: the loss and the gradient
    # norm are the check (full fine-tuning would scan every weight).
    check_state_every_step: ClassVar[bool] = True

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        c = cls.config_class
        cls.config_keys = c.keys()
        cls.drift_keys = c.drift_keys()
        cls.trains_base = c.trains_base

    def __init__(self, m):
        self.cfg = self.config_class.of(m)
        self.root: MethodRoot | None = None
        self.layout: Layout | None = None

    # ------------------------------------------------------------ config time
    def validate(self, need: Need) -> None:
        """Value checks of the method.* keys this method reads."""

    def check_environment(self, device: torch.device, need: Need) -> None:
        """Checks against the machine, once the device is known and before any weight is read."""

    def check_layout(self, layout: Layout, need: Need) -> None:
        """Checks against the model's targets (e.g. GPart's d <= D)."""

    def auto_lr(self, D: int) -> float:
        if self.DEFAULT_LR is None:
            raise NotImplementedError(f"{self.name} has no calibrated learning rate: set train.lr")
        return self.DEFAULT_LR

    def auto_lr_caveat(self, D: int) -> str | None:
        """Where this run lies outside the evidence behind auto_lr, in a sentence the run
        checks log beside the rate (None: nothing to say)."""
        return None

    @property
    def label(self) -> str:
        return self.cfg.label

    # ------------------------------------------------------------ run time
    def build(self, base: nn.Module, layout: Layout, device: torch.device) -> MethodRoot:
        raise NotImplementedError

    @property
    def model(self) -> nn.Module:
        """The causal LM whose module names match the base checkpoint's tensor names."""
        return self.root.lm

    def trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.root.named_parameters() if p.requires_grad}

    def trainable_params(self) -> int:
        return sum(numel(p) for p in self.trainable().values())

    def describe(self) -> str:
        return f"{self.label}: {self.trainable_params():,} trainable parameters"

    def after_engine(self) -> None:
        pass

    def state_finite(self) -> bool | None:
        """Whether this rank's part of the trainable parameters is finite (None: not checked)."""
        if not self.check_state_every_step:
            return None
        from ..zero3 import local_shard

        with torch.no_grad():
            return all(bool(torch.isfinite(local_shard(p)).all()) for p in self.trainable().values())

    def save_adapter(self, out_dir: Path, info: dict) -> Path | None:
        """Collective. Writes the adapter folder (rank 0); None where the method has none."""
        return None

    def shard_merger(self, compute_dtype: torch.dtype, device):
        """Collective. How the merged export is written (export.zero3.export_run): None (the
        default) gathers, tensor by tensor, what a merged value needs and rank 0 writes it
        (merge_source below); (merger, provenance) has every rank write
        merger.merged(its own shard) instead (export.zero3.ShardMerger), no rank gathering."""
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

    # ------------------------------------------------------------ export tools
    @classmethod
    def open_adapter(cls, path: Path, base_dir: Path):
        """A merge source (see methods/gpart/sources.py) for the offline export, or None
        when `path` is not this method's adapter."""
        return None

    @classmethod
    def open_checkpoint(cls, ckpt, base_dir: Path):
        """A merge source from a checkpoint (checkpoint.Checkpoint, read and verified by the
        caller: the methods sit below the checkpoint format), or None when the method does
        not merge checkpoints offline."""
        return None
