"""Loading SHARDED state into whatever the live state is now, reading only the bytes each rank needs.

``plan_reads`` intersects the box each live tensor holds on this rank (a DTensor's local piece on
any mesh, or the whole tensor for a plain or DDP-replicated one) with the saved chunks. ``read_chunks``
then reads, per overlap, only the saved chunk's bytes that hold it, verified block by block (see
``chunkfile``), straight into the live local tensor: an overlap that is contiguous both in the file
and in memory (resharding along dim 0, as FSDP does) is read into the tensor's memory with no copy;
otherwise (a column piece, say) the saved rows holding it are read into a bounded scratch window and
copied into place.

Files that carry no block digests (a Hugging Face safetensors directory, described as one chunk per tensor by
``engine.hf_files``) are read with ``read_chunks(..., verified=False)``, said explicitly by the caller; a verified
read (the default, and every read of our own chunk files) refuses a chunk without digests.

Example:
    >>> stats = load_sharded("step=5.ckpt", index, model.state_dict())   # doctest: +SKIP
    >>> stats.bytes_read, stats.bytes_needed                              # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lightning_sharing.errors import CheckpointError, CorruptCheckpointError
from lightning_sharing.sharded.chunkfile import ByteSource, ChunkStore, LocalFiles, StoreFiles, read_blocks
from lightning_sharing.sharded.dtensor_boxes import Box, local_box, local_tensor
from lightning_sharing.sharded.index import ChunkRecord, FileRecord, ShardedIndex, TensorRecord

__all__ = ["ReadPiece", "ReadPlan", "ReadStats", "TensorRead", "load_sharded", "plan_box", "plan_reads",
           "read_chunks"]

DEFAULT_WINDOW = 64 << 20


@dataclass(frozen=True)
class ReadPiece:
    """One overlap of a live piece with a saved chunk: its box relative to each of their corners."""

    chunk: ChunkRecord
    saved: Box
    dest: Box


@dataclass(frozen=True)
class TensorRead:
    """What one live tensor needs: its live box, the memory to fill, and the overlapping chunks."""

    name: str
    record: TensorRecord
    live: Box
    target: torch.Tensor
    pieces: tuple[ReadPiece, ...]


@dataclass(frozen=True)
class ReadPlan:
    """Every read this rank makes; ``skipped`` are saved tensors the live state lacks (``strict=False``)."""

    reads: tuple[TensorRead, ...]
    skipped: tuple[str, ...] = ()

    def files(self) -> list[str]:
        """The chunk files this rank opens."""
        return sorted({p.chunk.file for r in self.reads for p in r.pieces})

    @property
    def bytes_needed(self) -> int:
        return sum(p.dest.numel * r.target.element_size() for r in self.reads for p in r.pieces)


@dataclass
class ReadStats:
    """Bytes read per file (whole verified blocks), the bytes the live state needed, and the overlaps read."""

    bytes_needed: int = 0
    bytes_by_file: dict[str, int] = field(default_factory=dict)
    pieces: int = 0

    @property
    def bytes_read(self) -> int:
        return sum(self.bytes_by_file.values())


def plan_reads(index: ShardedIndex, state: Mapping[str, torch.Tensor], *, strict: bool = True) -> ReadPlan:
    """Match the live ``state`` (name -> Tensor or DTensor) against ``index``; nothing is read yet.

    Raises ``CheckpointError`` naming the tensor for a global shape or dtype that differs from the
    saved one, and (``strict``) for live tensors the checkpoint lacks or saved tensors the live state
    lacks (with ``strict=False`` both are skipped).

    Example:
        >>> plan = plan_reads(index, model.state_dict())   # doctest: +SKIP
        >>> plan.files(), plan.bytes_needed                 # doctest: +SKIP
    """
    missing = sorted(name for name in state if name not in index.tensors)
    unexpected = sorted(name for name in index.tensors if name not in state)
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"the sharded checkpoint and the live state hold different tensors: missing from the checkpoint "
            f"{missing or 'none'}, not in the live state {unexpected or 'none'} (load with strict=False to skip them)"
        )
    reads = []
    for name, tensor in state.items():
        record = index.tensors.get(name)
        if record is not None:
            reads.append(_plan_tensor(name, record, tensor))
    return ReadPlan(tuple(reads), tuple(unexpected))


def _plan_tensor(name: str, record: TensorRecord, tensor: torch.Tensor) -> TensorRead:
    if not isinstance(tensor, torch.Tensor):
        raise CheckpointError(f"live state entry {name!r} is a {type(tensor).__name__}, not a tensor")
    shape = tuple(tensor.shape)
    if shape != record.shape:
        raise CheckpointError(f"tensor {name!r} has global shape {list(record.shape)} in the checkpoint but "
                              f"{list(shape)} in the live state; the model does not match the checkpoint")
    if tensor.dtype != record.torch_dtype:
        raise CheckpointError(f"tensor {name!r} has dtype {record.torch_dtype} in the checkpoint but "
                              f"{tensor.dtype} in the live state")
    # local_box checks a DTensor's placements (and that DTensor agrees with them) before any byte lands.
    return plan_box(name, record, local_box(name, tensor, rank=_rank()), local_tensor(tensor))


def plan_box(name: str, record: TensorRecord, live: Box, target: torch.Tensor) -> TensorRead:
    """The reads that fill ``target`` (of ``record``'s dtype, shaped as ``live``) with the box ``live`` of the saved
    tensor ``name``; no shape or dtype check (``plan_reads`` makes them)."""
    pieces = []
    for chunk in record.chunks:
        overlap = live.intersect(chunk.box) if live.numel else None
        if overlap is not None:
            pieces.append(ReadPiece(chunk, overlap.relative_to(chunk.box), overlap.relative_to(live)))
    covered = sum(p.dest.numel for p in pieces)
    if covered != live.numel:  # an index that was not validated (validate() rules this out)
        raise CorruptCheckpointError(f"tensor {name!r}: the saved chunks cover {covered} of the {live.numel} "
                                     f"elements this rank holds at {live}")
    return TensorRead(name, record, live, target, tuple(pieces))


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _Counting:
    """A ByteSource that checks each file's size once and counts the bytes read from it."""

    def __init__(self, source: ByteSource, files: Mapping[str, FileRecord], stats: ReadStats) -> None:
        self.source, self.files, self.stats = source, files, stats

    def size(self, path: str) -> int:
        return self.source.size(path)

    def read_into(self, path: str, offset: int, buffers: Sequence[memoryview]) -> None:
        if path not in self.stats.bytes_by_file:
            actual, recorded = self.source.size(path), self.files[path].size
            if actual != recorded:
                raise CorruptCheckpointError(f"chunk file {path} is {actual} bytes but the index records "
                                             f"{recorded}: the file is truncated or altered")
            self.stats.bytes_by_file[path] = 0
        self.source.read_into(path, offset, buffers)
        self.stats.bytes_by_file[path] += sum(len(b) for b in buffers)


def read_chunks(plan: ReadPlan, index: ShardedIndex, source: ByteSource, *,
                window: int = DEFAULT_WINDOW, verified: bool = True) -> ReadStats:
    """Carry out ``plan``: read and verify the overlapping bytes into the live tensors, file by file.

    ``window`` bounds the scratch memory of a non-contiguous overlap. Raises
    ``CorruptCheckpointError`` naming the tensor, the chunk, the file and the block for any byte
    whose block checksum does not match; the live tensor may then hold part of the corrupt data.
    ``verified=False`` reads the bytes as they are, for files that carry no digests (Hugging Face files).

    Example:
        >>> with LocalFiles("step=5.ckpt") as files:          # doctest: +SKIP
        ...     stats = read_chunks(plan, index, files)
    """
    stats = ReadStats(bytes_needed=plan.bytes_needed, pieces=sum(len(r.pieces) for r in plan.reads))
    counting = _Counting(source, index.files, stats)
    work = [(piece.chunk.file, piece.chunk.begin + _first_byte(piece, read), read, piece)
            for read in plan.reads for piece in read.pieces]
    with torch.no_grad():
        for _, _, read, piece in sorted(work, key=lambda w: (w[0], w[1])):
            chunk = piece.chunk
            what = f"tensor {read.name!r}, chunk at offsets {list(chunk.offsets)} in {chunk.file}"
            dest = read.target[piece.dest.slices()] if piece.dest.sizes else read.target
            if verified and chunk.length and not chunk.blocks:
                raise CorruptCheckpointError(f"{what}: the index records no block digests, so its bytes cannot "
                                             "be verified")
            _read_box(_Reader(counting, index.files[chunk.file], chunk, what, window, read.target.dtype, verified),
                      chunk.sizes, 0, piece.saved.offsets, piece.saved.sizes, dest)
    return stats


def _first_byte(piece: ReadPiece, read: TensorRead) -> int:
    stride = read.target.element_size()
    position = 0
    for offset, size in zip(piece.saved.offsets, piece.chunk.sizes, strict=True):
        position = position * size + offset
    return position * stride


@dataclass(frozen=True)
class _Reader:
    source: ByteSource
    file: FileRecord
    chunk: ChunkRecord
    what: str
    window: int
    dtype: torch.dtype
    verified: bool = True

    def read(self, start: int, end: int, into: memoryview | None) -> torch.Tensor | None:
        if not self.verified:  # bytes [start, end) of the chunk as they are (files without digests)
            scratch = None if into is not None else torch.empty(end - start, dtype=torch.uint8)
            buffer = into if into is not None else memoryview(scratch.numpy())  # type: ignore[union-attr]
            self.source.read_into(self.chunk.file, self.chunk.begin + start, [buffer])
            return scratch
        return read_blocks(self.source, self.chunk.file, self.chunk.begin, self.chunk.length, self.file.block_size,
                           self.chunk.blocks, start, end, into, self.what)


def _read_box(reader: _Reader, sizes: tuple[int, ...], base: int, offsets: tuple[int, ...],
              extent: tuple[int, ...], dest: torch.Tensor) -> None:
    """Fill ``dest`` with the sub-box ``offsets``/``extent`` of a saved box of shape ``sizes`` at byte ``base``."""
    element = dest.element_size()
    if not sizes:  # a 0-d tensor: one element
        if _direct(dest):
            reader.read(base, base + element, _bytes_of(dest))
        else:
            value = reader.read(base, base + element, None)
            assert value is not None
            dest.copy_(value.view(reader.dtype).reshape(()))
        return
    row = math.prod(sizes[1:]) * element
    if all(o == 0 and e == s for o, e, s in zip(offsets[1:], extent[1:], sizes[1:], strict=True)):
        start = base + offsets[0] * row
        if _direct(dest):  # contiguous in the file and in memory: no copy
            reader.read(start, start + extent[0] * row, _bytes_of(dest))
            return
    if row <= reader.window:
        per = max(1, reader.window // row)
        inner = tuple(slice(o, o + e) for o, e in zip(offsets[1:], extent[1:], strict=True))
        for first in range(0, extent[0], per):
            count = min(per, extent[0] - first)
            start = base + (offsets[0] + first) * row
            slab = reader.read(start, start + count * row, None)
            assert slab is not None
            rows = slab.view(reader.dtype).view(count, *sizes[1:])
            dest[first:first + count].copy_(rows[(slice(None), *inner)])
        return
    for i in range(extent[0]):  # rows too big for one window: take the needed part of each row
        _read_box(reader, sizes[1:], base + (offsets[0] + i) * row, offsets[1:], extent[1:], dest[i])


def _direct(dest: torch.Tensor) -> bool:
    return dest.device.type == "cpu" and dest.is_contiguous()


def _bytes_of(dest: torch.Tensor) -> memoryview:
    return memoryview(dest.reshape(-1).view(torch.uint8).numpy())


def load_sharded(root: str | Path, index: ShardedIndex, state: Mapping[str, torch.Tensor], *,
                 strict: bool = True, window: int = DEFAULT_WINDOW, store: ChunkStore | None = None) -> ReadStats:
    """``plan_reads`` + ``read_chunks`` from the checkpoint at ``root`` (in ``store``, or a local directory).

    Example:
        >>> load_sharded("step=5.ckpt", index, {"w": model.weight})   # doctest: +SKIP
    """
    plan = plan_reads(index, state, strict=strict)
    files: LocalFiles | StoreFiles = LocalFiles(root) if store is None else StoreFiles(store, str(root))
    with files:
        return read_chunks(plan, index, files, window=window)
