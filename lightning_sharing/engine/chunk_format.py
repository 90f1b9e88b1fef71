"""The chunk copy format (SHARDED): every chunk of every tensor written once, by one rank holding it.

Saving: ``plan`` gives every chunk of the copy's tensors (``DTensor`` pieces, plain tensors whole) one writer
among the ranks holding it (``sharded.save.plan_writes``: balanced, the same on every rank, no communication);
``write`` puts this rank's chunks into its chunk file (``{key}/chunks-{rank:05d}.safetensors``, a digest per
block) and returns its part of the chunk index; the lead writes the structure of a non-flat state. At the
commit, ``merge`` joins the ranks' parts into ``{key}/index.json`` (refusing chunks that do not tile a tensor
exactly once) and, when every tensor is whole, a Hugging Face index into the chunk files.

Loading reads, per rank, only the byte ranges that overlap what it holds now (``engine/chunk_load.py``); an
export assembles each full tensor from its chunks.

Example:
    >>> fmt = ChunkFormat(ChunkFiles())                                                     # doctest: +SKIP
    >>> written = fmt.write(store, root, fmt.plan("model", placement, state, rank, options), rank)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from lightning_sharing.checkpoint.manifest import ComponentManifest, FileEntry
from lightning_sharing.core.declarations import StateComponent
from lightning_sharing.core.options import CheckpointOptions
from lightning_sharing.core.rules import SHARD_GROUPS, ChunkFiles, Placement
from lightning_sharing.engine.chunk_load import ChunkedLoad, prepare_chunked_load, read_index
from lightning_sharing.engine.copy_format import (
    CopyFormat,
    CopyPlan,
    FileJob,
    FullTensors,
    LoadContext,
    SavedTensor,
    WrittenCopy,
    reuse_file,
    tree_job,
    write_file,
)
from lightning_sharing.engine.verified_files import ComponentFiles
from lightning_sharing.errors import CheckpointError
from lightning_sharing.format.codec import EncodedState
from lightning_sharing.format.copy_files import index_name, json_bytes
from lightning_sharing.sharded.chunkfile import StoreFiles
from lightning_sharing.sharded.dtensor_boxes import local_tensor
from lightning_sharing.sharded.index import ShardedIndex, merge_indexes
from lightning_sharing.sharded.load import plan_reads, read_chunks
from lightning_sharing.sharded.save import WritePlan, plan_writes, write_chunks
from lightning_sharing.storage import CheckpointStore

__all__ = ["ChunkFormat"]


@dataclass(frozen=True)
class _Detail:
    """This rank's chunk assignment for the copy, and the state's ties (alias -> stored tensor name)."""

    writes: WritePlan
    ties: dict[str, str]


class ChunkFormat(CopyFormat):
    """Chunks of ``DTensor``s and plain tensors, each written once, with a merged index (module docstring)."""

    holds_dtensors = True
    shared_layout = False  # each rank's chunk files are its own: their grouping needs no other rank

    def __init__(self, files: ChunkFiles) -> None:
        self.files = files

    def plan_encoded(self, key: str, placement: Placement, encoded: EncodedState, rank: int,
                     options: CheckpointOptions) -> CopyPlan:
        """This rank's part of copy ``placement``: its chunks (one file), and (lead) the structure.

        The copy's tensors are held by ``placement.readers`` (plain tensors whole by each of them, ``DTensor``s
        piece by piece). A rank writing no chunk still reports its part of the index (shapes and dtypes).
        """
        writes = plan_writes(encoded.tensors, rank=rank, group_ranks=placement.readers)
        groups: dict[str, dict[str, torch.Tensor]] = {}  # an incremental save's shard groups: a file each
        for write in writes.mine():
            groups.setdefault(encoded.groups.get(write.name, ""), {})[write.name] = local_tensor(
                encoded.tensors[write.name])
        plan = CopyPlan(key, placement.stem, detail=_Detail(writes, dict(encoded.ties)))
        for group in (*SHARD_GROUPS, ""):
            if group in groups or (group == "" and not groups):  # a rank writing no chunk still reports its part
                plan.jobs.append(FileJob(self.files.file_for(key, rank, group), tensors=groups.get(group, {})))
        if rank == placement.writer and not encoded.flat:
            plan.jobs.append(tree_job(placement.stem, encoded))
        return plan

    def piece(self, tensor: torch.Tensor) -> torch.Tensor:
        return local_tensor(tensor)

    def planned_file(self, tensors: dict[str, torch.Tensor]) -> None:
        return None  # a chunk file's checksum needs its block layout: after a restart chunk files are written

    def write(self, store: CheckpointStore, root: str, plan: CopyPlan, rank: int) -> WrittenCopy:
        """This rank's chunk files (none when it writes no chunk; one per shard group of an incremental save) and
        the structure; the detail is its parts of the index, one per chunk file (a reused file's from memory)."""
        entries: list[FileEntry] = []
        parts: list[dict[str, Any]] = []
        for job in plan.jobs:
            if job.data is not None:
                entries.append(write_file(store, root, job, rank))
                continue
            reused = reuse_file(store, root, job, rank) if job.reuse is not None and job.reuse.detail else None
            if reused is not None:
                entries.append(reused)
                parts.append(job.reuse.detail)  # type: ignore[union-attr]
                continue
            index = write_chunks(root, job.rel, plan.detail.writes, job.tensors or {}, store=store,
                                 names=set(job.tensors or {}))
            parts.append(dataclasses.replace(index, ties=plan.detail.ties).to_json())
            entries.extend(FileEntry(f.path, f.size, f.checksum, rank, stamp=store.stamp(store.join(root, f.path)),
                                     origin={"kind": "written"}) for f in index.files.values())
        return WrittenCopy(plan.key, plan.stem, rank, entries, parts)

    def merge(self, component: StateComponent, copies: list[WrittenCopy]) -> list[FileJob]:
        """The merged chunk index and, when every tensor is whole, a Hugging Face index.

        Raises ``CheckpointError`` naming the component when the ranks' chunks do not tile every tensor
        exactly once (the ranks did not hold the same tensors) or disagree on a shape, dtype or tie.
        """
        parts = [ShardedIndex.from_json(part, complete=False) for c in copies for part in c.detail or []]
        try:
            index = merge_indexes(parts)
        except CheckpointError as exc:
            hint = ("" if component.process_group_name else "; if ranks hold tensors of different names (pipeline "
                    "stages), name the group whose members hold the same ones: process_group_name=...")
            raise CheckpointError(f"component {component.key!r}: {exc}{hint}") from exc
        jobs = [FileJob(self.files.index_for(component.key), data=json_bytes(index.to_json()))]
        hf_index = index.hf_index()
        if hf_index is not None:
            jobs.append(FileJob(index_name(component.key), data=json_bytes(hf_index)))
        return jobs

    def prepare_load(self, component: StateComponent, saved: ComponentManifest, context: LoadContext) -> ChunkedLoad:
        return prepare_chunked_load(component, saved, context, self.files)

    def full_tensors(self, files: ComponentFiles) -> FullTensors | None:
        rel = self.files.index_for(files.key)
        return _ChunkTensors(files, read_index(files, rel)) if rel in files.entries else None


class _ChunkTensors(FullTensors):
    """Every tensor of a chunk index, by name, each assembled from its chunks (read and verified block by block)."""

    def __init__(self, files: ComponentFiles, index: ShardedIndex) -> None:
        self.files, self.index = files, index
        self.ties = dict(index.ties)
        self.tensors = [SavedTensor(name, record.shape, record.torch_dtype)
                        for name, record in sorted(index.tensors.items())]
        self._source: StoreFiles | None = None

    def tensor(self, name: str) -> torch.Tensor:
        if self._source is None:
            self._source = StoreFiles(self.files.store, self.files.root)
        record = self.index.tensors[name]
        full = torch.empty(record.shape, dtype=record.torch_dtype)
        read_chunks(plan_reads(self.index, {name: full}, strict=False), self.index, self._source)
        return full

    def close(self) -> None:
        if self._source is not None:
            self._source.close()
            self._source = None
