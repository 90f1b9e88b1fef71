"""The whole-tensor copy format: each copy's tensors whole, in Hugging Face sharded safetensors (GLOBAL, PER_*, ...).

Saving: a REPLICATED copy is held identically by every rank, so its shards are divided among them (balanced by
bytes) and the copy is still written once in total; the copy's lead writer (the rule table's ``writer``) also
writes the index and the structure JSON. Every other copy has a single writer. Every rank computes the same plan
from the same state; a layout digest sent with each rank's files lets the commit check that they really did
(``merge``, which also writes one Hugging Face index over the disjoint copies of pipeline stages).

Loading: each rank reads its own copy whole (``finish``), every file verified, safetensors straight into the live
tensors; whole tensors loaded into a sharded module keep the piece each rank holds.

Example:
    >>> plan = plan_copy("model", encode_state(model.state_dict()), spread=(0, 1), lead=0, rank=1,
    ...                  options=CheckpointOptions())                               # doctest: +SKIP
"""

from __future__ import annotations

import heapq
import json
import math
import posixpath
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash

from lightning_sharing.checkpoint.manifest import ComponentManifest
from lightning_sharing.core.declarations import StateComponent
from lightning_sharing.core.options import CheckpointOptions, VerifyMode
from lightning_sharing.core.rules import (
    SHARD_GROUPS,
    Placement,
    WholeTensorFiles,
    placement_for_reader,
    placements,
    rule,
)
from lightning_sharing.engine.copy_format import (
    CopyFormat,
    CopyPlan,
    FileJob,
    FullTensors,
    LoadContext,
    SavedTensor,
    WrittenCopy,
    tree_job,
    write_file,
)
from lightning_sharing.engine.verified_files import ComponentFiles
from lightning_sharing.errors import CheckpointError, CorruptCheckpointError
from lightning_sharing.format.codec import EncodedState, encode_state
from lightning_sharing.format.copy_files import (
    index_name,
    json_bytes,
    merged_index,
    parse_index,
    read_payload,
    shard_pattern,
    tree_name,
)
from lightning_sharing.format.safetensors_io import dtype_from_name, nbytes
from lightning_sharing.sharded.dtensor_boxes import has_dtensors, is_dtensor
from lightning_sharing.sharded.redistribute import shard_state_like
from lightning_sharing.storage import CheckpointStore

__all__ = ["MIN_SPREAD_SHARD_SIZE", "WholeTensorFormat", "assign_writers", "check_same_layout", "plan_copy",
           "read_copy"]

# Spreading a small state over ranks only makes many tiny files; below this a shard is not split.
MIN_SPREAD_SHARD_SIZE = 64 * 1024 * 1024
_FILES = WholeTensorFiles()


@dataclass(frozen=True)
class _Detail:
    """What the commit needs of a rank's part of a copy: the lead's index, the planned layout, the shard writers."""

    index: dict[str, Any] | None = None  # the copy's safetensors index (lead writer, tensor-only copies)
    layout: str = ""  # a digest of the tensor names, shapes and shards this rank planned
    shard_writers: list[int] = field(default_factory=list)  # from the lead: every rank given shards of the copy


def assign_writers(sizes: list[int], spread: tuple[int, ...]) -> list[int]:
    """Writer of each shard: largest shards first, each to the least-loaded rank (ties: lowest rank)."""
    # A heap of (bytes given, rank): its top is what min() over the ranks would pick, in O(log ranks), not O(ranks)
    # per shard (every rank plans every shard: O(shards x ranks) per rank was the 7B DDP plan's cost at 4,096 ranks).
    heap = [(0, rank) for rank in dict.fromkeys(spread)]
    heapq.heapify(heap)
    owners = [spread[0]] * len(sizes)
    for shard in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        given, owner = heap[0]
        owners[shard] = owner
        heapq.heapreplace(heap, (given + sizes[shard], owner))
    return owners


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


def _grouped_shards(tensors: dict[str, torch.Tensor], groups: dict[str, str], shard_size: int
                    ) -> list[tuple[str, list[str]]]:
    """The shards of each shard group (``encoded.groups``: an incremental save's; else one group), groups apart."""
    by_group: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        by_group.setdefault(groups.get(name, ""), {})[name] = tensor
    return [(group, names) for group in (*SHARD_GROUPS, "") if group in by_group
            for names in _plan_shards(by_group[group], shard_size)]


def plan_copy(stem: str, encoded: EncodedState, spread: tuple[int, ...], lead: int, rank: int,
              options: CheckpointOptions, files: WholeTensorFiles = _FILES) -> CopyPlan:
    """This rank's files of copy ``stem`` (empty if it writes none of them): shards no larger than ``options``
    allow, divided among ``spread``; the ``lead`` adds the index and the structure."""
    plan = CopyPlan(stem, stem)
    tensors = encoded.tensors
    total = sum(nbytes(t) for t in tensors.values())
    shard_size = options.max_shard_size
    if len(spread) > 1:
        shard_size = min(shard_size, max(MIN_SPREAD_SHARD_SIZE, math.ceil(total / len(spread))))
    shards = _grouped_shards(tensors, encoded.groups, shard_size)
    owners = assign_writers([sum(nbytes(tensors[n]) for n in names) for _, names in shards], spread)
    counts = Counter(group for group, _ in shards)
    numbers: Counter[str] = Counter()
    weight_map: dict[str, str] = {}
    for (group, names), owner in zip(shards, owners, strict=True):
        numbers[group] += 1
        rel = files.shard_for(stem, numbers[group], counts[group], group)
        weight_map.update(dict.fromkeys(names, posixpath.basename(rel)))
        if owner == rank:
            plan.jobs.append(FileJob(rel, tensors={name: tensors[name] for name in names}))
    layout = [[n, str(tensors[n].dtype), list(tensors[n].shape), weight_map[n]] for n in tensors]
    digest = xxhash.xxh3_64(json_bytes([layout, encoded.ties, encoded.flat])).hexdigest()
    plan.detail = _Detail(layout=digest)
    if rank != lead:
        return plan
    index = None
    if tensors:
        metadata: dict[str, Any] = {"total_size": total, "format": "pt"}
        if encoded.ties:
            metadata["tied"] = dict(encoded.ties)
        index = {"metadata": metadata, "weight_map": weight_map}
        plan.jobs.append(FileJob(index_name(stem), data=json_bytes(index)))
    if not encoded.flat:
        plan.jobs.append(tree_job(stem, encoded))
    plan.detail = _Detail(index if encoded.flat else None, digest, sorted(set(owners)))
    return plan


def check_same_layout(key: str, copies: list[WrittenCopy]) -> None:
    """Ranks given shards of a copy by its lead writer must have planned the same tensors and shards."""
    details = {id(copy): copy.detail for copy in copies if isinstance(copy.detail, _Detail)}
    leads = {copy.stem: copy for copy in copies if id(copy) in details and details[id(copy)].shard_writers}
    for copy in copies:
        lead = leads.get(copy.stem)
        if lead is None or copy is lead or copy.rank not in lead.detail.shard_writers:
            continue
        if copy.detail.layout != lead.detail.layout:
            raise CheckpointError(
                f"component {key!r}: rank {copy.rank} and rank {lead.rank} hold different tensor names, "
                f"shapes or dtypes for {copy.stem}, so it is not replicated and its shards cannot be split "
                "between them; declare it PER_RANK (or GLOBAL if only rank 0 holds it), or make the ranks agree "
                "(validate_replication=True names the differences)"
            )


class WholeTensorFormat(CopyFormat):
    """Whole tensors in Hugging Face sharded safetensors per copy (see the module docstring)."""

    def __init__(self, files: WholeTensorFiles) -> None:
        self.files = files

    def plan_encoded(self, key: str, placement: Placement, encoded: EncodedState, rank: int,
                     options: CheckpointOptions) -> CopyPlan:
        plan = plan_copy(placement.stem, encoded, placement.writers, placement.writer, rank, options, self.files)
        plan.key = key
        return plan

    def write(self, store: CheckpointStore, root: str, plan: CopyPlan, rank: int) -> WrittenCopy:
        files = [write_file(store, root, job, rank) for job in plan.jobs]
        return WrittenCopy(plan.key, plan.stem, rank, files, plan.detail)

    def merge(self, component: StateComponent, copies: list[WrittenCopy]) -> list[FileJob]:
        """The layout check of spread copies; for multi-copy tensor-only components with disjoint names (pipeline
        stages), one Hugging Face index over them."""
        mine = sorted(copies, key=lambda c: c.stem)
        check_same_layout(component.key, mine)
        indexes = [(c.stem, c.detail.index if isinstance(c.detail, _Detail) else None) for c in mine]
        if not rule(component.sharing_pattern).merge_index or not mine or any(i is None for _, i in indexes):
            return []
        names = [name for _, index in indexes for name in index["weight_map"]]  # type: ignore[index]
        if len(names) != len(set(names)):
            return []
        return [FileJob(index_name(component.key), data=json_bytes(merged_index(indexes)))]  # type: ignore[arg-type]

    def prepare_load(self, component: StateComponent, saved: ComponentManifest, context: LoadContext) -> _WholeLoad:
        return _WholeLoad(component, saved, context)

    def full_tensors(self, files: ComponentFiles) -> FullTensors | None:
        return _ShardTensors(files) if index_name(files.key) in files.entries else None


@dataclass
class _WholeLoad:
    """A load of this rank's copy, whole: nothing is read before ``finish``.

    Which files each rank reads is known before anything is read (``files_read_by``), so a read-once load
    (``engine/read_once.py``) can have one rank fetch a file every rank reads and hand its bytes to the others
    (``given``, served from memory by ``finish``).
    """

    component: StateComponent
    saved: ComponentManifest
    context: LoadContext
    entries: tuple[str, ...] = ()
    held: tuple[bool, ...] = ()
    given: dict[str, memoryview] = field(default_factory=dict)

    _stems: dict[int, str] = field(default_factory=dict, repr=False)  # rank -> the stem of the copy it reads
    _files: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False)  # stem -> its files

    def files_read_by(self, rank: int) -> tuple[str, ...]:
        """The listed files ``finish`` reads on ``rank``: the copy's index, shards and structure, and the merged
        index (what ``read_copy`` opens, for a well-formed copy). O(world size) once, then a look-up per rank."""
        if not self._stems:
            component = self.component
            for copy in placements(component.key, component.sharing_pattern, self.context.topology,
                                   component.process_group_name):
                self._stems.update(dict.fromkeys(copy.readers, copy.stem))
        stem = self._stems[rank]
        if stem not in self._files:
            folder, shard = posixpath.dirname(stem), shard_pattern(stem)
            wanted = {index_name(stem), tree_name(stem), index_name(self.component.key)}
            self._files[stem] = tuple(sorted(entry.path for entry in self.saved.files if entry.path in wanted or (
                posixpath.dirname(entry.path) == folder and shard.fullmatch(posixpath.basename(entry.path)))))
        return self._files[stem]

    def finish(self, store: CheckpointStore, root: str) -> None:
        component, context = self.component, self.context
        copies = placements(component.key, component.sharing_pattern, context.topology, component.process_group_name)
        load_component(store, root, component, self.saved, placement_for_reader(copies, context.rank), context.mode,
                       self.given)


def load_component(store: CheckpointStore, root: str, component: StateComponent, saved: ComponentManifest,
                   placement: Placement, mode: VerifyMode, given: dict[str, memoryview] | None = None) -> None:
    """Read the copy ``placement`` of ``component`` under ``root`` and hand it to ``load_state_dict``; ``given``: files
    already read and verified by another rank (``ComponentFiles``)."""
    state = read_copy(store, root, component, saved, placement.stem, mode, into_live=True, given=given)
    stateful = component.stateful
    if isinstance(stateful, torch.nn.Module) and has_dtensors(stateful):
        # Whole tensors (a DDP checkpoint) into a sharded module: each rank keeps the piece it holds.
        state = shard_state_like(state, stateful.state_dict())
    stateful.load_state_dict(state)


def read_copy(store: CheckpointStore, root: str, component: StateComponent, saved: ComponentManifest, stem: str,
              mode: VerifyMode, *, into_live: bool = False, given: dict[str, memoryview] | None = None) -> Any:
    """The state of copy ``stem`` of ``component``, every file verified. ``into_live``: tensors are read straight
    into the live module's or optimizer's tensors (a load); otherwise into new memory (several copies at once)."""
    files = ComponentFiles(store, root, component.key, saved, mode,
                           live=(lambda: _live_tensors(component)) if into_live else None, given=given)
    available = set(files.entries)
    if not any(p.startswith(stem) for p in available):
        raise CorruptCheckpointError(f"component {component.key!r}: the checkpoint has no copy {stem}")
    flat = tree_name(stem) not in available
    merged = index_name(component.key)
    if merged in available and merged != index_name(stem):
        # The merged index of per-rank copies (for Hugging Face readers) is not read here, but a damaged
        # one is still a damaged checkpoint: refuse it like any other file.
        files.read_file(merged)
    return read_payload(stem, available, files.read_file, files.read_tensors, flat)


def _live_tensors(component: StateComponent) -> dict[str, torch.Tensor]:
    """A module's or optimizer's current tensors by their names in the checkpoint, to be read into in place.

    ``load_state_dict`` then copies each tensor onto itself, which torch skips: a load reads the bytes
    once, straight into the parameters and optimizer moments, without allocating a second copy.
    """
    stateful = component.stateful
    if not isinstance(stateful, (torch.nn.Module, torch.optim.Optimizer)):
        return {}
    # A DTensor's memory is its piece, not the whole tensor a file holds.
    encoded = encode_state(stateful.state_dict(), component.key, dtensors=True)
    return {name: tensor for name, tensor in encoded.tensors.items() if not is_dtensor(tensor)}


class _ShardTensors(FullTensors):
    """The tensors of a component's Hugging Face index, in file order; one input shard is held at a time."""

    def __init__(self, files: ComponentFiles) -> None:
        self.files = files
        rel = index_name(files.key)
        hf = parse_index(files.read_file(rel), rel)
        raw_ties = hf["metadata"].get("tied", {})
        self.ties = {str(k): str(v) for k, v in raw_ties.items()} if isinstance(raw_ties, dict) else {}
        self.source: dict[str, str] = {}
        for name, file in sorted(hf["weight_map"].items(), key=lambda item: (str(item[1]), item[0])):
            if not isinstance(file, str) or file not in files.entries or not file.endswith(".safetensors"):
                raise CorruptCheckpointError(f"{rel} points {name!r} to {file!r}, which component {files.key!r} "
                                             "does not list")
            self.source[name] = file
        self.tensors = self._with_shapes()
        self._shard: tuple[str, dict[str, torch.Tensor]] | None = None

    def _with_shapes(self) -> list[SavedTensor]:
        """Shapes and dtypes from the shards' headers (a few bytes each; the whole file is verified when read)."""
        store, root = self.files.store, self.files.root
        headers: dict[str, dict[str, Any]] = {}
        for rel in sorted(set(self.source.values())):
            with store.open_read(store.join(root, rel)) as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                if length > 100 * 1024 * 1024:
                    raise CorruptCheckpointError(f"{rel}: a safetensors header of {length} bytes is not plausible")
                headers[rel] = json.loads(handle.read(length))
        result = []
        for name, rel in self.source.items():
            entry = headers[rel].get(name)
            if not isinstance(entry, dict):
                raise CorruptCheckpointError(f"{rel} does not hold {name!r}, which its index maps there")
            dtype = dtype_from_name(entry.get("dtype"))
            if dtype is None:
                raise CorruptCheckpointError(f"{rel}: tensor {name!r} has unknown dtype {entry.get('dtype')!r}")
            result.append(SavedTensor(name, tuple(int(d) for d in entry.get("shape", [])), dtype))
        return result

    def tensor(self, name: str) -> torch.Tensor:
        rel = self.source[name]
        if self._shard is None or self._shard[0] != rel:
            self._shard = None  # free the previous input shard before reading the next
            self._shard = (rel, self.files.read_tensors(rel))
        return self._shard[1][name]

    def close(self) -> None:
        self._shard = None
