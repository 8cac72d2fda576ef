"""The planner's protocol: what a method costs, from shapes alone (no weights, no process
group). The planner (plan/memory.py; plan/step.py: FLOPs, traffic, step time) and dryrun.py ask a
method's `Cost` (methods/<name>/cost.py), bound to its config, and nothing else of it.

    trainable_sizes(arch)          elements of each trainable tensor (trainable_count: their sum)
    plan_rows(plan, arch, ctx)     its rows of the per-GPU memory plan (ctx: plan.memory.PlanContext)
    extra_saved_bytes(arch, ckpt)  activations it keeps beside the blocks' own (default none)
    step_flops(arch, ctx)          FLOPs of a micro-batch beyond the base model's forward,
                                   recompute and dX (ctx: plan.step.StepContext)
    delta_elements(arch, ctx)      weights it generates per micro-batch (default none)
    frozen_backward(arch, ctx, params)  the frozen parameters its backward gathers again
                                   (default: those plan.step names)
    step_traffic(traffic, arch)    the collectives that move its trainables in a step
    summary(arch)                  a line for dry runs and plans
    dry_run_lines(arch)            what a dry run says of it beyond the summary (default none)
    label, trains_base             the config's
"""

from __future__ import annotations

from .base import MethodConfig


class Cost:
    def __init__(self, cfg: MethodConfig):
        self.cfg = cfg

    @property
    def label(self) -> str:
        return self.cfg.label

    @property
    def trains_base(self) -> bool:
        return self.cfg.trains_base

    # ------------------------------------------------------------ memory (plan/memory.py)
    def trainable_sizes(self, arch) -> list[int]:
        """Elements of each trainable tensor, from shapes (plan.Arch)."""
        raise NotImplementedError

    def trainable_count(self, arch) -> int:
        return sum(self.trainable_sizes(arch))

    def plan_rows(self, plan, arch, ctx) -> None:
        """Add this method's rows to a memory plan (plan.estimate gives `ctx`)."""
        raise NotImplementedError

    def extra_saved_bytes(self, arch, grad_ckpt: bool) -> int:
        """Bytes of activations the method keeps beside the blocks' own, for one micro-batch
        (plan.saved_activation_bytes' `extra_bytes`)."""
        return 0

    # ------------------------------------------------------------ step time (plan/step.py)
    def step_flops(self, arch, ctx) -> dict[str, int]:
        """FLOPs of one micro-batch beyond the base model's forward, recompute and dX
        (plan.step.base_flops: every block's linears recomputed under checkpointing), as
        torch's FlopCounterMode counts them: {"forward", "recompute", "dx", "dw": FLOPs},
        any subset; negative where the method saves the base some work."""
        raise NotImplementedError

    def delta_elements(self, arch, ctx) -> dict[str, int]:
        """Elements of generated weights per micro-batch, {"build": n, "backward": n},
        timed at the cluster's measured kernel rates (none unless the method generates
        weights)."""
        return {}

    def frozen_backward(self, arch, ctx, params: dict[str, int]) -> dict[str, int]:
        """The frozen parameters ({name: elements}) the backward gathers again. `params`:
        those of every module whose output needs a gradient when each adapted linear's
        does (the decoder blocks, the LM head; the final norm under checkpointing)."""
        return params

    def step_traffic(self, traffic, arch) -> None:
        """Add to `traffic` (plan.step.StepTraffic) the collectives that move this
        method's trainables in one optimizer step: gathers, gradient reductions, the
        updated values; payload in bytes per step."""
        raise NotImplementedError

    # ------------------------------------------------------------ reports
    def summary(self, arch) -> str:
        n = self.trainable_count(arch)
        return f"{self.label}: {n:,} trainable parameters on {len(arch.targets)} target matrices"

    def dry_run_lines(self, arch) -> list[str]:
        """Lines a dry run prints about the method beyond its summary."""
        return []


def partitioned_traffic(traffic, what: str, sizes, gather_calls: int, reduce_calls: int) -> None:
    """Trainables ZeRO-3 partitions over the world, as it moves them (measured): gathered
    for the forward and once more for the recompute and backward together, their gradients
    reduce-scattered; `gather_calls`, `reduce_calls`: collectives per micro-step."""
    c = traffic.ctx
    gathered = c.micro_steps * traffic.gathered(sizes, c.world) * c.dtype_bytes
    traffic.add(f"{what}: forward gathers", "all_gather", c.world, gathered, c.micro_steps * gather_calls, True)
    traffic.add(
        f"{what}: recompute + backward gathers", "all_gather", c.world, gathered, c.micro_steps * gather_calls, True
    )
    traffic.add(
        f"{what}: gradient reduce-scatter",
        "reduce_scatter",
        c.world,
        c.micro_steps * traffic.padded(sizes, c.world) * c.comm_bytes,
        c.micro_steps * reduce_calls,
        True,
    )
