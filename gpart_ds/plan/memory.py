"""Per-GPU memory plan of a run under ZeRO-3: GPart, and LoRA / full fine-tuning for comparison.

    python -m gpart_ds.plan --config configs/llama70b.yaml --nodes 8 --gpus-per-node 8 --gpu-mem-gb 80

Everything is counted from shapes (a meta-device skeleton built from a config.json): no
weight is read, no GPU is needed. Exit status 0 when the plan fits, 1 when it does not
(with what to change), 2 for a bad config.

What is counted, per rank (bytes; b = bytes per element of the training dtype):

- frozen weights: this rank's ZeRO-3 partition of every parameter, ceil(n / W) elements,
  plus the whole of every parameter small enough to persist (stage3_param_persistence_threshold);
- gathered for compute: the largest gather unit (a decoder layer, the embeddings, the LM
  head) plus one prefetch bucket, bounded by stage3_max_live_parameters;
- activations: the tensors autograd saves, counted op by op for Llama-family blocks
  (RMSNorm keeps an fp32 copy of its input, SDPA with a padding mask works on repeated k/v
  heads, SwiGLU keeps four intermediate-size tensors; see `layer_saved_bytes_per_token`),
  checked against the saved tensors of real forwards in tests/integration/test_zero3.py;
- theta (d fp32 numbers) with s and theta*s on every rank, its fp32 master, Adam moments and
  gradient partition (1/W each);
- transients: one row chunk of W0 + delta and of dW per linear (method.chunk_elems), the
  d-length gradient, and the logits in the training dtype and fp32 before the loss;
- a fixed allowance for the CUDA context, NCCL buffers and allocator slack (--overhead-gb).

A plan fits when the total is at most (1 - headroom) of the GPU's memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .arch import Arch, checked_method, dtype_bytes, method_for, spec

GIB = 1 << 30


@dataclass
class Row:
    label: str
    gpu: float = 0.0  # bytes per GPU
    host: float = 0.0  # bytes of host memory per rank (offloaded state)


@dataclass
class Plan:
    rows: list[Row] = field(default_factory=list)
    world: int = 1
    notes: list[str] = field(default_factory=list)

    def add(self, label: str, nbytes: float, on_host: bool = False) -> None:
        self.rows.append(Row(label, 0.0 if on_host else nbytes, nbytes if on_host else 0.0))

    def get(self, label_start: str) -> float:
        return sum(r.gpu + r.host for r in self.rows if r.label.startswith(label_start))

    @property
    def gpu_total(self) -> float:
        return sum(r.gpu for r in self.rows)

    @property
    def host_total(self) -> float:
        return sum(r.host for r in self.rows)


def layer_saved_bytes_per_token(a: Arch, b: int, seq: int, padded: bool = True) -> float:
    """Bytes autograd keeps per token for one decoder block (Llama family, SDPA attention).

    Counted op by op (the GPart op, LoRA's A and trained full linears all keep their input):
      2 RMSNorms        fp32 copy of the input (4h) + 1/rms (4)         each
      attention         inputs of q/k/v (h); q after RoPE (heads x head_dim); k and v as SDPA
                        sees them, repeated to all heads when a padding mask is passed (else
                        kv heads); SDPA output, which o_proj's input shares (heads x head_dim);
                        log-sum-exp (4 x heads); the additive mask row (seq elements)
      SwiGLU MLP        input (h); gate and up outputs, silu(gate), their product (4 x i)
    """
    attn = a.heads * a.head_dim
    kv = attn if padded else a.kv_heads * a.head_dim
    norms = 2 * (4 * a.hidden + 4)
    attention = b * (a.hidden + 2 * attn + 2 * kv) + 4 * a.heads + (b * seq if padded else 0)
    mlp = b * (a.hidden + 4 * a.intermediate)
    return norms + attention + mlp


def head_saved_bytes_per_token(a: Arch, b: int) -> float:
    """Per position the LM head runs on: its input (bh: ZeRO-3 swaps F.linear for its own
    function, which keeps the input even of a frozen linear), the fp32 log-softmax of the
    logits (4V), the label (8)."""
    return b * a.hidden + 4 * a.vocab + 8


def final_norm_bytes_per_token(a: Arch) -> float:
    return 4 * a.hidden + 4  # fp32 copy of the input, 1/rms


def saved_activation_bytes(
    a: Arch,
    micro_batch: int,
    seq: int,
    b: int,
    grad_ckpt: bool,
    padded: bool = True,
    frozen_embeddings: bool = True,
    head_tokens: int | None = None,
    extra_bytes: int = 0,
) -> float:
    """Bytes saved for backward at the end of one micro-batch's forward (not the peak).

    `head_tokens`: positions the LM head and the loss run on; default every token (a loss
    evaluated at label positions only needs the number of labelled tokens).
    `extra_bytes`: what the method itself keeps beside the blocks' activations
    (methods.Cost.extra_saved_bytes, e.g. GPart's group ids with reuse_ids).
    """
    tokens = micro_batch * seq
    head = tokens if head_tokens is None else head_tokens
    if grad_ckpt:  # non-reentrant checkpointing keeps each block's input only
        body = a.layers * b * a.hidden
    else:
        body = a.layers * layer_saved_bytes_per_token(a, b, seq, padded)
        if frozen_embeddings:  # the first norm's input does not require grad: nothing kept
            body -= 4 * a.hidden + 4
    # RoPE's cos and sin, one pair shared by all blocks (inside checkpointed blocks otherwise)
    rope = 0 if grad_ckpt else 2 * seq * a.head_dim * b
    return (
        tokens * (body + final_norm_bytes_per_token(a)) + head * head_saved_bytes_per_token(a, b) + rope + extra_bytes
    )


@dataclass(frozen=True)
class PlanContext:
    """What a method's plan_rows needs beside the architecture and its own config."""

    world: int
    b: int  # bytes per element of the training dtype
    tokens: int  # tokens per micro-batch
    grad_ckpt: bool
    off_opt: bool  # optimizer state offloaded to the host
    shard: int  # elements of this rank's ZeRO-3 partition of the base
    biggest: int  # elements of the largest gather unit


def estimate(
    a: Arch,
    *,
    world: int,
    method=None,
    micro_batch: int = 1,
    seq_len: int = 2048,
    dtype_bytes: int = 2,
    grad_ckpt: bool = True,
    zero: dict | None = None,
    padded: bool = True,
    overhead_gb: float = 3.0,
    head_tokens: int | None = None,
    frozen_group: int | None = None,
) -> Plan:
    """The per-rank memory plan for `world` ZeRO-3 ranks (see the module docstring).

    `method`: a method config (config.MethodConfig, e.g. `spec("lora", r=8)`); its rows
    come from the method itself (methods/*: plan_rows). `zero`: DeepSpeed's
    zero_optimization section (thresholds, prefetch, offload); `head_tokens`: positions
    per micro-batch the LM head runs on (default: all tokens, the upper bound; a loss at
    label positions only needs the labelled ones). `frozen_group`: ranks the frozen weights
    are partitioned over (dist.frozen_partition=node: one node's; default, and for methods
    that train the base weights: the world).
    """
    m = method if method is not None else spec()
    cost = checked_method(m)
    z = zero or {}
    b, W = dtype_bytes, world
    persist = int(float(z.get("stage3_param_persistence_threshold", 1e5)))
    prefetch = int(float(z.get("stage3_prefetch_bucket_size", 5e7)))
    max_live = int(float(z.get("stage3_max_live_parameters", 1e9)))
    off_param = (z.get("offload_param") or {}).get("device", "none") == "cpu"
    off_opt = (z.get("offload_optimizer") or {}).get("device", "none") == "cpu"
    plan = Plan(world=W)
    tokens = micro_batch * seq_len

    weights = "trainable weights" if cost.trains_base else "frozen weights"
    G = W if cost.trains_base or not frozen_group else min(frozen_group, W)
    shard = sum(-(-n // G) for _, n in a.params)
    persisted = sum(n for _, n in a.params if n <= persist)
    where = "" if G == W else ", within a group"
    plan.add(f"{weights}, own ZeRO-3 partition (1/{G}{where})", shard * b, on_host=off_param)
    if persisted:
        plan.add(f"small parameters kept whole (<= {persist:,} elements)", persisted * b)
    units = a.units()
    biggest = max(units.values())
    gathered = min(biggest + min(prefetch, biggest), max(max_live, biggest))
    plan.add("gathered for compute: largest unit + one prefetch bucket", gathered * b)

    head = tokens if head_tokens is None else head_tokens
    head_saved = tokens * final_norm_bytes_per_token(a) + head * head_saved_bytes_per_token(a, b)
    if grad_ckpt:
        plan.add("activations: checkpointed block inputs", tokens * a.layers * b * a.hidden)
        plan.add(
            "activations: one block recomputed in backward", tokens * layer_saved_bytes_per_token(a, b, seq_len, padded)
        )
    else:
        every = saved_activation_bytes(a, micro_batch, seq_len, b, False, padded, not cost.trains_base, head)
        plan.add("activations: every block", every - head_saved)
    plan.add("activations: final norm, LM head input, fp32 log-softmax", head_saved)
    plan.add("transient: logits in the training dtype and fp32", head * (b + 4) * a.vocab)
    cost.plan_rows(plan, a, PlanContext(W, b, tokens, grad_ckpt, off_opt, shard, biggest))
    if overhead_gb:
        plan.add("CUDA context, NCCL buffers, allocator slack (allowance)", overhead_gb * GIB)
    if off_param:
        plan.notes.append("offload_param: the frozen partition lives in pinned host memory")
    return plan


@dataclass(frozen=True)
class Verdict:
    fits: bool
    usable: float  # bytes
    message: str


def check_fit(plan: Plan, gpu_mem_gb: float, headroom: float = 0.10) -> Verdict:
    usable = gpu_mem_gb * GIB * (1 - headroom)
    need = plan.gpu_total
    if need <= usable:
        return Verdict(
            True,
            usable,
            f"fits: {need / GIB:.1f} GiB of {usable / GIB:.1f} GiB usable "
            f"per GPU ({(usable - need) / GIB:.1f} GiB to spare)",
        )
    top = sorted(plan.rows, key=lambda r: -r.gpu)[:3]
    items = "; ".join(f"{r.label} {r.gpu / GIB:.1f}" for r in top)
    return Verdict(
        False,
        usable,
        f"does not fit: needs {need / GIB:.1f} GiB per GPU but only "
        f"{usable / GIB:.1f} GiB is usable ({gpu_mem_gb:g} GiB less "
        f"{headroom:.0%} headroom). Largest items (GiB): {items}",
    )


def min_nodes(fits_on, gpus_per_node: int, limit: int = 4096) -> int | None:
    """Fewest nodes for which `fits_on(world)` holds (None beyond `limit` nodes)."""
    for nodes in range(1, limit + 1):
        if fits_on(nodes * gpus_per_node):
            return nodes
    return None


def compare_methods(a: Arch, specs: dict, worlds=(8, 16, 64), **kw) -> dict:
    """{(name, world): Plan} for method configs {name: spec(...)}: per-GPU memory by cluster size."""
    return {(n, w): estimate(a, world=w, method=m, **kw) for n, m in specs.items() for w in worlds}


def plan_for_config(
    cfg, arch: Arch, world: int, method: str | None = None, overhead_gb: float = 3.0, frozen_group: int | None = None
) -> Plan:
    zero = dict((cfg.deepspeed or {}).get("zero_optimization", {}))
    return estimate(
        arch,
        world=world,
        method=method_for(cfg, method),
        micro_batch=cfg.train.micro_batch_size,
        seq_len=cfg.data.max_length,
        dtype_bytes=dtype_bytes(cfg.model.precision),
        grad_ckpt=cfg.model.gradient_checkpointing,
        zero=zero,
        padded=not cfg.data.packing,
        overhead_gb=overhead_gb,
        frozen_group=frozen_group,
    )
