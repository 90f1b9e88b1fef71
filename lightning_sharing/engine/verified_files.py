"""The listed files of one saved component, each read once and verified against its manifest entry.

Only files the manifest lists for the component are opened; each is checked against its entry (a regular file
inside the checkpoint, the recorded size, and, with ``VerifyMode.CHECKSUM``, the recorded checksum). JSON files
are hashed in memory; safetensors files are hashed while they are read, optionally straight into live tensors.
Every copy format reads through this class, at load and at export. Files another rank already read and verified
(``given``: a read-once load, ``engine/read_once.py``) are served from memory, through the same parsing, and not
verified again.

Example:
    >>> files = ComponentFiles(store, root, "model", manifest.components["model"], VerifyMode.CHECKSUM)
    ... # doctest: +SKIP
    >>> index = files.read_file("model.safetensors.index.json")                     # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from lightning_sharing.checkpoint.manifest import ComponentManifest, FileEntry
from lightning_sharing.checkpoint.reading import check_algorithm, checksum_mismatch, verify_entry
from lightning_sharing.core.options import VerifyMode
from lightning_sharing.errors import CorruptCheckpointError
from lightning_sharing.format.safetensors_io import bytes_checksum, read_tensors
from lightning_sharing.storage import CheckpointStore

__all__ = ["ComponentFiles", "MemoryFile"]


class ComponentFiles:
    """The listed files of component ``key`` under ``root``, each read once and verified.

    ``live`` (called once, at the first tensor read) gives tensors to read into in place, by their names in the
    checkpoint (a module's parameters, an optimizer's moments); other tensors are allocated. ``given`` maps listed
    files to their bytes, already verified by the rank that read them from storage: those are not read again.
    """

    def __init__(self, store: CheckpointStore, root: str, key: str, saved: ComponentManifest, mode: VerifyMode,
                 live: Callable[[], dict[str, torch.Tensor]] | None = None,
                 given: Mapping[str, memoryview] | None = None) -> None:
        self.store, self.root, self.key, self.mode = store, root, key, mode
        self.entries = {entry.path: entry for entry in saved.files}
        self.given = dict(given or {})
        self._live_of = live
        self._live: dict[str, torch.Tensor] | None = None

    def listed(self, rel: str) -> FileEntry:
        """The manifest entry of ``rel``; refuses a file the manifest does not list for the component."""
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
        """The bytes of listed file ``rel``, verified."""
        if rel in self.given:
            self.listed(rel)
            return self.given[rel].tobytes()
        entry, location = self._open(rel)
        data = self.store.read_bytes(location)
        if self.mode is VerifyMode.CHECKSUM and bytes_checksum(data) != entry.checksum:
            raise checksum_mismatch(self._where(entry), bytes_checksum(data), entry.checksum)
        return data

    def read_tensors(self, rel: str) -> dict[str, torch.Tensor]:
        """The tensors of listed safetensors file ``rel``, hashed while read (into the live tensors where given)."""
        if rel in self.given:  # verified by the rank that read it from storage
            entry, location, checksum = self.listed(rel), "", None
        else:
            entry, location = self._open(rel)
            checksum = entry.checksum if self.mode is VerifyMode.CHECKSUM else None
        try:
            if self._live is None:
                self._live = self._live_of() if self._live_of is not None else {}
            name = rel.rsplit("/", 1)[-1]
            if rel in self.given:
                return read_tensors(MemoryFile(self.given[rel]), entry.size, name, None, into=self._live)
            with self.store.open_read(location) as handle:
                return read_tensors(handle, entry.size, name, checksum, into=self._live)
        except CorruptCheckpointError as exc:
            # "<name> has checksum ..." becomes "component 'k', file <rel> (written by rank r) has checksum ...",
            # the same text as a file verified before it is read (checkpoint.reading.verify_entry).
            detail = str(exc)
            own = f"{rel.rsplit('/', 1)[-1]} "
            detail = detail[len(own) - 1:] if detail.startswith(own) else f": {detail}"
            raise CorruptCheckpointError(f"{self._where(entry)}{detail}") from exc


class MemoryFile:
    """A read-only binary file over bytes already in memory (``read``, ``readinto``, ``seek``, ``tell``), without
    copying them first as ``io.BytesIO`` would."""

    def __init__(self, data: memoryview) -> None:
        self._data = memoryview(data).cast("B")
        self._position = 0

    def readinto(self, buffer: Any) -> int:
        target = memoryview(buffer).cast("B")
        count = min(len(target), len(self._data) - self._position)
        target[:count] = self._data[self._position:self._position + count]
        self._position += count
        return count

    def read(self, size: int = -1) -> bytes:
        end = len(self._data) if size < 0 else min(len(self._data), self._position + size)
        data = self._data[self._position:end].tobytes()
        self._position = end
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._position, len(self._data))[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position
