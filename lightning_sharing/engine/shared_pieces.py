"""Read-once for SHARDED state: a piece of a chunk file that several ranks load is read by one of them.

SHARDED state is read by byte ranges (``sharded/load.py``), each rank reading the pieces of the saved chunks that
overlap what it holds now. Several ranks hold the same piece whenever the live layout replicates part of the state:
the data-parallel replicas of a tensor-parallel shard (DP x TP, HSDP), a DTensor on a sub-mesh that the other mesh
dims hold again, plain tensors in a SHARDED component (a scalar ``step``, a model loaded whole on every rank). Without
read-once each of them fetches those bytes from storage; with it (``read_once``, as for whole files in
``engine/read_once.py``) one of them reads each such piece, verified block by block, and sends it to the others.

Which ranks hold a piece depends on every rank's live layout, which no rank knows alone, so the routes are decided on
rank 0 from what each rank reports (O(N) coordination: each rank sends its own list and receives its own routes):

1. ``find_pieces``: this rank's pieces, each named by a key that only the saved bytes decide (component, tensor,
   chunk, box inside the chunk), with its size (computed once per load). The largest ``report()``'s size travels in
   the load's ballot.
2. ``route_pieces`` (collective): the reports go to rank 0 (``settle_on_rank_zero``), which picks one reader per
   piece held by several ranks (``plan_routes``: largest pieces first, each to the holder with the fewest bytes to
   read so far) and scatters to every rank its routes: the pieces it does not read, and what it sends to and
   receives from which rank.
3. ``read_and_send`` (collective): in one agreement step every rank reads its pieces (a checksum failure becomes
   the same error on every rank, before anything is sent); then, outside it, each reader sends each peer one
   message holding the pieces it routes there, and each rank copies what it receives into its live tensors. The
   loads then only hand their state to ``load_state_dict``.

Example (every rank, inside ``load_components``):
    >>> pieces = find_pieces(prepared)                                                # doctest: +SKIP
    >>> routes = route_pieces(pieces, capacity, "loading checkpoint x")               # doctest: +SKIP
    >>> read_and_send(prepared, pieces, routes, store, root, "loading checkpoint x")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from lightning_sharing.core.declarations import StateComponent
from lightning_sharing.distributed.basics import collective_device, get_rank, get_world_size, peer_failures
from lightning_sharing.distributed.collectives import agreement
from lightning_sharing.distributed.settle import settle_on_rank_zero
from lightning_sharing.engine.chunk_load import ChunkedLoad
from lightning_sharing.engine.component_errors import with_context
from lightning_sharing.engine.copy_format import PreparedLoad
from lightning_sharing.sharded.load import ReadPiece, ReadPlan, TensorRead
from lightning_sharing.storage import CheckpointStore

__all__ = ["ChunkPieces", "PieceRoutes", "find_pieces", "plan_routes", "read_and_send", "route_pieces"]

log = logging.getLogger(__name__)

Report = list[tuple[bytes, int, int]]  # (piece key, bytes, file tag), sorted by key


@dataclass(frozen=True)
class PieceRoutes:
    """One rank's part of a load's piece routes.

    Attributes:
        received: keys of the pieces this rank gets from another rank instead of reading them.
        sends: (peer, keys) pairs: the pieces this rank reads and sends to ``peer``, in this order.
        receives: (peer, keys) pairs: the pieces ``peer`` sends here, in this order.
    """

    received: frozenset[bytes] = frozenset()
    sends: tuple[tuple[int, tuple[bytes, ...]], ...] = ()
    receives: tuple[tuple[int, tuple[bytes, ...]], ...] = ()


@dataclass(frozen=True)
class _Piece:
    position: int  # of the load in ``prepared``
    read: TensorRead
    piece: ReadPiece
    size: int

    def region(self) -> torch.Tensor:
        """The live memory this piece fills."""
        return self.read.target[self.piece.dest.slices()] if self.piece.dest.sizes else self.read.target


@dataclass
class ChunkPieces:
    """This rank's pieces of its chunked loads, each keyed once (``find_pieces``), for the whole routing."""

    by_key: dict[bytes, _Piece] = field(default_factory=dict)
    repeated: set[bytes] = field(default_factory=set)  # read twice on this rank (tied names): never shared

    def report(self) -> Report:
        """As (key, bytes, file tag), sorted by key: what this rank sends rank 0 in ``route_pieces``; the tag names
        the chunk file (a CRC: equal tags only group pieces, never merge them)."""
        return sorted((key, piece.size, zlib.crc32(piece.piece.chunk.file.encode()))
                      for key, piece in self.by_key.items() if key not in self.repeated)


def _key(component: str, read: TensorRead, piece: ReadPiece) -> bytes:
    """A name for the saved bytes a piece holds, equal on every rank that loads the same bytes."""
    chunk = piece.chunk
    described = repr((component, read.name, chunk.file, chunk.begin, piece.saved.offsets, piece.saved.sizes))
    return hashlib.blake2b(described.encode(), digest_size=16).digest()


def find_pieces(prepared: Sequence[tuple[StateComponent, PreparedLoad]]) -> ChunkPieces:
    """The pieces of this rank's chunked loads among ``prepared``, each named by its key (computed here only)."""
    found = ChunkPieces()
    for position, (component, load) in enumerate(prepared):
        if not isinstance(load, ChunkedLoad):
            continue
        for read in load.plan.reads:
            for piece in read.pieces:
                size = piece.dest.numel * read.target.element_size()
                if not size:
                    continue
                key = _key(component.key, read, piece)
                if key in found.by_key:
                    found.repeated.add(key)
                found.by_key.setdefault(key, _Piece(position, read, piece, size))
    return found


def plan_routes(reports: Sequence[Report]) -> list[PieceRoutes]:
    """Rank 0: every rank's routes from every rank's ``ChunkPieces.report`` (a pure function).

    A piece one rank holds stays its own. The pieces several ranks hold are grouped by file and by the ranks holding
    them, and each group is read by one of its holders (the one with the fewest bytes to read so far, its own pieces
    included; ties: the lowest rank), largest groups first, and sent to the other holders: a file is then fetched
    by as few ranks as possible (an object store's ranged reader fetches more than a piece).

    Example:
        >>> routes = plan_routes([[(b"a", 8, 1), (b"b", 4, 1)], [(b"a", 8, 1)]])
        >>> routes[0].sends, routes[1].receives, routes[1].received
        (((1, (b'a',)),), ((0, (b'a',)),), frozenset({b'a'}))
    """
    holders: dict[bytes, list[int]] = {}
    about: dict[bytes, tuple[int, int]] = {}  # key -> (bytes, file tag)
    to_read = [0] * len(reports)
    for rank, report in enumerate(reports):
        for key, size, tag in report:
            holders.setdefault(key, []).append(rank)
            about[key] = (size, tag)
    groups: dict[tuple[int, tuple[int, ...]], list[bytes]] = {}
    for key, ranks in holders.items():
        if len(ranks) == 1:
            to_read[ranks[0]] += about[key][0]
        else:
            groups.setdefault((about[key][1], tuple(ranks)), []).append(key)
    sends: list[dict[int, list[bytes]]] = [{} for _ in reports]
    receives: list[dict[int, list[bytes]]] = [{} for _ in reports]
    received: list[set[bytes]] = [set() for _ in reports]
    sized = sorted(((sum(about[k][0] for k in keys), group, sorted(keys)) for group, keys in groups.items()),
                   key=lambda item: (-item[0], item[1]))
    for total, (_, ranks), keys in sized:
        reader = min(ranks, key=lambda r: (to_read[r], r))
        to_read[reader] += total
        for rank in ranks:
            if rank != reader:
                sends[reader].setdefault(rank, []).extend(keys)
                receives[rank].setdefault(reader, []).extend(keys)
                received[rank].update(keys)
    return [PieceRoutes(frozenset(received[rank]),
                        tuple((peer, tuple(keys)) for peer, keys in sorted(sends[rank].items())),
                        tuple((peer, tuple(keys)) for peer, keys in sorted(receives[rank].items())))
            for rank in range(len(reports))]


def route_pieces(pieces: ChunkPieces, capacity: int, phase: str) -> PieceRoutes:
    """Collective: this rank's routes (see the module docstring). ``capacity``: the largest ``report_size`` of any
    rank's ``pieces.report()``, the same on every rank (agreed in the load's ballot). A gather, a verdict broadcast
    and a scatter; rank 0 receives every report, every other rank only its own routes."""
    decided: list[list[PieceRoutes]] = []

    def decide(reports: list[Report]) -> int:
        decided.append(plan_routes(reports))
        return sum(len(r.received) for r in decided[0])

    shared = settle_on_rank_zero(f"{phase}: listing the chunk pieces each rank loads", None, pieces.report(),
                                 f"{phase}: routing the chunk pieces several ranks load", decide, capacity=capacity)
    if get_world_size() == 1:
        return decided[0][0]
    mine: list[PieceRoutes | None] = [None]
    with peer_failures(f"{phase}: sending each rank its piece routes"):
        dist.scatter_object_list(mine, decided[0] if get_rank() == 0 else None, src=0)
    log.debug("%s: %d chunk pieces received from another rank (all ranks)", phase, shared)
    assert mine[0] is not None
    return mine[0]


def read_and_send(prepared: Sequence[tuple[StateComponent, PreparedLoad]], pieces: ChunkPieces,
                  routes: PieceRoutes, store: CheckpointStore, root: str, phase: str,
                  first: Callable[[], None] | None = None) -> int:
    """Collective: every chunked load of ``prepared`` (whose ``pieces`` they are) reads its pieces but the
    ``routes.received`` ones (one agreement step, which runs ``first`` before any read: the caller's checks), then the
    pieces travel as ``routes`` say. The loads are left with their tensors filled (``ChunkedLoad.prefetched``).
    Returns the bytes this rank read for other ranks."""
    arriving = {id(pieces.by_key[key].piece) for key in routes.received}
    with agreement(phase):
        if first is not None:
            first()
        for component, load in prepared:
            if isinstance(load, ChunkedLoad):
                plan = _without(load.plan, lambda piece: id(piece) in arriving)
                with_context(component.key, "loading", lambda ld=load, p=plan: ld.read_now(store, root, p))
    _exchange(routes, pieces, phase)
    return sum(pieces.by_key[key].size for key in {key for _, keys in routes.sends for key in keys})


def _without(plan: ReadPlan, leave: Callable[[ReadPiece], bool]) -> ReadPlan:
    reads = []
    for read in plan.reads:
        kept = tuple(piece for piece in read.pieces if not leave(piece))
        if kept:
            reads.append(dataclasses.replace(read, pieces=kept))
    return dataclasses.replace(plan, reads=tuple(reads))


def _as_bytes(piece: _Piece) -> torch.Tensor:
    return piece.region().contiguous().reshape(-1).view(torch.uint8)


def _exchange(routes: PieceRoutes, pieces: ChunkPieces, phase: str) -> None:
    """Post every send and receive of ``routes`` at once (no order between peers to deadlock on), wait for them,
    then copy what arrived into the live tensors. Peers sent the same pieces share one message buffer."""
    if not routes.sends and not routes.receives:
        return
    device = collective_device()
    payloads: dict[tuple[bytes, ...], torch.Tensor] = {}
    inbound: list[tuple[torch.Tensor, tuple[bytes, ...]]] = []
    works = []
    with peer_failures(f"{phase}: sending chunk pieces between ranks"):
        for peer, keys in routes.sends:
            if keys not in payloads:
                payloads[keys] = torch.cat([_as_bytes(pieces.by_key[key]) for key in keys]).to(device)
            works.append(dist.isend(payloads[keys], dst=peer))
        for peer, keys in routes.receives:
            buffer = torch.empty(sum(pieces.by_key[key].size for key in keys), dtype=torch.uint8, device=device)
            works.append(dist.irecv(buffer, src=peer))
            inbound.append((buffer, keys))
        for work in works:
            work.wait()
    with torch.no_grad():
        for buffer, keys in inbound:
            offset = 0
            for key in keys:
                piece = pieces.by_key[key]
                region = piece.region()
                values = buffer[offset:offset + piece.size].clone().view(region.dtype).view(region.shape)
                region.copy_(values)
                offset += piece.size
