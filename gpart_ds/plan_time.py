"""Time and traffic of one training step, per method and frozen-partition mode, from shapes.

    python -m gpart_ds.plan --config configs/llama70b.yaml --nodes 8 --gpus-per-node 8 \
        --gpu-mem-gb 80 --cluster h100 --net-gbps 25 [--json]

For GPart with the frozen base partitioned within a node or over the world, LoRA (both
ways) and full fine-tuning, on a stated cluster, per GPU and per optimizer step:

- FLOPs: forward, the recompute of activation checkpointing, dX (the gradient for the
  inputs), dW where the method needs a weight gradient (GPart's dW GEMM feeds the scatter
  into theta's gradient; LoRA needs its factors' only; full fine-tuning every weight's),
  counted as torch.utils.flop_counter.FlopCounterMode counts them (its own formulas for
  attention); GPart's delta generation as elements per pass, timed at the fused kernels'
  measured rates;
- collectives: every gather of weights, every reduction of gradients, the scalars; their
  payload and the bytes each GPU moves inside its node and across nodes
  (`collective_bytes`, the model commcount.py also reads its measurements with);
- a predicted step time with and without overlap of communication and compute.

Traffic model (per rank, collective payload S over a group of n ranks, L of them on each
of N nodes): a gather or reduce-scatter moves S (L-1)/L over the node's links and
S (N-1)/(N L) over the network (hierarchical, or NCCL's rings, which cross each node
boundary once per channel and spread channels over the node's NICs); an all-reduce twice
that. Time of a collective: the slower of its two parts at the links' achievable
bandwidth, plus a fixed latency per call.

Which gathers a step makes is what DeepSpeed 0.19.8's ZeRO-3 does with a complete trace
(measured with commcount on the tiny model, tests/integration/test_scale.py): every
parameter once in the forward; with activation checkpointing every decoder block again
in the recompute; in the backward every decoder block and the LM head again (and the
final norm, with checkpointing); parameters of at most stage3_param_persistence_threshold
elements are kept whole and never gathered. The trainable parameters (world group): their
gradient reduce-scattered in DeepSpeed's communication dtype (bf16 under bf16 training)
every micro-step; theta (kept resident) all-gathered in fp32 once per step; the scalars:
DeepSpeed's gradient norm (8 B) and the trainer's loss/token sums and stop flag (20 B).

Place in the new layout: beside gpart_ds/plan.py (it uses plan.Arch and plan.estimate).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

from . import plan

MODES = ("node", "global")
# (method, frozen partition) rows of the table; full fine-tuning has no frozen weights
ROWS = (("gpart", "node"), ("gpart", "global"), ("lora", "node"), ("lora", "global"), ("full", "global"))


# ------------------------------------------------------------------ the cluster
@dataclass(frozen=True)
class Cluster:
    """Per-GPU figures of a cluster (GB = 1e9 bytes)."""
    name: str
    peak_tflops: float          # dense bf16 tensor-core peak
    hbm_gbps: float             # HBM bandwidth
    nvlink_gbps: float          # intra-node link bandwidth, one direction
    net_gbps: float             # network bandwidth per GPU (NIC per GPU), one direction
    gpu_mem_gb: float           # GiB, as --gpu-mem-gb
    # Achieved fractions and rates; the defaults are measured on one H200 (docs/
    # layer_llama70b_h200.json: a 28672 x 8192 bf16 layer at 4096 tokens runs its
    # frozen fwd+bwd GEMMs at 795 TFLOPS = 0.80 of peak; the fused GPart kernels build
    # W0 + delta at 1.2-1.36e11 elements/s and run the backward pass (rebuild + scatter
    # of dW into theta's gradient) at 5.5e10). H100 SXM and H200 share the GH100 die,
    # clocks and SM count, so the kernel rates carry over.
    gemm_efficiency: float = 0.80
    link_efficiency: float = 0.80   # NCCL bus bandwidth / nominal link bandwidth
    delta_build_per_s: float = 1.3e11
    delta_backward_per_s: float = 5.5e10
    latency_s: float = 20e-6        # per collective call

    def with_(self, **kw) -> "Cluster":
        return Cluster(**{**asdict(self), **{k: v for k, v in kw.items() if v is not None}})


PRESETS = {
    # NVIDIA H100 SXM5 80 GB: 989 TFLOPS dense bf16, 3.35 TB/s HBM3, NVLink 4 at 900 GB/s
    # (450 each way); a DGX/HGX H100 node has one 400 Gb/s NIC per GPU (50 GB/s).
    "h100": Cluster("H100 SXM 80GB nodes",
                    989.0, 3350.0, 450.0, 50.0, 80.0),
    # NVIDIA H200 SXM 141 GB (140 GiB as the driver reports it): same compute and NVLink,
    # 4.8 TB/s HBM3e.
    "h200": Cluster("H200 SXM 141GB nodes",
                    989.0, 4800.0, 450.0, 50.0, 140.0),
}


def collective_bytes(kind: str, size: float, n: int, per_node: list[int]) -> tuple[float, float]:
    """(intra-node, inter-node) bytes one rank moves in one collective of payload `size`
    over a group of `n` ranks with `per_node[i]` of them on each node it spans."""
    if n <= 1 or kind == "barrier":
        return 0.0, 0.0
    nodes = len(per_node)
    factor = 2.0 if kind == "all_reduce" else 1.0
    if kind == "p2p":
        return (float(size), 0.0) if nodes == 1 else (0.0, float(size))
    if nodes == 1:
        return factor * size * (n - 1) / n, 0.0
    if len(set(per_node)) != 1:      # uneven groups: count everything as crossing nodes
        return 0.0, factor * size * (n - 1) / n
    L = per_node[0]
    if kind == "all_to_all":
        return size * (L - 1) / n, size * (n - L) / n
    return factor * size * (L - 1) / L, factor * size * (nodes - 1) / (nodes * L)


# ------------------------------------------------------------------ the step
@dataclass(frozen=True)
class Layout:
    """How the ranks are laid out for one estimate."""
    nodes: int
    gpus_per_node: int
    frozen_group: int            # ranks the frozen weights are partitioned over

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def span(self, group: int) -> list[int]:
        """Ranks per node of a group of `group` consecutive ranks (node-aligned)."""
        if group <= self.gpus_per_node:
            return [group]
        return [self.gpus_per_node] * (group // self.gpus_per_node)


@dataclass
class Collective:
    what: str
    kind: str          # all_gather | reduce_scatter | all_reduce
    group: int         # ranks in the group
    payload: float     # bytes per step (all calls summed)
    calls: int
    overlapped: bool   # hidden behind compute when overlapping (prefetch / bucketed reduction)
    intra: float = 0.0
    inter: float = 0.0
    seconds: float = 0.0


@dataclass
class StepEstimate:
    method: str
    mode: str
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
        return {"method": self.method, "frozen_partition": self.mode,
                "step_time_s": self.times["step_overlap_s"], "step_time_no_overlap_s": self.times["step_serial_s"],
                "inter_node_bytes_per_step": self.inter_bytes, "intra_node_bytes_per_step": self.intra_bytes,
                "flops_per_step": self.flops["total"], "flops": self.flops, "delta_elements": self.delta_elems,
                "times_s": self.times, "fits": self.fits, "memory_per_gpu_gib": self.memory_gib,
                "collectives": [asdict(c) for c in self.collectives]}


_LAYER = re.compile(r"(^|\.)layers\.\d+\.")


def _padded(n: int, group: int) -> int:
    """Elements DeepSpeed moves for a parameter of n elements partitioned over `group`."""
    return -(-n // group) * group


def block_linear_shapes(a: plan.Arch) -> list[tuple[int, int]]:
    """(out, in) of every linear of one decoder block (Llama family)."""
    q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    h, i = a.hidden, a.intermediate
    return [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]


def _attention_flops(a: plan.Arch, micro_batch: int, seq: int, kernel: str = "flash") -> tuple[float, float]:
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


def step_flops(a: plan.Arch, method: str, *, micro_batch: int, seq: int, grad_ckpt: bool,
               head_tokens: int | None = None, lora_rank: int = 16, attention: str = "flash") -> dict:
    """FLOPs of one micro-batch's forward and backward (FlopCounterMode's counting).

    `head_tokens`: positions the LM head runs on (default all; gpart_ds.lm_loss runs it
    at label positions only). `attention`: "flash" (GPU kernels), "math" (the decomposed
    kernel) or "none" (leave SDPA out: CPU kernels FlopCounterMode has no formula for).
    """
    T = micro_batch * seq
    Th = T if head_tokens is None else head_tokens
    blocks = a.layers * sum(o * i for o, i in block_linear_shapes(a))
    qkv0 = sum(o * i for o, i in block_linear_shapes(a)[:3])
    head = a.hidden * a.vocab
    att_f, att_b = _attention_flops(a, micro_batch, seq, attention) if attention != "none" else (0, 0)
    # Layer 0's q/k/v inputs need no gradient when the embeddings are frozen, except that
    # transformers' gradient_checkpointing_enable makes the embedding output require grad.
    skip_qkv0 = method != "full" and not grad_ckpt
    # torch's non-reentrant checkpointing stops recomputing a block once the last tensor
    # saved for backward is rebuilt: a last matmul whose output nothing saves is skipped.
    # Full fine-tuning's down_proj is (its input is saved before it runs); GPart's op
    # saves its input inside its own forward, so it always runs whole.
    o_last, i_last = block_linear_shapes(a)[-1]
    skip_last = 2 * T * a.layers * o_last * i_last if method == "full" else 0
    f = {"forward": 2 * T * blocks + att_f + 2 * Th * head,
         "recompute": (2 * T * blocks + att_f - skip_last) if grad_ckpt else 0,
         "dx": 2 * T * (blocks - (qkv0 if skip_qkv0 else 0)) + att_b + 2 * Th * head,
         "dw": 0}
    if method == "gpart":
        f["dw"] = 2 * T * a.D
    elif method == "full":
        f["dw"] = 2 * T * blocks + 2 * Th * head
    elif method in ("lora", "vera"):
        # x A^T then (xA) B^T per target; backward: dB, d(xA), dA, and dx through A.
        ri = [(o, i) for o, i in a.targets]
        lora = sum(2 * T * lora_rank * (o + i) for o, i in ri)
        first = [(o, i) for (o, i), n in zip(ri, a.target_names)
                 if re.search(r"(^|\.)layers\.0\.", n) and n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj")]
        lora_qkv0 = sum(2 * T * lora_rank * i for o, i in first) if skip_qkv0 else 0
        f["forward"] += lora
        # recompute: the base layer runs before the adapter; B of the block's last target
        # is the matmul whose output nothing saves (see skip_last above)
        last_b = 2 * T * lora_rank * a.targets[-1][0] * a.layers if a.target_names and \
            a.target_names[-1].endswith("down_proj") else 0
        f["recompute"] += (lora - last_b) if grad_ckpt else 0
        f["dx"] += sum(2 * T * lora_rank * (o + i) for o, i in ri) - lora_qkv0
        f["dw"] = lora
    f["total"] = f["forward"] + f["recompute"] + f["dx"] + f["dw"]
    return f


def _param_classes(a: plan.Arch) -> dict[str, list[int]]:
    """Parameter sizes by role: decoder blocks, LM head, final norm, embeddings."""
    out = {"blocks": [], "head": [], "norm": [], "embed": []}
    names = [n for n, _ in a.params]
    tied = not any(n.endswith("lm_head.weight") for n in names)
    out["tied"] = tied
    for name, n in a.params:
        if _LAYER.search(name):
            out["blocks"].append(n)
        elif "lm_head" in name:
            out["head"].append(n)
        elif "embed" in name:
            out["embed"].append(n)
            if tied:   # the LM head is the embedding matrix
                out["head"].append(n)
        else:
            out["norm"].append(n)
    return out


def gathered_elements(sizes: list[int], group: int, persist: int) -> int:
    return sum(_padded(n, group) for n in sizes if n > persist)


def _lora_sizes(a: plan.Arch, r: int) -> list[int]:
    return [n for o, i in a.targets for n in (r * i, o * r)]


def estimate_step(a: plan.Arch, method: str, mode: str, layout: Layout, cluster: Cluster, *,
                  d: int = 0, lora_rank: int = 16, micro_batch: int = 1, seq: int = 2048,
                  grad_accum: int = 1, dtype_bytes: int = 2, grad_ckpt: bool = True,
                  zero: dict | None = None, head_tokens: int | None = None,
                  comm_dtype_bytes: int | None = None) -> StepEstimate:
    """Traffic, FLOPs and time of one optimizer step on one GPU (see the module doc)."""
    if method == "full" and mode != "global":
        raise plan.PlanError("full fine-tuning has no frozen weights: only frozen_partition=global")
    z = zero or {}
    persist = int(float(z.get("stage3_param_persistence_threshold", 1e5)))
    comm_b = comm_dtype_bytes or dtype_bytes
    W, G = layout.world, (layout.frozen_group if mode == "node" else layout.world)
    est = StepEstimate(method, mode)
    micro = grad_accum

    fl = step_flops(a, method, micro_batch=micro_batch, seq=seq, grad_ckpt=grad_ckpt,
                    head_tokens=head_tokens, lora_rank=lora_rank)
    est.flops = {k: v * micro for k, v in fl.items()}
    if method == "gpart":
        est.delta_elems = {"build": micro * a.D * (2 if grad_ckpt else 1), "backward": micro * a.D}

    # ---- gathers of the base weights (frozen: group G; full: the world)
    cls = _param_classes(a)
    allp = [n for _, n in a.params]
    n_units = a.layers + 3
    if method == "full":
        # Trainable parameters are released by their own backward hook: gathered in the
        # forward and once more for the recompute and backward together (measured).
        fwd = gathered_elements(allp, W, persist)
        est.collectives.append(Collective("weights: forward gathers", "all_gather", W, micro * fwd * dtype_bytes,
                                          micro * n_units, True))
        est.collectives.append(Collective("weights: recompute + backward gathers", "all_gather", W,
                                          micro * fwd * dtype_bytes, micro * n_units, True))
    else:
        # Frozen parameters are released after every use: the forward, the recompute and
        # the backward of every module whose output needs a gradient gather them anew.
        fwd = gathered_elements(allp, G, persist)
        rec = gathered_elements(cls["blocks"], G, persist) if grad_ckpt else 0
        back = cls["blocks"] + cls["head"] + (cls["norm"] if grad_ckpt else [])
        bwd = gathered_elements(back, G, persist)
        if method in ("lora", "vera"):
            if not grad_ckpt:   # layer 0's q/k/v base linears have no backward (nothing upstream trains)
                bwd -= sum(_padded(o * i, G) for o, i in block_linear_shapes(a)[:3] if o * i > persist)
            else:               # PEFT's own input-grad hook gives the embeddings a backward (measured)
                bwd += 0 if cls["tied"] else gathered_elements(cls["embed"], G, persist)
        est.collectives.append(Collective("frozen weights: forward gathers", "all_gather", G,
                                          micro * fwd * dtype_bytes, micro * n_units, True))
        if rec:
            est.collectives.append(Collective("frozen weights: recompute gathers (checkpointing)", "all_gather", G,
                                              micro * rec * dtype_bytes, micro * a.layers, True))
        est.collectives.append(Collective("frozen weights: backward gathers", "all_gather", G,
                                          micro * bwd * dtype_bytes, micro * (a.layers + 2), True))
    # ---- the trainables (world group)
    if method == "gpart":
        pd = _padded(d, W)
        est.collectives.append(Collective("theta: gradient reduce-scatter", "reduce_scatter", W,
                                          micro * pd * comm_b, micro, False))
        est.collectives.append(Collective("theta: all-gather after the step (fp32)", "all_gather", W, pd * 4, 1, False))
    elif method in ("lora", "vera"):
        sizes = _lora_sizes(a, lora_rank)
        lf = gathered_elements(sizes, W, persist)
        passes = 2   # trainable: forward, then recompute + backward together (measured)
        est.collectives.append(Collective("LoRA factors: gathers (forward, backward)", "all_gather", W,
                                          micro * passes * lf * dtype_bytes, micro * passes * a.layers, True))
        est.collectives.append(Collective("LoRA factors: gradient reduce-scatter", "reduce_scatter", W,
                                          micro * sum(_padded(n, W) for n in sizes) * comm_b, micro, True))
    else:
        est.collectives.append(Collective("weights: gradient reduce-scatter", "reduce_scatter", W,
                                          micro * sum(_padded(n, W) for n in allp) * comm_b, micro * n_units, True))
    est.collectives.append(Collective("scalars: gradient norm, loss and token sums, stop flag", "all_reduce", W,
                                      28, 3, False))

    # ---- bytes and time per collective
    for c in est.collectives:
        span = layout.span(c.group)
        c.intra, c.inter = collective_bytes(c.kind, c.payload, c.group, span)
        t_intra = c.intra / (cluster.nvlink_gbps * 1e9 * cluster.link_efficiency)
        t_inter = c.inter / (cluster.net_gbps * 1e9 * cluster.link_efficiency)
        c.seconds = max(t_intra, t_inter) + c.calls * cluster.latency_s
    compute = est.flops["total"] / (cluster.peak_tflops * 1e12 * cluster.gemm_efficiency)
    delta = 0.0
    if est.delta_elems:
        delta = (est.delta_elems["build"] / cluster.delta_build_per_s
                 + est.delta_elems["backward"] / cluster.delta_backward_per_s)
    # Optimizer: AdamW over this rank's partition of the trainables, memory bound: fp32
    # master, two moments and the gradient read and written, the working copy written.
    trainable = {"gpart": d, "lora": sum(_lora_sizes(a, lora_rank)), "vera": sum(_lora_sizes(a, lora_rank)),
                 "full": sum(allp)}[method]
    optimizer = math.ceil(trainable / W) * 32 / (cluster.hbm_gbps * 1e9)
    hidden = sum(c.seconds for c in est.collectives if c.overlapped)
    exposed = sum(c.seconds for c in est.collectives if not c.overlapped)
    est.times = {"compute_s": compute, "delta_s": delta, "optimizer_s": optimizer,
                 "comm_overlappable_s": hidden, "comm_exposed_s": exposed,
                 "step_serial_s": compute + delta + optimizer + hidden + exposed,
                 "step_overlap_s": max(compute + delta, hidden) + exposed + optimizer}
    return est


# ------------------------------------------------------------------ from a run config
def frozen_group(dist_cfg, gpus_per_node: int, world: int) -> int:
    """Ranks the frozen base is partitioned over in `node` mode (dist.frozen_partition_size)."""
    size = int(dist_cfg.get("frozen_partition_size", 0) or 0) or gpus_per_node
    return min(size, world)


def comm_dtype_bytes(ds: dict, dtype_bytes: int) -> int:
    """DeepSpeed reduces gradients in communication_data_type, else in the training dtype."""
    name = str((ds or {}).get("communication_data_type") or "").lower()
    return {"fp32": 4, "float32": 4, "fp16": 2, "bf16": 2, "bfloat16": 2}.get(name, dtype_bytes)


def estimate_rows(cfg, a: plan.Arch, nodes: int, gpus_per_node: int, cluster: Cluster,
                  headroom: float = 0.10, overhead_gb: float = 3.0, rows=ROWS,
                  lora_rank: int | None = None) -> list[StepEstimate]:
    """Every (method, frozen partition) row for a run config on `nodes` x `gpus_per_node`."""
    ds = dict(cfg.deepspeed or {})
    zero = dict(ds.get("zero_optimization", {}))
    b = plan.dtype_bytes(cfg.model.precision)
    world = nodes * gpus_per_node
    G = frozen_group(cfg.dist, gpus_per_node, world)
    layout = Layout(nodes, gpus_per_node, G)
    r = lora_rank or cfg.method.r or 16
    d = cfg.method.d or 0
    out = []
    for method, mode in rows:
        if method == "gpart" and d < 1:
            continue
        est = estimate_step(a, method, mode, layout, cluster, d=d, lora_rank=r,
                            micro_batch=cfg.train.micro_batch_size, seq=cfg.data.max_length,
                            grad_accum=cfg.train.grad_accum, dtype_bytes=b,
                            grad_ckpt=cfg.model.gradient_checkpointing, zero=zero,
                            comm_dtype_bytes=comm_dtype_bytes(ds, b))
        mem = plan.plan_for_config(cfg, a, world, method=method, lora_rank=r, overhead_gb=overhead_gb,
                                   frozen_group=G if mode == "node" else None)
        est.memory_gib = mem.gpu_total / plan.GIB
        est.fits = plan.check_fit(mem, cluster.gpu_mem_gb, headroom).fits
        out.append(est)
    return out


def recommend(rows: list[StepEstimate], method: str = "gpart") -> StepEstimate | None:
    """The frozen partition for `method`: the fitting row with the shortest predicted step
    (overlapped), ties broken by fewer bytes across nodes."""
    ok = [r for r in rows if r.method == method and r.fits]
    return min(ok, key=lambda r: (round(r.times["step_overlap_s"], 6), r.inter_bytes)) if ok else None


def _fmt_bytes(x: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if x >= size:
            return f"{x / size:.3g} {unit}"
    return f"{x:.0f} B"


def format_table(rows: list[StepEstimate], cluster: Cluster, nodes: int, gpus_per_node: int) -> str:
    lines = [f"time and traffic per optimizer step, per GPU: {nodes} node(s) x {gpus_per_node} GPU(s) "
             f"of {cluster.name}",
             f"  assumed per GPU: {cluster.gpu_mem_gb:g} GiB, {cluster.peak_tflops:g} TFLOPS bf16 peak x "
             f"{cluster.gemm_efficiency:.2f} achieved, "
             f"NVLink {cluster.nvlink_gbps:g} GB/s, network {cluster.net_gbps:g} GB/s per GPU "
             f"(x {cluster.link_efficiency:.2f} achieved), HBM {cluster.hbm_gbps:g} GB/s, "
             f"GPart delta {cluster.delta_build_per_s:.3g} / {cluster.delta_backward_per_s:.3g} elem/s "
             "(build / backward)",
             "| method | frozen partition | PFLOP/step | inter-node bytes | intra-node bytes | compute s | delta s "
             "| comm s | step s (overlap) | step s (no overlap) | GiB/GPU | fits |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r.times
        lines.append(f"| {r.method} | {r.mode} | {r.flops['total'] / 1e15:.3g} | {_fmt_bytes(r.inter_bytes)} | "
                     f"{_fmt_bytes(r.intra_bytes)} | {t['compute_s']:.3g} | {t['delta_s']:.3g} | "
                     f"{t['comm_overlappable_s'] + t['comm_exposed_s']:.3g} | {t['step_overlap_s']:.3g} | "
                     f"{t['step_serial_s']:.3g} | {r.memory_gib:.1f} | {'yes' if r.fits else 'NO'} |")
    best = recommend(rows)
    if best is not None:
        other = next((r for r in rows if r.method == best.method and r.mode != best.mode), None)
        vs = ""
        if other is not None:
            vs = (f"; vs {other.mode}: {other.times['step_overlap_s'] / best.times['step_overlap_s']:.2f}x "
                  f"(overlap), {other.times['step_serial_s'] / best.times['step_serial_s']:.2f}x (no overlap), "
                  f"{other.inter_bytes / max(best.inter_bytes, 1):.3g}x the inter-node bytes")
        lines.append(f"recommended for gpart: dist.frozen_partition={best.mode}{vs}")
    return "\n".join(lines)


# ------------------------------------------------------------------ command line (gpart_ds.plan)
def add_arguments(ap) -> None:
    g = ap.add_argument_group("time and traffic (gpart_ds/plan_time.py)")
    g.add_argument("--cluster", choices=sorted(PRESETS), default="h100",
                   help="per-GPU figures of the nodes (default h100); the options below override them")
    g.add_argument("--net-gbps", type=float, help="network bandwidth per GPU, GB/s (presets: 50)")
    g.add_argument("--nvlink-gbps", type=float, help="intra-node bandwidth per GPU and direction, GB/s")
    g.add_argument("--tflops", type=float, help="dense bf16 peak per GPU, TFLOPS")
    g.add_argument("--gemm-efficiency", type=float, help="achieved fraction of the peak (default 0.80)")
    g.add_argument("--json", action="store_true",
                   help="print the time/traffic rows (and each row's memory per GPU) as JSON only")


def cluster_from_args(args) -> Cluster:
    base = PRESETS[args.cluster]
    return base.with_(net_gbps=args.net_gbps, nvlink_gbps=args.nvlink_gbps, peak_tflops=args.tflops,
                      gemm_efficiency=args.gemm_efficiency, gpu_mem_gb=args.gpu_mem_gb)


def config_frozen_group(cfg, method: str | None, gpus_per_node: int, world: int) -> int | None:
    """The frozen weights' group size for the memory plan of a run config (None: the world)."""
    if (method or cfg.method.name) == "full" or cfg.dist.frozen_partition != "node":
        return None
    g = frozen_group(cfg.dist, gpus_per_node, world)
    return None if g >= world else g


def cli_report(args, cfg, arch: plan.Arch) -> dict:
    """{"text": the table, "json": the rows}, for python -m gpart_ds.plan."""
    cluster = cluster_from_args(args)
    rows = estimate_rows(cfg, arch, args.nodes, args.gpus_per_node, cluster, headroom=args.headroom,
                         overhead_gb=args.overhead_gb, lora_rank=args.lora_rank if args.method else None)
    best = recommend(rows)
    js = {"nodes": args.nodes, "gpus_per_node": args.gpus_per_node, "cluster": asdict(cluster),
          "config": cfg.config_file, "recommended": {"gpart": best.mode if best else None},
          "methods": {f"{r.method}/{r.mode}": r.to_json() for r in rows}}
    return {"text": format_table(rows, cluster, args.nodes, args.gpus_per_node), "json": js}


def sweep(cfg, arch: plan.Arch, nodes: int, gpus_per_node: int, cluster: Cluster, nets: list[float],
          micro_batches: list[int]) -> str:
    """GPart node vs global: predicted step time ratio over network bandwidths and micro-batches."""
    lines = ["| micro-batch | network GB/s per GPU | node s (overlap / none) | global s (overlap / none) "
             "| global / node (overlap) | global / node (no overlap) |", "|---|---|---|---|---|---|"]
    for mb in micro_batches:
        c = cfg.copy()
        c.train.micro_batch_size = mb
        for net in nets:
            rows = {r.mode: r for r in estimate_rows(c, arch, nodes, gpus_per_node, cluster.with_(net_gbps=net),
                                                     rows=(("gpart", "node"), ("gpart", "global")))}
            n, g = rows["node"].times, rows["global"].times
            lines.append(f"| {mb} | {net:g} | {n['step_overlap_s']:.2f} / {n['step_serial_s']:.2f} | "
                         f"{g['step_overlap_s']:.2f} / {g['step_serial_s']:.2f} | "
                         f"{g['step_overlap_s'] / n['step_overlap_s']:.2f}x | "
                         f"{g['step_serial_s'] / n['step_serial_s']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """python -m gpart_ds.plan_time --config C --nodes N --gpus-per-node G [--cluster h100]
    [--net 50,25,12.5] [--micro-batch 1,2]: GPart node vs global over networks and micro-batches."""
    import argparse
    import sys

    from .config import ConfigError, load_config

    ap = argparse.ArgumentParser(prog="python -m gpart_ds.plan_time", description=main.__doc__)
    ap.add_argument("--config", required=True)
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--gpus-per-node", type=int, required=True)
    ap.add_argument("--cluster", choices=sorted(PRESETS), default="h100")
    ap.add_argument("--net", default="50,25,12.5,6.25,3.125", help="network GB/s per GPU, comma-separated")
    ap.add_argument("--micro-batch", default="", help="train.micro_batch_size values (default: the config's)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, check_files=False)
        arch, _ = plan.arch_for_config(cfg)
        nets = [float(x) for x in args.net.split(",") if x.strip()]
        mbs = [int(x) for x in args.micro_batch.split(",") if x.strip()] or [cfg.train.micro_batch_size]
    except (ConfigError, plan.PlanError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"GPart step time, frozen base within a node vs over the world: {args.nodes} x {args.gpus_per_node} "
          f"GPUs, {PRESETS[args.cluster].name}, {cfg.data.max_length} tokens per sequence")
    print(sweep(cfg, arch, args.nodes, args.gpus_per_node, PRESETS[args.cluster], nets, mbs))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
