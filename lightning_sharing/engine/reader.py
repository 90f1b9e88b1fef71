"""Reading one component's copy back from a checkpoint directory, verifying every file it touches.

Only files the manifest lists for the component are opened; each is checked against its manifest
entry (a regular file inside the checkpoint, the recorded size, and, with ``verify="checksum"``, the
recorded checksum). Safetensors shards are hashed while they are read, in one pass, and a module's or
optimizer's tensors are read straight into the live tensors.

Example:
    >>> load_component(Path("ckpt/step=10.ckpt"), component, manifest.components["model"], placement,
    ...                mode="checksum")                                            # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_sharing.core.declarations import StateComponent
from lightning_sharing.core.rules import Placement
from lightning_sharing.errors import CorruptCheckpointError
from lightning_sharing.format.codec import encode_state
from lightning_sharing.format.layout import index_name, read_payload, tree_name
from lightning_sharing.format.manifest import ComponentManifest, FileEntry
from lightning_sharing.format.safetensors_io import read_tensor_file
from lightning_sharing.storage.local import check_algorithm, verify_file

__all__ = ["load_component"]


def load_component(root: Path, component: StateComponent, saved: ComponentManifest, placement: Placement,
                   mode: str) -> None:
    """Read the copy ``placement`` of ``component`` under ``root`` and hand it to ``load_state_dict``."""
    key = component.key
    entries = {entry.path: entry for entry in saved.files}

    def listed(rel: str) -> FileEntry:
        if rel not in entries:
            raise CorruptCheckpointError(f"component {key!r} needs {rel}, which the manifest does not list")
        return entries[rel]

    def open_file(rel: str) -> Path:
        return verify_file(root, listed(rel), mode, key)

    live = _live_tensors(component)

    def read_tensors(rel: str) -> dict[str, torch.Tensor]:
        entry = listed(rel)
        if mode == "checksum":  # the checksum is verified while the file is read: check the size here
            check_algorithm(entry, key)
        path = verify_file(root, entry, "size" if mode == "checksum" else mode, key)
        try:
            return read_tensor_file(path, entry.checksum if mode == "checksum" else None, into=live)
        except CorruptCheckpointError as exc:
            # "<name> has checksum ..." becomes "component 'k', file <rel> (written by rank r) has checksum ...",
            # the same text as a file verified before it is read (storage.local.verify_file).
            detail = str(exc)
            own = f"{path.name} "
            detail = detail[len(own) - 1:] if detail.startswith(own) else f": {detail}"
            raise CorruptCheckpointError(
                f"component {key!r}, file {rel} (written by rank {entry.rank}){detail}") from exc

    available = set(entries)
    if not any(p.startswith(placement.stem) for p in available):
        raise CorruptCheckpointError(f"component {key!r}: the checkpoint has no copy {placement.stem}")
    flat = tree_name(placement.stem) not in available
    merged = index_name(key)
    if merged in available and merged != index_name(placement.stem):
        # The merged index of per-rank copies (for Hugging Face readers) is not read here, but a damaged
        # one is still a damaged checkpoint: refuse it like any other file.
        open_file(merged)
    component.stateful.load_state_dict(read_payload(placement.stem, available, open_file, read_tensors, flat))


def _live_tensors(component: StateComponent) -> dict[str, torch.Tensor]:
    """A module's or optimizer's current tensors by their names in the checkpoint, to be read into in place.

    ``load_state_dict`` then copies each tensor onto itself, which torch skips: a load reads the bytes
    once, straight into the parameters and optimizer moments, without allocating a second copy.
    """
    stateful = component.stateful
    if not isinstance(stateful, (torch.nn.Module, torch.optim.Optimizer)):
        return {}
    return encode_state(stateful.state_dict(), component.key).tensors
