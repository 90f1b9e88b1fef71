"""Read-once loads: a file every rank reads is fetched from storage by one rank and sent to the others.

GLOBAL and REPLICATED state is read whole by every rank, so without this a load of N ranks fetches those files N
times (N times the bytes from an object store). With ``read_once`` each such *shared* file has one *reader*; the
readers fetch and verify their files (size and checksum, once) and hand the bytes to the other ranks: through
shared memory when every rank is on one node (``distributed/node_files.py``: written once, mapped by the others;
faster than gloo's sockets, ``benchmarks/read_once.py``), else broadcast over the process group; every rank then
parses them through the same path as bytes read from storage (``ComponentFiles``' ``given``).

Who reads what needs no communication: it is a pure function of what every rank loads (``files_read_by`` of each
prepared load, the same on every rank from the manifest and the topology) and of the manifest's sizes
(``plan_shared_files``: largest files first, each to the rank with the fewest bytes so far, so the ranks split the
reading). The broadcasts need no size exchange either: every rank knows each file's size from the manifest.

Failures stay agreed and collectives stay unconditional: for each component with shared files, one agreement step
runs the loads finished so far and this rank's reads (and writes into shared memory), so a reader's failure (a
checksum mismatch, a missing object) becomes the same error on every rank, naming the file once; only then, outside
it, every rank joins every broadcast of the component's files, in the same order (shared-memory files are opened in
the next step, and removed by their writer after it). At most one component's shared files are held in memory
(besides the live state), and each file travels in pieces (``broadcast_bytes``).

``read_once=None`` resolves to on for object-store URLs and for jobs spanning several nodes (``resolve_read_once``),
off for one node on a local disk, where the page cache already shares the reads.

Example (every rank, inside ``load_components``):
    >>> schedule = plan_shared_files(prepared_loads, world_size=4)                     # doctest: +SKIP
    >>> finish_loads(prepared, store, root, "loading checkpoint x", schedule, loaded.append)  # doctest: +SKIP
"""

from __future__ import annotations

import heapq
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from lightning_sharing.checkpoint.manifest import ComponentManifest
from lightning_sharing.core.declarations import StateComponent
from lightning_sharing.core.topology import Topology
from lightning_sharing.distributed.collectives import (
    agreement,
    any_rank,
    broadcast_bytes,
    broadcast_object,
    get_rank,
)
from lightning_sharing.distributed.node_files import NodeFiles
from lightning_sharing.engine.component_errors import with_context
from lightning_sharing.engine.copy_format import LoadContext, PreparedLoad
from lightning_sharing.engine.verified_files import ComponentFiles
from lightning_sharing.storage import CheckpointStore, is_url

__all__ = ["USE_SHARED_MEMORY", "SharedFile", "SharesFiles", "finish_loads", "hand_over_in_memory",
           "plan_shared_files", "resolve_read_once"]

log = logging.getLogger(__name__)

#: Whether the ranks of a one-node job hand shared files over through shared memory (else over the process group,
#: as between nodes); ``benchmarks/read_once.py`` turns it off to compare the two.
USE_SHARED_MEMORY = True


@runtime_checkable
class SharesFiles(Protocol):
    """A prepared load that knows, before reading, which files each rank reads (whole-tensor copies), and that
    takes bytes another rank read (``given``: listed path -> verified bytes)."""

    saved: ComponentManifest
    context: LoadContext
    given: dict[str, memoryview]

    def files_read_by(self, rank: int) -> tuple[str, ...]:
        """The listed files this load reads on ``rank``."""


@dataclass(frozen=True)
class SharedFile:
    """One file every rank reads: fetched by ``reader`` alone, ``size`` bytes (from the manifest)."""

    rel: str
    size: int
    reader: int


def resolve_read_once(setting: bool | None, path: Any, topology: Topology) -> bool:
    """Whether a load of ``path`` reads shared files once: ``setting`` when given, else on for an object-store URL
    or a job on several nodes, off for one node on a local disk (the page cache shares the reads already).

    Example:
        >>> resolve_read_once(None, "s3://bucket/step=1.ckpt", Topology.build(4))
        True
        >>> resolve_read_once(None, "/ckpt/step=1.ckpt", Topology.build(4))
        False
        >>> resolve_read_once(None, "/ckpt/step=1.ckpt", Topology.build(4, node_of_rank=[0, 0, 1, 1]))
        True
    """
    if topology.world_size == 1:
        return False  # nobody to share with
    if setting is not None:
        return setting
    return (is_url(path) and not str(path).startswith("file://")) or len(topology.nodes) > 1


def hand_over_in_memory(topology: Topology) -> bool:
    """Whether shared files go from reader to ranks through shared memory: every rank on one node (and a
    shared-memory directory there); else they are broadcast over the process group."""
    return USE_SHARED_MEMORY and len(topology.nodes) == 1 and NodeFiles.available()


def plan_shared_files(loads: Sequence[PreparedLoad], world_size: int) -> dict[int, list[SharedFile]]:
    """For each load (by position) that reads files every one of the ``world_size`` ranks reads, those files and
    their readers. A pure function of the loads' plans and the manifest: identical on every rank.

    Readers are balanced by bytes: largest files first, each to the rank with the fewest bytes so far (ties: the
    lowest rank), so with as many files as ranks every rank fetches about the same amount.
    """
    found: list[tuple[int, str, int]] = []
    for position, load in enumerate(loads):
        if not isinstance(load, SharesFiles):
            continue
        common = set(load.files_read_by(0))
        for rank in range(1, world_size):
            if not common:
                break
            common &= set(load.files_read_by(rank))
        sizes = {entry.path: entry.size for entry in load.saved.files}
        found.extend((position, rel, sizes[rel]) for rel in sorted(common) if rel in sizes)
    assigned: dict[int, list[SharedFile]] = {}
    fetched = [(0, rank) for rank in range(world_size)]  # a heap: the rank with the fewest bytes so far on top
    for position, rel, size in sorted(found, key=lambda item: (-item[2], item[0], item[1])):
        bytes_so_far, reader = heapq.heappop(fetched)
        heapq.heappush(fetched, (bytes_so_far + size, reader))
        assigned.setdefault(position, []).append(SharedFile(rel, size, reader))
    return {position: sorted(files, key=lambda f: f.rel) for position, files in sorted(assigned.items())}


def finish_loads(prepared: Sequence[tuple[StateComponent, PreparedLoad]], store: CheckpointStore, root: str,
                 phase: str, schedule: dict[int, list[SharedFile]], done: Callable[[str], None],
                 first: Callable[[], None] | None = None, node_local: bool = False) -> int:
    """Collective: ``finish`` every prepared load in order, each component's shared files (``schedule``, from
    ``plan_shared_files``; empty: every rank reads its own files) fetched once and handed to the other ranks:
    through shared memory when every rank is on one node (``node_local``, the same on every rank), else broadcast.

    ``first`` runs at the start of the first agreement step (the caller's checks); ``done(key)`` after each load.
    Every failure is raised on every rank, as ``phase`` (see the module docstring). Returns the bytes of shared
    files this rank fetched from storage.
    """
    rank, fetched = get_rank(), 0
    # One broadcast names this load's shared-memory files (two jobs on one node never collide).
    node_files = NodeFiles(broadcast_object(uuid.uuid4().hex if rank == 0 else None, phase=phase)) \
        if node_local and schedule else None
    pending: list[tuple[StateComponent, PreparedLoad, Callable[[], dict[str, memoryview]] | None]] = []
    checks = first

    def finish_pending() -> None:
        nonlocal checks
        if checks is not None:
            checks()
            checks = None
        for component, load, receive in pending:
            if receive is not None and isinstance(load, SharesFiles):
                load.given = receive()  # opened here, inside the agreement step: a failure is everyone's
            with_context(component.key, "loading", lambda loading=load: loading.finish(store, root))
            if isinstance(load, SharesFiles):
                load.given = {}  # the shared bytes are no longer needed
            done(component.key)
        pending.clear()  # and neither are their receivers: this rank holds one component's shared files at a time

    try:
        for position, (component, load) in enumerate(prepared):
            shared = schedule.get(position)
            if not shared or not isinstance(load, SharesFiles):
                pending.append((component, load, None))
                continue
            mine: dict[str, memoryview] = {}
            earlier = node_files.written() if node_files is not None else []
            not_in_memory = [node_files is None] * len(shared)
            started = time.perf_counter()
            with agreement(phase):
                finish_pending()
                files = ComponentFiles(store, root, component.key, load.saved, load.context.mode)
                for number, file in enumerate(shared):
                    if file.reader == rank:
                        mine[file.rel] = memoryview(files.read_file(file.rel))  # size and checksum verified here
                        if node_files is not None:
                            not_in_memory[number] = not node_files.put(rank, f"{position}-{number}", mine[file.rel])
            if node_files is not None:
                node_files.remove(earlier)  # every rank has opened them: they finished the previous loads
                # The files shared memory could not take go over the process group (one all-reduce says which).
                not_in_memory = any_rank(*not_in_memory, phase=phase)
            fetched += sum(len(data) for data in mine.values())
            pending = [(component, load, _receiver(shared, mine, position, node_files, not_in_memory, phase))]
            log.debug("component %r: %d shared files (%d bytes, %d read here) in %.3fs", component.key, len(shared),
                      sum(f.size for f in shared), sum(len(v) for v in mine.values()), time.perf_counter() - started)
        with agreement(phase):
            finish_pending()
    finally:
        if node_files is not None:
            node_files.remove()
    return fetched


def _receiver(shared: list[SharedFile], mine: dict[str, memoryview], position: int, node_files: NodeFiles | None,
              not_in_memory: list[bool], phase: str) -> Callable[[], dict[str, memoryview]]:
    """How this rank gets a component's shared files: broadcast now, outside any agreement step (every rank joins
    every broadcast, in the same order, whatever it reads), unless in shared memory (``node_files``), where they
    are mapped from the readers' files when the load runs."""
    rank = get_rank()
    received = {file.rel: broadcast_bytes(mine.get(file.rel), file.size, file.reader, phase)
                for file, broadcast in zip(shared, not_in_memory, strict=True) if broadcast}
    if node_files is None:
        return lambda: received

    def mapped() -> dict[str, memoryview]:
        given = dict(received)
        for number, file in enumerate(shared):
            if file.rel not in given:
                given[file.rel] = mine[file.rel] if file.reader == rank else \
                    node_files.get(file.reader, f"{position}-{number}", file.size)
        return given

    return mapped
