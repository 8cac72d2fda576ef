"""The cluster model: a cluster's per-GPU figures (presets), how the ranks of a planned run
sit on nodes, the groups the frozen base is partitioned over (by training's own rule,
topology.partition_groups), and the bytes one rank moves inside and across nodes in a
collective (`collective_bytes`: the planner's model, and the one commcount reads its
measurements with).

Traffic model (per rank, collective payload S over a group of n ranks, L of them on each
of N nodes): a gather or reduce-scatter moves S (L-1)/L over the node's links and
S (N-1)/(N L) over the network (hierarchical, or NCCL's rings, which cross each node
boundary once per channel and spread channels over the node's NICs); an all-reduce twice
that. Time of a collective: the slower of its two parts at the links' achievable
bandwidth, plus a fixed latency per call.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Cluster:
    """Per-GPU figures of a cluster (GB = 1e9 bytes)."""

    name: str
    peak_tflops: float  # dense bf16 tensor-core peak
    hbm_gbps: float  # HBM bandwidth
    nvlink_gbps: float  # intra-node link bandwidth, one direction
    net_gbps: float  # network bandwidth per GPU (NIC per GPU), one direction
    gpu_mem_gb: float  # GiB, as --gpu-mem-gb
    # Achieved fractions and rates; the defaults are measured on one H200 (docs/
    # layer_llama70b_h200.json: a 28672 x 8192 bf16 layer at 4096 tokens runs its
    # frozen fwd+bwd GEMMs at 795 TFLOPS = 0.80 of peak; the fused GPart kernels build
    # W0 + delta at 1.2-1.36e11 elements/s and run the backward pass (rebuild + scatter
    # of dW into theta's gradient) at 5.5e10). H100 SXM and H200 share the GH100 die,
    # clocks and SM count, so the kernel rates carry over.
    gemm_efficiency: float = 0.80
    link_efficiency: float = 0.80  # NCCL bus bandwidth / nominal link bandwidth
    delta_build_per_s: float = 1.3e11
    delta_backward_per_s: float = 5.5e10
    latency_s: float = 20e-6  # per collective call

    def with_(self, **kw) -> Cluster:
        return Cluster(**{**asdict(self), **{k: v for k, v in kw.items() if v is not None}})


PRESETS = {
    # NVIDIA H100 SXM5 80 GB: 989 TFLOPS dense bf16, 3.35 TB/s HBM3, NVLink 4 at 900 GB/s
    # (450 each way); a DGX/HGX H100 node has one 400 Gb/s NIC per GPU (50 GB/s).
    "h100": Cluster("H100 SXM 80GB nodes", 989.0, 3350.0, 450.0, 50.0, 80.0),
    # NVIDIA H200 SXM 141 GB (140 GiB as the driver reports it): same compute and NVLink,
    # 4.8 TB/s HBM3e.
    "h200": Cluster("H200 SXM 141GB nodes", 989.0, 4800.0, 450.0, 50.0, 140.0),
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
    if len(set(per_node)) != 1:  # uneven groups: count everything as crossing nodes
        return 0.0, factor * size * (n - 1) / n
    L = per_node[0]
    if kind == "all_to_all":
        return size * (L - 1) / n, size * (n - L) / n
    return factor * size * (L - 1) / L, factor * size * (nodes - 1) / (nodes * L)


@dataclass(frozen=True)
class RankLayout:
    """How the ranks of a planned run sit: nodes x GPUs per node, and the size of the
    groups the frozen base is partitioned over in node mode (consecutive ranks)."""

    nodes: int
    gpus_per_node: int
    frozen_group: int

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def span(self, group: int) -> list[int]:
        """Ranks per node of a group of `group` consecutive ranks (node-aligned)."""
        if group <= self.gpus_per_node:
            return [group]
        return [self.gpus_per_node] * (group // self.gpus_per_node)


def frozen_group(dist_cfg, gpus_per_node: int, world: int) -> int:
    """Ranks the frozen base is partitioned over in `node` mode (dist.frozen_partition_size),
    grouped by the rule training applies (topology.partition_groups on `world` ranks in
    blocks of `gpus_per_node`): a size training refuses is refused here, in its words."""
    from ..topology import Topology, partition_groups

    size = int(dist_cfg.get("frozen_partition_size", 0) or 0)
    return len(partition_groups(Topology.blocks(world, gpus_per_node), "node", size)[0])
