"""The last step of a save, on rank 0: check what the ranks wrote, build the manifest, commit.

Example:
    >>> manifest = build_manifest(components, topology, staging, written_by_rank, step=500, metadata={})
    >>> commit_checkpoint(staging, Path("ckpts/step=500.ckpt"), token, manifest)     # doctest: +SKIP
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import torch

from lightning_sharing._faults import fault_point
from lightning_sharing.core.declarations import SharingPattern, StateComponent
from lightning_sharing.core.rules import Placement, placements
from lightning_sharing.core.topology import Topology
from lightning_sharing.engine.save_plan import CopyPlan, FileJob, write_copy
from lightning_sharing.errors import CheckpointError
from lightning_sharing.format.layout import index_name, json_bytes, merged_index, tree_name
from lightning_sharing.format.manifest import MANIFEST_NAME, CheckpointManifest, ComponentManifest
from lightning_sharing.storage.local import commit_directory, fsync_tree, write_bytes_durable

__all__ = ["WrittenCopies", "build_manifest", "commit_checkpoint"]

# Per rank: {component key: [{"stem": str, "files": [FileEntry], "index": dict | None}, ...]}
WrittenCopies = list[dict[str, list[dict[str, Any]]]]


def build_manifest(components: list[StateComponent], topology: Topology, staging: Path,
                   written: WrittenCopies, step: int | None, metadata: dict[str, Any] | None) -> CheckpointManifest:
    """Check that rank 0 sees every reported file, write merged indexes, and describe the checkpoint."""
    _check_visible(staging, written)
    records: dict[str, ComponentManifest] = {}
    for component in components:
        copies = sorted((c for per_rank in written for c in per_rank.get(component.key, [])),
                        key=lambda c: c["stem"])
        _check_same_layout(component.key, copies)
        files = sorted((entry for copy in copies for entry in copy["files"]), key=lambda e: e.path)
        merged = _merged_index(component, copies)
        if merged is not None:
            files.extend(write_copy(staging, CopyPlan(component.key, jobs=[merged]), rank=0))
        plan = placements(component.key, component.sharing_pattern, topology, component.process_group_name)
        has_tree = any(tree_name(c["stem"]) in {f.path for f in c["files"]} for c in copies)
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
        library_version=_library_version(),
        torch_version=torch.__version__,
        metadata=dict(metadata or {}),
    )


def commit_checkpoint(staging: Path, target: Path, token: str, manifest: CheckpointManifest) -> None:
    """Make the staging directory durable, write the manifest last, and rename it into place."""
    text = manifest.dumps()  # fails here, before anything is committed, if metadata is not JSON
    fsync_tree(staging)
    fault_point("commit:manifest")
    write_bytes_durable(staging / MANIFEST_NAME, text.encode("utf-8"))
    fault_point("commit:rename")
    commit_directory(staging, target, token)
    fault_point("commit:renamed")


def _merged_index(component: StateComponent, copies: list[dict[str, Any]]) -> FileJob | None:
    """For multi-copy tensor-only components with disjoint names (pipeline stages), one HF index."""
    if component.sharing_pattern in (SharingPattern.GLOBAL, SharingPattern.REPLICATED) or not copies:
        return None
    if any(copy["index"] is None for copy in copies):
        return None
    names = [name for copy in copies for name in copy["index"]["weight_map"]]
    if len(names) != len(set(names)):
        return None
    index = merged_index([(c["stem"], c["index"]) for c in copies])
    return FileJob(index_name(component.key), data=json_bytes(index))


def _check_same_layout(key: str, copies: list[dict[str, Any]]) -> None:
    """Ranks given shards of a copy by its lead writer must have planned the same tensors and shards."""
    leads = {copy["stem"]: copy for copy in copies if copy["shard_writers"]}
    for copy in copies:
        lead = leads.get(copy["stem"])
        if lead is None or copy is lead or copy["rank"] not in lead["shard_writers"]:
            continue
        if copy["layout"] != lead["layout"]:
            raise CheckpointError(
                f"component {key!r}: rank {copy['rank']} and rank {lead['rank']} hold different tensor names, "
                f"shapes or dtypes for {copy['stem']}, so it is not replicated and its shards cannot be split "
                "between them; declare it PER_RANK (or GLOBAL if only rank 0 holds it), or make the ranks agree "
                "(validate_replication=True names the differences)"
            )


def _check_visible(staging: Path, all_written: WrittenCopies) -> None:
    """Rank 0 must see every file the other ranks wrote, at the size they wrote it."""
    for per_rank in all_written:
        for copies in per_rank.values():
            for copy in copies:
                for entry in copy["files"]:
                    path = staging / entry.path
                    size = path.stat().st_size if path.is_file() else None
                    if size != entry.size:
                        raise CheckpointError(
                            f"rank 0 sees {entry.path} written by rank {entry.rank} "
                            f"{'missing' if size is None else f'with {size} bytes, not {entry.size}'}: the "
                            "checkpoint directory must be on a filesystem shared by all ranks, with "
                            "close-to-open consistency"
                        )


def _replicated_across(component: StateComponent, plan: tuple[Placement, ...]) -> list[Any] | None:
    if component.sharing_pattern is SharingPattern.REPLICATED:
        return list(plan[0].readers)
    if component.sharing_pattern is SharingPattern.PER_GROUP:
        return [list(p.readers) for p in plan]
    return None


def _library_version() -> str:
    from lightning_sharing import __version__  # the package imports this module

    return __version__
