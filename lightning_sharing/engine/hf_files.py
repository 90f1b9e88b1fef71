"""A Hugging Face safetensors directory described as the SHARDED reader's index: one chunk per tensor.

``read_hf_directory`` reads ``model.safetensors.index.json`` (or finds a single ``model.safetensors``) and the
header of every file it names (a few KB each, never the tensors), checks them strictly (relative file names, known
dtypes, byte ranges inside the file that match each tensor's shape), and returns a ``ShardedIndex`` in which every
tensor is one whole chunk at its offset in its file. Such files carry no block digests: they are read with
``read_chunks(..., verified=False)``. ``open_hf_files`` gives the byte source to read them from: a local directory
(symbolic links followed, as in the Hugging Face cache) or a URL through ``storage.store_for``.

Example:
    >>> index = read_hf_directory("gpt2-export")                                       # doctest: +SKIP
    >>> index.tensors["transformer.wte.weight"].shape                                   # doctest: +SKIP
    (97, 32)
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import struct
from collections.abc import Sequence
from typing import Any, Protocol

from lightning_sharing.errors import CheckpointError, CheckpointNotFoundError
from lightning_sharing.format.safetensors_io import dtype_from_name
from lightning_sharing.sharded.chunkfile import StoreFiles
from lightning_sharing.sharded.index import ChunkRecord, FileRecord, ShardedIndex, TensorRecord
from lightning_sharing.storage import is_url, store_for

__all__ = ["HF_INDEX", "HF_SINGLE", "HFFiles", "open_hf_files", "read_hf_directory"]

HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
_MAX_HEADER = 100 * 1024 * 1024
_MAX_INDEX = 64 * 1024 * 1024


class HFFiles(Protocol):
    """Ranged reads of the files of a Hugging Face directory by relative name (a ``ByteSource`` that can tell)."""

    def exists(self, path: str) -> bool: ...

    def size(self, path: str) -> int: ...

    def read_into(self, path: str, offset: int, buffers: Sequence[memoryview]) -> None: ...

    def close(self) -> None: ...


class _LocalHF:
    """A local directory; files are opened following symbolic links (the Hugging Face cache links to blobs)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._fds: dict[str, int] = {}

    def _fd(self, path: str) -> int:
        if path not in self._fds:
            try:
                self._fds[path] = os.open(os.path.join(self.root, path), os.O_RDONLY)
            except OSError as exc:
                raise CheckpointError(f"cannot open {path} in {self.root}: {exc}") from None
        return self._fds[path]

    def exists(self, path: str) -> bool:
        return os.path.isfile(os.path.join(self.root, path))

    def size(self, path: str) -> int:
        return os.fstat(self._fd(path)).st_size

    def read_into(self, path: str, offset: int, buffers: Sequence[memoryview]) -> None:
        fd = self._fd(path)
        for buffer in buffers:
            done = 0
            while done < len(buffer):
                got = os.preadv(fd, [buffer[done:]], offset + done)
                if got <= 0:
                    raise CheckpointError(f"{path} in {self.root} ended at byte {offset + done}, before the data "
                                          "its header describes (truncated?)")
                done += got
            offset += len(buffer)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class _StoreHF(StoreFiles):
    """A URL, through the checkpoint store for it (``store_for``)."""

    def exists(self, path: str) -> bool:
        return self.store.size(self.store.join(self.root, path)) is not None


def open_hf_files(path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> HFFiles:
    """The files of the Hugging Face directory ``path`` (a local path, or an fsspec URL)."""
    text = os.fspath(path)
    if is_url(text) and not text.startswith("file://"):
        store = store_for(text, storage_options)
        return _StoreHF(store, store.normalize(text))  # type: ignore[arg-type]
    return _LocalHF(text.removeprefix("file://"))


def _read(files: HFFiles, path: str, offset: int, size: int) -> bytes:
    buffer = bytearray(size)
    files.read_into(path, offset, [memoryview(buffer)])
    return bytes(buffer)


def _json(raw: bytes, what: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{what} is not valid JSON ({exc})") from None


def _weight_map(files: HFFiles, where: str) -> dict[str, str]:
    """Tensor name -> file, from the index, or every tensor of the single ``model.safetensors``."""
    if files.exists(HF_INDEX):
        size = files.size(HF_INDEX)
        if size > _MAX_INDEX:
            raise CheckpointError(f"{where}/{HF_INDEX} is {size} bytes, too big for an index")
        index = _json(_read(files, HF_INDEX, 0, size), f"{where}/{HF_INDEX}")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in weight_map.items()):
            raise CheckpointError(f"{where}/{HF_INDEX} has no weight_map of tensor name -> file name")
        for file in set(weight_map.values()):
            parts = file.split("/")
            if (file.startswith("/") or "\\" in file or any(p in ("", ".", "..") for p in parts)
                    or posixpath.normpath(file) != file or not file.endswith(".safetensors")):
                raise CheckpointError(f"{where}/{HF_INDEX} names {file!r}, which is not a .safetensors file "
                                      "inside the directory")
        return dict(weight_map)
    if files.exists(HF_SINGLE):
        return {}
    raise CheckpointNotFoundError(f"{where} holds neither {HF_INDEX} nor {HF_SINGLE}: it is not a Hugging Face "
                                  "safetensors directory")


def _header(files: HFFiles, rel: str, where: str) -> tuple[int, int, dict[str, Any]]:
    """(file size, data start, header) of one safetensors file, checked."""
    size = files.size(rel)
    if size < 8:
        raise CheckpointError(f"{where}/{rel} is {size} bytes: not a safetensors file")
    (length,) = struct.unpack("<Q", _read(files, rel, 0, 8))
    if length > min(_MAX_HEADER, size - 8):
        raise CheckpointError(f"{where}/{rel}: a safetensors header of {length} bytes does not fit the file")
    header = _json(_read(files, rel, 8, length), f"the header of {where}/{rel}")
    if not isinstance(header, dict):
        raise CheckpointError(f"the header of {where}/{rel} is not an object")
    return size, 8 + length, header


def _tensor(name: str, entry: Any, rel: str, size: int, start: int, where: str) -> TensorRecord:
    what = f"tensor {name!r} in {where}/{rel}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{what}: its header entry is not an object")
    dtype_code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    dtype = dtype_from_name(dtype_code) if isinstance(dtype_code, str) else None
    if dtype is None:
        raise CheckpointError(f"{what} has dtype {dtype_code!r}, which torch cannot hold")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                            for d in shape)):
        raise CheckpointError(f"{what}: shape {shape!r} is not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and not isinstance(o, bool)
                                                                   for o in offsets)):
        raise CheckpointError(f"{what}: data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    element = dtype.itemsize
    if not (0 <= begin <= end and start + end <= size and end - begin == math.prod(shape) * element):
        raise CheckpointError(f"{what}: bytes {offsets} do not hold shape {shape} of {dtype_code} inside the "
                              f"{size - start} bytes of data (the file is truncated or not safetensors)")
    sizes = tuple(shape)
    chunk = ChunkRecord((0,) * len(sizes), sizes, rel, name, start + begin, end - begin, 0, ())
    return TensorRecord(dtype_code, sizes, (chunk,))  # type: ignore[arg-type]


def read_hf_directory(files: HFFiles, where: str) -> ShardedIndex:
    """Every tensor of the Hugging Face directory in ``files`` as a one-chunk record (``where`` names it in errors).

    Raises ``CheckpointNotFoundError`` when it is no such directory and ``CheckpointError`` naming the file and the
    tensor for anything malformed (a tensor the index maps to a file that lacks it, a byte range outside the file).
    """
    weight_map = _weight_map(files, where)
    names_by_file: dict[str, list[str] | None] = {}
    for name, rel in sorted(weight_map.items()):
        names_by_file.setdefault(rel, []).append(name)  # type: ignore[union-attr]
    if not weight_map:
        names_by_file[HF_SINGLE] = None  # every tensor in it
    tensors: dict[str, TensorRecord] = {}
    records: dict[str, FileRecord] = {}
    for rel, names in sorted(names_by_file.items()):
        if not files.exists(rel):
            raise CheckpointError(f"{where}/{HF_INDEX} maps tensors to {rel}, which is missing")
        size, start, header = _header(files, rel, where)
        records[rel] = FileRecord(rel, size, "", 0, 0)
        wanted = [n for n in header if n != "__metadata__"] if names is None else names
        for name in wanted:
            if name not in header:
                raise CheckpointError(f"{where}/{HF_INDEX} maps tensor {name!r} to {rel}, which does not hold it")
            tensors[name] = _tensor(name, header[name], rel, size, start, where)
    return ShardedIndex(tensors, records)
