"""Reading one component's copy back from a checkpoint, verifying every file it touches.

Only files the manifest lists for the component are opened; each is checked against its manifest
entry (a regular file inside the checkpoint, the recorded size, and, with ``VerifyMode.CHECKSUM``,
the recorded checksum). Every file is read once: safetensors shards are hashed while they are read,
JSON files are hashed in memory, and a module's or optimizer's tensors are read straight into the
live tensors.

Example:
    >>> load_component(store, root, component, manifest.components["model"], placement,
    ...                VerifyMode.CHECKSUM)                                            # doctest: +SKIP
"""

from __future__ import annotations

import torch

from lightning_sharing.checkpoint.manifest import ComponentManifest, FileEntry
from lightning_sharing.checkpoint.reading import check_algorithm, checksum_mismatch, verify_entry
from lightning_sharing.core.declarations import StateComponent
from lightning_sharing.core.options import VerifyMode
from lightning_sharing.core.rules import Placement
from lightning_sharing.errors import CorruptCheckpointError
from lightning_sharing.format.codec import encode_state
from lightning_sharing.format.copy_files import index_name, read_payload, tree_name
from lightning_sharing.format.safetensors_io import bytes_checksum, read_tensors
from lightning_sharing.sharded.dtensor_boxes import has_dtensors, is_dtensor
from lightning_sharing.sharded.redistribute import shard_state_like
from lightning_sharing.storage.base import CheckpointStore

__all__ = ["ComponentFiles", "load_component"]


class ComponentFiles:
    """The listed files of one component, each read once and verified."""

    def __init__(self, store: CheckpointStore, root: str, component: StateComponent, saved: ComponentManifest,
                 mode: VerifyMode) -> None:
        self.store, self.root, self.key, self.mode = store, root, component.key, mode
        self.component = component
        self.entries = {entry.path: entry for entry in saved.files}
        self._live: dict[str, torch.Tensor] | None = None

    def listed(self, rel: str) -> FileEntry:
        if rel not in self.entries:
            raise CorruptCheckpointError(f"component {self.key!r} needs {rel}, which the manifest does not list")
        return self.entries[rel]

    def _where(self, entry: FileEntry) -> str:
        return f"component {self.key!r}, file {entry.path} (written by rank {entry.rank})"

    def _open(self, rel: str) -> tuple[FileEntry, str]:
        entry = self.listed(rel)
        if self.mode is VerifyMode.CHECKSUM:  # the checksum is verified while the file is read
            check_algorithm(entry, self.key)
        return entry, verify_entry(self.store, self.root, entry, VerifyMode.SIZE, self.key)

    def read_file(self, rel: str) -> bytes:
        entry, location = self._open(rel)
        data = self.store.read_bytes(location)
        if self.mode is VerifyMode.CHECKSUM and bytes_checksum(data) != entry.checksum:
            raise checksum_mismatch(self._where(entry), bytes_checksum(data), entry.checksum)
        return data

    def read_tensors(self, rel: str) -> dict[str, torch.Tensor]:
        entry, location = self._open(rel)
        checksum = entry.checksum if self.mode is VerifyMode.CHECKSUM else None
        try:
            if self._live is None:
                self._live = _live_tensors(self.component)
            with self.store.open_read(location) as handle:
                return read_tensors(handle, entry.size, rel.rsplit("/", 1)[-1], checksum, into=self._live)
        except CorruptCheckpointError as exc:
            # "<name> has checksum ..." becomes "component 'k', file <rel> (written by rank r) has checksum ...",
            # the same text as a file verified before it is read (checkpoint.reading.verify_entry).
            detail = str(exc)
            own = f"{rel.rsplit('/', 1)[-1]} "
            detail = detail[len(own) - 1:] if detail.startswith(own) else f": {detail}"
            raise CorruptCheckpointError(f"{self._where(entry)}{detail}") from exc


def load_component(store: CheckpointStore, root: str, component: StateComponent, saved: ComponentManifest,
                   placement: Placement, mode: VerifyMode) -> None:
    """Read the copy ``placement`` of ``component`` under ``root`` and hand it to ``load_state_dict``."""
    files = ComponentFiles(store, root, component, saved, mode)
    available = set(files.entries)
    if not any(p.startswith(placement.stem) for p in available):
        raise CorruptCheckpointError(f"component {component.key!r}: the checkpoint has no copy {placement.stem}")
    flat = tree_name(placement.stem) not in available
    merged = index_name(component.key)
    if merged in available and merged != index_name(placement.stem):
        # The merged index of per-rank copies (for Hugging Face readers) is not read here, but a damaged
        # one is still a damaged checkpoint: refuse it like any other file.
        files.read_file(merged)
    state = read_payload(placement.stem, available, files.read_file, files.read_tensors, flat)
    stateful = component.stateful
    if isinstance(stateful, torch.nn.Module) and has_dtensors(stateful):
        # Whole tensors (a DDP checkpoint) into a sharded module: each rank keeps the piece it holds.
        state = shard_state_like(state, stateful.state_dict())
    stateful.load_state_dict(state)


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
