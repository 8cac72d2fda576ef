"""Which ranks share a node, and the groups of ranks the frozen base is partitioned over.

`dist.frozen_partition` chooses where ZeRO-3 partitions the frozen base weights:

    global  one group: the world (plain ZeRO-3; every gather may cross the network)
    node    groups of `dist.frozen_partition_size` ranks (0: the ranks of one node); each
            group holds a whole copy of the base and gathers only inside itself

Groups are node-aligned: a group lies inside one node (its size divides the ranks per
node) or is a union of whole nodes (its size is a multiple of them). Ranks with the same
position in different groups hold the same shard: they are that shard's replicas.

Where a rank's node comes from (first match): GPART_NODE_ID (tests, odd launchers),
GROUP_RANK (torchrun's node index; it is what tells the simulated nodes on one host
apart), else the host name. Knows nothing of DeepSpeed or of any method.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from .config import FROZEN_PARTITIONS as MODES
from .errors import UserError


class TopologyError(UserError):
    """The ranks cannot be grouped as asked; the message names the key to change."""


@dataclass(frozen=True)
class Topology:
    """The ranks of each node (global ranks, ascending), nodes in order of their first rank."""

    nodes: tuple[tuple[int, ...], ...]

    @property
    def world(self) -> int:
        return sum(len(n) for n in self.nodes)

    def node_of(self, rank: int) -> int:
        for i, ranks in enumerate(self.nodes):
            if rank in ranks:
                return i
        raise KeyError(f"rank {rank} is on no node of {self.nodes}")

    @property
    def ranks_per_node(self) -> int | None:
        """Ranks on every node, or None when nodes differ."""
        sizes = {len(n) for n in self.nodes}
        return sizes.pop() if len(sizes) == 1 else None

    def to_json(self) -> list[list[int]]:
        return [list(n) for n in self.nodes]

    @classmethod
    def from_keys(cls, keys: list[str]) -> Topology:
        """keys[r]: the node key of global rank r (ranks with equal keys share a node)."""
        groups: dict[str, list[int]] = {}
        for r, k in enumerate(keys):
            groups.setdefault(k, []).append(r)
        return cls(tuple(tuple(g) for g in sorted(groups.values(), key=lambda g: g[0])))

    @classmethod
    def blocks(cls, world: int, per_node: int) -> Topology:
        """Contiguous blocks of `per_node` ranks (what the launchers do; for the planner)."""
        return cls(tuple(tuple(range(s, min(world, s + per_node))) for s in range(0, world, per_node)))


def node_key(env=None) -> str:
    env = os.environ if env is None else env
    for key in ("GPART_NODE_ID", "GROUP_RANK"):
        if env.get(key, "").strip():
            return f"{key}={env[key].strip()}"
    return socket.gethostname()


def discover() -> Topology:
    """Collective: every rank's node key, exchanged once (a few bytes per rank)."""
    from . import comm

    return Topology.from_keys(comm.gather_objects(node_key()))


def partition_groups(topo: Topology, mode: str, size: int = 0) -> list[list[int]]:
    """The groups of global ranks the frozen base is partitioned over (see the module doc)."""
    if mode not in MODES:
        raise TopologyError(f"dist.frozen_partition must be one of {MODES}, got {mode!r}")
    world = topo.world
    if mode == "global":
        return [list(range(world))]
    per_node = topo.ranks_per_node
    if per_node is None:
        raise TopologyError(
            f"dist.frozen_partition=node needs the same number of ranks on every node; "
            f"got {[len(n) for n in topo.nodes]} ranks on {len(topo.nodes)} nodes "
            "(use dist.frozen_partition=global)"
        )
    size = size or per_node
    if size < 1 or world % size:
        raise TopologyError(f"dist.frozen_partition_size={size} must divide the world size {world}")
    if size <= per_node:
        if per_node % size:
            raise TopologyError(
                f"dist.frozen_partition_size={size} must divide the {per_node} ranks per "
                "node (a group may not straddle two nodes partly)"
            )
        return [list(n[i : i + size]) for n in topo.nodes for i in range(0, per_node, size)]
    if size % per_node:
        raise TopologyError(
            f"dist.frozen_partition_size={size} must be a multiple of the {per_node} ranks "
            "per node when larger than one node"
        )
    k = size // per_node
    return [sorted(r for n in topo.nodes[i : i + k] for r in n) for i in range(0, len(topo.nodes), k)]


@dataclass(frozen=True)
class Placement:
    """Where this rank's frozen shard sits: its group, and which replica of that shard it is.

    `nodes`: the topology the groups were made from; `process_group`: this rank's torch
    group for the frozen base (None: the world).
    """

    groups: tuple[tuple[int, ...], ...]
    rank: int
    nodes: Topology | None = None
    process_group: object = field(default=None, compare=False, repr=False)

    @property
    def group(self) -> tuple[int, ...]:
        return next(g for g in self.groups if self.rank in g)

    @property
    def replicas(self) -> int:
        return len(self.groups)

    @property
    def replica(self) -> int:
        """Index of this rank's group: ranks at the same place in different groups hold
        the same shard, and replica i of them does the i-th part of shard-wide work."""
        return next(i for i, g in enumerate(self.groups) if self.rank in g)

    @property
    def is_world(self) -> bool:
        return len(self.groups) == 1
