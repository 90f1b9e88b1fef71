"""``LocalTier``: the settings validate themselves, with messages that say what to pass."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_sharing import CheckpointCoordinator, ComponentDeclarationError, LocalTier


def test_defaults_and_node_placeholder(tmp_path: Path) -> None:
    tier = LocalTier(tmp_path / "{node}" / "ckpt")
    assert (tier.replicas, tier.keep, tier.every_n_steps) == (1, 2, None)
    assert tier.directory_for(1) == str(tmp_path / "1" / "ckpt")
    assert LocalTier("/local/ckpt").directory_for(5) == "/local/ckpt"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"directory": ""}, "directory must be a non-empty path on node-local storage"),
    ({"directory": 3}, "directory must be a non-empty path"),
    ({"directory": "s3://bucket/run"}, "the local tier lives on node-local storage, not a URL"),
    ({"directory": "/local/{rank}"}, "the only placeholder a directory may hold is {node}"),
    ({"replicas": -1}, "LocalTier(replicas=-1): replicas must be an integer >= 0"),
    ({"replicas": True}, "replicas must be an integer >= 0"),
    ({"keep": 0}, "LocalTier(keep=0): keep must be a positive integer"),
    ({"every_n_steps": 0}, "LocalTier(every_n_steps=0): every_n_steps must be a positive integer"),
    ({"every_n_steps": 2.5}, "every_n_steps must be a positive integer"),
])
def test_bad_settings_are_refused_with_what_to_pass(kwargs: dict, message: str) -> None:
    settings = {"directory": "/local/ckpt/{node}", **kwargs}
    with pytest.raises(ComponentDeclarationError) as error:
        LocalTier(**settings)
    assert message in str(error.value)


def test_save_local_needs_a_tier_and_restore_without_one_finds_nothing(tmp_path: Path) -> None:
    from support.statefuls import Box

    from lightning_sharing import SharingPattern, StateComponent

    coordinator = CheckpointCoordinator([StateComponent("box", Box("a"), SharingPattern.GLOBAL)])
    with pytest.raises(ComponentDeclarationError, match=r"save_local needs a local tier"):
        coordinator.save_local(3)
    assert coordinator.restore(tmp_path / "none") is None
    with pytest.raises(ComponentDeclarationError, match=r"local_tier must be a LocalTier"):
        CheckpointCoordinator([], local_tier="/local")


def test_one_process_round_trip(tmp_path: Path) -> None:
    import torch
    from support.statefuls import Box

    from lightning_sharing import SharingPattern, StateComponent

    box, mine = Box("a", torch.arange(3.0)), Box("r", torch.ones(2))
    components = [StateComponent("box", box, SharingPattern.GLOBAL), StateComponent("mine", mine,
                                                                                     SharingPattern.PER_RANK)]
    coordinator = CheckpointCoordinator(components, local_tier=LocalTier(tmp_path / "local" / "{node}"))
    coordinator.save_checkpoint(tmp_path / "ckpts" / "step=1.ckpt", step=1)
    coordinator.save_local(2)
    box.values, mine.values = torch.zeros(3), torch.zeros(2)
    assert coordinator.restore(tmp_path / "ckpts") == 2
    assert torch.equal(box.values, torch.arange(3.0)) and torch.equal(mine.values, torch.ones(2))
    assert sorted(p.name for p in (tmp_path / "local" / "0" / "own" / "step_2").iterdir()) == [
        "COMPLETE.json", "rank-00000.safetensors", "rank-00000.safetensors.sum", "shared-00000.safetensors"]


def test_the_choice_of_step_and_sources_is_a_pure_function_of_what_ranks_hold() -> None:
    from lightning_sharing import Topology
    from lightning_sharing.engine.local_plan import Layout, choose

    nodes = Topology.build(4, node_of_rank=[0, 0, 1, 1]).nodes
    lay = Layout(rank=0, nodes=nodes, replicas=1)
    both = {(0, 5), (1, 5), (0, 4), (1, 4)}  # own copies and the other node's replicas, steps 4 and 5
    assert choose(lay, [both] * 4, None, set()) == (5, [0, 1, 2, 3])
    # Rank 1's own copy of step 5 refused: its replica on rank 3 (node 1, same local rank) is used.
    assert choose(lay, [both] * 4, None, {(1, 1, 5)}) == (5, [0, 3, 2, 3])
    # Its replica refused too: step 4; a persistent step 5 rules the local tier out (never older than it).
    assert choose(lay, [both] * 4, None, {(1, 1, 5), (3, 1, 5)}) == (4, [0, 1, 2, 3])
    assert choose(lay, [both] * 4, 5, {(1, 1, 5), (3, 1, 5)}) is None
    # No replicas: a node that lost its disk cannot be restored from the local tier.
    alone = Layout(rank=0, nodes=nodes, replicas=0)
    assert choose(alone, [{(0, 5)}, {(0, 5)}, set(), set()], None, set()) is None


def test_each_rank_needs_its_file_and_every_part_of_its_nodes_shared_copy() -> None:
    from lightning_sharing import Topology
    from lightning_sharing.engine.local_plan import Layout, needs

    nodes = Topology.build(6, node_of_rank=[0, 0, 0, 1, 1, 1]).nodes
    lay = Layout(rank=0, nodes=nodes, replicas=1)

    def of(sources: list[int], target: int) -> list[tuple[str, int, int]]:
        return [(n.name, n.origin, n.provider) for n in needs(lay, sources, target)]

    # Every own copy usable: each rank reads its file and its node-mates' parts itself, from its node's disk.
    assert of([0, 1, 2, 3, 4, 5], 1) == [("rank-00001.safetensors", 1, 1), ("shared-00000.safetensors", 0, 1),
                                         ("shared-00001.safetensors", 1, 1), ("shared-00002.safetensors", 2, 1)]
    # Rank 4's own copy refused (its replica is on rank 1): its node-mates take its part from rank 1 as well, and the
    # parts of ranks 3 and 5 from those ranks (their own copies), no longer each from the disk.
    sources = [0, 1, 2, 3, 1, 5]
    assert of(sources, 3) == [("rank-00003.safetensors", 3, 3), ("shared-00000.safetensors", 3, 3),
                              ("shared-00001.safetensors", 4, 1), ("shared-00002.safetensors", 5, 5)]
    assert of(sources, 4)[:2] == [("rank-00004.safetensors", 4, 1), ("shared-00000.safetensors", 3, 3)]
    # Node 0 is untouched by node 1's trouble.
    assert [n.provider for n in needs(lay, sources, 2)] == [2, 2, 2, 2]


def test_the_shared_copy_is_split_by_bytes_and_only_replicated_tensors_move() -> None:
    import torch

    from lightning_sharing import Topology
    from lightning_sharing.engine.local_plan import Layout, assign_parts
    from lightning_sharing.engine.local_state import Collected

    sizes = [(f"1/w{i}", size) for i, size in enumerate([40, 30, 20, 10, 10, 5, 5])]
    chosen = assign_parts(sizes, 3)
    loads = [sum(size for name, size in sizes if chosen[name] == part) for part in range(3)]
    assert sorted(loads) == [40, 40, 40], loads  # 120 bytes over 3 parts, every tensor placed once
    assert assign_parts(list(reversed(sizes)), 3) == chosen  # a function of the names and sizes, not their order

    shared = {"__trees__": torch.zeros(3, dtype=torch.uint8), "0/step": torch.ones(1),
              **{name: torch.zeros(size) for name, size in sizes}}
    collected = Collected({"own": torch.ones(2)}, shared, frozenset(name for name, _ in sizes))
    nodes = Topology.build(6, node_of_rank=[0, 0, 0, 1, 1, 1]).nodes
    parts = [collected.bundles(Layout(rank, nodes, 1), spread=True) for rank in (3, 4, 5)]
    names = [set(part[f"shared-0000{j}.safetensors"]) for j, part in enumerate(parts)]
    assert {"__trees__", "0/step"} <= names[0] and all(n.startswith("1/") for n in names[1] | names[2])
    assert set().union(*names) == set(shared) and sum(map(len, names)) == len(shared)  # disjoint, complete
    assert parts[1]["rank-00004.safetensors"] is collected.own
    whole = collected.bundles(Layout(3, nodes, 1), spread=False)["shared-00000.safetensors"]
    assert set(whole) == set(shared) and not collected.bundles(Layout(4, nodes, 1), spread=False)[
        "shared-00001.safetensors"]


def test_what_a_rank_sends_is_what_the_others_need_from_it() -> None:
    import itertools

    from lightning_sharing import Topology
    from lightning_sharing.engine.local_plan import Layout, needs, served_by

    nodes = Topology.build(8, node_of_rank=[0, 0, 1, 1, 2, 2, 3, 3]).nodes
    layouts = [Layout(rank, nodes, 2) for rank in range(8)]
    # Every way of sourcing ranks 2 and 3 (node 1) from themselves or their two holders, the rest their own copies.
    for source_2, source_3 in itertools.product([2, 4, 6], [3, 5, 7]):
        sources = [0, 1, source_2, source_3, 4, 5, 6, 7]
        for lay in layouts:  # the candidates served_by looks at miss no one (checked against every target)
            brute = {target: [n for n in needs(lay, sources, target) if n.provider == lay.rank]
                     for target in range(8) if target != lay.rank}
            assert served_by(lay, sources) == {t: files for t, files in brute.items() if files}, (sources, lay.rank)
