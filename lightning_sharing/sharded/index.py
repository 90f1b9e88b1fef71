"""The chunk index of a SHARDED component: per tensor its global shape, dtype and where each chunk lies.

JSON form (``ShardedIndex.to_json()``; it can sit in a component's manifest metadata or in a JSON file
next to the chunk files, whose checksum the manifest then records)::

    {"format": "lightning_sharing.sharded", "version": 1, "checksum_algorithm": "xxh3_128",
     "ties": {"lm_head.weight": "embed.weight"},
     "files": [{"path": "model/chunks-00001.safetensors", "size": 4242, "writer": 1,
                "checksum": "xxh3_128:<32 hex>", "block_size": 1048576}],
     "tensors": {"layers.0.weight": {"dtype": "F32", "shape": [6, 5], "chunks": [
         {"offsets": [3, 0], "sizes": [3, 5], "file": "model/chunks-00001.safetensors",
          "key": "layers.0.weight@3,0", "begin": 200, "length": 60, "writer": 1,
          "blocks": ["<32 hex: xxh3-128 of the chunk's bytes [0, block_size)>", "..."]}]}}}

``begin``/``length`` are the chunk's bytes in the file (the safetensors data of entry ``key``), in
row-major order of the chunk's own shape ``sizes``. ``from_json`` parses untrusted input strictly:
types, ranges, paths (relative, inside the checkpoint), byte ranges inside the recorded file size, one
digest per block, and that each tensor's chunks tile it exactly (no gap, no overlap). ``ties`` maps a
tensor name to the saved tensor it shares memory with (tied weights, stored once).

Example:
    >>> index = ShardedIndex.from_json({"format": "lightning_sharing.sharded", "version": 1,
    ...     "checksum_algorithm": "xxh3_128", "ties": {}, "files": [], "tensors": {}})
    >>> index.tensors
    {}
"""

from __future__ import annotations

import math
import posixpath
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_sharing.errors import CheckpointError, ManifestError
from lightning_sharing.format.safetensors_io import CHECKSUM_ALGORITHM, dtype_from_name
from lightning_sharing.sharded.dtensor_boxes import Box

__all__ = ["INDEX_FORMAT", "INDEX_VERSION", "ChunkRecord", "FileRecord", "ShardedIndex", "TensorRecord",
           "merge_indexes"]

INDEX_FORMAT = "lightning_sharing.sharded"
INDEX_VERSION = 1
_MAX_DIMS = 64
_HEX128 = re.compile(r"^[0-9a-f]{32}$")
_CHECKSUM = re.compile(r"^xxh3_128:[0-9a-f]{32}$")


@dataclass(frozen=True)
class ChunkRecord:
    """One saved chunk: its box in the global tensor and the verified bytes holding it."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    key: str
    begin: int
    length: int
    writer: int
    blocks: tuple[str, ...]

    @property
    def box(self) -> Box:
        return Box(self.offsets, self.sizes)


@dataclass(frozen=True)
class TensorRecord:
    """A saved tensor: safetensors dtype name (``"F32"``), global shape, and its chunks."""

    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[ChunkRecord, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = dtype_from_name(self.dtype)
        assert dtype is not None  # checked when parsed or built
        return dtype


@dataclass(frozen=True)
class FileRecord:
    """A chunk file: relative path, size, whole-file checksum, block size of its digests, writing rank."""

    path: str
    size: int
    checksum: str
    block_size: int
    writer: int


@dataclass(frozen=True)
class ShardedIndex:
    """Every tensor of a SHARDED component and every chunk file, as saved (``ties``: alias -> saved name)."""

    tensors: Mapping[str, TensorRecord]
    files: Mapping[str, FileRecord]
    ties: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": INDEX_FORMAT, "version": INDEX_VERSION, "checksum_algorithm": CHECKSUM_ALGORITHM,
            "ties": dict(sorted(self.ties.items())),
            "files": [{"path": f.path, "size": f.size, "checksum": f.checksum, "block_size": f.block_size,
                       "writer": f.writer} for f in sorted(self.files.values(), key=lambda f: f.path)],
            "tensors": {name: {"dtype": t.dtype, "shape": list(t.shape), "chunks": [
                {"offsets": list(c.offsets), "sizes": list(c.sizes), "file": c.file, "key": c.key,
                 "begin": c.begin, "length": c.length, "writer": c.writer, "blocks": list(c.blocks)}
                for c in t.chunks]} for name, t in sorted(self.tensors.items())},
        }

    @classmethod
    def from_json(cls, data: Any, *, complete: bool = True) -> ShardedIndex:
        """Parse and fully validate an index from untrusted JSON; ``ManifestError`` says what is wrong.

        ``complete=False`` parses one rank's partial index (``write_chunks``' result), whose chunks
        need not tile the tensors yet.
        """
        _fields(data, "the sharded index", {"format", "version", "checksum_algorithm", "ties", "files", "tensors"})
        _expect(data["format"] == INDEX_FORMAT, f"format is {data['format']!r}, expected {INDEX_FORMAT!r}")
        if data["version"] != INDEX_VERSION:
            raise ManifestError(f"sharded index version {data['version']!r} is not supported (this "
                                f"lightning_sharing reads version {INDEX_VERSION}); upgrade lightning_sharing")
        _expect(data["checksum_algorithm"] == CHECKSUM_ALGORITHM,
                f"checksum_algorithm {data['checksum_algorithm']!r} is not {CHECKSUM_ALGORITHM!r}")
        _expect(isinstance(data["files"], list), "files is not a list")
        files: dict[str, FileRecord] = {}
        for entry in data["files"]:
            record = _file_record(entry)
            _expect(record.path not in files, f"file {record.path!r} is listed twice")
            files[record.path] = record
        _expect(isinstance(data["tensors"], dict), "tensors is not an object")
        tensors = {name: _tensor_record(name, entry, files) for name, entry in data["tensors"].items()}
        ties = data["ties"]
        _expect(isinstance(ties, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in ties.items()),
                "ties is not an object of tensor names")
        for alias, saved in ties.items():
            _expect(saved in tensors and alias not in tensors,
                    f"tie {alias!r} -> {saved!r} does not point from an unsaved name to a saved tensor")
        index = cls(tensors, files, dict(ties))
        if complete:
            index.validate()
        return index

    def validate(self) -> None:
        """Check that every tensor's chunks tile its global shape exactly; ``ManifestError`` if not."""
        for name, record in self.tensors.items():
            _check_tiling(name, record)

    def hf_index(self) -> dict[str, Any] | None:
        """A Hugging Face ``model.safetensors.index.json`` over the chunk files, when every tensor is
        saved whole in one chunk (a pipeline stage's or a DDP model's tensors); None otherwise.

        The chunk of a whole tensor is stored under the tensor's own name, so ``transformers`` and
        plain ``safetensors`` can load it; tied names are listed under ``metadata.tied``.
        """
        weight_map: dict[str, str] = {}
        total = 0
        for name, record in sorted(self.tensors.items()):
            if len(record.chunks) != 1 or record.chunks[0].sizes != record.shape or record.chunks[0].key != name:
                return None
            weight_map[name] = record.chunks[0].file
            total += record.chunks[0].length
        if not weight_map:
            return None
        metadata: dict[str, Any] = {"total_size": total, "format": "pt"}
        if self.ties:
            metadata["tied"] = dict(sorted(self.ties.items()))
        return {"metadata": metadata, "weight_map": weight_map}

    def bytes_by_writer(self) -> dict[int, int]:
        """Chunk bytes written by each rank (for reports and ``inspect``)."""
        totals: dict[int, int] = {}
        for record in self.tensors.values():
            for chunk in record.chunks:
                totals[chunk.writer] = totals.get(chunk.writer, 0) + chunk.length
        return dict(sorted(totals.items()))


def merge_indexes(parts: Iterable[ShardedIndex]) -> ShardedIndex:
    """Join the partial indexes each rank's ``write_chunks`` returned into the component's index.

    Raises ``CheckpointError`` if ranks disagree on a tensor's shape or dtype, if a file is listed by
    two ranks, or if the joined chunks do not tile every tensor exactly once (a chunk written twice or
    by nobody: the ranks did not hold the same tensors, which a SHARDED component requires).

    Example:
        >>> parts = [None] * world_size                                              # doctest: +SKIP
        >>> dist.all_gather_object(parts, part.to_json())                            # doctest: +SKIP
        >>> index = merge_indexes(ShardedIndex.from_json(p, complete=False) for p in parts)  # doctest: +SKIP
    """
    tensors: dict[str, tuple[str, tuple[int, ...], list[ChunkRecord]]] = {}
    files: dict[str, FileRecord] = {}
    ties: dict[str, str] = {}
    for part in parts:
        for alias, saved in part.ties.items():
            if ties.setdefault(alias, saved) != saved:
                raise CheckpointError(f"tensor {alias!r} is tied to {ties[alias]!r} on one rank and to {saved!r} "
                                      "on another; a SHARDED state must have the same ties on every rank")
        for path, file in part.files.items():
            if path in files:
                raise CheckpointError(f"chunk file {path} was written by ranks {files[path].writer} and {file.writer}")
            files[path] = file
        for name, record in part.tensors.items():
            dtype, shape, chunks = tensors.setdefault(name, (record.dtype, record.shape, []))
            if (dtype, shape) != (record.dtype, record.shape):
                raise CheckpointError(
                    f"tensor {name!r} has global shape {list(shape)} and dtype {dtype} on one rank but shape "
                    f"{list(record.shape)} and dtype {record.dtype} on another; a SHARDED tensor must be the "
                    "same global tensor on every rank"
                )
            chunks.extend(record.chunks)
    merged = ShardedIndex({name: TensorRecord(dtype, shape, tuple(sorted(chunks, key=lambda c: c.offsets)))
                           for name, (dtype, shape, chunks) in sorted(tensors.items())}, files, ties)
    try:
        merged.validate()
    except ManifestError as exc:
        raise CheckpointError(f"the ranks' chunks do not add up: {exc}") from None
    return merged


def _check_tiling(name: str, record: TensorRecord) -> None:
    total = math.prod(record.shape)
    covered = sum(math.prod(c.sizes) for c in record.chunks)
    if covered != total:
        raise ManifestError(f"invalid sharded index: tensor {name!r} of shape {list(record.shape)} has "
                            f"{total} elements but its chunks hold {covered}")
    if not record.shape:
        return
    # Sweep along the dim with the most distinct chunk offsets: only chunks overlapping there can overlap.
    dim = max(range(len(record.shape)), key=lambda d: len({c.offsets[d] for c in record.chunks}))
    active: list[ChunkRecord] = []
    for chunk in sorted(record.chunks, key=lambda c: c.offsets[dim]):
        active = [a for a in active if a.offsets[dim] + a.sizes[dim] > chunk.offsets[dim]]
        for other in active:
            if chunk.box.intersect(other.box) is not None:
                raise ManifestError(f"invalid sharded index: tensor {name!r}: chunks at offsets "
                                    f"{list(other.offsets)} and {list(chunk.offsets)} overlap")
        active.append(chunk)


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise ManifestError(f"invalid sharded index: {message}")


def _fields(data: Any, what: str, names: set[str]) -> None:
    _expect(isinstance(data, dict), f"{what} is not an object")
    _expect(set(data) == names, f"{what} has fields {sorted(data)}, expected {sorted(names)}")


def _int(value: Any, what: str, minimum: int = 0) -> int:
    _expect(isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
            f"{what} is {value!r}, not an integer >= {minimum}")
    return value


def _ints(value: Any, what: str, length: int, minimum: int = 0) -> tuple[int, ...]:
    _expect(isinstance(value, list) and len(value) == length, f"{what} is {value!r}, not a list of {length} integers")
    return tuple(_int(v, what, minimum) for v in value)


def _path(value: Any) -> str:
    _expect(isinstance(value, str) and bool(value), f"file path {value!r} is not a non-empty string")
    bad = (value.startswith("/") or "\\" in value or "\x00" in value or re.match(r"^[A-Za-z]:", value)
           or any(p in ("", ".", "..") for p in value.split("/")) or posixpath.normpath(value) != value)
    _expect(not bad, f"file path {value!r} is not a normalised relative path inside the checkpoint")
    return value


def _file_record(entry: Any) -> FileRecord:
    _fields(entry, "a file entry", {"path", "size", "checksum", "block_size", "writer"})
    path = _path(entry["path"])
    _expect(isinstance(entry["checksum"], str) and bool(_CHECKSUM.match(entry["checksum"])),
            f"file {path!r}: checksum {entry['checksum']!r} is not 'xxh3_128:<32 hex digits>'")
    block_size = _int(entry["block_size"], f"file {path!r}: block_size", 8)
    _expect(block_size % 8 == 0, f"file {path!r}: block_size {block_size} is not a multiple of 8")
    return FileRecord(path, _int(entry["size"], f"file {path!r}: size"), entry["checksum"], block_size,
                      _int(entry["writer"], f"file {path!r}: writer"))


_TENSOR_FIELDS = frozenset({"dtype", "shape", "chunks"})


def _tensor_record(name: Any, entry: Any, files: Mapping[str, FileRecord]) -> TensorRecord:
    dtype = dtype_from_name(entry["dtype"]) if type(entry) is dict and type(entry.get("dtype")) is str else None
    shape = entry.get("shape") if dtype is not None else None
    if (dtype is not None and type(name) is str and name and entry.keys() == _TENSOR_FIELDS and type(shape) is list
            and len(shape) <= _MAX_DIMS and all(type(n) is int and n >= 0 for n in shape)
            and type(entry["chunks"]) is list):
        # Every check below passes (checked without formatting their messages: N ranks' parts list every tensor).
        dims, element = tuple(shape), dtype.itemsize  # type: ignore[union-attr]
        return TensorRecord(entry["dtype"], dims, tuple(
            _valid_chunk(c, dims, element, files) or _chunk_record(name, c, dims, element, files)
            for c in entry["chunks"]))
    _expect(isinstance(name, str) and bool(name), f"tensor name {name!r} is not a non-empty string")
    _fields(entry, f"tensor {name!r}", {"dtype", "shape", "chunks"})
    dtype = dtype_from_name(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    _expect(dtype is not None, f"tensor {name!r}: unknown dtype {entry['dtype']!r}")
    shape = entry["shape"]
    _expect(isinstance(shape, list) and len(shape) <= _MAX_DIMS, f"tensor {name!r}: shape {shape!r} is not a list")
    shape = _ints(shape, f"tensor {name!r}: shape", len(shape))
    _expect(isinstance(entry["chunks"], list), f"tensor {name!r}: chunks is not a list")
    element = dtype.itemsize  # type: ignore[union-attr]
    chunks = tuple(_valid_chunk(c, shape, element, files) or _chunk_record(name, c, shape, element, files)
                   for c in entry["chunks"])
    return TensorRecord(entry["dtype"], shape, chunks)


_CHUNK_FIELDS = frozenset({"offsets", "sizes", "file", "key", "begin", "length", "writer", "blocks"})


def _valid_chunk(entry: Any, shape: tuple[int, ...], element: int,
                 files: Mapping[str, FileRecord]) -> ChunkRecord | None:
    """``_chunk_record``'s result for an entry that passes every one of its checks, else None (which then finds
    and names the problem): the same checks without a message formatted per field. A merged index of a job on
    thousands of ranks holds millions of chunks, parsed on rank 0 at every save's commit and on every rank at load.
    """
    if type(entry) is not dict or entry.keys() != _CHUNK_FIELDS:
        return None
    offsets, sizes, path, key = entry["offsets"], entry["sizes"], entry["file"], entry["key"]
    begin, length, writer, blocks = entry["begin"], entry["length"], entry["writer"], entry["blocks"]
    if type(offsets) is not list or type(sizes) is not list or len(offsets) != len(shape) or len(sizes) != len(shape):
        return None
    for o, n, whole in zip(offsets, sizes, shape, strict=True):
        if type(o) is not int or type(n) is not int or o < 0 or n < 1 or o + n > whole:
            return None
    file = files.get(path) if type(path) is str else None  # the listed paths passed ``_path`` already
    if file is None or type(key) is not str or type(begin) is not int or type(length) is not int:
        return None
    if type(writer) is not int or begin < 0 or writer < 0 or length != math.prod(sizes) * element:
        return None
    if begin + length > file.size or type(blocks) is not list or len(blocks) != -(-length // file.block_size):
        return None
    match = _HEX128.match
    if not all(type(b) is str and match(b) for b in blocks):
        return None
    return ChunkRecord(tuple(offsets), tuple(sizes), path, key, begin, length, writer, tuple(blocks))


def _chunk_record(name: str, entry: Any, shape: tuple[int, ...], element: int,
                  files: Mapping[str, FileRecord]) -> ChunkRecord:
    what = f"tensor {name!r}: a chunk"
    _fields(entry, what, {"offsets", "sizes", "file", "key", "begin", "length", "writer", "blocks"})
    offsets = _ints(entry["offsets"], f"{what}'s offsets", len(shape))
    sizes = _ints(entry["sizes"], f"{what}'s sizes", len(shape), 1)
    _expect(all(o + s <= n for o, s, n in zip(offsets, sizes, shape, strict=True)),
            f"{what} at offsets {list(offsets)} of sizes {list(sizes)} lies outside the shape {list(shape)}")
    path = _path(entry["file"])
    _expect(path in files, f"{what} refers to file {path!r}, which the index does not list")
    _expect(isinstance(entry["key"], str), f"{what}: key {entry['key']!r} is not a string")
    begin, length = _int(entry["begin"], f"{what}'s begin"), _int(entry["length"], f"{what}'s length")
    _expect(length == math.prod(sizes) * element,
            f"{what} at offsets {list(offsets)}: length {length} is not {math.prod(sizes)} elements of {element} bytes")
    file = files[path]
    _expect(begin + length <= file.size,
            f"{what}: bytes {begin}-{begin + length} lie outside {path} ({file.size} bytes)")
    blocks = entry["blocks"]
    count = -(-length // file.block_size)
    _expect(isinstance(blocks, list) and len(blocks) == count and all(
        isinstance(b, str) and _HEX128.match(b) for b in blocks),
        f"{what} at offsets {list(offsets)}: blocks must be {count} xxh3-128 hex digests")
    return ChunkRecord(offsets, sizes, path, entry["key"], begin, length,
                       _int(entry["writer"], f"{what}'s writer"), tuple(blocks))
