"""The manifest: a typed, validated JSON record of everything a checkpoint holds.

``checkpoint_manifest.json`` is written last; its presence is what makes a checkpoint complete.
Parsing is strict: anything malformed raises ``ManifestError`` and no path may leave the
checkpoint directory.

Example:
    >>> m = CheckpointManifest.load("runs/step=500.ckpt")           # doctest: +SKIP
    >>> {k: c.sharing_pattern for k, c in m.components.items()}     # doctest: +SKIP
    {'model': 'replicated', 'rng': 'per_rank'}
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning_sharing.checkpoint.hf_record import HFModelRecord
from lightning_sharing.core.declarations import SharingPattern
from lightning_sharing.core.topology import Topology
from lightning_sharing.errors import CheckpointNotFoundError, ComponentDeclarationError, ManifestError
from lightning_sharing.storage import MANIFEST_NAME, CheckpointStore, store_for

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "ORIGIN_KINDS",
    "READABLE_VERSIONS",
    "CheckpointManifest",
    "ComponentManifest",
    "FileEntry",
    "check_relative_path",
    "data_root",
    "read_manifest",
]

FORMAT_NAME = "lightning_sharing"
#: Version 2 (incremental saves) added ``stamp`` and ``origin`` to file entries and shard groups to file names;
#: version 1 checkpoints are still read. A reader of version 1 refuses version 2, saying to upgrade.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
#: How a file came to be in its checkpoint (``FileEntry.origin["kind"]``).
ORIGIN_KINDS = ("written", "linked", "copied")
# A manifest is small (one entry per file); anything bigger is not one of ours.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
_CHECKSUM_RE = re.compile(r"^[a-z0-9_]+:[0-9a-f]+$")


def check_relative_path(path: Any) -> str:
    """Return ``path`` if it is a plain relative POSIX path inside the checkpoint, else raise."""
    if not isinstance(path, str) or not path:
        raise ManifestError(f"file path {path!r} in the manifest is not a non-empty string")
    if path.startswith("/") or "\\" in path or "\x00" in path or re.match(r"^[A-Za-z]:", path):
        raise ManifestError(f"file path {path!r} in the manifest is absolute; only relative paths are allowed")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts) or posixpath.normpath(path) != path:
        raise ManifestError(
            f"file path {path!r} in the manifest is not a normalised path inside the checkpoint "
            "('..', '.' and empty parts are refused)"
        )
    return path


@dataclass
class FileEntry:
    """One file of a checkpoint: relative path, size in bytes, checksum ``"algo:hex"``, writing rank.

    ``stamp``: what the store said of the file once written (a local file's inode and modification time, an object's
    ETag), so that an incremental save can check cheaply that the file is still what was saved before reusing it.
    ``origin``: where it came from, ``{"kind": "written"}`` or ``{"kind": "linked" | "copied", "from": NAME}`` (the
    checkpoint it was reused from). Both None in checkpoints of format version 1 (the keys are then absent).

    Example:
        >>> FileEntry("model-00001-of-00001.safetensors", 8, "xxh3_128:00", 0, origin={"kind": "written"}).reused
        False
    """

    path: str
    size: int
    checksum: str
    rank: int
    stamp: str | None = None
    origin: dict[str, str] | None = None

    @property
    def reused(self) -> bool:
        """True when the save linked or copied the file from an earlier checkpoint instead of writing it."""
        return self.origin is not None and self.origin.get("kind") in ("linked", "copied")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("stamp", "origin"):
            if data[name] is None:
                del data[name]
        return data

    @classmethod
    def from_json(cls, data: Any) -> FileEntry:
        _expect(isinstance(data, dict), f"file entry {data!r} is not an object")
        path = check_relative_path(data.get("path"))
        size, rank, checksum = data.get("size"), data.get("rank"), data.get("checksum")
        _expect(isinstance(size, int) and not isinstance(size, bool) and size >= 0,
                f"file {path!r}: size {size!r} is not a non-negative integer")
        _expect(isinstance(rank, int) and not isinstance(rank, bool) and rank >= 0,
                f"file {path!r}: rank {rank!r} is not a non-negative integer")
        _expect(isinstance(checksum, str) and bool(_CHECKSUM_RE.match(checksum)),
                f"file {path!r}: checksum {checksum!r} is not of the form 'algorithm:hex'")
        stamp, origin = data.get("stamp"), data.get("origin")
        _expect(stamp is None or isinstance(stamp, str), f"file {path!r}: stamp {stamp!r} is not a string")
        _expect(origin is None or (isinstance(origin, dict) and origin.get("kind") in ORIGIN_KINDS
                                   and all(isinstance(v, str) for v in origin.values())),
                f"file {path!r}: origin {origin!r} is not {{'kind': one of {ORIGIN_KINDS}, 'from': name}}")
        return cls(path=path, size=size, checksum=checksum, rank=rank, stamp=stamp, origin=origin)


@dataclass
class ComponentManifest:
    """What was saved for one component.

    ``ranks`` are the writing ranks; ``replicated_across`` the ranks holding identical state
    (REPLICATED) or each group instance's members (PER_GROUP); ``storage`` is ``"tensors"`` for a
    flat tensor dict stored as safetensors alone, ``"tree"`` for a JSON structure plus tensors.
    ``hf_model`` describes the ``transformers`` model the component wraps (``checkpoint.hf_record``); None (the
    key is absent from the JSON) for any other component and in checkpoints older than the field.
    """

    key: str
    sharing_pattern: str
    ranks: list[int]
    group_name: str | None = None
    replicated_across: list[Any] | None = None
    required: bool = True
    storage: str = "tree"
    validation: str = "none"
    files: list[FileEntry] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    hf_model: HFModelRecord | None = None

    @property
    def size_bytes(self) -> int:
        """Total bytes of this component's files."""
        return sum(f.size for f in self.files)

    @property
    def pattern(self) -> SharingPattern:
        """The saved sharing pattern as an enum member."""
        return SharingPattern(self.sharing_pattern)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["size_bytes"] = self.size_bytes
        data["files"] = [entry.to_json() for entry in self.files]
        if self.hf_model is None:  # components that wrap no transformers model keep the format they always had
            del data["hf_model"]
        else:
            data["hf_model"] = self.hf_model.to_json()
        return data

    @classmethod
    def from_json(cls, key: str, data: Any) -> ComponentManifest:
        _expect(isinstance(data, dict), f"component {key!r} is not an object")
        pattern = data.get("sharing_pattern")
        _expect(isinstance(pattern, str) and pattern in {p.value for p in SharingPattern},
                f"component {key!r}: unknown sharing_pattern {pattern!r}")
        ranks = data.get("ranks")
        _expect(isinstance(ranks, list) and all(isinstance(r, int) and not isinstance(r, bool) for r in ranks),
                f"component {key!r}: ranks {ranks!r} is not a list of integers")
        storage = data.get("storage", "tree")
        _expect(isinstance(storage, str) and storage in ("tree", "tensors"),
                f"component {key!r}: unknown storage kind {storage!r}")
        files = data.get("files", [])
        _expect(isinstance(files, list), f"component {key!r}: files is not a list")
        group = data.get("group_name")
        _expect(group is None or isinstance(group, str), f"component {key!r}: group_name is not a string")
        metadata = data.get("metadata", {})
        _expect(isinstance(metadata, dict), f"component {key!r}: metadata is not an object")
        hf_model = data.get("hf_model")
        if hf_model is not None:
            hf_model = HFModelRecord.from_json(hf_model, f"component {key!r}: hf_model")
        return cls(
            key=key,
            sharing_pattern=pattern,
            ranks=list(ranks),
            group_name=group,
            replicated_across=data.get("replicated_across"),
            required=bool(data.get("required", True)),
            storage=storage,
            validation=str(data.get("validation", "none")),
            files=[FileEntry.from_json(f) for f in files],
            metadata=metadata,
            hf_model=hf_model,
        )


@dataclass
class CheckpointManifest:
    """The record of a whole checkpoint (see docs/patterns.md for the on-disk layout).

    ``data_prefix`` is where the files live relative to the checkpoint: None (the key is absent from the
    JSON) when they are in the checkpoint directory itself, as on a filesystem; on an object store the
    save's generation, e.g. ``g-<token>-<base>`` (see docs/storage.md). File paths are relative to it.
    """

    world_size: int
    topology: dict[str, Any]
    components: dict[str, ComponentManifest]
    created_at: str
    step: int | None = None
    checksum_algorithm: str = "xxh3_128"
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    library_version: str = ""
    torch_version: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    data_prefix: str | None = None

    def all_files(self) -> list[FileEntry]:
        """Every file of every component."""
        return [f for c in self.components.values() for f in c.files]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["components"] = {k: c.to_json() for k, c in self.components.items()}
        if self.data_prefix is None:  # checkpoints on a filesystem keep the format they always had
            del data["data_prefix"]
        return data

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, data: Any) -> CheckpointManifest:
        _expect(isinstance(data, dict), "the manifest is not a JSON object")
        _expect(data.get("format") == FORMAT_NAME,
                f"the manifest's format is {data.get('format')!r}, expected {FORMAT_NAME!r}")
        version = data.get("format_version")
        if version not in READABLE_VERSIONS:
            raise ManifestError(
                f"checkpoint format version {version!r} is not supported by this lightning_sharing "
                f"(it reads versions {', '.join(map(str, READABLE_VERSIONS))}); upgrade lightning_sharing to read it"
            )
        world_size = data.get("world_size")
        _expect(isinstance(world_size, int) and world_size >= 1, f"world_size {world_size!r} is invalid")
        components = data.get("components")
        _expect(isinstance(components, dict), "the manifest has no components object")
        topology = data.get("topology")
        _expect(isinstance(topology, dict), "the manifest has no topology object")
        try:
            parsed_topology = Topology.from_json(topology)
        except ComponentDeclarationError as exc:
            raise ManifestError(f"invalid manifest: {exc}") from exc
        _expect(parsed_topology.world_size == world_size,
                f"topology world_size {parsed_topology.world_size} differs from world_size {world_size}")
        step = data.get("step")
        _expect(step is None or (isinstance(step, int) and not isinstance(step, bool)),
                f"step {step!r} is not an integer")
        data_prefix = data.get("data_prefix")
        if data_prefix is not None:
            data_prefix = check_relative_path(data_prefix)
        manifest = cls(
            world_size=world_size,
            topology=topology,
            components={str(k): ComponentManifest.from_json(str(k), v) for k, v in components.items()},
            created_at=str(data.get("created_at", "")),
            step=step,
            checksum_algorithm=str(data.get("checksum_algorithm", "xxh3_128")),
            library_version=str(data.get("library_version", "")),
            torch_version=str(data.get("torch_version", "")),
            metadata=data.get("metadata") if isinstance(data.get("metadata"), dict) else {},
            data_prefix=data_prefix,
        )
        manifest.format_version = version
        paths = [f.path for f in manifest.all_files()]
        duplicates = sorted({p for p in paths if paths.count(p) > 1})
        _expect(not duplicates, f"the manifest lists files more than once: {duplicates}")
        _expect(MANIFEST_NAME not in paths, "the manifest lists itself as a data file")
        return manifest

    @classmethod
    def parse(cls, raw: bytes, where: str) -> CheckpointManifest:
        """Parse and validate a manifest's bytes; ``where`` names the file in errors."""
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{where} is {len(raw)} bytes, over the {MAX_MANIFEST_BYTES}-byte limit for a manifest")
        try:
            data = json.loads(raw.decode("utf-8"))
        except ValueError as exc:  # bad UTF-8, bad JSON, or an integer too long to convert
            raise ManifestError(f"{where} is not valid JSON ({exc}); the checkpoint is corrupt") from exc
        except RecursionError as exc:
            raise ManifestError(f"{where} is nested too deeply to be a manifest") from exc
        try:
            return cls.from_json(data)
        except ManifestError as exc:  # name the file: "invalid manifest: ..." alone does not say which
            raise ManifestError(f"{where}: {exc}") from exc

    @classmethod
    def load(cls, checkpoint_dir: str | os.PathLike[str], storage_options: dict[str, Any] | None = None,
             ) -> CheckpointManifest:
        """Read and validate ``checkpoint_dir/checkpoint_manifest.json`` (a local path or an fsspec URL)."""
        store = store_for(checkpoint_dir, storage_options)
        return read_manifest(store, store.normalize(os.fspath(checkpoint_dir)), display=os.fspath(checkpoint_dir))


def read_manifest(store: CheckpointStore, root: str, display: str | None = None) -> CheckpointManifest:
    """Read and validate the manifest of the checkpoint at ``root``; raises ``ManifestError``.

    ``display`` is how the checkpoint is named in errors (the caller's spelling of the path).
    """
    shown = display if display is not None else root
    if not store.is_dir(root):
        if store.size(root) is None:  # nothing there, or a dangling link
            raise CheckpointNotFoundError(f"Checkpoint file not found: {shown} does not exist (a "
                                          "lightning_sharing checkpoint is a directory)")
        raise ManifestError(f"{shown} is not a checkpoint directory (it is a file)")
    location = store.join(root, MANIFEST_NAME)
    named = store.join(shown, MANIFEST_NAME)
    if store.check_inside(root, MANIFEST_NAME) is not None:
        raise ManifestError(
            f"{named} is a symbolic link; a checkpoint's manifest must be a regular file inside it "
            "(refusing a checkpoint that may have been tampered with)"
        )
    size = store.size(location)
    if size is None:
        raise ManifestError(
            f"{named} is missing: {shown} is not a complete lightning_sharing checkpoint "
            "(the save may have been interrupted); use find_latest_checkpoint() to pick a complete one"
        )
    if size > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{named} is {size} bytes, over the {MAX_MANIFEST_BYTES}-byte limit for a manifest")
    return CheckpointManifest.parse(store.read_bytes(location), named)


def data_root(store: CheckpointStore, root: str, manifest: CheckpointManifest) -> str:
    """Where the files of the checkpoint at ``root`` are: ``root`` itself, or its ``data_prefix`` (a generation).

    Every ``FileEntry.path`` is relative to it.
    """
    return store.join(root, manifest.data_prefix) if manifest.data_prefix else root


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise ManifestError(f"invalid manifest: {message}")
