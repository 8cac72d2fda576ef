"""Time and traffic of one training step, per method and frozen-partition mode, from shapes.

    python -m gpart_ds.plan --config configs/llama70b.yaml --nodes 8 --gpus-per-node 8 \
        --gpu-mem-gb 80 --cluster h100 --net-gbps 25 [--json]
    python -m gpart_ds.plan sweep --config configs/llama70b.yaml --nodes 8 --gpus-per-node 8 \
        --micro-batch 1,2          # the run's method, node vs global, over network bandwidths

For the compared methods (COMPARED) with the frozen base partitioned within a node
or over the world, on a stated cluster, per GPU and per optimizer step:

- FLOPs: forward, the recompute of activation checkpointing and dX of the base model
  (`base_flops`), plus what the method adds (`Cost.step_flops`: its weight gradients,
  adapter matmuls, a recompute cut short), counted as
  torch.utils.flop_counter.FlopCounterMode counts them (its own formulas for attention);
  generated weights (`Cost.delta_elements`, GPart's W0 + delta) as elements per pass,
  timed at the fused kernels' measured rates;
- collectives: the gathers of the frozen base (here: forward, recompute, and the backward
  of the parameters `Cost.frozen_backward` names), whatever moves the method's
  trainables (`Cost.step_traffic`), the scalars; their payload and the bytes each GPU
  moves inside its node and across nodes (cluster.py: `collective_bytes`, the model
  commcount.py also reads its measurements with);
- a predicted step time with and without overlap of communication and compute.

Which gathers a step makes is what DeepSpeed 0.19.8's ZeRO-3 does with a complete trace
(measured with commcount on the tiny model, tests/integration/test_scale.py): every
frozen parameter once in the forward; with activation checkpointing every decoder block
again in the recompute; in the backward every decoder block and the LM head again (and
the final norm, with checkpointing); parameters of at most
stage3_param_persistence_threshold elements are kept whole and never gathered. The
scalars: DeepSpeed's gradient norm and the trainer's loss/token/non-finite sums and stop flag.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

from ..config import FROZEN_PARTITIONS as MODES
from .arch import Arch, PlanError, checked_method, dtype_bytes, method_for, spec
from .cluster import Cluster, RankLayout, collective_bytes, frozen_group
from .memory import GIB, check_fit, plan_for_config

COMPARED = ("gpart", "lora", "full")  # what the benchmark projects per GPU

# Per step, over the world: DeepSpeed's gradient norm (float64), the trainer's loss and
# token sums and count of ranks with a non-finite state (3 x float64, comm.all_sum) and
# its stop flag (float64, comm.any_rank).
SCALARS = (("scalars: gradient norm, loss, token and non-finite sums, stop flag", 8 + 24 + 8, 3),)


@dataclass(frozen=True)
class StepContext:
    """What a method's step hooks (methods/cost.py: Cost) need beside the architecture and its
    own config: one micro-batch's shape, and the ranks and dtypes its collectives use."""

    micro_batch: int
    seq: int
    grad_ckpt: bool
    head_tokens: int | None = None  # positions the LM head runs on per micro-batch (None: all)
    world: int = 1
    frozen_group: int = 1  # ranks the frozen base is partitioned over
    micro_steps: int = 1  # micro-batches per optimizer step (train.grad_accum)
    dtype_bytes: int = 2  # the training dtype
    comm_bytes: int = 2  # DeepSpeed's gradient-reduction dtype
    persist: int = 0  # stage3_param_persistence_threshold (kept whole, never gathered)

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq

    @property
    def head(self) -> int:
        return self.tokens if self.head_tokens is None else self.head_tokens


@dataclass
class Collective:
    what: str
    kind: str  # all_gather | reduce_scatter | all_reduce
    group: int  # ranks in the group
    payload: float  # bytes per step (all calls summed)
    calls: int
    overlapped: bool  # hidden behind compute when overlapping (prefetch / bucketed reduction)
    intra: float = 0.0
    inter: float = 0.0
    seconds: float = 0.0


def padded(sizes, group: int) -> int:
    """Elements DeepSpeed moves for parameters of these sizes partitioned over `group`
    (each padded to a multiple of the group)."""
    return sum(-(-n // group) * group for n in sizes)


class StepTraffic:
    """The collectives of one optimizer step; a method's `step_traffic` adds those that
    move its trainables, with payloads in bytes per optimizer step."""

    def __init__(self, ctx: StepContext):
        self.ctx = ctx
        self.collectives: list[Collective] = []

    def add(self, what: str, kind: str, group: int, payload: float, calls: int, overlapped: bool) -> None:
        self.collectives.append(Collective(what, kind, group, payload, calls, overlapped))

    def gathered(self, sizes, group: int) -> int:
        """Elements one all-gather of parameters of these sizes moves (padded; those of at
        most stage3_param_persistence_threshold elements are kept whole, never gathered)."""
        return padded([n for n in sizes if n > self.ctx.persist], group)

    padded = staticmethod(padded)


@dataclass
class StepEstimate:
    method: str  # the method's name (methods/ registry)
    mode: str  # frozen partition: node | global
    label: str = ""  # e.g. "LoRA r=8"
    flops: dict = field(default_factory=dict)
    delta_elems: dict = field(default_factory=dict)
    collectives: list = field(default_factory=list)
    times: dict = field(default_factory=dict)
    memory_gib: float = 0.0
    fits: bool = True

    @property
    def intra_bytes(self) -> float:
        return sum(c.intra for c in self.collectives)

    @property
    def inter_bytes(self) -> float:
        return sum(c.inter for c in self.collectives)

    def to_json(self) -> dict:
        return {
            "method": self.method,
            "label": self.label,
            "frozen_partition": self.mode,
            "step_time_s": self.times["step_overlap_s"],
            "step_time_no_overlap_s": self.times["step_serial_s"],
            "inter_node_bytes_per_step": self.inter_bytes,
            "intra_node_bytes_per_step": self.intra_bytes,
            "flops_per_step": self.flops["total"],
            "flops": self.flops,
            "delta_elements": self.delta_elems,
            "times_s": self.times,
            "fits": self.fits,
            "memory_per_gpu_gib": self.memory_gib,
            "collectives": [asdict(c) for c in self.collectives],
        }


_LAYER = re.compile(r"(^|\.)layers\.\d+\.")


def _attention_flops(a: Arch, micro_batch: int, seq: int, kernel: str = "flash") -> tuple[float, float]:
    """(forward, backward) FLOPs of SDPA in all blocks, by FlopCounterMode's formulas.

    kernel "flash": the fused kernels GPUs train with, whose backward recomputes the
    scores (FlopCounterMode's sdpa backward formula, 2.5x the forward); "math": the
    decomposed kernel (CPU with a mask), whose backward is two bmms per forward bmm.
    """
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    q = (micro_batch, a.heads, seq, a.head_dim)
    kv = (micro_batch, a.kv_heads, seq, a.head_dim)
    fwd = a.layers * sdpa_flop_count(q, kv, kv)
    bwd = a.layers * sdpa_backward_flop_count(q, q, kv, kv) if kernel == "flash" else 2 * fwd
    return fwd, bwd


def base_flops(a: Arch, ctx: StepContext, trains_base: bool, attention: str = "flash") -> dict:
    """FLOPs of one micro-batch through the base model: forward, the recompute of every
    block's linears and attention under checkpointing, dX (attention, linears, the LM
    head at `ctx.head` positions); dW is the method's (Cost.step_flops)."""
    T, Th = ctx.tokens, ctx.head
    linears = a.block_linears()
    blocks = a.layers * sum(o * i for o, i in linears)
    qkv0 = sum(o * i for o, i in linears[:3])
    head = a.hidden * a.vocab
    att_f, att_b = _attention_flops(a, ctx.micro_batch, ctx.seq, attention) if attention != "none" else (0, 0)
    # Layer 0's q/k/v inputs need no gradient when the embeddings are frozen, except that
    # transformers' gradient_checkpointing_enable makes the embedding output require grad.
    skip_qkv0 = not trains_base and not ctx.grad_ckpt
    return {
        "forward": 2 * T * blocks + att_f + 2 * Th * head,
        "recompute": (2 * T * blocks + att_f) if ctx.grad_ckpt else 0,
        "dx": 2 * T * (blocks - (qkv0 if skip_qkv0 else 0)) + att_b + 2 * Th * head,
        "dw": 0,
    }


def step_flops(
    a: Arch,
    method=None,
    *,
    micro_batch: int,
    seq: int,
    grad_ckpt: bool,
    head_tokens: int | None = None,
    attention: str = "flash",
) -> dict:
    """FLOPs of one micro-batch's forward and backward (FlopCounterMode's counting).

    `method`: a method config (spec(...)); `head_tokens`: positions the LM head runs
    on (default all; the training objective runs it at label positions only).
    `attention`: "flash" (GPU kernels), "math" (the decomposed kernel) or "none" (leave
    SDPA out: CPU kernels FlopCounterMode has no formula for).
    """
    m = method if method is not None else spec()
    cost = checked_method(m)
    ctx = StepContext(micro_batch, seq, grad_ckpt, head_tokens)
    f = base_flops(a, ctx, cost.trains_base, attention)
    for k, v in cost.step_flops(a, ctx).items():
        f[k] += v
    f["total"] = f["forward"] + f["recompute"] + f["dx"] + f["dw"]
    return f


def _param_roles(a: Arch) -> dict[str, dict[str, int]]:
    """Parameters ({name: elements}) by role: decoder blocks, LM head, final norm, embeddings."""
    out: dict[str, dict[str, int]] = {"blocks": {}, "head": {}, "norm": {}, "embed": {}}
    tied = not any(n.endswith("lm_head.weight") for n, _ in a.params)
    for name, n in a.params:
        if _LAYER.search(name):
            out["blocks"][name] = n
        elif "lm_head" in name:
            out["head"][name] = n
        elif "embed" in name:
            out["embed"][name] = n
            if tied:  # the LM head is the embedding matrix
                out["head"][name] = n
        else:
            out["norm"][name] = n
    return out


def _frozen_gathers(t: StepTraffic, a: Arch, cost) -> None:
    """Frozen parameters are released after every use: the forward, the recompute and the
    backward of every module whose output needs a gradient gather them anew."""
    ctx, G, micro = t.ctx, t.ctx.frozen_group, t.ctx.micro_steps
    roles = _param_roles(a)
    fwd = t.gathered([n for _, n in a.params], G)
    rec = t.gathered(roles["blocks"].values(), G) if ctx.grad_ckpt else 0
    default = {**roles["blocks"], **roles["head"], **(roles["norm"] if ctx.grad_ckpt else {})}
    bwd = t.gathered(cost.frozen_backward(a, ctx, default).values(), G)
    b = ctx.dtype_bytes
    t.add("frozen weights: forward gathers", "all_gather", G, micro * fwd * b, micro * (a.layers + 3), True)
    if rec:
        t.add(
            "frozen weights: recompute gathers (checkpointing)",
            "all_gather",
            G,
            micro * rec * b,
            micro * a.layers,
            True,
        )
    t.add("frozen weights: backward gathers", "all_gather", G, micro * bwd * b, micro * (a.layers + 2), True)


def estimate_step(
    a: Arch,
    method,
    mode: str,
    layout: RankLayout,
    cluster: Cluster,
    *,
    micro_batch: int = 1,
    seq: int = 2048,
    grad_accum: int = 1,
    dtype_bytes: int = 2,
    grad_ckpt: bool = True,
    zero: dict | None = None,
    head_tokens: int | None = None,
    comm_dtype_bytes: int | None = None,
) -> StepEstimate:
    """Traffic, FLOPs and time of one optimizer step on one GPU (see the module doc).

    `method`: a method config (spec(...) or a run's cfg.method); `mode`: where the
    frozen base is partitioned (dist.frozen_partition: node or global).
    """
    cost = checked_method(method)
    if mode not in MODES:
        raise PlanError(f"frozen partition must be one of {MODES}, got {mode!r}")
    if cost.trains_base and mode != "global":
        raise PlanError(
            f"{cost.label} trains the base weights: it has no frozen partition, only frozen_partition=global"
        )
    z = zero or {}
    W = layout.world
    ctx = StepContext(
        micro_batch,
        seq,
        grad_ckpt,
        head_tokens,
        world=W,
        frozen_group=layout.frozen_group if mode == "node" else W,
        micro_steps=grad_accum,
        dtype_bytes=dtype_bytes,
        comm_bytes=comm_dtype_bytes or dtype_bytes,
        persist=int(float(z.get("stage3_param_persistence_threshold", 1e5))),
    )
    est = StepEstimate(method.name, mode, cost.label)
    fl = step_flops(a, method, micro_batch=micro_batch, seq=seq, grad_ckpt=grad_ckpt, head_tokens=head_tokens)
    est.flops = {k: v * grad_accum for k, v in fl.items()}
    est.delta_elems = {k: v * grad_accum for k, v in cost.delta_elements(a, ctx).items()}

    traffic = StepTraffic(ctx)
    if not cost.trains_base:
        _frozen_gathers(traffic, a, cost)
    cost.step_traffic(traffic, a)
    for what, nbytes, calls in SCALARS:
        traffic.add(what, "all_reduce", W, nbytes, calls, False)
    est.collectives = traffic.collectives

    # ---- bytes and time per collective
    for c in est.collectives:
        span = layout.span(c.group)
        c.intra, c.inter = collective_bytes(c.kind, c.payload, c.group, span)
        t_intra = c.intra / (cluster.nvlink_gbps * 1e9 * cluster.link_efficiency)
        t_inter = c.inter / (cluster.net_gbps * 1e9 * cluster.link_efficiency)
        c.seconds = max(t_intra, t_inter) + c.calls * cluster.latency_s
    compute = est.flops["total"] / (cluster.peak_tflops * 1e12 * cluster.gemm_efficiency)
    delta = (
        est.delta_elems.get("build", 0) / cluster.delta_build_per_s
        + est.delta_elems.get("backward", 0) / cluster.delta_backward_per_s
    )
    # Optimizer: AdamW over this rank's partition of the trainables, memory bound: fp32
    # master, two moments and the gradient read and written, the working copy written.
    optimizer = math.ceil(cost.trainable_count(a) / W) * 32 / (cluster.hbm_gbps * 1e9)
    hidden = sum(c.seconds for c in est.collectives if c.overlapped)
    exposed = sum(c.seconds for c in est.collectives if not c.overlapped)
    est.times = {
        "compute_s": compute,
        "delta_s": delta,
        "optimizer_s": optimizer,
        "comm_overlappable_s": hidden,
        "comm_exposed_s": exposed,
        "step_serial_s": compute + delta + optimizer + hidden + exposed,
        "step_overlap_s": max(compute + delta, hidden) + exposed + optimizer,
    }
    return est


def comm_dtype_bytes(ds: dict, dtype_bytes: int) -> int:
    """DeepSpeed reduces gradients in communication_data_type, else in the training dtype."""
    name = str((ds or {}).get("communication_data_type") or "").lower()
    return {"fp32": 4, "float32": 4, "fp16": 2, "bf16": 2, "bfloat16": 2}.get(name, dtype_bytes)


def modes_of(name: str) -> tuple[str, ...]:
    """The frozen partitions a method can run with (one that trains the base: the world only)."""
    from .. import methods

    return ("global",) if methods.get(name).trains_base else MODES


def _plannable(m) -> bool:
    try:
        checked_method(m)
        return True
    except PlanError:
        return False


def estimate_rows(
    cfg,
    a: Arch,
    nodes: int,
    gpus_per_node: int,
    cluster: Cluster,
    headroom: float = 0.10,
    overhead_gb: float = 3.0,
    names=COMPARED,
) -> list[StepEstimate]:
    """Every (method, frozen partition) row for a run config on `nodes` x `gpus_per_node`.

    Each method runs on the config's targets with its method.* values where it reads
    them (method_for); a method the config cannot describe (GPart without
    method.d, in a LoRA config) is left out.
    """
    ds = dict(cfg.deepspeed or {})
    zero = dict(ds.get("zero_optimization", {}))
    b = dtype_bytes(cfg.model.precision)
    world = nodes * gpus_per_node
    G = frozen_group(cfg.dist, gpus_per_node, world)
    layout = RankLayout(nodes, gpus_per_node, G)
    out = []
    for name in names:
        m = method_for(cfg, name)
        if not _plannable(m):
            continue
        for mode in modes_of(name):
            est = estimate_step(
                a,
                m,
                mode,
                layout,
                cluster,
                micro_batch=cfg.train.micro_batch_size,
                seq=cfg.data.max_length,
                grad_accum=cfg.train.grad_accum,
                dtype_bytes=b,
                grad_ckpt=cfg.model.gradient_checkpointing,
                zero=zero,
                comm_dtype_bytes=comm_dtype_bytes(ds, b),
            )
            mem = plan_for_config(
                cfg, a, world, method=name, overhead_gb=overhead_gb, frozen_group=G if mode == "node" else None
            )
            est.memory_gib = mem.gpu_total / GIB
            est.fits = check_fit(mem, cluster.gpu_mem_gb, headroom).fits
            out.append(est)
    return out


def recommend(rows: list[StepEstimate], method: str) -> StepEstimate | None:
    """The frozen partition for `method`: the fitting row with the shortest predicted step
    (overlapped), ties broken by fewer bytes across nodes."""
    ok = [r for r in rows if r.method == method and r.fits]
    return min(ok, key=lambda r: (round(r.times["step_overlap_s"], 6), r.inter_bytes)) if ok else None


def config_frozen_group(cfg, method: str | None, gpus_per_node: int, world: int) -> int | None:
    """The frozen weights' group size for the memory plan of a run config (None: the world)."""
    if len(modes_of(method or cfg.method.name)) == 1 or cfg.dist.frozen_partition != "node":
        return None
    g = frozen_group(cfg.dist, gpus_per_node, world)
    return None if g >= world else g
