"""Who holds whose files in the local tier, which step and sources a restore uses, and how a node's copy of the
shared state is spread over its ranks: pure functions of the topology and of what every rank reported, identical on
every rank (``engine/local_tier.py`` runs them).

Rank ``j`` of node ``n`` (``local`` = its place on the node) writes its own state and part ``j`` of the node's copy of
the REPLICATED state (``assign_parts``), and sends those files to rank ``j`` of nodes ``n+1 .. n+replicas`` (mod the
node count); a restore takes each rank's files from its own copy, else from those holders in that order
(``choose``), and gives every rank its own file and every part of its node's copy (``needs``).

Example:
    >>> from lightning_sharing.core.topology import Topology
    >>> topology = Topology.build(4, node_of_rank=[0, 0, 1, 1])
    >>> lay = Layout(rank=2, nodes=topology.nodes, replicas=1)
    >>> lay.node, lay.local, lay.holders(0, 1), lay.origins()
    (1, 0, [3], [0])
    >>> choose(lay, [{(0, 5), (1, 5)}, {(0, 5), (1, 5)}, set(), set()], None, set())  # node 1 lost its disk
    (5, [0, 1, 0, 1])
    >>> [(n.name, n.origin, n.provider) for n in needs(lay, [0, 1, 0, 1], 2)]  # rank 2's files come from node 0
    [('rank-00002.safetensors', 2, 0), ('shared-00000.safetensors', 2, 0), ('shared-00001.safetensors', 3, 1)]
    >>> assign_parts([("0/a", 8), ("0/b", 4), ("1/c", 4)], 2)
    {'0/a': 0, '0/b': 1, '1/c': 1}
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from lightning_sharing.core.local_tier import LocalTier
from lightning_sharing.core.topology import Topology
from lightning_sharing.engine.local_files import rank_file, shared_file
from lightning_sharing.errors import ComponentDeclarationError

__all__ = ["Layout", "Need", "assign_parts", "choose", "copy_holder", "layout", "needs", "node_of", "served_by"]


@dataclass(frozen=True)
class Layout:
    """Where a rank stands in the tier: its node, its place on the node, and which ranks hold copies of whom."""

    rank: int
    nodes: tuple[tuple[int, ...], ...]
    replicas: int  # at most the number of other nodes

    @cached_property
    def node_by_rank(self) -> dict[int, int]:
        """Every global rank's node index."""
        return {rank: node for node, members in enumerate(self.nodes) for rank in members}

    @cached_property
    def node(self) -> int:
        """This rank's node index."""
        return self.node_by_rank[self.rank]

    @cached_property
    def local(self) -> int:
        """This rank's place on its node (its local rank)."""
        return self.nodes[self.node].index(self.rank)

    @property
    def lead(self) -> int:
        """The first rank of this rank's node (writes the node's shared files and commits its steps)."""
        return self.nodes[self.node][0]

    def holders(self, node: int, local: int) -> list[int]:
        """The ranks holding replicas of rank (``node``, ``local``)'s files, nearest node first."""
        return [self.nodes[(node + k) % len(self.nodes)][local] for k in range(1, self.replicas + 1)]

    def origins(self) -> list[int]:
        """The nodes whose files this rank holds replicas of (same order as ``holders``)."""
        return [(self.node - k) % len(self.nodes) for k in range(1, self.replicas + 1)]


def layout(tier: LocalTier, topology: Topology, rank: int) -> Layout:
    """``rank``'s layout; refuses nodes of different sizes (ranks are paired by local rank)."""
    sizes = sorted({len(members) for members in topology.nodes})
    if len(sizes) != 1:
        raise ComponentDeclarationError(
            f"the local tier pairs the ranks of different nodes by local rank, so every node must run the same "
            f"number of ranks; this job has nodes of {sizes} ranks ({topology.describe()})")
    return Layout(rank, topology.nodes, min(tier.replicas, len(topology.nodes) - 1))


def choose(lay: Layout, held: list[set[tuple[int, int]]], floor: int | None,
            refused: set[tuple[int, int, int]]) -> tuple[int, list[int]] | None:
    """The newest step (not older than ``floor``) every rank can get, and where each rank gets it (a pure function
    of data every rank holds alike, so every rank makes the same choice)."""
    for step in sorted({step for per_rank in held for _, step in per_rank}, reverse=True):
        if floor is not None and step < floor:
            return None
        sources = sources_for(lay, held, step, refused)
        if sources is not None:
            return step, sources
    return None


def sources_for(lay: Layout, held: list[set[tuple[int, int]]], step: int,
             refused: set[tuple[int, int, int]]) -> list[int] | None:
    """For every rank, the rank it gets ``step`` from (itself first, then its holders), or None if one cannot."""
    sources = [-1] * len(held)  # by global rank
    for node, members in enumerate(lay.nodes):
        for local, target in enumerate(members):
            found = next((h for h in [target, *lay.holders(node, local)]
                          if (node, step) in held[h] and (h, target, step) not in refused), None)
            if found is None:
                return None
            sources[target] = found
    return sources


def node_of(lay: Layout, rank: int) -> int:
    """The node index of global rank ``rank``."""
    return lay.node_by_rank[rank]


@dataclass(frozen=True)
class Need:
    """A file a rank needs to restore a step: its name, the rank that wrote it, and the rank that reads it (the rank
    needing it reads it itself when ``provider`` is that rank; otherwise ``provider`` reads it and sends it)."""

    name: str
    origin: int
    provider: int


def needs(lay: Layout, sources: Sequence[int], target: int) -> list[Need]:
    """The files ``target`` needs to restore a step whose sources ``choose`` gave: its own file, and every part of
    its node's copy of the shared state. While every rank of the node reads its own copy, the node's ranks read each
    other's parts from the node's disk; otherwise each part comes from whoever serves the rank that wrote it."""
    node = node_of(lay, target)
    members = lay.nodes[node]
    own = all(sources[member] == member for member in members)
    files = [Need(rank_file(target), target, sources[target])]
    files += [Need(shared_file(local), member, target if own else sources[member])
              for local, member in enumerate(members)]
    return files


def served_by(lay: Layout, sources: Sequence[int]) -> dict[int, list[Need]]:
    """What this rank reads for other ranks and sends them, by target rank. Only its node-mates and the ranks of the
    nodes it holds replicas of can need anything from it, so only those are looked at."""
    candidates = [*lay.nodes[lay.node], *(rank for origin in lay.origins() for rank in lay.nodes[origin])]
    served = {target: [n for n in needs(lay, sources, target) if n.provider == lay.rank]
              for target in dict.fromkeys(candidates) if target != lay.rank}
    return {target: files for target, files in served.items() if files}


def copy_holder(lay: Layout, provider: int, origin: int) -> int:
    """The rank whose copy of ``origin``'s files ``provider`` reads: ``origin``'s own (a rank of its node reads
    them from the node's disk), else ``provider``'s replica. A refusal of that copy names this rank."""
    return origin if node_of(lay, provider) == node_of(lay, origin) else provider


def assign_parts(sizes: Sequence[tuple[str, int]], parts: int) -> dict[str, int]:
    """Which of ``parts`` files each tensor (name, bytes) of a node's copy of the REPLICATED state goes to: largest
    first, each to the part with the fewest bytes so far (ties: the lower part), so that each rank of a node stages,
    writes and sends about ``1/parts`` of the copy. Depends only on the names and sizes, so the ranks agree."""
    loads = [(0, part) for part in range(parts)]
    chosen: dict[str, int] = {}
    for name, size in sorted(sizes, key=lambda item: (-item[1], item[0])):
        load, part = heapq.heappop(loads)
        chosen[name] = part
        heapq.heappush(loads, (load + size, part))
    return chosen
