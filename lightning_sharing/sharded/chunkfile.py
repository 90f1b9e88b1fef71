"""Chunk files: standard safetensors files whose every block of data carries its own checksum.

A rank's chunks go into one safetensors file (plain ``safetensors.safe_open`` reads it). While the file
is written, in the same pass, two kinds of xxh3-128 digests are computed: one of the whole file (what
the manifest records for every file, so ``verify`` works as for any other file) and one per *block*
of each chunk's data: block ``i`` of a chunk is its bytes ``[i * block_size, (i + 1) * block_size)``
(the last one shorter), counted from the chunk's first byte, so blocks never straddle two chunks.

A loading rank that needs bytes ``[a, b)`` of a chunk reads the blocks covering them, from
``a // block_size`` up to ``ceil(b / block_size)``, and checks each block's digest before using any
byte: a partial read is verified as strictly as a whole-file read, at the cost of at most one partial
block of extra reading at each end. Where the destination is contiguous memory (the live local
tensor), the bytes are read straight into it and only the two partial edge blocks go through
scratch buffers.

Example:
    >>> import torch
    >>> info = write_chunk_file(Path("chunks.safetensors"), [("w", torch.ones(4))], block_size=8)  # doctest: +SKIP
    >>> info.entries[0].blocks  # two 8-byte blocks of the 16 bytes of w            # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import torch
import xxhash

from lightning_sharing._faults import fault_point
from lightning_sharing.errors import CorruptCheckpointError
from lightning_sharing.format.overlapped import Overlapped
from lightning_sharing.format.safetensors_io import (
    CHECKSUM_ALGORITHM,
    ByteSink,
    DescriptorSink,
    encode_header,
    tensor_bytes,
)

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "ByteSource",
    "ChunkFileInfo",
    "ChunkStore",
    "EntryInfo",
    "LocalFiles",
    "StoreFiles",
    "read_blocks",
    "write_chunk_file",
    "write_chunk_stream",
]

DEFAULT_BLOCK_SIZE = 1 << 20
_WRITE_PIECE = 16 << 20  # bytes handed to one sink.write, rounded down to whole blocks
_PIECES_IN_FLIGHT = 4  # written pieces waiting for the hashing thread, at most


@dataclass(frozen=True)
class EntryInfo:
    """Where one chunk's data lies in its file: bytes ``[begin, begin + length)``, one digest per block."""

    key: str
    begin: int
    length: int
    blocks: tuple[str, ...]


@dataclass(frozen=True)
class ChunkFileInfo:
    """What ``write_chunk_file`` wrote: the file's size and whole-file checksum, and each entry's blocks."""

    size: int
    checksum: str
    block_size: int
    entries: tuple[EntryInfo, ...]


def write_chunk_file(path: Path, entries: Sequence[tuple[str, torch.Tensor]], *,
                     block_size: int = DEFAULT_BLOCK_SIZE) -> ChunkFileInfo:
    """``write_chunk_stream`` into a local file at ``path``, fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        info = write_chunk_stream(DescriptorSink(fd), entries, block_size=block_size)
        os.fsync(fd)
    finally:
        os.close(fd)
    return info


def write_chunk_stream(sink: ByteSink, entries: Sequence[tuple[str, torch.Tensor]], *,
                       block_size: int = DEFAULT_BLOCK_SIZE) -> ChunkFileInfo:
    """Stream ``entries`` (safetensors key, tensor) into ``sink`` as one safetensors file, digests on the way.

    Entries are laid out largest element size first, so every tensor is aligned in the file.
    ``block_size`` must be a positive multiple of 8 (so a block edge never splits an element).
    """
    if block_size <= 0 or block_size % 8:
        raise ValueError(f"block_size must be a positive multiple of 8, not {block_size}")
    tensors = dict(entries)
    if len(tensors) != len(entries):
        raise ValueError("write_chunk_stream: duplicate entry keys")
    order = sorted(tensors, key=lambda key: (-tensors[key].element_size(), key))
    header = encode_header(tensors, order, {"format": "pt", "lightning_sharing": "sharded-chunks"})
    piece = max(block_size, _WRITE_PIECE - _WRITE_PIECE % block_size)
    total = len(header) + sum(tensors[key].numel() * tensors[key].element_size() for key in order)
    blocks: dict[str, list[str]] = {key: [] for key in order}
    with _Hasher(block_size, threaded=total >= 4 * piece) as hasher:
        sink.write(memoryview(header))
        hasher.update(None, memoryview(header))
        fault_point("save:write")
        for key in order:
            view = tensor_bytes(tensors[key]) if tensors[key].numel() else memoryview(b"")
            for start in range(0, len(view), piece):
                part = view[start:start + piece]
                sink.write(part)
                hasher.update(blocks[key], part)
        whole = hasher.finish()
    infos: dict[str, EntryInfo] = {}
    position = len(header)
    for key in order:
        length = tensors[key].numel() * tensors[key].element_size()
        infos[key] = EntryInfo(key, position, length, tuple(blocks[key]))
        position += length
    return ChunkFileInfo(position, f"{CHECKSUM_ALGORITHM}:{whole}", block_size,
                         tuple(infos[key] for key, _ in entries))


class _Hasher:
    """The whole-file digest and the per-block digests of the pieces written, on a helper thread.

    The caller writes the next piece while the helper hashes the last one (``format.overlapped``). Small
    files hash inline. The pieces must not change until ``finish`` returns (the save holds them still).
    """

    def __init__(self, block_size: int, threaded: bool) -> None:
        self._whole = xxhash.xxh3_128()
        self._block_size = block_size
        # Bounded: a piece of a GPU or strided tensor holds a temporary copy of it until hashed.
        self._hashing: Overlapped[tuple[list[str] | None, memoryview]] = Overlapped(
            self._hash, threaded=threaded, bound=_PIECES_IN_FLIGHT)

    def _hash(self, item: tuple[list[str] | None, memoryview]) -> None:
        blocks, part = item
        self._whole.update(part)
        if blocks is not None:
            size = self._block_size
            blocks.extend(xxhash.xxh3_128(part[b:b + size]).hexdigest() for b in range(0, len(part), size))

    def update(self, blocks: list[str] | None, part: memoryview) -> None:
        """Hash ``part`` into the whole-file digest and, unless ``blocks`` is None, append its block digests."""
        self._hashing.submit((blocks, part))

    def finish(self) -> str:
        """Wait for every piece given so far; the whole-file digest's hex."""
        self._hashing.finish()
        return self._whole.hexdigest()

    def __enter__(self) -> _Hasher:
        return self

    def __exit__(self, *exc: object) -> None:
        self._hashing.__exit__(*exc)


class ChunkStore(Protocol):
    """The part of ``lightning_sharing.storage.CheckpointStore`` the chunk files need (any store fits)."""

    def join(self, base: str, *parts: str) -> str: ...

    def open_write(self, location: str) -> AbstractContextManager[ByteSink]: ...

    def open_read(self, location: str) -> BinaryIO: ...

    def size(self, location: str) -> int | None: ...

    def check_inside(self, root: str, rel: str) -> str | None: ...


class ByteSource(Protocol):
    """Ranged reads of checkpoint files by relative path (a local directory, or an object store)."""

    def size(self, path: str) -> int:
        """The file's size in bytes."""

    def read_into(self, path: str, offset: int, buffers: Sequence[memoryview]) -> None:
        """Fill ``buffers``, in order, with the file's bytes from ``offset`` on; raise if the file ends first."""


class LocalFiles:
    """A ``ByteSource`` over a local checkpoint directory; keeps each file open until ``close()``.

    Example:
        >>> with LocalFiles(Path("step=5.ckpt")) as files:        # doctest: +SKIP
        ...     files.size("model/chunks-00000.safetensors")
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._fds: dict[str, int] = {}

    def _fd(self, path: str) -> int:
        if path not in self._fds:
            try:
                self._fds[path] = os.open(self.root / path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            except FileNotFoundError:
                raise CorruptCheckpointError(f"chunk file {path} is missing from {self.root}") from None
            except OSError as exc:  # ELOOP: the file is a symbolic link
                raise CorruptCheckpointError(f"chunk file {path} in {self.root} cannot be opened ({exc}); a "
                                             "checkpoint's files must be regular files inside it") from None
        return self._fds[path]

    def size(self, path: str) -> int:
        return os.fstat(self._fd(path)).st_size

    def read_into(self, path: str, offset: int, buffers: Sequence[memoryview]) -> None:
        fd = self._fd(path)
        pending = [b for b in buffers if len(b)]
        while pending:
            got = os.preadv(fd, pending, offset)
            if got <= 0:
                raise CorruptCheckpointError(f"chunk file {path} ended at byte {offset}, before the data the "
                                             "index records (truncated?)")
            offset += got
            while pending and got >= len(pending[0]):
                got -= len(pending[0])
                pending.pop(0)
            if got:
                pending[0] = pending[0][got:]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> LocalFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StoreFiles:
    """A ``ByteSource`` over a checkpoint at ``root`` in a ``ChunkStore`` (a local directory, an object store).

    Example:
        >>> with StoreFiles(store, checkpoint) as files:      # doctest: +SKIP
        ...     stats = read_chunks(plan, index, files)
    """

    def __init__(self, store: ChunkStore, root: str) -> None:
        self.store, self.root = store, root
        self._handles: dict[str, BinaryIO] = {}

    def _handle(self, path: str) -> BinaryIO:
        if path not in self._handles:
            problem = self.store.check_inside(self.root, path)
            if problem is not None:
                raise CorruptCheckpointError(f"chunk file {path} in {self.root} {problem}")
            self._handles[path] = self.store.open_read(self.store.join(self.root, path))
        return self._handles[path]

    def size(self, path: str) -> int:
        size = self.store.size(self.store.join(self.root, path))
        if size is None:
            raise CorruptCheckpointError(f"chunk file {path} is missing from {self.root}")
        return size

    def read_into(self, path: str, offset: int, buffers: Sequence[memoryview]) -> None:
        handle = self._handle(path)
        handle.seek(offset)
        for buffer in buffers:
            done = 0
            while done < len(buffer):
                got = handle.readinto(buffer[done:])
                if not got:
                    raise CorruptCheckpointError(f"chunk file {path} ended at byte {offset + done}, before the "
                                                 "data the index records (truncated?)")
                done += got
            offset += len(buffer)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self) -> StoreFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_blocks(source: ByteSource, path: str, begin: int, length: int, block_size: int, blocks: Sequence[str],
                start: int, end: int, into: memoryview | None, what: str) -> torch.Tensor | None:
    """Read bytes ``[start, end)`` of the chunk at ``[begin, begin + length)`` of ``path``, verified.

    Reads the whole blocks covering the range and checks every one against ``blocks`` before
    returning. With ``into`` (``end - start`` bytes of contiguous memory) the range is read straight
    into it and None is returned; otherwise a uint8 tensor holding the range is returned. ``what``
    names the tensor and chunk in errors. If a block proves corrupt, ``into`` may hold part of it.
    """
    first, last = start // block_size, -(-end // block_size)
    low, high = first * block_size, min(last * block_size, length)
    scratch: torch.Tensor | None = None
    if into is None:
        scratch = torch.empty(high - low, dtype=torch.uint8)
        segments = [(low, memoryview(scratch.numpy()))]
    else:
        segments = [(low, memoryview(bytearray(start - low))), (start, into),
                    (end, memoryview(bytearray(high - end)))]
    source.read_into(path, begin + low, [view for _, view in segments])
    for block in range(first, last):
        block_start, block_end = block * block_size, min((block + 1) * block_size, length)
        digest = xxhash.xxh3_128()
        for seg_start, view in segments:
            lo, hi = max(block_start, seg_start), min(block_end, seg_start + len(view))
            if lo < hi:
                digest.update(view[lo - seg_start:hi - seg_start])
        if digest.hexdigest() != blocks[block]:
            raise CorruptCheckpointError(
                f"{what}: block {block} (bytes {begin + block_start}-{begin + block_end} of {path}) has checksum "
                f"{CHECKSUM_ALGORITHM}:{digest.hexdigest()} but the index records {CHECKSUM_ALGORITHM}:"
                f"{blocks[block]}: the file is corrupt (altered after the save)"
            )
    return None if scratch is None else scratch[start - low:end - low]
