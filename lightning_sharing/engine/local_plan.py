"""Who holds whose files in the local tier, and which step and sources a restore uses: pure functions of the
topology and of what every rank reported, identical on every rank (``engine/local_tier.py`` runs them).

Rank ``j`` of node ``n`` (``local`` = its place on the node) sends its files to rank ``j`` of nodes ``n+1 ..
n+replicas`` (mod the node count); a restore takes each rank's files from its own copy, else from those holders in
that order.

Example:
    >>> from lightning_sharing.core.topology import Topology
    >>> topology = Topology.build(4, node_of_rank=[0, 0, 1, 1])
    >>> lay = Layout(rank=2, nodes=topology.nodes, replicas=1)
    >>> lay.node, lay.local, lay.holders(0, 1), lay.origins()
    (1, 0, [3], [0])
    >>> choose(lay, [{(0, 5), (1, 5)}, {(0, 5), (1, 5)}, set(), set()], None, set())  # node 1 lost its disk
    (5, [0, 1, 0, 1])
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_sharing.core.local_tier import LocalTier
from lightning_sharing.core.topology import Topology
from lightning_sharing.errors import ComponentDeclarationError

__all__ = ["Layout", "choose", "layout", "node_of"]


@dataclass(frozen=True)
class Layout:
    """Where a rank stands in the tier: its node, its place on the node, and which ranks hold copies of whom."""

    rank: int
    nodes: tuple[tuple[int, ...], ...]
    replicas: int  # at most the number of other nodes

    @property
    def node(self) -> int:
        """This rank's node index."""
        return next(i for i, members in enumerate(self.nodes) if self.rank in members)

    @property
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
    return next(i for i, members in enumerate(lay.nodes) if rank in members)
