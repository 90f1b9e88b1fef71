"""The copy-format interface: how one copy of a component becomes files, and how those files are read back.

A pattern's rule names its copy format as data (``core.rules.Rule.files``); ``engine.formats.format_for`` turns
that record into one ``CopyFormat``, chosen once per component, and the save, the load and the export call the
same steps whatever the format. Two implementations exist:

================  ================================================  ===============================================
step              ``WholeTensorFormat`` (GLOBAL, REPLICATED, PER_*)  ``ChunkFormat`` (SHARDED)
================  ================================================  ===============================================
``plan``          HF safetensors shards, spread over the writers     every chunk once, by one rank holding it
``write``         this rank's shards, the index and the structure    this rank's chunk file and the structure
``merge``         rank 0: one HF index over per-rank copies          rank 0: the chunk index (refuses bad tiling)
``prepare_load``  nothing yet: ``finish`` reads this rank's copy     index and structure matched to the live state
``full_tensors``  the tensors of whole input shards                  tensors assembled from their chunks
================  ================================================  ===============================================

A new copy format is a new record in ``core/rules.py`` (its file names), a ``CopyFormat`` subclass here in the
engine, and one line in ``engine/formats.py``; the rows of the rule table that use it name the record.

Example:
    >>> fmt = format_for(SharingPattern.REPLICATED)                                   # doctest: +SKIP
    >>> plan = fmt.plan("model", placement, model.state_dict(), rank, options)       # doctest: +SKIP
    >>> written = fmt.write(store, write_root, plan, rank)                            # doctest: +SKIP
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from lightning_sharing.checkpoint.manifest import ComponentManifest, FileEntry
from lightning_sharing.core.declarations import StateComponent
from lightning_sharing.core.options import CheckpointOptions, VerifyMode
from lightning_sharing.core.rules import Placement
from lightning_sharing.core.topology import Topology
from lightning_sharing.engine.verified_files import ComponentFiles
from lightning_sharing.format.codec import EncodedState, encode_state
from lightning_sharing.format.copy_files import TREE_FORMAT, check_json_size, json_bytes, tree_name
from lightning_sharing.format.safetensors_io import tensors_checksum, tensors_file_size, write_blob, write_tensors
from lightning_sharing.storage import CheckpointStore

__all__ = ["CopyFormat", "CopyPlan", "FileJob", "FullTensors", "LoadContext", "PreparedLoad", "ReuseSource",
           "SavedTensor", "WrittenCopy", "reuse_file", "tree_job", "write_file"]


@dataclass(frozen=True)
class ReuseSource:
    """A file of an earlier checkpoint holding exactly what a ``FileJob`` would write (an incremental save):
    ``location`` in the store, its manifest record (``size``, ``checksum``, ``stamp``) and the checkpoint's name."""

    location: str
    size: int
    checksum: str
    stamp: str
    checkpoint: str
    detail: Any = None  # the format's record of the file when it was written (a chunk file's part of the index)


@dataclass
class FileJob:
    """One file a rank writes: tensors (``tensors``; the format decides how) or bytes (``data``, JSON).

    ``reuse``: an earlier checkpoint's file with the same content (``engine/incremental.py``): ``write_file`` links
    or copies it instead of writing, and writes the tensors only when the store cannot.
    """

    rel: str
    tensors: dict[str, torch.Tensor] | None = None
    data: bytes | None = None
    reuse: ReuseSource | None = None


@dataclass
class CopyPlan:
    """This rank's part of one copy of a component: its files, and the format's own record of the copy.

    ``jobs`` hold the tensors to write (a background save stages them, replacing ``job.tensors``);
    ``detail`` is what the format's ``write`` and ``merge`` need besides the files (plain, picklable data).
    """

    key: str
    stem: str
    jobs: list[FileJob] = field(default_factory=list)
    detail: Any = None


@dataclass(frozen=True)
class WrittenCopy:
    """What one rank wrote of one copy of a component; gathered to rank 0 for the commit.

    Attributes:
        key: the component.
        stem: the copy (e.g. ``model`` or ``rng/rank-00001``).
        rank: the writing rank.
        files: the files this rank wrote of the copy.
        detail: the format's record of what was written (its part of an index, a layout digest, ...).
    """

    key: str
    stem: str
    rank: int
    files: list[FileEntry]
    detail: Any = None


@dataclass(frozen=True)
class LoadContext:
    """What every load of a component needs: where the files are, both topologies, the loading rules."""

    store: CheckpointStore
    root: str
    saved_topology: Topology
    topology: Topology
    strict: bool
    mode: VerifyMode
    rank: int


class PreparedLoad(Protocol):
    """One component's load on this rank, planned (and matched to the live state) but not read yet.

    ``entries`` are saved entries that ranks take different parts of (empty when every rank loads the whole
    state); ``held`` says which of them this rank takes. The load refuses (strict) entries no rank takes.
    """

    entries: tuple[str, ...]
    held: tuple[bool, ...]

    def finish(self, store: CheckpointStore, root: str) -> Any:
        """Read (verified) into the live state and hand it to the stateful's ``load_state_dict``."""


@dataclass(frozen=True)
class SavedTensor:
    """One full tensor of a saved component, as the export lists it (global shape, saved dtype)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


class FullTensors(ABC):
    """A saved component's full tensors, one at a time (memory: about one tensor, or one input file).

    ``tensors`` lists them in the order an export writes them; ``ties`` maps an alias to its stored name.
    """

    tensors: list[SavedTensor]
    ties: dict[str, str]

    @abstractmethod
    def tensor(self, name: str) -> torch.Tensor:
        """The full tensor ``name``, read and verified."""

    @abstractmethod
    def close(self) -> None:
        """Release open files and buffers (a later ``tensor`` opens them again)."""


class CopyFormat(ABC):
    """How the tensors of one copy of a component are laid out in files (see the module docstring).

    ``holds_dtensors``: the format stores ``DTensor``s piece by piece (the state is encoded keeping them, and a
    replication check compares what each one is rather than its bytes).
    ``shared_layout``: the writers of one copy must plan the same files (a REPLICATED copy's shards spread over its
    ranks); an incremental save then groups its tensors only by what every rank knows alike (``requires_grad``).
    """

    holds_dtensors: bool = False
    shared_layout: bool = True

    def encode(self, state: Any, key: str) -> EncodedState:
        """``state`` split into a JSON tree and tensors, as this format stores it."""
        return encode_state(state, key, dtensors=self.holds_dtensors)

    def plan(self, key: str, placement: Placement, state: Any, rank: int, options: CheckpointOptions) -> CopyPlan:
        """This rank's files of copy ``placement`` of component ``key`` (none when it writes none of them)."""
        return self.plan_encoded(key, placement, self.encode(state, key), rank, options)

    @abstractmethod
    def plan_encoded(self, key: str, placement: Placement, encoded: EncodedState, rank: int,
                     options: CheckpointOptions) -> CopyPlan:
        """``plan`` of a state already encoded (``encode``)."""

    def piece(self, tensor: torch.Tensor) -> torch.Tensor:
        """What this rank writes of one of the state's tensors (a format of pieces writes a DTensor's local one)."""
        return tensor

    def refill(self, plan: CopyPlan, encoded: EncodedState) -> CopyPlan:
        """``plan`` (made by ``plan_encoded`` for a state of the same layout: names, shapes, dtypes, ties) with the
        tensors and the structure of ``encoded``: what ``plan_encoded`` would return, without planning again.

        A job's ``tensors`` give the names to take (their values are ignored); the structure file is written anew
        (it holds the state's non-tensor values); every other file and the ``detail`` depend on the layout only.
        """
        jobs = []
        for job in plan.jobs:
            if job.tensors is not None:
                jobs.append(FileJob(job.rel, tensors={name: self.piece(encoded.tensors[name]) for name in job.tensors}))
            elif job.rel == tree_name(plan.stem):
                jobs.append(tree_job(plan.stem, encoded))
            else:
                jobs.append(FileJob(job.rel, data=job.data))
        return CopyPlan(plan.key, plan.stem, jobs, plan.detail)

    def planned_file(self, tensors: dict[str, torch.Tensor]) -> tuple[int, Callable[[], str]] | None:
        """The size of the file ``write`` makes of ``tensors`` and how to compute its checksum without writing it (an
        incremental save without memory compares them with the previous checkpoint's); None: not known before."""
        return tensors_file_size(tensors), lambda: tensors_checksum(tensors)

    @abstractmethod
    def write(self, store: CheckpointStore, root: str, plan: CopyPlan, rank: int) -> WrittenCopy:
        """Write this rank's files of ``plan`` under ``root``, checksummed as they are written."""

    @abstractmethod
    def merge(self, component: StateComponent, copies: list[WrittenCopy]) -> list[FileJob]:
        """Rank 0, at the commit: the files that join what every rank wrote of ``component`` (its indexes).

        Raises ``CheckpointError`` naming the component when the ranks' parts do not fit together.
        """

    @abstractmethod
    def prepare_load(self, component: StateComponent, saved: ComponentManifest, context: LoadContext) -> PreparedLoad:
        """Plan this rank's load of ``component``; anything read now is verified, nothing is loaded yet."""

    @abstractmethod
    def full_tensors(self, files: ComponentFiles) -> FullTensors | None:
        """The component's full tensors for an export; None when its files hold none in this format."""


def tree_job(stem: str, encoded: EncodedState) -> FileJob:
    """The structure file of copy ``stem`` (a non-flat state's tree, its non-tensor values and ties)."""
    body = {"format": TREE_FORMAT, "version": 1, "tree": encoded.tree, "ties": encoded.ties}
    return FileJob(tree_name(stem), data=json_bytes(body))


def reuse_file(store: CheckpointStore, root: str, job: FileJob, rank: int) -> FileEntry | None:
    """``job.reuse`` linked or copied to ``job.rel`` under ``root`` (``CheckpointStore.reuse_file``: only when it still
    is what its manifest recorded); its manifest entry, or None when the file is to be written."""
    source = job.reuse
    if source is None:
        return None
    stamp = store.reuse_file(source.location, source.size, source.stamp, store.join(root, job.rel))
    if stamp is None:
        return None
    origin = {"kind": store.reuse_kind or "copied", "from": source.checkpoint}
    return FileEntry(job.rel, source.size, source.checksum, rank, stamp=stamp, origin=origin)


def write_file(store: CheckpointStore, root: str, job: FileJob, rank: int) -> FileEntry:
    """Write one file: ``job.tensors`` as one safetensors file, else ``job.data``; returns its manifest entry.

    The checksum is computed from the bytes as they are written; no file is read back. With ``job.reuse`` the
    earlier file is linked or copied (``CheckpointStore.reuse_file``: only when it still is what its manifest
    recorded); it is written only when that is not possible.
    """
    location = store.join(root, job.rel)
    reused = reuse_file(store, root, job, rank)
    if reused is not None:
        return reused
    if job.tensors is None and job.rel.endswith(".json"):
        check_json_size(len(job.data or b""), job.rel)
    with store.open_write(location) as sink:
        if job.tensors is not None:
            size, checksum = write_tensors(sink, job.tensors)
        else:
            size, checksum = write_blob(sink, job.data or b"")
    return FileEntry(job.rel, size, checksum, rank, stamp=store.stamp(location), origin={"kind": "written"})
