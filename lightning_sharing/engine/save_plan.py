"""Which files of one copy a rank writes: the copy's shards are spread over the ranks that hold it.

A REPLICATED component is held identically by every rank, so its safetensors shards are divided
among all of them (balanced by bytes) and the copy is still written once in total; the copy's lead
writer (the rule table's ``writer``) also writes the index and the structure JSON. Every other
copy has a single writer. Every rank computes the same plan from the same state; a layout digest
recorded with each rank's files lets the commit step check that they really did.

A copy of a chunked pattern (SHARDED) is planned from its tensors' layouts instead
(``plan_chunked_copy``): each chunk of each ``DTensor`` or plain tensor is written once, by one rank
holding it, into that rank's chunk file; the lead writes the structure JSON of a non-flat state.

Example:
    >>> plan = plan_copy("model", encode_state(model.state_dict()), spread=(0, 1), lead=0, rank=1,
    ...                  max_shard_size=DEFAULT_MAX_SHARD_SIZE)                     # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
import posixpath
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash

from lightning_sharing.checkpoint.manifest import FileEntry
from lightning_sharing.core.rules import ChunkFiles, Placement
from lightning_sharing.format.codec import EncodedState
from lightning_sharing.format.copy_files import TREE_FORMAT, index_name, json_bytes, tree_name
from lightning_sharing.format.safetensors_io import nbytes, write_blob, write_tensors
from lightning_sharing.sharded.dtensor_boxes import local_tensor
from lightning_sharing.sharded.save import WritePlan, plan_writes, write_chunks
from lightning_sharing.storage.base import CheckpointStore

__all__ = ["MIN_SPREAD_SHARD_SIZE", "CopyPlan", "FileJob", "WrittenFiles", "assign_writers", "plan_chunked_copy",
           "plan_copy", "write_copy"]

# Spreading a small state over ranks only makes many tiny files; below this a shard is not split.
MIN_SPREAD_SHARD_SIZE = 64 * 1024 * 1024


@dataclass
class FileJob:
    """One file this rank writes: a safetensors shard (``tensors``), a JSON file (``data``), or a
    chunk file (``chunks``, the copy's write plan; ``tensors`` then holds this rank's local pieces)."""

    rel: str
    tensors: dict[str, torch.Tensor] | None = None
    data: bytes | None = None
    chunks: WritePlan | None = None


@dataclass
class CopyPlan:
    """This rank's part of one copy, and what the commit step needs to know about the copy."""

    stem: str
    jobs: list[FileJob] = field(default_factory=list)
    index: dict[str, Any] | None = None  # the copy's safetensors index (lead writer, tensor-only copies)
    layout_digest: str = ""
    shard_writers: list[int] = field(default_factory=list)  # ranks the lead's plan gives shards to
    ties: dict[str, str] = field(default_factory=dict)  # chunked copies: alias -> stored tensor name


@dataclass
class WrittenFiles:
    """What ``write_copy`` wrote: the files' manifest entries and, for a chunked copy, this rank's part
    of the chunk index (``ShardedIndex.to_json()``)."""

    files: list[FileEntry]
    chunks: dict[str, Any] | None = None


def _plan_shards(tensors: dict[str, torch.Tensor], shard_size: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for name, tensor in tensors.items():
        size = nbytes(tensor)
        if shards[-1] and used + size > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def assign_writers(sizes: list[int], spread: tuple[int, ...]) -> list[int]:
    """Writer of each shard: largest shards first, each to the least-loaded rank (ties: lowest rank)."""
    load = dict.fromkeys(spread, 0)
    owners = [spread[0]] * len(sizes)
    for shard in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        owner = min(spread, key=lambda r: (load[r], r))
        owners[shard] = owner
        load[owner] += sizes[shard]
    return owners


def plan_copy(stem: str, encoded: EncodedState, spread: tuple[int, ...], lead: int, rank: int,
              max_shard_size: int) -> CopyPlan:
    """This rank's files of copy ``stem`` (empty if it writes none of them)."""
    plan = CopyPlan(stem)
    tensors = encoded.tensors
    total = sum(nbytes(t) for t in tensors.values())
    shard_size = max_shard_size
    if len(spread) > 1:
        shard_size = min(max_shard_size, max(MIN_SPREAD_SHARD_SIZE, math.ceil(total / len(spread))))
    shards = _plan_shards(tensors, shard_size) if tensors else []
    owners = assign_writers([sum(nbytes(tensors[n]) for n in names) for names in shards], spread)
    weight_map: dict[str, str] = {}
    for number, (names, owner) in enumerate(zip(shards, owners, strict=True), start=1):
        rel = f"{stem}-{number:05d}-of-{len(shards):05d}.safetensors"
        weight_map.update(dict.fromkeys(names, posixpath.basename(rel)))
        if owner == rank:
            plan.jobs.append(FileJob(rel, tensors={name: tensors[name] for name in names}))
    layout = [[n, str(tensors[n].dtype), list(tensors[n].shape), weight_map[n]] for n in tensors]
    plan.layout_digest = xxhash.xxh3_64(json_bytes([layout, encoded.ties, encoded.flat])).hexdigest()
    if rank != lead:
        return plan
    plan.shard_writers = sorted(set(owners))
    if tensors:
        metadata: dict[str, Any] = {"total_size": total, "format": "pt"}
        if encoded.ties:
            metadata["tied"] = dict(encoded.ties)
        index = {"metadata": metadata, "weight_map": weight_map}
        plan.jobs.append(FileJob(index_name(stem), data=json_bytes(index)))
        plan.index = index if encoded.flat else None
    if not encoded.flat:
        body = {"format": TREE_FORMAT, "version": 1, "tree": encoded.tree, "ties": encoded.ties}
        plan.jobs.append(FileJob(tree_name(stem), data=json_bytes(body)))
    return plan


def plan_chunked_copy(key: str, placement: Placement, encoded: EncodedState, files: ChunkFiles,
                      rank: int) -> CopyPlan:
    """This rank's part of copy ``placement`` of a chunked component: its chunks, and (lead) the structure.

    The copy's tensors are held by ``placement.readers`` (plain tensors whole by each of them,
    ``DTensor``s piece by piece); ``plan_writes`` gives every chunk one writer among its holders, the
    same on every rank, with no communication. A rank writing no chunk still reports its part of the
    index (the tensors' shapes and dtypes).
    """
    writes = plan_writes(encoded.tensors, rank=rank, group_ranks=placement.readers)
    mine = {write.name: local_tensor(encoded.tensors[write.name]) for write in writes.mine()}
    plan = CopyPlan(placement.stem, ties=dict(encoded.ties))
    plan.jobs.append(FileJob(files.file_for(key, rank), tensors=mine, chunks=writes))
    if rank == placement.writer and not encoded.flat:
        body = {"format": TREE_FORMAT, "version": 1, "tree": encoded.tree, "ties": encoded.ties}
        plan.jobs.append(FileJob(tree_name(placement.stem), data=json_bytes(body)))
    return plan


def write_copy(store: CheckpointStore, root: str, plan: CopyPlan, rank: int) -> WrittenFiles:
    """Write this rank's files of one copy under ``root`` (each durable); returns what it wrote.

    Checksums are computed from the bytes as they are written; no file is read back.
    """
    entries: list[FileEntry] = []
    part: dict[str, Any] | None = None
    for job in plan.jobs:
        if job.chunks is not None:
            index = write_chunks(root, job.rel, job.chunks, job.tensors or {}, store=store)
            part = dataclasses.replace(index, ties=plan.ties).to_json()
            entries.extend(FileEntry(f.path, f.size, f.checksum, rank) for f in index.files.values())
            continue
        with store.open_write(store.join(root, job.rel)) as sink:
            if job.tensors is not None:
                size, checksum = write_tensors(sink, job.tensors)
            else:
                size, checksum = write_blob(sink, job.data or b"")
        entries.append(FileEntry(job.rel, size, checksum, rank))
    return WrittenFiles(entries, part)
