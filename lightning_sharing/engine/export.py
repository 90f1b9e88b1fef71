"""Exporting a component's full tensors as Hugging Face sharded safetensors, streaming.

The output directory holds ``model-0000k-of-0000N.safetensors`` files of at most ``max_shard_size``
bytes (a larger single tensor gets a file of its own) and ``model.safetensors.index.json``, which plain
``safetensors`` and ``transformers`` read. Tensors are written one at a time, so memory stays about
one tensor (SHARDED: the tensor is assembled from its chunks, each read and verified block by block)
or one input shard (a component stored as whole-tensor shards: each shard is read once, verified
against the manifest, and its tensors written in order): never the whole model. Tied weights are
stored once and listed under ``metadata.tied``, as in the checkpoint.

The output shards can be written by several ranks at once (``write_shards`` with ``ExportPlan.assign``):
``CheckpointCoordinator.save_checkpoint(..., export_hf=...)`` has every rank write its share.

Example:
    >>> result = export_checkpoint("runs/step=500.ckpt", "runs/hf", dtype="bfloat16")   # doctest: +SKIP
    >>> result.files                                                                  # doctest: +SKIP
    ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lightning_sharing.checkpoint.manifest import CheckpointManifest, FileEntry, data_root, read_manifest
from lightning_sharing.checkpoint.reading import verify_entry
from lightning_sharing.core.options import DEFAULT_MAX_SHARD_SIZE, VerifyMode
from lightning_sharing.core.rules import rule
from lightning_sharing.distributed.collectives import agreement, get_rank, get_world_size, on_rank_zero
from lightning_sharing.engine.save_plan import assign_writers
from lightning_sharing.errors import CheckpointError, ComponentDeclarationError, CorruptCheckpointError
from lightning_sharing.format.copy_files import index_name, json_bytes, parse_index, parse_json
from lightning_sharing.format.safetensors_io import (
    DescriptorSink,
    bytes_checksum,
    dtype_from_name,
    dtype_name,
    encode_header,
    read_tensors,
)
from lightning_sharing.sharded.chunkfile import StoreFiles
from lightning_sharing.sharded.index import ShardedIndex
from lightning_sharing.sharded.load import plan_reads, read_chunks
from lightning_sharing.storage import CheckpointStore, store_for
from lightning_sharing.storage.local import fsync_dir, rmtree_missing_ok

__all__ = ["HF_INDEX", "ExportPlan", "ExportResult", "HFExport", "abort_export", "begin_export", "commit_export",
           "export_checkpoint", "parse_dtype", "parse_size", "plan_export", "write_shards"]

HF_INDEX = "model.safetensors.index.json"
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: int | str) -> int:
    """Bytes from ``5GB``, ``500MB``, ``2GiB`` or a plain integer (Hugging Face's ``max_shard_size`` spelling)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ComponentDeclarationError(f"max_shard_size={value!r} is not a size such as 5GB, 500MB or 1048576")
    size = int(float(match[1]) * _UNITS[(match[2] or "b").lower()])
    if size < 1:
        raise ComponentDeclarationError(f"max_shard_size={value!r} must be at least one byte")
    return size


def parse_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """A torch floating-point dtype from ``torch.bfloat16`` or ``"bfloat16"`` (None: keep the saved dtypes)."""
    if value is None or isinstance(value, torch.dtype):
        dtype = value
    else:
        dtype = getattr(torch, str(value).removeprefix("torch."), None)
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ComponentDeclarationError(f"dtype={value!r} is not a floating-point torch dtype such as bfloat16")
    if dtype is not None:
        dtype_name(dtype)  # safetensors must be able to hold it
    return dtype


@dataclass(frozen=True)
class HFExport:
    """Where and how ``save_checkpoint(..., export_hf=HFExport(...))`` writes a Hugging Face copy.

    Args:
        path: the output directory (a local or mounted path; replaced if it holds an earlier export).
        component: the component whose tensors are exported.
        dtype: cast floating-point tensors to this dtype (None keeps the saved dtypes).
        max_shard_size: the largest output file, in bytes or as ``"5GB"``.
    """

    path: str | os.PathLike[str]
    component: str = "model"
    dtype: torch.dtype | str | None = None
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))
        object.__setattr__(self, "max_shard_size", parse_size(self.max_shard_size))

    @classmethod
    def of(cls, value: HFExport | str | os.PathLike[str] | None, components: Sequence[str]) -> HFExport | None:
        """``value`` as an ``HFExport`` (a path exports ``model``); its component must be one of ``components``."""
        if value is None:
            return None
        spec = value if isinstance(value, HFExport) else cls(value)
        if spec.component not in components:
            raise ComponentDeclarationError(f"export_hf names component {spec.component!r}, which is not declared "
                                            f"(declared: {sorted(components)})")
        return spec


@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]
    saved: torch.dtype
    out: torch.dtype
    source: str  # the input file holding it (whole-tensor shards), "" for chunks

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.out).element_size()


@dataclass
class ExportPlan:
    """The output shards (tensors in write order) of one component's export, and where to read them."""

    store: CheckpointStore
    root: str
    key: str
    manifest: CheckpointManifest
    shards: list[list[_Tensor]]
    ties: dict[str, str]
    index: ShardedIndex | None = None
    entries: dict[str, FileEntry] = field(default_factory=dict)

    def file_name(self, number: int) -> str:
        return f"model-{number + 1:05d}-of-{len(self.shards):05d}.safetensors"

    def assign(self, world_size: int) -> list[list[int]]:
        """Output shard numbers for each of ``world_size`` writers, balanced by bytes."""
        owners = assign_writers([sum(t.nbytes for t in shard) for shard in self.shards], tuple(range(world_size)))
        return [[n for n, owner in enumerate(owners) if owner == rank] for rank in range(world_size)]

    def hf_index(self) -> dict[str, Any]:
        weight_map = {t.name: self.file_name(n) for n, shard in enumerate(self.shards) for t in shard}
        metadata: dict[str, Any] = {"total_size": sum(t.nbytes for shard in self.shards for t in shard),
                                    "format": "pt"}
        if self.ties:
            metadata["tied"] = dict(sorted(self.ties.items()))
        return {"metadata": metadata, "weight_map": weight_map}


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: the output directory, its shard files, their total tensor bytes."""

    path: Path
    files: list[str]
    total_size: int
    tensors: int


def plan_export(store: CheckpointStore, root: str, key: str = "model", dtype: torch.dtype | None = None,
                max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, display: str | None = None) -> ExportPlan:
    """Read the manifest and the component's index (both verified) and lay out the output shards."""
    manifest = read_manifest(store, root, display=display)
    root = data_root(store, root, manifest)  # where the files are (an object store's generation)
    saved = manifest.components.get(key)
    if saved is None:
        raise ComponentDeclarationError(f"the checkpoint has no component {key!r} (it holds "
                                        f"{sorted(manifest.components)}); pass --component")
    entries = {entry.path: entry for entry in saved.files}

    def read_json(rel: str, what: str) -> bytes:
        location = verify_entry(store, root, entries[rel], VerifyMode.SIZE, key)
        data = store.read_bytes(location)
        if bytes_checksum(data) != entries[rel].checksum:
            raise CorruptCheckpointError(f"component {key!r}, {what} {rel}: its checksum does not match the manifest")
        return data

    tensors: list[_Tensor] = []
    chunks = rule(saved.pattern).chunks
    index = None
    if chunks is not None and chunks.index_for(key) in entries:
        rel = chunks.index_for(key)
        index = ShardedIndex.from_json(parse_json(read_json(rel, "chunk index"), "chunk index", rel))
        ties = dict(index.ties)
        for name, record in sorted(index.tensors.items()):
            saved_dtype = record.torch_dtype
            tensors.append(_Tensor(name, record.shape, saved_dtype, _out(saved_dtype, dtype), ""))
    elif index_name(key) in entries:
        hf = parse_index(read_json(index_name(key), "safetensors index"), index_name(key))
        raw_ties = hf["metadata"].get("tied", {})
        ties = {str(k): str(v) for k, v in raw_ties.items()} if isinstance(raw_ties, dict) else {}
        for name, rel in sorted(hf["weight_map"].items(), key=lambda item: (str(item[1]), item[0])):
            if not isinstance(rel, str) or rel not in entries or not rel.endswith(".safetensors"):
                raise CorruptCheckpointError(f"{index_name(key)} points {name!r} to {rel!r}, which component {key!r} "
                                             "does not list")
            tensors.append(_Tensor(name, (), torch.float32, torch.float32, rel))  # shapes come from the file
        tensors = _with_shapes(store, root, tensors, dtype)
    else:
        raise ComponentDeclarationError(
            f"component {key!r} ({saved.pattern.name}) holds no tensors that form one model (no chunk index, "
            f"no {index_name(key)}); export a SHARDED, REPLICATED or GLOBAL component"
        )
    shards: list[list[_Tensor]] = [[]]
    used = 0
    for tensor in tensors:
        if shards[-1] and used + tensor.nbytes > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(tensor)
        used += tensor.nbytes
    return ExportPlan(store, root, key, manifest, shards if tensors else [], ties, index, entries)


def _out(saved: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and saved.is_floating_point else saved


def _with_shapes(store: CheckpointStore, root: str, tensors: list[_Tensor], dtype: torch.dtype | None) -> list[_Tensor]:
    """Shapes and dtypes of whole-tensor shards, from their headers (a few bytes each; the whole file is
    verified against its checksum when it is read)."""
    headers: dict[str, dict[str, Any]] = {}
    for rel in sorted({t.source for t in tensors}):
        with store.open_read(store.join(root, rel)) as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100 * 1024 * 1024:
                raise CorruptCheckpointError(f"{rel}: a safetensors header of {length} bytes is not plausible")
            headers[rel] = json.loads(handle.read(length))
    result = []
    for t in tensors:
        entry = headers[t.source].get(t.name)
        if not isinstance(entry, dict):
            raise CorruptCheckpointError(f"{t.source} does not hold {t.name!r}, which its index maps there")
        saved = dtype_from_name(entry.get("dtype"))
        if saved is None:
            raise CorruptCheckpointError(f"{t.source}: tensor {t.name!r} has unknown dtype {entry.get('dtype')!r}")
        result.append(_Tensor(t.name, tuple(int(d) for d in entry.get("shape", [])), saved, _out(saved, dtype),
                              t.source))
    return result


class _Source:
    """Full tensors of a plan, one at a time: assembled from chunks, or taken from whole input shards."""

    def __init__(self, plan: ExportPlan) -> None:
        self.plan = plan
        self.files = StoreFiles(plan.store, plan.root) if plan.index is not None else None
        self._shard: tuple[str, dict[str, torch.Tensor]] | None = None

    def tensor(self, spec: _Tensor) -> torch.Tensor:
        if self.files is not None:
            assert self.plan.index is not None
            full = torch.empty(spec.shape, dtype=spec.saved)
            read_chunks(plan_reads(self.plan.index, {spec.name: full}, strict=False), self.plan.index, self.files)
            return full
        if self._shard is None or self._shard[0] != spec.source:
            self._shard = None  # free the previous input shard before reading the next
            entry = self.plan.entries[spec.source]
            location = verify_entry(self.plan.store, self.plan.root, entry, VerifyMode.SIZE, self.plan.key)
            with self.plan.store.open_read(location) as handle:
                self._shard = (spec.source, read_tensors(handle, entry.size, spec.source, entry.checksum))
        return self._shard[1][spec.name]

    def close(self) -> None:
        self._shard = None
        if self.files is not None:
            self.files.close()


def _write_shard(path: Path, shard: Sequence[_Tensor], source: _Source) -> None:
    metas = {t.name: torch.empty(t.shape, dtype=t.out, device="meta") for t in shard}
    order = sorted(metas, key=lambda name: (-metas[name].element_size(), name))
    by_name = {t.name: t for t in shard}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        sink = DescriptorSink(fd)
        sink.write(encode_header(metas, order, {"format": "pt"}))
        for name in order:
            tensor = source.tensor(by_name[name]).to(by_name[name].out).contiguous()
            if tensor.numel():
                sink.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            del tensor
        os.fsync(fd)
    finally:
        os.close(fd)


def write_shards(plan: ExportPlan, numbers: Sequence[int], directory: str | os.PathLike[str]) -> list[str]:
    """Write output shards ``numbers`` of ``plan`` into ``directory``; returns their file names."""
    source = _Source(plan)
    written = []
    try:
        for number in numbers:
            name = plan.file_name(number)
            _write_shard(Path(directory) / name, plan.shards[number], source)
            written.append(name)
    finally:
        source.close()
    return written


def begin_export(out: str | os.PathLike[str], token: str) -> str:
    """Create the hidden staging directory beside ``out``; refuse an ``out`` that is not an earlier export."""
    target = Path(out)
    if target.exists() and not (target.is_dir() and ((target / HF_INDEX).is_file() or not any(target.iterdir()))):
        raise CheckpointError(f"refusing to write the export into {target}: it exists and is not an earlier export "
                              f"(no {HF_INDEX}); remove it or choose another directory")
    staging = target.parent / f".{target.name}.export-{token}"
    staging.mkdir(parents=True)
    return str(staging)


def commit_export(staging: str | os.PathLike[str], out: str | os.PathLike[str], index: dict[str, Any]) -> None:
    """Write the index last, then move the finished export into place (an earlier one is removed)."""
    staging, target = Path(staging), Path(out)
    fd = os.open(staging / HF_INDEX, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        DescriptorSink(fd).write(json_bytes(index))
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(staging)
    if target.exists():
        old = target.parent / f".{target.name}.replaced-{uuid.uuid4().hex}"
        os.rename(target, old)
        os.rename(staging, target)
        rmtree_missing_ok(old)
    else:
        os.rename(staging, target)
    fsync_dir(target.parent)


def abort_export(staging: str | os.PathLike[str] | None) -> None:
    """Remove a staging directory of a failed export."""
    if staging is not None and Path(staging).exists():
        rmtree_missing_ok(Path(staging))


def export_checkpoint(path: str | os.PathLike[str], out: str | os.PathLike[str], component: str = "model",
                      dtype: torch.dtype | str | None = None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                      storage_options: dict[str, Any] | None = None) -> ExportResult:
    """Export ``component`` of the checkpoint at ``path`` into the directory ``out`` (this process alone)."""
    store = store_for(path, storage_options)
    root = store.normalize(os.fspath(path))
    plan = plan_export(store, root, component, parse_dtype(dtype), parse_size(max_shard_size), os.fspath(path))
    staging = begin_export(out, uuid.uuid4().hex)
    try:
        files = write_shards(plan, range(len(plan.shards)), staging)
        commit_export(staging, out, plan.hf_index())
    except BaseException:
        abort_export(staging)
        raise
    return ExportResult(Path(out), files, sum(t.nbytes for s in plan.shards for t in s),
                        sum(len(s) for s in plan.shards))



def export_in_parallel(store: CheckpointStore, checkpoint: str, spec: HFExport, group: Any = None) -> list[str]:
    """Collective: export ``spec.component`` of the committed ``checkpoint``, every rank writing its share.

    The output shards are divided among the ranks, balanced by bytes; each rank reads (verified) only
    the chunks or input shards of its own output shards. Rank 0 writes the index last and moves the
    directory into place. A failure on any rank raises on every rank and leaves no partial export.
    Returns the files this rank wrote.
    """
    rank, world = get_rank(), get_world_size()
    staging = on_rank_zero(f"preparing the export to {spec.path}", lambda: begin_export(spec.path, uuid.uuid4().hex),
                           group)
    committed = False
    written: list[str] = []
    try:
        plan: ExportPlan | None = None
        with agreement(f"exporting {checkpoint} to {spec.path}", group):
            plan = plan_export(store, checkpoint, spec.component, spec.dtype, int(spec.max_shard_size))
            written = write_shards(plan, plan.assign(world)[rank], staging)
        with agreement(f"committing the export {spec.path}", group):
            if rank == 0 and plan is not None:
                commit_export(staging, spec.path, plan.hf_index())
        committed = True
    finally:
        if not committed and rank == 0:
            abort_export(staging)
    return written
