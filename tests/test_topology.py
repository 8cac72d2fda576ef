"""Nodes, frozen-partition groups and replica parts (no process group needed)."""

import pytest

from gpart_ds.config import ConfigError, load_config
from gpart_ds.errors import UserError
from gpart_ds.export.zero3 import replica_part
from gpart_ds.topology import Placement, Topology, TopologyError, node_key, partition_groups


def test_nodes_from_keys_keep_rank_order_whatever_the_launcher_numbering():
    # a cyclic launcher: ranks 0, 2 on host a, 1, 3 on host b
    topo = Topology.from_keys(["a", "b", "a", "b"])
    assert topo.nodes == ((0, 2), (1, 3)) and topo.world == 4 and topo.ranks_per_node == 2
    assert topo.node_of(3) == 1
    assert partition_groups(topo, "node") == [[0, 2], [1, 3]]


@pytest.mark.parametrize(
    "size, groups",
    [
        (0, [[0, 1, 2, 3], [4, 5, 6, 7]]),  # one node's ranks
        (2, [[0, 1], [2, 3], [4, 5], [6, 7]]),  # half a node
        (8, [[0, 1, 2, 3, 4, 5, 6, 7]]),  # two whole nodes: the world here
    ],
)
def test_groups_are_node_aligned(size, groups):
    assert partition_groups(Topology.blocks(8, 4), "node", size) == groups


def test_global_is_one_group_and_bad_sizes_are_refused_with_the_key():
    assert issubclass(TopologyError, UserError)  # `error: ...`, exit 2 from every command
    topo = Topology.blocks(8, 4)
    assert partition_groups(topo, "global") == [list(range(8))]
    for size, why in ((3, "must divide"), (6, "must divide"), (12, "must divide")):
        with pytest.raises(TopologyError, match=f"dist.frozen_partition_size={size} {why}"):
            partition_groups(topo, "node", size)
    with pytest.raises(TopologyError, match="same number of ranks on every node"):
        partition_groups(Topology.from_keys(["a", "a", "b"]), "node")
    big = Topology.blocks(12, 4)
    with pytest.raises(TopologyError, match="multiple of the 4 ranks"):
        partition_groups(big, "node", 6)


def test_placement_replicas():
    p = Placement(((0, 1), (2, 3), (4, 5)), rank=4)
    assert p.group == (4, 5) and p.replica == 2 and p.replicas == 3 and not p.is_world
    assert Placement(((0, 1, 2),), rank=1).is_world


@pytest.mark.parametrize("n, count", [(0, 2), (1, 2), (7, 3), (10, 4), (5, 1)])
def test_replica_parts_tile_the_shard(n, count):
    parts = [replica_part(n, i, count) for i in range(count)]
    assert parts[0][0] == 0 and parts[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))


def test_node_key_prefers_explicit_then_torchrun_then_host():
    assert node_key({"GPART_NODE_ID": "7", "GROUP_RANK": "1"}) == "GPART_NODE_ID=7"
    assert node_key({"GROUP_RANK": "1"}) == "GROUP_RANK=1"
    assert node_key({})  # the host name


def test_config_keys_are_validated():
    cfg = load_config("configs/tiny.yaml", check_files=False)
    assert cfg.dist.frozen_partition == "node" and cfg.dist.frozen_partition_size == 0
    assert cfg.dist.count_comm is False
    with pytest.raises(ConfigError, match="dist.frozen_partition"):
        load_config("configs/tiny.yaml", ["dist.frozen_partition=rack"], check_files=False)
    with pytest.raises(ConfigError, match="dist.frozen_partition_size"):
        load_config("configs/tiny.yaml", ["dist.frozen_partition_size=-1"], check_files=False)
