"""Declarations, the rule table and the topology, single process (no process group needed)."""

from __future__ import annotations

import json

import pytest
import torch
from support.statefuls import ValueState

from lightning_sharing import (
    CheckpointCoordinator,
    CheckpointError,
    ComponentDeclarationError,
    SharingPattern,
    StateComponent,
    Topology,
    ValidationLevel,
)
from lightning_sharing.core.rules import RULES, ChunkFiles, Placement, placement_for_reader, placements, rank_specific

# --------------------------------------------------------------------------- StateComponent


def test_per_group_without_group_name_is_refused():
    with pytest.raises(ComponentDeclarationError, match=r"'data' is PER_GROUP but has no process_group_name"):
        StateComponent("data", ValueState(), SharingPattern.PER_GROUP)


@pytest.mark.parametrize("group", ["a/b", "..", "", "x y"])
def test_per_group_with_unsafe_group_name_is_refused(group):
    # "" is the same as "no group" (falsy); the others are not path-safe.
    with pytest.raises(ComponentDeclarationError, match="process_group_name"):
        StateComponent("data", ValueState(), SharingPattern.PER_GROUP, process_group_name=group)


@pytest.mark.parametrize("pattern", ["global", "per_rank", "replicated", "per_node"])
def test_group_name_on_a_non_group_pattern_is_refused(pattern):
    with pytest.raises(ComponentDeclarationError, match=r"only applies to PER_GROUP"):
        StateComponent("x", ValueState(), pattern, process_group_name="dp")


@pytest.mark.parametrize("pattern", ["global", "per_rank", "per_node"])
def test_validate_replication_needs_replicated(pattern):
    with pytest.raises(ComponentDeclarationError, match=r"validate_replication=True needs sharing_pattern REPLICATED"):
        StateComponent("x", ValueState(), pattern, validate_replication=True)
    with pytest.raises(ComponentDeclarationError, match=r"got PER_GROUP"):
        StateComponent("x", ValueState(), "per_group", process_group_name="dp", validate_replication=True)


def test_validate_replication_on_replicated_is_accepted():
    component = StateComponent("x", ValueState(), "replicated", validate_replication=True, validation_level="TENSOR")
    assert component.effective_validation is ValidationLevel.TENSOR
    # Without validate_replication the level is recorded but not applied.
    assert StateComponent("y", ValueState(), "replicated", validation_level="full").effective_validation \
        is ValidationLevel.NONE


@pytest.mark.parametrize(
    "key",
    ["", "a/b", "../x", "a b", "-leading-dash", ".", "x.y", "k" * 129, "é", 5, None, "checkpoint_manifest"],
)
def test_bad_keys_are_refused(key):
    with pytest.raises(ComponentDeclarationError, match=r"StateComponent key .* (invalid|reserved)"):
        StateComponent(key, ValueState(), "global")


@pytest.mark.parametrize("key", ["a", "model", "rng_0", "_x", "9", "a-b", "k" * 128])
def test_good_keys_are_accepted(key):
    assert StateComponent(key, ValueState(), "global").key == key


class OnlyStateDict:
    def state_dict(self):
        return {}


class NotCallable:
    state_dict = {}
    load_state_dict = None


@pytest.mark.parametrize("stateful", [object(), {"a": 1}, OnlyStateDict(), NotCallable(), None])
def test_non_stateful_object_is_refused(stateful):
    with pytest.raises(ComponentDeclarationError, match=r"has no state_dict\(\)/load_state_dict\(\)") as info:
        StateComponent("thing", stateful, "global")
    assert type(stateful).__name__ in str(info.value)
    assert "'thing'" in str(info.value)


def test_metadata_must_be_a_dict():
    with pytest.raises(ComponentDeclarationError, match="metadata must be a dict"):
        StateComponent("x", ValueState(), "global", metadata=[1, 2])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("per_rank", SharingPattern.PER_RANK),
        ("PER_RANK", SharingPattern.PER_RANK),
        ("Per_Rank", SharingPattern.PER_RANK),
        ("global", SharingPattern.GLOBAL),
        ("REPLICATED", SharingPattern.REPLICATED),
        ("per_node", SharingPattern.PER_NODE),
        (SharingPattern.PER_NODE, SharingPattern.PER_NODE),
    ],
)
def test_pattern_strings_are_accepted(text, expected):
    component = StateComponent("x", ValueState(), text)
    assert component.sharing_pattern is expected
    assert SharingPattern.parse(text) is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("QUICK", ValidationLevel.QUICK), ("quick", ValidationLevel.QUICK), ("none", ValidationLevel.NONE),
     ("TENSOR", ValidationLevel.TENSOR), ("Full", ValidationLevel.FULL)],
)
def test_validation_level_strings_are_accepted(text, expected):
    component = StateComponent("x", ValueState(), "replicated", validate_replication=True, validation_level=text)
    assert component.validation_level is expected
    assert component.effective_validation is expected


def test_unknown_pattern_and_level_strings_list_the_choices():
    with pytest.raises(ComponentDeclarationError, match=r"sharing_pattern='per_host' is not one of GLOBAL, PER_RANK"):
        StateComponent("x", ValueState(), "per_host")
    with pytest.raises(ComponentDeclarationError, match=r"validation_level='deep' is not one of NONE, QUICK"):
        StateComponent("x", ValueState(), "replicated", validation_level="deep")
    with pytest.raises(ComponentDeclarationError, match=r"sharing_pattern=3"):
        StateComponent("x", ValueState(), 3)


def test_declaration_errors_are_checkpoint_errors_and_value_errors():
    with pytest.raises(CheckpointError):
        StateComponent("a/b", ValueState(), "global")
    with pytest.raises(ValueError):
        StateComponent("a/b", ValueState(), "global")


# --------------------------------------------------------------------------- CheckpointCoordinator construction


def test_duplicate_keys_are_refused_by_the_coordinator():
    with pytest.raises(ComponentDeclarationError, match=r"duplicate StateComponent key 'model'"):
        CheckpointCoordinator([
            StateComponent("model", torch.nn.Linear(2, 2), "replicated"),
            StateComponent("other", ValueState(), "global"),
            StateComponent("model", ValueState(), "per_rank"),
        ])


def test_non_component_items_are_refused_by_the_coordinator():
    with pytest.raises(ComponentDeclarationError, match=r"expected StateComponent, got Linear"):
        CheckpointCoordinator([torch.nn.Linear(2, 2)])


def test_per_group_component_with_an_unknown_group_is_refused_at_construction():
    component = StateComponent("loader", ValueState(), "per_group", process_group_name="dp")
    with pytest.raises(ComponentDeclarationError, match=r"process group 'dp', which no one provided") as info:
        CheckpointCoordinator([component], process_groups={"tp": object()})
    assert "'loader'" in str(info.value)
    assert "tp" in str(info.value)
    with pytest.raises(ComponentDeclarationError, match=r"process group 'dp'.*none were passed"):
        CheckpointCoordinator([component])
    # The same declaration is fine when the group is provided.
    CheckpointCoordinator([component], process_groups={"dp": object()})


def test_coordinator_option_validation():
    component = StateComponent("x", ValueState(), "global")
    with pytest.raises(ComponentDeclarationError, match=r"max_shard_size must be a positive integer"):
        CheckpointCoordinator([component], max_shard_size=0)
    with pytest.raises(ComponentDeclarationError, match=r"verify='md5' must be one of"):
        CheckpointCoordinator([component], verify="md5")
    with pytest.raises(ComponentDeclarationError, match=r"process_groups must be None, a dict"):
        CheckpointCoordinator([component], process_groups=["dp"])


# --------------------------------------------------------------------------- the rule table

# World 4 laid out as 2 (dp) x 2 (pp), two ranks per node.
GROUPS = {"dp": [[0, 2], [1, 3]], "pp": [[0, 1], [2, 3]]}
NODES = [0, 0, 1, 1]


@pytest.fixture
def topo() -> Topology:
    return Topology.build(4, node_of_rank=NODES, group_members=GROUPS)


def _table(result):
    return [(p.stem, p.writer, p.readers) for p in result]


def test_topology_build(topo):
    assert topo.world_size == 4
    assert topo.nodes == ((0, 1), (2, 3))
    assert dict(topo.groups) == {"dp": ((0, 2), (1, 3)), "pp": ((0, 1), (2, 3))}
    assert [topo.node_index(r) for r in range(4)] == [0, 0, 1, 1]
    assert [topo.group_index("dp", r) for r in range(4)] == [0, 1, 0, 1]
    assert [topo.group_index("pp", r) for r in range(4)] == [0, 0, 1, 1]


def test_rules_global(topo):
    assert _table(placements("trainer", "global", topo)) == [("trainer", 0, (0, 1, 2, 3))]


def test_rules_replicated(topo):
    assert _table(placements("model", SharingPattern.REPLICATED, topo)) == [("model", 0, (0, 1, 2, 3))]


def test_rules_per_rank(topo):
    assert _table(placements("rng", "per_rank", topo)) == [
        ("rng/rank-00000", 0, (0,)),
        ("rng/rank-00001", 1, (1,)),
        ("rng/rank-00002", 2, (2,)),
        ("rng/rank-00003", 3, (3,)),
    ]


def test_rules_per_group_dp(topo):
    assert _table(placements("data", "per_group", topo, "dp")) == [
        ("data/dp-00000", 0, (0, 2)),
        ("data/dp-00001", 1, (1, 3)),
    ]


def test_rules_per_group_pp(topo):
    assert _table(placements("stage", "per_group", topo, "pp")) == [
        ("stage/pp-00000", 0, (0, 1)),
        ("stage/pp-00001", 2, (2, 3)),
    ]


def test_rules_per_node_writers_are_lowest_rank_of_each_node(topo):
    assert _table(placements("cache", "per_node", topo)) == [
        ("cache/node-00000", 0, (0, 1)),
        ("cache/node-00001", 2, (2, 3)),
    ]


def test_rules_per_node_interleaved_host_names():
    # Ranks are not numbered node by node here; the writer is still the lowest rank of each node,
    # and nodes are ordered by their lowest rank (not by host name).
    topo = Topology.build(4, node_of_rank=["host-b", "host-a", "host-b", "host-a"])
    assert topo.nodes == ((0, 2), (1, 3))
    assert _table(placements("cache", "per_node", topo)) == [
        ("cache/node-00000", 0, (0, 2)),
        ("cache/node-00001", 1, (1, 3)),
    ]


def test_rules_single_process():
    topo = Topology.single()
    assert _table(placements("m", "replicated", topo)) == [("m", 0, (0,))]
    assert _table(placements("r", "per_rank", topo)) == [("r/rank-00000", 0, (0,))]
    assert _table(placements("n", "per_node", topo)) == [("n/node-00000", 0, (0,))]


def test_rules_every_rank_reads_exactly_one_copy(topo):
    cases = [("global", None), ("replicated", None), ("per_rank", None), ("per_group", "dp"),
             ("per_group", "pp"), ("per_node", None)]
    for pattern, group in cases:
        plan = placements("k", pattern, topo, group)
        for rank in range(4):
            readers = [p for p in plan if rank in p.readers]
            assert len(readers) == 1, (pattern, group, rank)
            assert placement_for_reader(plan, rank) == readers[0]
        # every writer reads what it writes
        assert all(p.writer in p.readers for p in plan)
    assert placement_for_reader(placements("d", "per_group", topo, "dp"), 3) == Placement("d/dp-00001", 1, (1, 3))
    with pytest.raises(ComponentDeclarationError, match=r"rank 7 reads no copy"):
        placement_for_reader(placements("d", "per_group", topo, "dp"), 7)


def test_rules_per_group_unknown_or_missing_group(topo):
    with pytest.raises(ComponentDeclarationError, match=r"no process group named 'tp' \(known: dp, pp\)"):
        placements("data", "per_group", topo, "tp")
    with pytest.raises(ComponentDeclarationError, match=r"PER_GROUP needs a process_group_name"):
        placements("data", "per_group", topo)


def test_rank_specific():
    assert [rank_specific(p) for p in SharingPattern] == [
        p in (SharingPattern.PER_RANK, SharingPattern.PER_GROUP, SharingPattern.PER_NODE) for p in SharingPattern
    ]
    assert rank_specific("per_rank") and not rank_specific("GLOBAL")


# --------------------------------------------------------------------------- topology validation


def test_topology_refuses_overlapping_group_instances():
    with pytest.raises(ComponentDeclarationError, match=r"process group 'dp' must place every rank in exactly one"):
        Topology.build(4, group_members={"dp": [[0, 1], [1, 2, 3]]})


def test_topology_refuses_a_missing_rank():
    with pytest.raises(ComponentDeclarationError, match=r"process group 'pp' must place every rank") as info:
        Topology.build(4, group_members={"pp": [[0, 1], [2]]})
    assert "world_size 4" in str(info.value)


def test_topology_refuses_an_out_of_range_rank():
    with pytest.raises(ComponentDeclarationError, match=r"must place every rank"):
        Topology.build(2, group_members={"dp": [[0], [5]]})


def test_topology_refuses_bad_nodes_and_world_size():
    with pytest.raises(ComponentDeclarationError, match=r"node_of_rank has 3 entries for world_size 4"):
        Topology.build(4, node_of_rank=[0, 0, 1])
    with pytest.raises(ComponentDeclarationError, match=r"world_size must be >= 1"):
        Topology.build(0)
    with pytest.raises(ComponentDeclarationError, match=r"nodes must place every rank"):
        Topology(world_size=2, nodes=((0,), (0, 1)))
    with pytest.raises(ComponentDeclarationError, match=r"nodes has an empty instance"):
        Topology(world_size=1, nodes=((0,), ()))


def test_topology_merges_every_ranks_own_view():
    # What gather_topology passes: each rank's view of its own instance, in rank order.
    topo = Topology.build(4, group_members={"dp": [[0, 2], [1, 3], [2, 0], [3, 1]]})
    assert topo.groups["dp"] == ((0, 2), (1, 3))


def test_topology_group_index_unknown_group(topo):
    with pytest.raises(ComponentDeclarationError, match=r"no process group named 'tp'"):
        topo.group_index("tp", 0)


def test_topology_json_round_trip(topo):
    data = topo.to_json()
    assert data == {
        "world_size": 4,
        "nodes": [[0, 1], [2, 3]],
        "groups": {"dp": [[0, 2], [1, 3]], "pp": [[0, 1], [2, 3]]},
    }
    again = Topology.from_json(json.loads(json.dumps(data)))
    assert again == topo
    assert again.nodes == topo.nodes and dict(again.groups) == dict(topo.groups)
    assert _table(placements("d", "per_group", again, "dp")) == _table(placements("d", "per_group", topo, "dp"))
    assert Topology.from_json(Topology.single().to_json()) == Topology.single()


@pytest.mark.parametrize(
    "data",
    [
        {"nodes": [[0]]},
        {"world_size": 1},
        {"world_size": "x", "nodes": [[0]]},
        {"world_size": 2, "nodes": [[0]]},
        {"world_size": 2, "nodes": [[0, 1]], "groups": {"dp": [[0]]}},
    ],
)
def test_topology_from_json_refuses_malformed_records(data):
    with pytest.raises(ComponentDeclarationError):
        Topology.from_json(data)


# --------------------------------------------------------------------------- SHARDED: one row of the table


def test_rules_sharded_one_copy_written_by_every_rank(topo):
    (copy,) = placements("model", "sharded", topo)
    assert (copy.stem, copy.writer, copy.readers, copy.writers) == ("model", 0, (0, 1, 2, 3), (0, 1, 2, 3))
    rule = RULES[SharingPattern.SHARDED]
    assert isinstance(rule.files, ChunkFiles) and not rule.rank_specific and not rule.group_bound and rule.validated
    assert (rule.files.file_for("model", 3), rule.files.index_for("model")) == (
        "model/chunks-00003.safetensors", "model/index.json")
    assert _table(placements("m", "sharded", Topology.single())) == [("m", 0, (0,))]


def test_rules_sharded_over_a_group_one_structure_per_instance(topo):
    # The group's members hold the same tensors (a pipeline stage's replicas); instances hold different ones.
    assert _table(placements("model", "sharded", topo, "dp")) == [("model/dp-00000", 0, (0, 2)),
                                                                   ("model/dp-00001", 1, (1, 3))]
    assert [p.writers for p in placements("model", "sharded", topo, "dp")] == [(0, 2), (1, 3)]


def test_sharded_files_are_accepted_and_nothing_else():
    from lightning_sharing.engine.load_plan import _allowed_file_re

    allowed = _allowed_file_re("model")
    for rel in ("model/chunks-00012.safetensors", "model/index.json", "model.json", "model/dp-00001.json",
                "model.safetensors.index.json"):
        assert allowed.fullmatch(rel), rel
    for rel in ("model/chunks-12.safetensors", "model/index.pt", "model/chunks-00001.pt", "other/index.json"):
        assert not allowed.fullmatch(rel), rel


def test_sharded_group_is_optional_and_validation_allowed():
    assert StateComponent("m", ValueState(), "sharded").process_group_name is None
    assert StateComponent("m", ValueState(), "sharded", process_group_name="dp").process_group_name == "dp"
    with pytest.raises(ComponentDeclarationError, match="process_group_name 'a/b' must be 1-128 letters"):
        StateComponent("m", ValueState(), "sharded", process_group_name="a/b")
    component = StateComponent("m", ValueState(), "sharded", validate_replication=True, validation_level="tensor")
    assert component.effective_validation is ValidationLevel.TENSOR
    with pytest.raises(ComponentDeclarationError, match=r"only applies to PER_GROUP or SHARDED, not GLOBAL"):
        StateComponent("m", ValueState(), "global", process_group_name="dp")
