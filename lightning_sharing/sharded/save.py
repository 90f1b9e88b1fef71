"""Saving SHARDED state: who writes each chunk (every chunk exactly once), and writing this rank's chunks.

``plan_writes`` is a pure function of the state's layouts: every rank computes the same assignment
for every chunk in the job, with no communication. A chunk one rank alone holds is written by it. A chunk held by
several ranks (replicas along ``Replicate`` mesh dims, or the holders of a plain tensor) is written by one of them,
chosen so the bytes each rank writes stay balanced: each rank starts with the bytes of the chunks it alone holds
(summed per distinct layout, never listed: a 70B model on 4,096 ranks has millions of chunks), then the shared
chunks are taken largest first (then by name and offsets, a canonical order) and each goes to the holder that has
been given the fewest bytes so far (ties to the lowest rank). Where chunks share one set of holders (the replicas of
HSDP, of DDP), no holder writes more than their average plus one chunk. For all ranks to reach the same plan, every
rank holding a chunk must see the same tensors (true for the DTensors of one model spread over ``group_ranks``: the
world, or one pipeline stage's ranks).

Example (one process, a plain tensor held by ranks 0 and 1):
    >>> import torch
    >>> plan = plan_writes({"a": torch.ones(4), "b": torch.ones(2)}, rank=1, group_ranks=[0, 1])
    >>> [(w.name, w.writer) for w in plan.writes]
    [('a', 0), ('b', 1)]
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lightning_sharing.errors import CheckpointError, UnsupportedStateError
from lightning_sharing.format.safetensors_io import dtype_name
from lightning_sharing.sharded.chunkfile import DEFAULT_BLOCK_SIZE, ChunkStore, write_chunk_file, write_chunk_stream
from lightning_sharing.sharded.dtensor_boxes import Box, TensorLayout, local_tensor, tensor_layout
from lightning_sharing.sharded.index import ChunkRecord, FileRecord, ShardedIndex, TensorRecord

__all__ = ["ChunkWrite", "WritePlan", "chunk_key", "plan_writes", "write_chunks"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkWrite:
    """One chunk of the job and the rank that writes it."""

    name: str
    box: Box
    nbytes: int
    holders: tuple[int, ...]
    writer: int


@dataclass(frozen=True)
class WritePlan:
    """Who writes each chunk of a component's state in the job, and this rank's layouts.

    Planned without listing every chunk: ``shared`` holds the chunks several ranks hold, each with its writer; a
    chunk one rank alone holds is written by that rank and stays in its layout's ``chunk_groups``. ``mine()`` is
    what this rank writes; ``writes`` lists every chunk of the job (O(chunks): for tests and the scale simulation).
    """

    rank: int
    layouts: Mapping[str, TensorLayout]
    shared: tuple[ChunkWrite, ...]

    def mine(self) -> list[ChunkWrite]:
        """The chunks this rank writes, by name, then offsets."""
        own = [ChunkWrite(name, chunk.box, chunk.box.numel * layout.element_size, chunk.holders, self.rank)
               for name, layout in self.layouts.items()
               for chunk in layout.chunk_groups.alone.get(self.rank, ())]
        return _in_order(own + [w for w in self.shared if w.writer == self.rank])

    @property
    def writes(self) -> tuple[ChunkWrite, ...]:
        """Every chunk of the job and its writer, by name, then offsets."""
        alone = [ChunkWrite(name, chunk.box, chunk.box.numel * layout.element_size, chunk.holders, chunk.holders[0])
                 for name, layout in self.layouts.items()
                 for chunks in layout.chunk_groups.alone.values() for chunk in chunks]
        return tuple(_in_order(alone + list(self.shared)))

    def bytes_by_rank(self) -> dict[int, int]:
        """Bytes each rank is to write."""
        totals: dict[int, int] = {}
        for write in self.writes:
            totals[write.writer] = totals.get(write.writer, 0) + write.nbytes
        return dict(sorted(totals.items()))


def _in_order(writes: list[ChunkWrite]) -> list[ChunkWrite]:
    return sorted(writes, key=lambda w: (w.name, w.box.offsets))


def _default_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _default_holders() -> list[int]:
    import torch.distributed as dist

    return list(range(dist.get_world_size())) if dist.is_available() and dist.is_initialized() else [0]


def plan_writes(state: Mapping[str, torch.Tensor], *, rank: int | None = None,
                group_ranks: Sequence[int] | None = None) -> WritePlan:
    """Assign every chunk of ``state`` (name -> Tensor or DTensor) a writer; see the module docstring.

    ``rank`` defaults to this process's global rank; ``group_ranks``, the global ranks over which the
    component is spread (they all hold its plain tensors, see ``tensor_layout``), to every rank of
    the default group. Raises ``UnsupportedStateError`` for a value that is not a tensor, a layout that
    cannot be stored as chunks, or a dtype safetensors cannot hold.
    """
    rank = _default_rank() if rank is None else rank
    holders = _default_holders() if group_ranks is None else sorted(set(group_ranks))
    if rank not in holders:
        raise UnsupportedStateError(f"plan_writes: rank {rank} is not one of group_ranks {holders}")
    layouts: dict[str, TensorLayout] = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise UnsupportedStateError(f"state entry {name!r} is a {type(tensor).__name__}, not a tensor")
        layout = tensor_layout(name, tensor, rank=rank, group_ranks=holders)
        try:
            dtype_name(layout.dtype)
        except CheckpointError as exc:
            raise UnsupportedStateError(f"tensor {name!r}: {exc}") from None
        layouts[name] = layout
    # A chunk one rank alone holds is its writer's, and only adds to that rank's bytes: summed per distinct layout
    # (the tensors of a model share a few), not listed, since a job on thousands of ranks has millions of chunks.
    load: dict[int, int] = {}
    by_layout: dict[int, list] = {}
    for layout in layouts.values():
        groups = layout.chunk_groups
        by_layout.setdefault(id(groups), [groups, 0])[1] += layout.element_size
    for groups, element_bytes in by_layout.values():
        for holder, numel in groups.alone_numel.items():
            load[holder] = load.get(holder, 0) + numel * element_bytes
    # The chunks several ranks hold, largest first (then by name and offsets, unique; plain tuples, compared as they
    # are), each to the holder given the fewest bytes so far.
    pending = sorted((-chunk.box.numel * layout.element_size, layout.name, chunk.box.offsets, chunk)
                     for layout in layouts.values() for chunk in layout.chunk_groups.shared)
    least = _LeastLoaded(load)
    shared = []
    for negative, name, _, chunk in pending:
        writer = least.pick(chunk.holders)
        load[writer] = load.get(writer, 0) - negative
        shared.append(ChunkWrite(name, chunk.box, -negative, chunk.holders, writer))
    return WritePlan(rank, layouts, tuple(_in_order(shared)))


class _LeastLoaded:
    """The holder given the fewest bytes so far (ties: the lowest rank), per set of holders, in O(log holders).

    ``min(holders, key=(load, rank))`` over every holder is O(ranks) per chunk: a model's plain tensors, held by every
    rank, made planning O(tensors x ranks). A heap per holder set gives the same answer: loads only grow, so an entry
    whose load is out of date is smaller than the truth; popped, it is pushed back with the current load.
    """

    def __init__(self, load: dict[int, int]) -> None:
        self.load = load
        self.heaps: dict[tuple[int, ...], list[tuple[int, int]]] = {}

    def pick(self, holders: tuple[int, ...]) -> int:
        heap = self.heaps.get(holders)
        if heap is None:
            heap = self.heaps[holders] = [(self.load.get(r, 0), r) for r in holders]
            heapq.heapify(heap)
        while True:
            seen, rank = heap[0]
            now = self.load.get(rank, 0)
            if seen == now:
                break
            heapq.heapreplace(heap, (now, rank))
        # The caller adds the chunk to the pick's load: its entry here goes out of date until it surfaces again.
        return rank


def chunk_key(name: str, box: Box, global_shape: tuple[int, ...]) -> str:
    """The safetensors key of a chunk: the tensor's name for a whole tensor, ``name@o0,o1`` for a piece."""
    if box.sizes == tuple(global_shape):
        return name
    return f"{name}@{','.join(str(o) for o in box.offsets)}"


def write_chunks(root: str | Path, file: str, plan: WritePlan, state: Mapping[str, torch.Tensor], *,
                 block_size: int = DEFAULT_BLOCK_SIZE, store: ChunkStore | None = None,
                 names: set[str] | None = None) -> ShardedIndex:
    """Write the chunks ``plan`` assigns to this rank into ``root/file``; return this rank's partial index.

    ``file`` is the relative path the index records (``{key}/chunks-{rank:05d}.safetensors``, say).
    With ``store`` (a ``CheckpointStore``), the file is written through ``store.open_write`` at
    ``store.join(root, file)`` (durable when that returns); without, to the local directory ``root``.
    ``names``: only the chunks of these tensors go to ``file`` (the others of this rank to other files).
    No file is written when this rank writes no chunk. The partial index lists every tensor of the
    state (shape and dtype, also those with no chunk here) and this rank's chunks; ``merge_indexes``
    joins the ranks' parts.

    Example:
        >>> part = write_chunks(root, f"model/chunks-{plan.rank:05d}.safetensors", plan, state)  # doctest: +SKIP
        >>> part.files  # this rank's file, with its size and checksum                        # doctest: +SKIP
    """
    mine = [write for write in plan.mine() if names is None or write.name in names]
    entries: list[tuple[str, torch.Tensor]] = []
    for write in mine:
        layout = plan.layouts[write.name]
        data = local_tensor(state[write.name])
        if write.box != layout.local or tuple(data.shape) != write.box.sizes:
            raise UnsupportedStateError(f"tensor {write.name!r}: this rank was assigned chunk {write.box} but "
                                        f"holds {layout.local}; the state changed since plan_writes")
        entries.append((chunk_key(write.name, write.box, layout.global_shape), data))
    records: dict[str, list[ChunkRecord]] = {name: [] for name in plan.layouts}
    files: dict[str, FileRecord] = {}
    if entries:
        if store is not None:
            with store.open_write(store.join(str(root), file)) as sink:
                info = write_chunk_stream(sink, entries, block_size=block_size)
        else:
            path = Path(root) / file
            path.parent.mkdir(parents=True, exist_ok=True)
            info = write_chunk_file(path, entries, block_size=block_size)
        files[file] = FileRecord(file, info.size, info.checksum, info.block_size, plan.rank)
        for write, entry in zip(mine, info.entries, strict=True):
            records[write.name].append(ChunkRecord(write.box.offsets, write.box.sizes, file, entry.key,
                                                   entry.begin, entry.length, plan.rank, entry.blocks))
        log.debug("rank %d wrote %d chunks (%d bytes) to %s", plan.rank, len(entries), info.size, file)
    tensors = {name: TensorRecord(dtype_name(layout.dtype), layout.global_shape, tuple(records[name]))
               for name, layout in plan.layouts.items()}
    return ShardedIndex(tensors, files)
