"""The local tier's files on one node: what a step directory holds, how it is written, checked and read back.

Layout under a node's directory (``LocalTier.directory_for(node)``)::

    own/step_<N>/rank-<r>.safetensors       each rank of the node: its state of every component but GLOBAL/REPLICATED
    own/step_<N>/shared-<j>.safetensors     local rank j: part j of the node's copy of the GLOBAL and REPLICATED
                                            components (part 0 also holds the GLOBAL state and their structures)
    own/step_<N>/COMPLETE.json              the node's first rank, last: sizes and checksums of the files above
    replica_of_<m>/step_<N>/...             the same files of node m, received over the process group

A step directory is written as ``.tmp-step_<N>`` beside its final name and renamed into place once every file and
``COMPLETE.json`` are durable, so a step directory without a valid ``COMPLETE.json`` is never used. A bundle file is
one safetensors file: each component's tensors under ``<i>/<name>`` and the components' structures (the codec's JSON
trees, ``format/codec.py``) as the uint8 tensor ``__trees__``, so one checksum covers everything. The parts of a
node's shared copy are plain tensor files whose union is one such bundle (``__trees__`` in part 0).

Example:
    >>> import torch
    >>> data = bundle_bytes([("rng", {"seed": 3, "state": torch.arange(2)})])
    >>> parse_bundle(data, "rank-00000.safetensors")
    {'rng': {'seed': 3, 'state': tensor([0, 1])}}
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_sharing._faults import fault_point
from lightning_sharing.errors import CorruptCheckpointError
from lightning_sharing.format.codec import decode_state, encode_state, is_dtensor
from lightning_sharing.format.safetensors_io import bytes_checksum, read_tensor_file, read_tensors, write_tensors
from lightning_sharing.storage.local import LocalStore, fsync_dir, rmtree_missing_ok

__all__ = ["COMPLETE_NAME", "TREES", "bundle_bytes", "bundle_tensors", "commit_step", "complete_record",
           "list_steps", "own_dir", "pack", "parse_bundle", "parse_tensors", "place", "rank_file", "read_bundle",
           "read_complete", "read_verified", "remove_old_steps", "remove_step", "replica_dir", "shared_file",
           "states_of", "step_dir", "temp_dir", "unpack", "write_batch", "write_file", "write_raw"]

COMPLETE_NAME = "COMPLETE.json"
# 2: the node's shared copy spread over its ranks (shared-<j>); 1 had it whole in node.safetensors.
FORMAT_VERSION = 2
TREES = "__trees__"
_STEP_RE = re.compile(r"step_(\d+)")
_MAX_COMPLETE_BYTES = 16 * 1024 * 1024
_Bytes = bytes | bytearray | memoryview
_STORE = LocalStore()


def rank_file(rank: int) -> str:
    """The name of rank ``rank``'s bundle in a step directory."""
    return f"rank-{rank:05d}.safetensors"


def shared_file(local: int) -> str:
    """The name of part ``local`` (written by the node's rank ``local``) of a node's copy of the shared state."""
    return f"shared-{local:05d}.safetensors"


def own_dir(node_dir: Path) -> Path:
    """Where a node keeps its own steps, under its tier directory."""
    return node_dir / "own"


def replica_dir(node_dir: Path, origin: int) -> Path:
    """Where a node keeps the steps it holds of node ``origin``, under its tier directory."""
    return node_dir / f"replica_of_{origin}"


def step_dir(parent: Path, step: int) -> Path:
    """The committed directory of ``step`` under ``parent`` (``own`` or ``replica_of_<m>``)."""
    return parent / f"step_{step}"


def temp_dir(parent: Path, step: int) -> Path:
    """Where ``step`` is written before it is renamed into place."""
    return parent / f".tmp-step_{step}"


# ------------------------------------------------------------------------------------------------------- bundles
def _local_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A DTensor's own piece (the local tier restores each rank's piece at the same topology)."""
    return {name: tensor.to_local() if is_dtensor(tensor) else tensor for name, tensor in tensors.items()}


def bundle_tensors(states: Sequence[tuple[str, Any]]) -> dict[str, torch.Tensor]:
    """The tensors of a bundle of ``(component key, state)`` pairs, structures included (``__trees__``)."""
    tensors: dict[str, torch.Tensor] = {}
    trees = []
    for index, (key, state) in enumerate(states):
        encoded = encode_state(state, key, dtensors=True)
        tensors.update({f"{index}/{name}": t for name, t in _local_tensors(encoded.tensors).items()})
        trees.append([key, encoded.tree, encoded.ties, encoded.flat])
    text = json.dumps(trees, allow_nan=False).encode("utf-8")
    tensors[TREES] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    return tensors


def bundle_bytes(states: Sequence[tuple[str, Any]]) -> bytes:
    """A bundle as the bytes of one safetensors file (see the module docstring)."""
    sink = io.BytesIO()
    write_tensors(sink, bundle_tensors(states))
    return sink.getvalue()


def parse_bundle(data: _Bytes, name: str) -> dict[str, Any]:
    """The states of a bundle (already verified) by component key."""
    return states_of(parse_tensors(data, name), name)


def parse_tensors(data: _Bytes, name: str) -> dict[str, torch.Tensor]:
    """The tensors of a file's bytes (already verified)."""
    return read_tensors(io.BytesIO(data), len(memoryview(data)), name)


def read_bundle(folder: Path, name: str, body: dict[str, Any]) -> dict[str, Any]:
    """The states of bundle ``name`` of a step directory (``read_verified``)."""
    return states_of(read_verified(folder, name, body), name)


def read_verified(folder: Path, name: str, body: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of file ``name`` of a step directory, read from disk straight into new tensors while its checksum
    is verified against ``COMPLETE.json`` (``body``); raises ``CorruptCheckpointError`` naming the file."""
    path = folder / name
    expected = body["files"].get(name)
    if expected is None:
        raise CorruptCheckpointError(f"{path} is not listed in {folder / COMPLETE_NAME}")
    try:
        size = path.stat().st_size
        if size != expected["size"]:
            raise CorruptCheckpointError(f"{path} has {size} bytes, {folder / COMPLETE_NAME} lists {expected['size']}")
        return read_tensor_file(path, expected["checksum"])
    except OSError as exc:
        raise CorruptCheckpointError(f"{path} cannot be read: {exc}") from exc
    except CorruptCheckpointError as exc:
        raise CorruptCheckpointError(f"{folder}: {exc}") from exc


def states_of(tensors: dict[str, torch.Tensor], name: str) -> dict[str, Any]:
    """The states by component key of a bundle's tensors (``__trees__`` included; ``name`` is for errors)."""
    if TREES not in tensors:
        raise CorruptCheckpointError(f"local checkpoint file {name} has no component structures ({TREES})")
    try:
        trees = json.loads(tensors.pop(TREES).numpy().tobytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"local checkpoint file {name}: unreadable component structures: {exc}") from exc
    states = {}
    for index, (key, tree, ties, flat) in enumerate(trees):
        prefix = f"{index}/"
        mine = {n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)}
        states[key] = decode_state(tree, mine, ties, flat)
    return states


def write_file(folder: Path, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Write a bundle's tensors (``bundle_tensors``) into ``folder`` (durable at the end of the caller's
    ``write_batch``); its size and checksum."""
    fault_point("local:write")
    with _STORE.open_write(str(folder / name)) as sink:
        size, checksum = write_tensors(sink, tensors)
    return {"size": size, "checksum": checksum}


def write_batch() -> Any:
    """A block whose files are fsynced together when it ends (``LocalStore.write_batch``)."""
    return _STORE.write_batch()


# ------------------------------------------------------------------------------------------------ COMPLETE.json
def complete_record(step: int, node: int, topology: dict[str, Any], declaration: Any,
                    files: dict[str, dict[str, Any]]) -> bytes:
    """The bytes of a step's ``COMPLETE.json``: what was saved, at which topology, and every file's checksum."""
    body = {"format": FORMAT_VERSION, "step": step, "node": node, "topology": topology, "declaration": declaration,
            "files": files}
    text = json.dumps(body, sort_keys=True)
    return json.dumps({"body": body, "checksum": bytes_checksum(text.encode("utf-8"))}, sort_keys=True).encode()


def read_complete(folder: Path) -> dict[str, Any]:
    """A step directory's ``COMPLETE.json`` body, checked against its own checksum; raises
    ``CorruptCheckpointError`` saying why it cannot be used."""
    path = folder / COMPLETE_NAME
    try:
        if path.stat().st_size > _MAX_COMPLETE_BYTES:
            raise CorruptCheckpointError(f"{path} is larger than {_MAX_COMPLETE_BYTES} bytes")
        record = json.loads(path.read_bytes())
        body = record["body"]
        if bytes_checksum(json.dumps(body, sort_keys=True).encode("utf-8")) != record["checksum"]:
            raise CorruptCheckpointError(f"{path} fails its checksum")
        if body["format"] != FORMAT_VERSION:
            raise CorruptCheckpointError(f"{path} has format {body['format']!r}, this version reads "
                                         f"{FORMAT_VERSION}")
        return body
    except FileNotFoundError as exc:
        raise CorruptCheckpointError(f"{path} is missing (the save did not complete)") from exc
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"{path} cannot be read: {type(exc).__name__}: {exc}") from exc


def commit_step(temp: Path, final: Path, record: bytes) -> None:
    """Write ``COMPLETE.json`` into ``temp`` (durably), then rename ``temp`` to ``final`` (``place``)."""
    with write_batch():
        with _STORE.open_write(str(temp / COMPLETE_NAME)) as sink:
            sink.write(record)
    place(temp, final)


def place(temp: Path, final: Path) -> None:
    """Rename the finished directory ``temp`` to ``final`` (replacing an old one), the names made durable."""
    fsync_dir(temp)
    if final.exists():
        rmtree_missing_ok(final)
    os.rename(temp, final)
    fsync_dir(final.parent)


def write_raw(folder: Path, name: str, data: _Bytes) -> None:
    """Write received bytes as ``folder/name`` (durable at the end of the caller's ``write_batch``)."""
    fault_point("local:write")
    with _STORE.open_write(str(folder / name)) as sink:
        sink.write(data)


def pack(folder: Path, names: Sequence[str], body: dict[str, Any] | None = None) -> memoryview:
    """Files of ``folder`` as one message, read straight into it: an 8-byte header length, a JSON header of names,
    sizes and checksums, then the bytes. With ``body`` (``COMPLETE.json``), each file is checked against its listed
    size and checksum first; raises ``CorruptCheckpointError`` naming the file."""
    sizes = {}
    for name in names:
        if body is not None and name not in body["files"]:
            raise CorruptCheckpointError(f"{folder / name} is not listed in {folder / COMPLETE_NAME}")
        try:
            sizes[name] = (folder / name).stat().st_size
        except OSError as exc:
            raise CorruptCheckpointError(f"{folder / name} cannot be read: {exc}") from exc
    # The header's length is known before the files are read: every checksum has the same length.
    placeholder = bytes_checksum(b"")
    length = len(json.dumps([[name, size, placeholder] for name, size in sizes.items()]).encode())
    # Not zero-filled first (a bytearray would be): every byte is written below.
    view = memoryview(torch.empty(8 + length + sum(sizes.values()), dtype=torch.uint8).numpy())
    header = []
    start = 8 + length
    for name, size in sizes.items():
        part = view[start:start + size]
        try:
            with open(folder / name, "rb", buffering=0) as handle:
                if handle.readinto(part) != size or handle.read(1):
                    raise CorruptCheckpointError(f"{folder / name} changed size while being read")
        except OSError as exc:
            raise CorruptCheckpointError(f"{folder / name} cannot be read: {exc}") from exc
        checksum = bytes_checksum(part)
        if body is not None:
            expected = body["files"][name]
            if size != expected["size"]:
                raise CorruptCheckpointError(f"{folder / name} has {size} bytes, {folder / COMPLETE_NAME} lists "
                                             f"{expected['size']}")
            if checksum != expected["checksum"]:
                raise CorruptCheckpointError(f"{folder / name} fails its checksum (expected {expected['checksum']})")
        header.append([name, size, checksum])
        start += size
    text = json.dumps(header).encode()
    if len(text) != length:  # cannot happen: the checksums of one algorithm have one length
        raise CorruptCheckpointError(f"the header of the files of {folder} changed length while being built")
    view[:8] = length.to_bytes(8, "little")
    view[8:8 + length] = text
    return view


def unpack(message: _Bytes, source: str) -> dict[str, memoryview]:
    """The files of a ``pack``ed message (views into it, no copy), each checked against the checksum sent with it."""
    view = memoryview(message).cast("B")
    try:
        length = int.from_bytes(view[:8], "little")
        header = json.loads(bytes(view[8:8 + length]))
        files, position = {}, 8 + length
        for name, size, checksum in header:
            data = view[position:position + size]
            position += size
            if len(data) != size or bytes_checksum(data) != checksum:
                raise CorruptCheckpointError(f"{name} from {source} arrived damaged (size or checksum differs)")
            files[str(name)] = data
        return files
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"the local checkpoint files from {source} are malformed: {exc}") from exc


def list_steps(parent: Path) -> list[int]:
    """The committed steps under ``parent``, newest first (whether they are complete is checked on use)."""
    if not parent.is_dir():
        return []
    found = [int(m.group(1)) for entry in parent.iterdir() if (m := _STEP_RE.fullmatch(entry.name)) and entry.is_dir()]
    return sorted(found, reverse=True)


def remove_old_steps(parent: Path, keep: int) -> None:
    """Keep the newest ``keep`` steps under ``parent``; remove older ones and leftovers of interrupted writes."""
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        if entry.name.startswith(".tmp-step_") and entry.is_dir():
            rmtree_missing_ok(entry)
    for step in list_steps(parent)[keep:]:
        remove_step(parent, step)


def remove_step(parent: Path, step: int) -> None:
    """Remove a committed step directory (renamed to a hidden name first, so it is never seen half-removed)."""
    doomed = temp_dir(parent, step)
    if doomed.exists():
        rmtree_missing_ok(doomed)
    os.rename(step_dir(parent, step), doomed)
    rmtree_missing_ok(doomed)
