"""The rule table: who writes, who reads, and which file, for each sharing pattern.

This is the only place that knows what the patterns mean. It is a pure function of the
topology, so it is tested without any process group:

=========== ============================== ============================ ==========================
pattern     writes                          file stem                    reads
=========== ============================== ============================ ==========================
GLOBAL      global rank 0                   ``{key}``                    every rank
REPLICATED  one copy in total (rank 0)      ``{key}``                    every rank
PER_RANK    every rank                      ``{key}/rank-{r:05d}``       each rank its own
PER_GROUP   lowest rank of each instance    ``{key}/{group}-{i:05d}``    members of that instance
PER_NODE    local rank 0 of each node       ``{key}/node-{n:05d}``       every rank of that node
=========== ============================== ============================ ==========================

Example:
    >>> from lightning_sharing.core.topology import Topology
    >>> topo = Topology.build(4, group_members={"dp": [[0, 2], [1, 3]]})
    >>> [(p.stem, p.writer, p.readers) for p in placements("data", "per_group", topo, "dp")]
    [('data/dp-00000', 0, (0, 2)), ('data/dp-00001', 1, (1, 3))]
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_sharing.core.declarations import SharingPattern
from lightning_sharing.core.topology import Instances, Topology
from lightning_sharing.errors import ComponentDeclarationError

__all__ = ["Placement", "placement_for_reader", "placements", "rank_specific"]


@dataclass(frozen=True)
class Placement:
    """One copy of a component: the file stem, the rank that writes it, the ranks that read it.

    ``spread`` lists the ranks among which the copy's tensor shards are divided when every reader
    holds the same state (REPLICATED); empty means the ``writer`` writes the whole copy.
    """

    stem: str
    writer: int
    readers: tuple[int, ...]
    spread: tuple[int, ...] = ()

    @property
    def writers(self) -> tuple[int, ...]:
        """Every rank that writes part of this copy; ``writer`` (the lead) writes its index and structure."""
        return self.spread or (self.writer,)


def _instances(pattern: SharingPattern, topology: Topology, group: str | None) -> Instances:
    if pattern in (SharingPattern.GLOBAL, SharingPattern.REPLICATED):
        return (tuple(range(topology.world_size)),)
    if pattern is SharingPattern.PER_RANK:
        return tuple((r,) for r in range(topology.world_size))
    if pattern is SharingPattern.PER_NODE:
        return topology.nodes
    if group is None:
        raise ComponentDeclarationError("PER_GROUP needs a process_group_name")
    if group not in topology.groups:
        known = ", ".join(sorted(topology.groups)) or "none"
        raise ComponentDeclarationError(f"no process group named {group!r} (known: {known})")
    return topology.groups[group]


def _stem(key: str, pattern: SharingPattern, index: int, group: str | None) -> str:
    if pattern in (SharingPattern.GLOBAL, SharingPattern.REPLICATED):
        return key
    if pattern is SharingPattern.PER_RANK:
        return f"{key}/rank-{index:05d}"
    if pattern is SharingPattern.PER_NODE:
        return f"{key}/node-{index:05d}"
    return f"{key}/{group}-{index:05d}"


def placements(
    key: str,
    pattern: SharingPattern | str,
    topology: Topology,
    group: str | None = None,
) -> tuple[Placement, ...]:
    """Every copy of component ``key`` under ``topology``, in stem order."""
    pattern = SharingPattern.parse(pattern)
    instances = _instances(pattern, topology, group)
    # The writer is the lowest global rank of its instance: rank 0 for single-copy patterns,
    # local rank 0 for nodes (ranks are numbered node by node), the group leader for groups.
    # REPLICATED state is identical on every rank, so writing its one copy is shared among them.
    spread = pattern is SharingPattern.REPLICATED and topology.world_size > 1
    return tuple(
        Placement(stem=_stem(key, pattern, index, group), writer=min(inst), readers=tuple(sorted(inst)),
                  spread=tuple(sorted(inst)) if spread else ())
        for index, inst in enumerate(instances)
    )


def placement_for_reader(all_placements: tuple[Placement, ...], rank: int) -> Placement:
    """The copy that ``rank`` reads."""
    for placement in all_placements:
        if rank in placement.readers:
            return placement
    raise ComponentDeclarationError(f"rank {rank} reads no copy (placements: {all_placements})")


def rank_specific(pattern: SharingPattern | str) -> bool:
    """True when the saved copies depend on the topology (so a topology change matters)."""
    return SharingPattern.parse(pattern) in (
        SharingPattern.PER_RANK,
        SharingPattern.PER_GROUP,
        SharingPattern.PER_NODE,
    )
