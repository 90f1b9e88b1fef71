"""The write and commit steps of a save: every rank writes its files in one batch, rank 0 commits.

``write_files`` runs on every rank (on the saver's thread for background saves) inside one agreement
step; ``commit_files`` on rank 0 once every rank's ``WrittenCopy`` records are gathered.

Example:
    >>> with_context("model", "writing", lambda: 1)
    1
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning_sharing._faults import fault_point
from lightning_sharing.checkpoint.manifest import FileEntry
from lightning_sharing.core.declarations import StateComponent
from lightning_sharing.core.topology import Topology
from lightning_sharing.distributed.collectives import agreement
from lightning_sharing.engine.commit import (
    WrittenCopy,
    build_manifest,
    check_visible,
    chunk_index_jobs,
    merged_index_jobs,
)
from lightning_sharing.engine.save_plan import CopyPlan, write_copy
from lightning_sharing.errors import CheckpointError, DistributedCheckpointError
from lightning_sharing.storage import CheckpointStore

__all__ = ["Plans", "commit_files", "with_context", "write_files"]

Plans = list[tuple[str, CopyPlan]]


def write_files(store: CheckpointStore, write_root: str, plans: Plans, rank: int, group: Any) -> list[WrittenCopy]:
    """Write this rank's files, all durable when it returns; returns what it wrote, for the manifest.

    The files are written in one ``store.write_batch()``: a local store starts each file's write-back
    when it is closed and fsyncs them together at the end, so a failing fsync fails this step, on
    every rank, before anything is committed.
    """
    written: list[WrittenCopy] = []
    with agreement("writing checkpoint files", group):
        store.check_write_root(write_root, rank)
        fault_point("save:start")
        with store.write_batch():
            for key, plan in plans:
                files = with_context(key, "writing", lambda p=plan: write_copy(store, write_root, p, rank))
                written.append(WrittenCopy(key=key, stem=plan.stem, rank=rank, files=files.files, index=plan.index,
                                           layout=plan.layout_digest, shard_writers=plan.shard_writers,
                                           chunks=files.chunks))
        fault_point("save:written")
    return written


def commit_files(store: CheckpointStore, components: Sequence[StateComponent], write_root: str, target: str,
                 token: str, topology: Topology, copies: list[WrittenCopy], step: int | None,
                 metadata: dict[str, Any] | None) -> None:
    """Rank 0: check what every rank wrote, add the merged indexes, write the manifest last, commit."""
    check_visible(store, write_root, copies)
    extra: dict[str, list[FileEntry]] = {}
    with store.write_batch():  # durable before the manifest that lists them is written
        for key, job in merged_index_jobs(components, copies) + chunk_index_jobs(components, copies):
            extra.setdefault(key, []).extend(write_copy(store, write_root, CopyPlan(key, jobs=[job]), rank=0).files)
    manifest = build_manifest(components, topology, copies, extra, step, metadata)
    manifest.data_prefix = store.data_prefix(write_root, target)  # an object store's generation, else None
    text = manifest.dumps()  # fails here, before anything is committed, if metadata is not JSON
    store.commit(write_root, target, token, text.encode("utf-8"))


def with_context(key: str, action: str, fn: Any) -> Any:
    """Run ``fn``; re-raise any failure as a ``CheckpointError`` (of the same kind) that names the component."""
    try:
        return fn()
    except DistributedCheckpointError:
        raise
    except CheckpointError as exc:
        if f"component {key!r}" in str(exc):
            raise
        raise type(exc)(f"component {key!r}: {action} failed: {exc}") from exc
    except Exception as exc:
        raise CheckpointError(f"component {key!r}: {action} failed: {type(exc).__name__}: {exc}") from exc
