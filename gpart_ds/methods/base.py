"""The Method interface: one fine-tuning method's whole life cycle behind one class.

Everything the system does differently per method is a method of `Method`; the trainer,
config, planner, dry run, export and study call only these, so two runs that differ in
`method.name` differ only in the method (same data order, loop, loss, logging,
checkpoints), and adding a method means a folder under methods/ and a line in the
registry (methods/__init__.py), nothing else.

Config time (classmethods, no weights, no process group):
    validate(m, need)           value checks of the method.* keys it reads
    check_environment(m, device, need)  what this machine must offer (e.g. Triton on CUDA)
    check_layout(m, layout, need)  checks against the model's target weights
    trainable_sizes(m, arch)    elements of each trainable tensor, from shapes
    trainable_count(m, arch)    their sum: the trainable parameters
    auto_lr(m, D)               the learning rate `train.lr: auto` resolves to
    plan_rows(plan, arch, m, ctx)  its rows of the per-GPU memory plan
    summary(m, arch)            a line for dry runs and plans
    trains_base                 (class attribute) the base weights themselves train: no frozen
                                base, so its memory rows count their optimizer state and the
                                base is partitioned over the world whatever dist.frozen_partition says
Step time and traffic (classmethods, for plan_time.py; ctx: plan_time.StepContext):
    step_flops(m, arch, ctx)    FLOPs of a micro-batch beyond the base model's forward, recompute
                                and dX: weight gradients, adapter matmuls, a recompute cut short
    delta_elements(m, arch, ctx)  weights it generates per micro-batch (GPart's W0 + delta)
    frozen_backward(m, arch, ctx, params)  the frozen parameters its backward gathers again
    step_traffic(traffic, arch, m)  the collectives that move its trainables in a step
                                (traffic: plan_time.StepTraffic)
Run time (an instance per run, on every rank):
    build(base, layout, device) -> MethodRoot   adapt the (ZeRO-3 sharded) base model
    trainable()                 name -> parameter the optimizer steps and checkpoints hold
    after_engine()              anything to do once DeepSpeed owns the parameters
    save_adapter(out, info)     collective; the adapter folder (None: the method has none)
    shard_merger(dtype, device) collective; how the merged Hugging Face folder is written
                                (export.zero3.export_run writes it): None gathers (merge_source)
    open_adapter(path, base)    an adapter folder as a merge source for the offline export
    open_checkpoint(ckpt, base) a checkpoint (read by the caller) as such a source
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..targets import Layout, numel

Need = Callable[[bool, str, str], None]   # need(condition, "method.key", message)


def is_positive_number(x) -> bool:
    """A finite number > 0 (a bool is not a number here): rates and steps."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


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
    name: ClassVar[str] = "?"
    # method.* keys this method reads; another set away from its default is named at start-up
    # and in dry runs (config.unread_method_keys), not refused. Each method adds its own.
    config_keys: ClassVar[frozenset[str]] = frozenset({"name"})
    # method.* keys whose change makes a checkpoint's trainable state mean something else;
    # each adapter adds its own (target_modules among them), a key a method does not read
    # is no reason to refuse a resume.
    drift_keys: ClassVar[tuple[str, ...]] = ("name",)
    # True when the base weights themselves train (the planner counts their optimizer state).
    trains_base: ClassVar[bool] = False
    # The rate `train.lr: auto` gives a method whose rate does not depend on D (docs/lr_rule.md).
    DEFAULT_LR: ClassVar[float | None] = None

    # ------------------------------------------------------------ config time
    @classmethod
    def validate(cls, m, need: Need) -> None:
        """Value checks of the method.* keys this method reads."""

    @classmethod
    def check_environment(cls, m, device: torch.device, need: Need) -> None:
        """Checks against the machine, once the device is known and before any weight is read."""

    @classmethod
    def check_layout(cls, m, layout: Layout, need: Need) -> None:
        """Checks against the model's targets (e.g. GPart's d <= D)."""

    @classmethod
    def trainable_sizes(cls, m, arch) -> list[int]:
        """Elements of each trainable tensor, from shapes (plan.Arch)."""
        raise NotImplementedError

    @classmethod
    def trainable_count(cls, m, arch) -> int:
        return sum(cls.trainable_sizes(m, arch))

    @classmethod
    def auto_lr(cls, m, D: int) -> float:
        if cls.DEFAULT_LR is None:
            raise NotImplementedError(f"{cls.name} has no calibrated learning rate: set train.lr")
        return cls.DEFAULT_LR

    @classmethod
    def auto_lr_caveat(cls, m, D: int) -> str | None:
        """Where this run lies outside the evidence behind auto_lr, in a sentence the run
        checks log beside the rate (None: nothing to say)."""
        return None

    @classmethod
    def plan_rows(cls, plan, arch, m, ctx) -> None:
        """Add this method's rows to a memory plan (plan.estimate gives `ctx`)."""
        raise NotImplementedError

    # ------------------------------------------------------------ step time (plan_time.py)
    @classmethod
    def step_flops(cls, m, arch, ctx) -> dict[str, int]:
        """FLOPs of one micro-batch beyond the base model's forward, recompute and dX
        (plan_time.base_flops: every block's linears recomputed under checkpointing), as
        torch's FlopCounterMode counts them: {"forward", "recompute", "dx", "dw": FLOPs},
        any subset; negative where the method saves the base some work."""
        raise NotImplementedError

    @classmethod
    def delta_elements(cls, m, arch, ctx) -> dict[str, int]:
        """Elements of generated weights per micro-batch, {"build": n, "backward": n},
        timed at the cluster's measured kernel rates (none unless the method generates
        weights)."""
        return {}

    @classmethod
    def frozen_backward(cls, m, arch, ctx, params: dict[str, int]) -> dict[str, int]:
        """The frozen parameters ({name: elements}) the backward gathers again. `params`:
        those of every module whose output needs a gradient when each adapted linear's
        does (the decoder blocks, the LM head; the final norm under checkpointing)."""
        return params

    @classmethod
    def step_traffic(cls, traffic, arch, m) -> None:
        """Add to `traffic` (plan_time.StepTraffic) the collectives that move this
        method's trainables in one optimizer step: gathers, gradient reductions, the
        updated values; payload in bytes per step."""
        raise NotImplementedError

    @classmethod
    def summary(cls, m, arch) -> str:
        n = cls.trainable_count(m, arch)
        return f"{cls.label(m)}: {n:,} trainable parameters on {len(arch.targets)} target matrices"

    @classmethod
    def label(cls, m) -> str:
        """Short name for tables and plots, e.g. 'LoRA r=8'."""
        return cls.name

    # ------------------------------------------------------------ run time
    def __init__(self, m):
        self.cfg = m
        self.root: MethodRoot | None = None
        self.layout: Layout | None = None

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
        return f"{self.label(self.cfg)}: {self.trainable_params():,} trainable parameters"

    def after_engine(self) -> None:
        pass

    # Check the trained parameters for NaN/inf after every step (this rank's ZeRO-3
    # partitions: cheap for a few trainable parameters). False: the loss and the gradient
    # norm are the check (full fine-tuning would scan every weight).
    check_state_every_step: ClassVar[bool] = True

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
