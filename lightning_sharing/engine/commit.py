"""The last step of a save, on rank 0: check what the ranks wrote, then describe the checkpoint.

Every rank reports what it wrote as ``WrittenCopy`` records; rank 0 checks them against each other
(``check_same_layout``) and against the store (``check_visible``), writes the merged indexes that
``merged_index_jobs`` and ``chunk_index_jobs`` plan (the latter fails the save if the ranks' chunks
do not tile every tensor exactly once), and builds the manifest with ``build_manifest``, a pure
function. The store's ``commit`` then writes the manifest last and makes the checkpoint appear.

Example:
    >>> manifest = build_manifest(components, topology, copies, extra_files, step=500, metadata={})
    ... # doctest: +SKIP
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_sharing._version import __version__
from lightning_sharing.checkpoint.manifest import CheckpointManifest, ComponentManifest, FileEntry
from lightning_sharing.core.declarations import StateComponent
from lightning_sharing.core.rules import Placement, Replicas, placements, rule
from lightning_sharing.core.topology import Topology
from lightning_sharing.engine.save_plan import FileJob
from lightning_sharing.errors import CheckpointError
from lightning_sharing.format.copy_files import index_name, json_bytes, merged_index, tree_name
from lightning_sharing.sharded.index import ShardedIndex, merge_indexes
from lightning_sharing.storage.base import CheckpointStore

__all__ = ["WrittenCopy", "build_manifest", "check_same_layout", "check_visible", "chunk_index_jobs",
           "merged_index_jobs"]


@dataclass(frozen=True)
class WrittenCopy:
    """What one rank wrote of one copy of a component; sent to rank 0 for the manifest.

    Attributes:
        key: the component.
        stem: the copy (e.g. ``model`` or ``rng/rank-00001``).
        rank: the writing rank.
        files: the files this rank wrote of the copy.
        index: the copy's safetensors index, from its lead writer, when the copy is tensors only.
        layout: a digest of the tensor names, shapes and shards this rank planned for the copy.
        shard_writers: from the lead writer: every rank its plan gives shards of the copy to.
        chunks: for a chunked copy, this rank's part of the chunk index (``ShardedIndex.to_json()``).
    """

    key: str
    stem: str
    rank: int
    files: list[FileEntry]
    index: dict[str, Any] | None = None
    layout: str = ""
    shard_writers: list[int] = field(default_factory=list)
    chunks: dict[str, Any] | None = None


def check_visible(store: CheckpointStore, root: str, copies: list[WrittenCopy]) -> None:
    """Rank 0 must see every file the other ranks wrote, at the size they wrote it."""
    sizes = store.sizes(root, [entry.path for copy in copies for entry in copy.files])
    for copy in copies:
        for entry in copy.files:
            size = sizes[entry.path]
            if size != entry.size:
                raise CheckpointError(
                    f"rank 0 sees {entry.path} written by rank {entry.rank} "
                    f"{'missing' if size is None else f'with {size} bytes, not {entry.size}'}: the "
                    "checkpoint directory must be on a filesystem shared by all ranks, with "
                    "close-to-open consistency"
                )


def check_same_layout(key: str, copies: list[WrittenCopy]) -> None:
    """Ranks given shards of a copy by its lead writer must have planned the same tensors and shards."""
    leads = {copy.stem: copy for copy in copies if copy.shard_writers}
    for copy in copies:
        lead = leads.get(copy.stem)
        if lead is None or copy is lead or copy.rank not in lead.shard_writers:
            continue
        if copy.layout != lead.layout:
            raise CheckpointError(
                f"component {key!r}: rank {copy.rank} and rank {lead.rank} hold different tensor names, "
                f"shapes or dtypes for {copy.stem}, so it is not replicated and its shards cannot be split "
                "between them; declare it PER_RANK (or GLOBAL if only rank 0 holds it), or make the ranks agree "
                "(validate_replication=True names the differences)"
            )


def merged_index_jobs(components: list[StateComponent], copies: list[WrittenCopy]) -> list[tuple[str, FileJob]]:
    """For multi-copy tensor-only components with disjoint names (pipeline stages): one HF index each."""
    jobs = []
    for component in components:
        mine = sorted((c for c in copies if c.key == component.key), key=lambda c: c.stem)
        if not rule(component.sharing_pattern).merge_index or not mine or any(c.index is None for c in mine):
            continue
        names = [name for copy in mine for name in copy.index["weight_map"]]  # type: ignore[index]
        if len(names) != len(set(names)):
            continue
        index = merged_index([(c.stem, c.index) for c in mine])  # type: ignore[misc]
        jobs.append((component.key, FileJob(index_name(component.key), data=json_bytes(index))))
    return jobs


def chunk_index_jobs(components: list[StateComponent], copies: list[WrittenCopy]) -> list[tuple[str, FileJob]]:
    """For chunked components: the merged chunk index and, when every tensor is whole, a Hugging Face index.

    Raises ``CheckpointError`` naming the component when the ranks' chunks do not tile every tensor
    exactly once (the ranks did not hold the same tensors) or disagree on a shape, dtype or tie.
    """
    jobs = []
    for component in components:
        files = rule(component.sharing_pattern).chunks
        if files is None:
            continue
        parts = [ShardedIndex.from_json(c.chunks, complete=False) for c in copies
                 if c.key == component.key and c.chunks is not None]
        try:
            index = merge_indexes(parts)
        except CheckpointError as exc:
            hint = ("" if component.process_group_name else "; if ranks hold tensors of different names (pipeline "
                    "stages), name the group whose members hold the same ones: process_group_name=...")
            raise CheckpointError(f"component {component.key!r}: {exc}{hint}") from exc
        jobs.append((component.key, FileJob(files.index_for(component.key), data=json_bytes(index.to_json()))))
        hf_index = index.hf_index()
        if hf_index is not None:
            jobs.append((component.key, FileJob(index_name(component.key), data=json_bytes(hf_index))))
    return jobs


def build_manifest(components: list[StateComponent], topology: Topology, copies: list[WrittenCopy],
                   extra_files: dict[str, list[FileEntry]], step: int | None,
                   metadata: dict[str, Any] | None) -> CheckpointManifest:
    """Describe the checkpoint: every component's pattern, writers and files (``extra_files``: rank 0's own)."""
    records: dict[str, ComponentManifest] = {}
    for component in components:
        mine = sorted((c for c in copies if c.key == component.key), key=lambda c: c.stem)
        check_same_layout(component.key, mine)
        files = sorted((entry for copy in mine for entry in copy.files), key=lambda e: e.path)
        files.extend(extra_files.get(component.key, []))
        plan = placements(component.key, component.sharing_pattern, topology, component.process_group_name)
        has_tree = any(tree_name(c.stem) in {f.path for f in c.files} for c in mine)
        records[component.key] = ComponentManifest(
            key=component.key,
            sharing_pattern=component.sharing_pattern.value,
            ranks=sorted({entry.rank for entry in files} or {p.writer for p in plan}),
            group_name=component.process_group_name,
            replicated_across=_replicated_across(component, plan),
            required=component.required,
            storage="tree" if has_tree else "tensors",
            validation=component.effective_validation.value,
            files=files,
            metadata=dict(component.metadata),
        )
    return CheckpointManifest(
        world_size=topology.world_size,
        topology=topology.to_json(),
        components=records,
        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        step=step,
        library_version=__version__,
        torch_version=torch.__version__,
        metadata=dict(metadata or {}),
    )


def _replicated_across(component: StateComponent, plan: tuple[Placement, ...]) -> list[Any] | None:
    replicas = rule(component.sharing_pattern).replicas
    if replicas is Replicas.ONE_LIST:
        return list(plan[0].readers)
    if replicas is Replicas.PER_COPY:
        return [list(p.readers) for p in plan]
    return None
