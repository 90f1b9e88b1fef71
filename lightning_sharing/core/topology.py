"""The layout of a job: how many ranks, which node each is on, and the named process groups.

A ``Topology`` is plain data: the rule table is a pure function of it, and the manifest records it
so that loading can tell whether rank-specific state still fits.

Example:
    >>> topo = Topology.build(world_size=4, node_of_rank=[0, 0, 1, 1],
    ...                       group_members={"dp": [[0, 2], [1, 3]]})
    >>> topo.group_index("dp", 3), topo.node_index(2)
    (1, 1)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_sharing.errors import ComponentDeclarationError

__all__ = ["Topology"]

Instances = tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Topology:
    """World size, nodes (ranks per node) and named groups (ranks of each group instance).

    Nodes and group instances are ordered by their lowest global rank, which makes their indices
    the same on every rank and stable from one run to the next on the same layout.
    """

    world_size: int
    nodes: Instances
    groups: Mapping[str, Instances] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ComponentDeclarationError(f"world_size must be >= 1, got {self.world_size}")
        _check_partition("nodes", self.nodes, self.world_size)
        for name, instances in self.groups.items():
            _check_partition(f"process group {name!r}", instances, self.world_size)

    @classmethod
    def build(
        cls,
        world_size: int,
        node_of_rank: Sequence[Any] | None = None,
        group_members: Mapping[str, Sequence[Sequence[int]]] | None = None,
    ) -> Topology:
        """Build from per-rank node ids (any hashable: ints, host names) and group member lists.

        ``group_members[name]`` lists, for each rank or each instance, the ranks of a group
        instance; duplicates are merged, so passing every rank's own view works.
        """
        node_ids = list(node_of_rank) if node_of_rank is not None else [0] * world_size
        if len(node_ids) != world_size:
            raise ComponentDeclarationError(
                f"node_of_rank has {len(node_ids)} entries for world_size {world_size}"
            )
        by_node: dict[Any, list[int]] = {}
        for rank, node in enumerate(node_ids):
            by_node.setdefault(node, []).append(rank)
        nodes = tuple(sorted((tuple(r) for r in by_node.values()), key=lambda inst: inst[0]))
        groups: dict[str, Instances] = {}
        for name, member_lists in (group_members or {}).items():
            unique = {tuple(sorted(int(r) for r in members)) for members in member_lists}
            groups[name] = tuple(sorted(unique, key=lambda inst: inst[0] if inst else -1))
        return cls(world_size=world_size, nodes=nodes, groups=groups)

    @classmethod
    def single(cls) -> Topology:
        """The topology of a non-distributed run."""
        return cls(world_size=1, nodes=((0,),), groups={})

    def node_index(self, rank: int) -> int:
        """Index of the node holding ``rank``."""
        return _index_of(self.nodes, rank, "node")

    def group_index(self, name: str, rank: int) -> int:
        """Index of the instance of group ``name`` that holds ``rank``."""
        if name not in self.groups:
            known = ", ".join(sorted(self.groups)) or "none"
            raise ComponentDeclarationError(f"no process group named {name!r} (known: {known})")
        return _index_of(self.groups[name], rank, f"group {name!r}")

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict, as recorded in the manifest."""
        return {
            "world_size": self.world_size,
            "nodes": [list(n) for n in self.nodes],
            "groups": {name: [list(i) for i in inst] for name, inst in sorted(self.groups.items())},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Topology:
        """Inverse of ``to_json``; raises ``ComponentDeclarationError`` on malformed data."""
        try:
            return cls(
                world_size=int(data["world_size"]),
                nodes=tuple(tuple(int(r) for r in n) for n in data["nodes"]),
                groups={
                    str(name): tuple(tuple(int(r) for r in i) for i in inst)
                    for name, inst in dict(data.get("groups", {})).items()
                },
            )
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as exc:
            raise ComponentDeclarationError(f"malformed topology record: {exc}") from exc

    def describe(self, group: str | None = None) -> str:
        """A short human-readable summary used in error messages."""
        text = f"world_size={self.world_size}, nodes={[list(n) for n in self.nodes]}"
        if group is not None:
            text += f", group {group!r}={[list(i) for i in self.groups.get(group, ())]}"
        return text


def _check_partition(what: str, instances: Instances, world_size: int) -> None:
    seen: list[int] = []
    for inst in instances:
        if not inst:
            raise ComponentDeclarationError(f"{what} has an empty instance")
        seen.extend(inst)
    if sorted(seen) != list(range(world_size)):
        raise ComponentDeclarationError(
            f"{what} must place every rank in exactly one instance; got {[list(i) for i in instances]} "
            f"for world_size {world_size}. Each rank must pass the group it belongs to, and groups "
            "with the same name must not overlap"
        )


def _index_of(instances: Instances, rank: int, what: str) -> int:
    for index, inst in enumerate(instances):
        if rank in inst:
            return index
    raise ComponentDeclarationError(f"rank {rank} is in no {what} instance")
