"""Safetensors files written and read in one streaming pass, with the checksum computed on the way.

The files are standard safetensors (an 8-byte little-endian header length, a JSON header padded
with spaces to a multiple of 8, then the tensors' bytes), readable by ``safetensors.torch.load_file``.
Writing streams each tensor's memory straight to the file in chunks, so a save needs no serialized
copy of the state, and hashes each chunk while it is still in the CPU cache. Reading reads each
tensor straight into its own freshly allocated memory, hashing as it goes: the bytes are read once
and nothing is returned unless the whole file matches its checksum. File writes, reads and the xxh3 hash all
release the GIL, so a background save does not stall a training thread.

Example:
    >>> size, checksum = write_tensor_file(Path("model-00001-of-00001.safetensors"), {"w": torch.ones(2)})
    >>> tensors = read_tensor_file(Path("model-00001-of-00001.safetensors"), checksum)  # doctest: +SKIP
"""

from __future__ import annotations

import io
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO, Protocol

import torch
import xxhash

from lightning_sharing._faults import fault_point
from lightning_sharing.errors import CheckpointError, CorruptCheckpointError
from lightning_sharing.format.overlapped import Overlapped
from lightning_sharing.format.parallel_read import read_ranges

__all__ = [
    "CHECKSUM_ALGORITHM",
    "ByteSink",
    "DescriptorSink",
    "bytes_checksum",
    "check_checksum",
    "dtype_from_name",
    "dtype_name",
    "encode_header",
    "file_checksum",
    "nbytes",
    "read_tensor_file",
    "read_tensors",
    "stream_checksum",
    "tensor_bytes",
    "tensors_checksum",
    "tensors_file_size",
    "write_blob",
    "write_tensor_file",
    "write_tensors",
]

CHECKSUM_ALGORITHM = "xxh3_128"
_CHUNK = 16 * 1024 * 1024
_MAX_HEADER = 100 * 1024 * 1024
_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.complex64: "C64", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
for _name in ("uint16", "uint32", "uint64"):  # unsigned types newer than torch 2.3
    if hasattr(torch, _name):
        _DTYPE_NAMES[getattr(torch, _name)] = f"U{_name[4:]}"
for _name, _code in (("float8_e4m3fnuz", "F8_E4M3FNUZ"), ("float8_e5m2fnuz", "F8_E5M2FNUZ")):  # AMD's float8 (ROCm)
    if hasattr(torch, _name):
        _DTYPE_NAMES[getattr(torch, _name)] = _code
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.float32`` -> ``"F32"``); ``CheckpointError`` if none."""
    if dtype not in _DTYPE_NAMES:
        raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors")
    return _DTYPE_NAMES[dtype]


def dtype_from_name(name: str) -> torch.dtype | None:
    """The torch dtype of a safetensors dtype name (``"F32"`` -> ``torch.float32``), or None if unknown."""
    return _DTYPES.get(name)


def encode_header(tensors: Mapping[str, torch.Tensor], order: list[str],
                  metadata: Mapping[str, str] | None = None) -> bytes:
    """The 8-byte length and padded JSON header of a safetensors file holding ``tensors`` in ``order``.

    The data that follows must be each tensor's bytes in that order, back to back.
    """
    return _header(tensors, order, metadata or {})


def nbytes(tensor: torch.Tensor) -> int:
    """Bytes of a tensor's data."""
    return tensor.numel() * tensor.element_size()


def stream_checksum(handle: BinaryIO) -> str:
    """``"xxh3_128:<hex>"`` of the rest of a binary stream, read in chunks."""
    digest = xxhash.xxh3_128()
    while chunk := handle.read(_CHUNK):
        digest.update(chunk)
    return f"{CHECKSUM_ALGORITHM}:{digest.hexdigest()}"


def file_checksum(path: str | os.PathLike[str]) -> str:
    """``"xxh3_128:<hex>"`` of a local file's bytes."""
    with open(path, "rb", buffering=0) as handle:
        return stream_checksum(handle)


def bytes_checksum(data: bytes) -> str:
    """``"xxh3_128:<hex>"`` of a byte string (the same as the file checksum of a file holding it)."""
    return f"{CHECKSUM_ALGORITHM}:{xxhash.xxh3_128(data).hexdigest()}"


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's data as bytes (a CPU, contiguous copy only where the tensor is not one already)."""
    flat = tensor.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return memoryview(flat.contiguous().view(torch.uint8).numpy())


def _header(tensors: Mapping[str, torch.Tensor], order: list[str], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        tensor = tensors[name]
        if tensor.dtype not in _DTYPE_NAMES:
            raise CheckpointError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
        size = nbytes(tensor)
        header[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # keeps the data 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(text)) + text


class _OverlappedDigest:
    """xxh3-128 of a stream of chunks, computed on a helper thread while the caller reads or writes the next.

    Both the file I/O and xxhash release the GIL, so on a machine with a spare core hashing costs almost
    nothing on top of the I/O. Files smaller than a few chunks hash inline.
    """

    def __init__(self, size: int) -> None:
        self._digest = xxhash.xxh3_128()
        self._hashing: Overlapped[memoryview] = Overlapped(self._digest.update, threaded=size >= 4 * _CHUNK)

    def update(self, chunk: memoryview) -> None:
        self._hashing.submit(chunk)

    def checksum(self) -> str:
        self._hashing.finish()
        return f"{CHECKSUM_ALGORITHM}:{self._digest.hexdigest()}"

    def __enter__(self) -> _OverlappedDigest:
        return self

    def __exit__(self, *exc: object) -> None:
        self._hashing.__exit__(*exc)


class ByteSink(Protocol):
    """Where a file's bytes go (a store's writer): ``write`` takes every byte it is given."""

    def write(self, data: memoryview | bytes) -> None: ...


def _write_all(sink: ByteSink, view: memoryview, digest: _OverlappedDigest) -> int:
    for start in range(0, len(view), _CHUNK):
        chunk = view[start:start + _CHUNK]
        sink.write(chunk)
        digest.update(chunk)
    return len(view)


def write_tensors(sink: ByteSink, tensors: Mapping[str, torch.Tensor],
                  metadata: Mapping[str, str] | None = None) -> tuple[int, str]:
    """Stream ``tensors`` into ``sink`` as one safetensors file; returns ``(size, checksum)``.

    Tensors are laid out largest element size first, so every tensor is aligned in the file.
    """
    order = _order(tensors)
    header = _header(tensors, order, metadata or {"format": "pt"})
    with _OverlappedDigest(sum(nbytes(t) for t in tensors.values())) as digest:
        size = _write_all(sink, memoryview(header), digest)
        fault_point("save:write")
        for name in order:
            if tensors[name].numel():
                size += _write_all(sink, tensor_bytes(tensors[name]), digest)
        return size, digest.checksum()


def _order(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    return sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))


class _Discard:
    def write(self, data: memoryview | bytes) -> None:
        pass


def tensors_file_size(tensors: Mapping[str, torch.Tensor]) -> int:
    """The size of the file ``write_tensors`` makes of ``tensors`` (its header is built; no data is touched)."""
    return len(_header(tensors, _order(tensors), {"format": "pt"})) + sum(nbytes(t) for t in tensors.values())


def tensors_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """The checksum of the file ``write_tensors`` makes of ``tensors``, computed without writing it."""
    return write_tensors(_Discard(), tensors)[1]


def write_blob(sink: ByteSink, data: bytes) -> tuple[int, str]:
    """Write ``data`` (a JSON file) into ``sink``; returns ``(size, checksum)``."""
    sink.write(data)
    fault_point("save:write")
    return len(data), bytes_checksum(data)


class DescriptorSink:
    """A ``ByteSink`` writing to an OS file descriptor (no Python-level buffering: the chunks are large)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.write(self.fd, view[done:])


def write_tensor_file(path: Path, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> tuple[int, str]:
    """Write ``tensors`` as a safetensors file at a local ``path`` and fsync it; returns ``(size, checksum)``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        size, checksum = write_tensors(DescriptorSink(fd), tensors, metadata)
        os.fsync(fd)
    finally:
        os.close(fd)
    return size, checksum


def _entry_layout(name: str, entry: object, data_size: int) -> tuple[torch.dtype, list[int], int, int]:
    if not isinstance(entry, dict):
        raise ValueError(f"entry {name!r} is not an object")
    dtype = _DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if dtype is None:
        raise ValueError(f"tensor {name!r} has unknown dtype {entry.get('dtype')!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise ValueError(f"tensor {name!r} has a malformed shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_size):
        raise ValueError(f"tensor {name!r} has data offsets {offsets!r} outside the file")
    numel = 1
    for dim in shape:
        numel *= dim
    if offsets[1] - offsets[0] != numel * torch.empty((), dtype=dtype).element_size():
        raise ValueError(f"tensor {name!r}: data offsets {offsets} do not match shape {shape} and dtype {dtype}")
    return dtype, shape, offsets[0], offsets[1]


def _read_into(handle: BinaryIO, view: memoryview, digest: _OverlappedDigest, name: str) -> None:
    done = 0
    while done < len(view):
        got = handle.readinto(view[done:done + _CHUNK])
        if not got:
            raise CorruptCheckpointError(f"{name} ended early while being read (truncated?)")
        digest.update(view[done:done + got])
        done += got


def _parse_header(raw: bytes, data_size: int) -> list[tuple[str, torch.dtype, list[int], int, int]]:
    header = json.loads(raw.decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    layout = sorted(((*_entry_layout(name, entry, data_size), name) for name, entry in header.items()
                     if name != "__metadata__"), key=lambda item: item[2])
    position = 0
    for _, _, begin, end, name in layout:
        if begin != position:
            raise ValueError(f"tensor {name!r} starts at {begin}, not {position}: the data has a gap or overlap")
        position = end
    if position != data_size:
        raise ValueError(f"the tensors cover {position} bytes but the file holds {data_size}")
    return [(name, dtype, shape, begin, end) for dtype, shape, begin, end, name in layout]


def read_tensors(handle: BinaryIO, size: int, name: str, checksum: str | None = None,
                 into: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file of ``size`` bytes from ``handle`` (at its start) in one pass, verifying ``checksum``.

    Each tensor is read straight into its own memory while the file is hashed; nothing is returned
    unless the whole file matches ``checksum`` (when given). ``into`` may map names to existing
    contiguous CPU tensors of the same shape and dtype (the live parameters): those are read into
    in place, which saves an allocation and a copy; if the file then proves corrupt, they hold part
    of it. A local file (``handle`` an unbuffered ``open(path, "rb", buffering=0)``) is read on
    several threads (``format.parallel_read``). Raises ``CorruptCheckpointError`` naming the file
    (``name``) for a wrong checksum or a malformed file.
    """
    local_fd = handle.fileno() if isinstance(handle, io.FileIO) else None
    # A local file's data is hashed by the reading threads themselves, so only a stream gets a hashing thread.
    with _OverlappedDigest(size if local_fd is None else 0) as digest:
        layout, data_start = _read_layout(handle, size, name, checksum, digest)
        tensors = {tensor_name: _destination(into, tensor_name, dtype, shape)
                   for tensor_name, dtype, shape, _, _ in layout}
        ranges = [(data_start + begin, memoryview(tensors[tensor_name].reshape(-1).view(torch.uint8).numpy()))
                  for tensor_name, _, _, begin, end in layout if end > begin]
        if local_fd is not None:
            read_ranges(local_fd, ranges, name, digest.update if checksum is not None else None)
        else:
            for _, view in ranges:
                _read_into(handle, view, digest, name)
        actual = digest.checksum()
    if checksum is not None:
        check_checksum(name, actual, checksum)
    return tensors


def _read_layout(handle: BinaryIO, size: int, name: str, checksum: str | None,
                 digest: _OverlappedDigest) -> tuple[list[tuple[str, torch.dtype, list[int], int, int]], int]:
    """The tensors' layout from the file's header (read and hashed) and the offset where their data starts."""
    try:
        prefix = bytearray(8)
        _read_into(handle, memoryview(prefix), digest, name)
        (length,) = struct.unpack("<Q", prefix)
        if length > min(_MAX_HEADER, size - 8):
            raise ValueError(f"header length {length} exceeds the file or {_MAX_HEADER} bytes")
        raw = bytearray(length)
        _read_into(handle, memoryview(raw), digest, name)
        return _parse_header(bytes(raw), size - 8 - length), 8 + length
    except (ValueError, UnicodeDecodeError, RecursionError, CorruptCheckpointError) as exc:
        if checksum is not None:  # for an unreadable file a checksum mismatch is the more useful message
            handle.seek(0)
            check_checksum(name, stream_checksum(handle), checksum)
        raise CorruptCheckpointError(f"safetensors file {name} cannot be read: {exc}") from exc


def read_tensor_file(path: Path, checksum: str | None = None,
                     into: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``read_tensors`` of a local file."""
    with open(path, "rb", buffering=0) as handle:
        return read_tensors(handle, os.fstat(handle.fileno()).st_size, Path(path).name, checksum, into)


def _destination(into: Mapping[str, torch.Tensor] | None, name: str, dtype: torch.dtype,
                 shape: list[int]) -> torch.Tensor:
    existing = into.get(name) if into is not None else None
    if (existing is not None and existing.device.type == "cpu" and existing.dtype == dtype
            and list(existing.shape) == shape and existing.is_contiguous() and existing.numel()):
        return existing.detach()
    return torch.empty(shape, dtype=dtype)


def check_checksum(name: str, actual: str, expected: str) -> None:
    """Raise ``CorruptCheckpointError`` naming file ``name`` when ``actual`` differs from ``expected``."""
    if actual != expected:
        raise CorruptCheckpointError(
            f"{name} has checksum {actual} but the manifest records {expected}: the file is corrupt "
            "(altered after the save)"
        )
