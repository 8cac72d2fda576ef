"""What GPart costs, from shapes: theta (d floats) and its state, W0 + delta built in row
chunks, the group ids kept with reuse_ids; a dW GEMM, theta's reductions."""

from __future__ import annotations

from ..cost import Cost
from . import partition
from .config import reuse_ids


class GPartCost(Cost):
    def trainable_sizes(self, arch) -> list[int]:
        return [int(self.cfg.d)]

    def summary(self, arch) -> str:
        d = self.cfg.d
        return (
            f"GPart: {len(arch.targets)} target matrices, D = {arch.D:,}, d = {d:,} "
            f"(D/d = {arch.D / d:,.0f}); adapter {4 * d / 2**20:.2f} MiB"
        )

    def extra_saved_bytes(self, arch, grad_ckpt: bool) -> int:
        """The int32 group ids kept with reuse_ids (inside checkpointed blocks they are
        recomputed with the block instead)."""
        return 4 * arch.D if reuse_ids(self.cfg, arch.D) and not grad_ckpt else 0

    def plan_rows(self, plan, arch, ctx) -> None:
        m = self.cfg
        d, W, b = m.d, ctx.world, ctx.b
        if reuse_ids(m, arch.D):
            if ctx.grad_ckpt:
                plan.add("GPart group ids of the recomputed block (int32)", 4 * arch.D / max(1, arch.layers))
            else:
                plan.add("activations: GPart group ids kept for backward (int32, 4 x D)", 4 * arch.D)
        plan.add("theta, s and theta*s (fp32, every rank)", 12 * d)
        # theta's own partition (fp32), its fp32 master and two Adam moments, and the
        # gradient partition in the training dtype
        plan.add(
            f"theta's partition, fp32 master, Adam moments, grad (1/{W})", (16 + b) * -(-d // W), on_host=ctx.off_opt
        )
        chunk = max(min(o, max(1, m.chunk_elems // i)) * i for o, i in arch.targets)
        plan.add("transient: W0+delta and dW row chunks, d-length gradients", 2 * chunk * b + 8 * d)

    def step_flops(self, arch, ctx) -> dict[str, int]:
        # dW = g^T x of every target (in row chunks), scattered into theta's gradient:
        # one GEMM the size of the targets.
        return {"dw": 2 * ctx.tokens * arch.D}

    def delta_elements(self, arch, ctx) -> dict[str, int]:
        # W0 + delta is built in the forward and again in the recompute; the backward
        # rebuilds it for dX and scatters dW into theta's gradient.
        return {"build": arch.D * (2 if ctx.grad_ckpt else 1), "backward": arch.D}

    def step_traffic(self, traffic, arch) -> None:
        c = traffic.ctx
        pd = traffic.padded([self.cfg.d], c.world)
        # theta is kept whole on every rank (after_engine), so no pass gathers it. Its
        # gradient is reduce-scattered at the end of each backward (one bucket, nothing
        # left to overlap it with) and the updated partitions are all-gathered in fp32.
        traffic.add(
            "theta: gradient reduce-scatter",
            "reduce_scatter",
            c.world,
            c.micro_steps * pd * c.comm_bytes,
            c.micro_steps,
            False,
        )
        traffic.add("theta: all-gather after the step (fp32)", "all_gather", c.world, pd * 4, 1, False)

    def dry_run_lines(self, arch) -> list[str]:
        m = self.cfg
        s = partition.group_size_stats(arch.D, m.d, m.seed)
        how = (
            "exact: counted over all D positions"
            if s["method"] == "exact"
            else "theory: each n_g ~ Binomial(D, 1/d), the multinomial's marginals; min/max are the "
            "expected extremes over d groups (normal approximation); the run counts them exactly "
            "at start-up"
        )
        fmt = (lambda v: f"{v:,}") if s["method"] == "exact" else (lambda v: f"{v:,.1f}")
        empty = f"{s['empty']:,}" if s["method"] == "exact" else f"{s['empty']:.2g} expected"
        return [
            f"group sizes n_g: mean {s['mean']:,.1f}, sd {s['sd']:,.1f}, min {fmt(s['min'])}, "
            f"max {fmt(s['max'])}, empty groups {empty} ({how})"
        ]
