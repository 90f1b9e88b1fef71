"""Which files of one copy a rank writes: the copy's shards are spread over the ranks that hold it.

A REPLICATED component is held identically by every rank, so its safetensors shards are divided
among all of them (balanced by bytes) and the copy is still written once in total; the copy's lead
writer (the rule table's ``writer``) also writes the index and the structure JSON. Every other
copy has a single writer. Every rank computes the same plan from the same state; a layout digest
recorded with each rank's files lets the commit step check that they really did.

Example:
    >>> plan = plan_copy("model", encode_state(model.state_dict()), spread=(0, 1), lead=0, rank=1,
    ...                  max_shard_size=DEFAULT_MAX_SHARD_SIZE)                     # doctest: +SKIP
"""

from __future__ import annotations

import math
import posixpath
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash

from lightning_sharing.format.codec import EncodedState
from lightning_sharing.format.layout import TREE_FORMAT, index_name, json_bytes, tree_name
from lightning_sharing.format.manifest import FileEntry
from lightning_sharing.format.safetensors_io import nbytes, write_blob, write_tensors
from lightning_sharing.storage.base import CheckpointStore

__all__ = ["MIN_SPREAD_SHARD_SIZE", "CopyPlan", "FileJob", "plan_copy", "write_copy"]

# Spreading a small state over ranks only makes many tiny files; below this a shard is not split.
MIN_SPREAD_SHARD_SIZE = 64 * 1024 * 1024


@dataclass
class FileJob:
    """One file this rank writes: a safetensors shard (``tensors``) or a JSON file (``data``)."""

    rel: str
    tensors: dict[str, torch.Tensor] | None = None
    data: bytes | None = None


@dataclass
class CopyPlan:
    """This rank's part of one copy, and what the commit step needs to know about the copy."""

    stem: str
    jobs: list[FileJob] = field(default_factory=list)
    index: dict[str, Any] | None = None  # the copy's safetensors index (lead writer, tensor-only copies)
    layout_digest: str = ""
    shard_writers: list[int] = field(default_factory=list)  # ranks the lead's plan gives shards to


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


def _assign(sizes: list[int], spread: tuple[int, ...]) -> list[int]:
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
    owners = _assign([sum(nbytes(tensors[n]) for n in names) for names in shards], spread)
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


def write_copy(store: CheckpointStore, root: str, plan: CopyPlan, rank: int) -> list[FileEntry]:
    """Write this rank's files of one copy under ``root`` (each durable); returns their manifest entries.

    Checksums are computed from the bytes as they are written; no file is read back.
    """
    entries: list[FileEntry] = []
    for job in plan.jobs:
        with store.open_write(store.join(root, job.rel)) as sink:
            if job.tensors is not None:
                size, checksum = write_tensors(sink, job.tensors)
            else:
                size, checksum = write_blob(sink, job.data or b"")
        entries.append(FileEntry(job.rel, size, checksum, rank))
    return entries
