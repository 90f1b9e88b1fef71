"""Incremental saves: what did not change since the previous checkpoint is linked or copied, not written again.

A save with ``CheckpointOptions(incremental=True)``, on every rank that writes files:

1. **The previous checkpoint** is the newest complete one in the directory of the save path
   (``checkpoint.discovery.newest_complete``: a checkpoint without a complete manifest is never one). Only its files
   whose manifest entry has a ``stamp`` (format version 2) can be reused.
2. **Unchanged tensors are found without reading anything.** Within a process a tensor not modified since the last
   save keeps its storage address, offset, shape, strides, dtype and version counter (``tensor._version``, bumped by
   every in-place operation): ``IncrementalMemory`` (kept in the coordinator's ``PlanCache``) holds each tensor's
   fingerprint from the last committed save, and a reference to it, so that its memory cannot be given to another
   tensor meanwhile. After a restart there is no memory: a file the previous checkpoint holds under the same name and
   size is then hashed in memory (xxh3-128, nothing written) and compared with the checksum its manifest recorded.
3. **Files of their own**: parameters that do not require grad (of the module a component saves: the stateful, or
   its ``source_module``, as Lightning's and Fabric's model state has) go to
   the ``frozen`` shard group, tensors seen unchanged since the previous save to the ``stable`` one, the others to
   the copy's usual shards (``core.rules.SHARD_GROUPS``), so a file of unchanged tensors is unchanged as a whole.
   ``stable`` only where one rank plans the copy's files alone (a single writer, SHARDED chunk files): the writers
   of a spread REPLICATED copy must plan alike, and their version counters need not agree (DDP's buffer broadcast).
4. **Reuse**: a file whose tensors (names, order, fingerprints) are those of the file of the same name last time, and
   whose checksum the previous checkpoint records for it, gets ``FileJob.reuse`` (a SHARDED chunk file with its part
   of the chunk index, from memory: after a restart chunk files are written); ``copy_format.write_file`` then
   hard-links it (local) or copies it server-side (object store) after checking its size and stamp, and writes it
   only when that is not possible. The manifest records each file's ``origin``.

Whole-tensor files are reused only when the content's checksum, computed in memory before anything is written,
equals the one the previous checkpoint recorded, so a change that bypasses the version counter (``tensor.data
.add_(...)``, writes through ``numpy()`` or ``data_ptr``) is written afresh, at the cost of hashing the unchanged
bytes (xxh3-128, several GB/s). A SHARDED chunk file's checksum depends on its block layout, so there the
fingerprints decide alone: such a change to a frozen DTensor is not seen.

Example (every rank; ``save.plan_save`` does this):
    >>> step = IncrementalSave(cache.incremental, store, "/runs/step=2.ckpt")     # doctest: +SKIP
    >>> plan = cache.plan(fmt, "model", placement, state, rank, options, step.grouping(component))  # doctest: +SKIP
    >>> step.mark("model", plan)                                                   # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lightning_sharing.checkpoint.discovery import newest_complete
from lightning_sharing.checkpoint.manifest import data_root
from lightning_sharing.core.declarations import StateComponent
from lightning_sharing.engine.copy_format import CopyFormat, CopyPlan, ReuseSource, WrittenCopy
from lightning_sharing.format.codec import EncodedState
from lightning_sharing.sharded.dtensor_boxes import is_dtensor, local_tensor
from lightning_sharing.storage import CheckpointStore

__all__ = ["IncrementalMemory", "IncrementalSave", "fingerprint"]

log = logging.getLogger(__name__)

Fingerprint = tuple[Any, ...]


def fingerprint(tensor: torch.Tensor) -> Fingerprint | None:
    """What identifies ``tensor``'s content within this process while it is not modified (None: nothing does); a
    ``DTensor`` by its local piece, its own version counter (an in-place operation on a ``DTensor`` bumps its
    counter, not its local tensor's), its global shape and its placements."""
    layout: tuple[Any, ...] = ()
    if is_dtensor(tensor):
        layout = (tensor._version, tuple(tensor.shape), str(tensor.placements))
        tensor = local_tensor(tensor)
    try:
        address = tensor.untyped_storage().data_ptr()
    except RuntimeError:  # no real storage
        return None
    return (address, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype,
            str(tensor.device), tensor._version, *layout)


@dataclass(frozen=True)
class _FileRecord:
    """A file of the last committed save: its tensors' names and fingerprints, in order; its checksum and size."""

    tensors: tuple[tuple[str, Fingerprint | None], ...]
    checksum: str
    size: int
    detail: Any = None  # the format's record of the file (a chunk file's part of the index)


class IncrementalMemory:
    """This process's record of the last committed incremental save (one per ``PlanCache``)."""

    def __init__(self) -> None:
        #: (component, stem, tensor name) -> (fingerprint, the tensor itself: its memory stays its own)
        self.tensors: dict[tuple[str, str, str], tuple[Fingerprint, torch.Tensor]] = {}
        #: (component, file) -> what this rank wrote or linked there
        self.files: dict[tuple[str, str], _FileRecord] = {}


class IncrementalSave:
    """One incremental save on this rank: the previous checkpoint, the grouping, the reuse decisions.

    ``remember`` (after the commit) makes this save's fingerprints and files the memory of the next one.
    """

    def __init__(self, memory: IncrementalMemory, store: CheckpointStore, target: str) -> None:
        self.memory = memory
        self.sources: dict[tuple[str, str], ReuseSource] = {}
        self._seen: dict[tuple[str, str, str], tuple[Fingerprint, torch.Tensor]] = {}
        self._files: dict[tuple[str, str], tuple[tuple[str, Fingerprint | None], ...]] = {}
        found = newest_complete(store, store.parent(target))
        if found is None:
            return
        location, manifest = found
        root, name = data_root(store, location, manifest), store.basename(location)
        for key, component in manifest.components.items():
            for entry in component.files:
                if entry.stamp is not None:
                    self.sources[key, entry.path] = ReuseSource(store.join(root, entry.path), entry.size,
                                                                entry.checksum, entry.stamp, name)

    def grouping(self, component: StateComponent, stem: str, observed: bool = True,
                 ) -> Callable[[EncodedState], dict[str, str]]:
        """The shard groups of copy ``stem`` of ``component`` (``PlanCache.plan`` applies them to the encoded state);
        records every tensor's fingerprint. ``observed``: tensors seen unchanged go to the ``stable`` group (False
        where several ranks must plan the copy alike: only ``requires_grad`` decides then)."""

        def groups(encoded: EncodedState) -> dict[str, str]:
            frozen = _frozen_names(component)
            result: dict[str, str] = {}
            for name, tensor in encoded.tensors.items():
                key = (component.key, stem, name)
                mark = fingerprint(tensor)
                if mark is not None:
                    self._seen[key] = (mark, tensor)
                if name in frozen:
                    result[name] = "frozen"
                elif observed and mark is not None and self.memory.tensors.get(key, (None,))[0] == mark:
                    result[name] = "stable"
            return result

        return groups

    def mark(self, key: str, plan: CopyPlan, fmt: CopyFormat) -> None:
        """Give each file of ``plan`` that the previous checkpoint holds unchanged its ``reuse`` source."""
        for job in plan.jobs:
            if job.tensors is None:
                continue
            # The fingerprints of the state's tensors (a DTensor's, not its local piece's, which the job holds)
            marks = tuple((name, self._seen.get((key, plan.stem, name), (None,))[0]) for name in job.tensors)
            self._files[key, job.rel] = marks
            source = self.sources.get((key, job.rel))
            if source is None or any(mark is None for _, mark in marks):
                continue
            record = self.memory.files.get((key, job.rel))
            planned = fmt.planned_file(job.tensors)

            # The content's checksum, computed in memory (nothing written), must be the one the previous checkpoint
            # recorded: the fingerprints only say which files are worth hashing (so a file they show changed is not
            # hashed), since a change through ``.data`` (an EMA updated as ``p.data.mul_(...)``) does not move a
            # version counter. A chunk file's checksum depends on its block layout (``planned_file`` is None): there
            # the fingerprints decide alone.
            def same_content(planned: Any = planned, source: ReuseSource = source) -> bool:
                return planned is None or (planned[0] == source.size and planned[1]() == source.checksum)

            if record is not None:
                if record.tensors == marks and (record.checksum, record.size) == (source.checksum, source.size) \
                        and same_content():
                    job.reuse = dataclasses.replace(source, detail=record.detail)
            elif planned is not None and same_content():  # no memory of it (a restart): the content decides
                job.reuse = source

    def remember(self, written: list[WrittenCopy]) -> None:
        """After the commit: this save's tensors and files are what the next save compares with."""
        files = {}
        for copy in written:
            details = _file_details(copy.detail)
            for entry in copy.files:
                marks = self._files.get((copy.key, entry.path))
                if marks is not None:
                    files[copy.key, entry.path] = _FileRecord(marks, entry.checksum, entry.size,
                                                              details.get(entry.path))
        self.memory.tensors, self.memory.files = self._seen, files
        entries = [entry for copy in written for entry in copy.files]
        log.info("incremental save: this rank linked or copied %d of its %d files (%d of %d bytes)",
                 sum(e.reused for e in entries), len(entries), sum(e.size for e in entries if e.reused),
                 sum(e.size for e in entries))


def _file_details(detail: Any) -> dict[str, Any]:
    """A chunk copy's detail (a list of per-file parts of the index) by file; nothing for other formats."""
    if not isinstance(detail, list):
        return {}
    return {file["path"]: part for part in detail for file in part.get("files", [])}


def _frozen_names(component: StateComponent) -> set[str]:
    """The names of the parameters that do not require grad of the module a component saves the state dict of (the
    stateful itself, or its ``source_module``: Lightning's and Fabric's model state); none for other statefuls."""
    module = component.stateful
    if not isinstance(module, torch.nn.Module):
        module = getattr(module, "source_module", None)  # as engine.hf_model finds it
    if not isinstance(module, torch.nn.Module):
        return set()
    return {name for name, tensor in module.state_dict(keep_vars=True).items()
            if isinstance(tensor, torch.nn.Parameter) and not tensor.requires_grad}
