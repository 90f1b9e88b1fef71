"""Exporting a component's full tensors as Hugging Face sharded safetensors, streaming.

The output directory holds ``model-0000k-of-0000N.safetensors`` files of at most ``max_shard_size``
bytes (a larger single tensor gets a file of its own) and ``model.safetensors.index.json``, which plain
``safetensors`` and ``transformers`` read. Tensors are written one at a time, as the component's copy format
gives them (``CopyFormat.full_tensors``), so memory stays about one tensor (SHARDED: the tensor is assembled
from its chunks, each read and verified block by block) or one input shard (a component stored as whole-tensor
shards: each shard is read once, verified against the manifest, and its tensors written in order): never the
whole model. Tied weights are stored once and listed under ``metadata.tied``, as in the checkpoint.

A component that wraps a ``transformers`` model (recorded at save time in the manifest's ``hf_model``, see
``engine.hf_model``) is exported for ``from_pretrained``: its prefix in the component (``model.`` for ``self.model``
in a LightningModule) taken off the keys, tensors outside it left out, ``config.json`` and ``generation_config.json``
written, and ties written as ``transformers`` expects them (``engine.hf_export``). ``prefix`` overrides the detected
prefix (or strips one from any model's keys).

The export commits like a save (``engine.commit.staged``): the files are written into a hidden directory beside
the output, the index last, then renamed into place (an earlier export there is replaced, anything else is
refused). The output shards can be written by several ranks at once (``export_in_parallel``):
``CheckpointCoordinator.save_checkpoint(..., export_hf=...)`` has every rank write its share.

Example:
    >>> result = export_checkpoint("runs/step=500.ckpt", "runs/hf", dtype="bfloat16")   # doctest: +SKIP
    >>> result.files                                                                  # doctest: +SKIP
    ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
"""

from __future__ import annotations

import errno
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_sharing.checkpoint.manifest import CheckpointManifest, data_root, read_manifest
from lightning_sharing.core.options import DEFAULT_MAX_SHARD_SIZE, VerifyMode
from lightning_sharing.distributed.collectives import agreement, get_rank, get_world_size
from lightning_sharing.engine.commit import staged
from lightning_sharing.engine.copy_format import FullTensors
from lightning_sharing.engine.formats import all_formats, format_for
from lightning_sharing.engine.hf_export import config_files, derived_keys, output_names
from lightning_sharing.engine.verified_files import ComponentFiles
from lightning_sharing.engine.whole_format import assign_writers
from lightning_sharing.errors import CheckpointError, ComponentDeclarationError
from lightning_sharing.format.copy_files import index_name, json_bytes
from lightning_sharing.format.safetensors_io import dtype_name, encode_header
from lightning_sharing.storage import CheckpointStore, LocalStore, store_for

__all__ = ["HF_INDEX", "ExportDirectory", "ExportPlan", "ExportResult", "HFExport", "export_checkpoint",
           "export_in_parallel", "parse_dtype", "parse_size", "plan_export", "write_shards"]

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
        prefix: taken off the tensor names, tensors outside it left out (None: the prefix of the ``transformers``
            model found in the component at save time, else none; ``""``: keep the names as saved).
    """

    path: str | os.PathLike[str]
    component: str = "model"
    dtype: torch.dtype | str | None = None
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
    prefix: str | None = None

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
    name: str  # in the output
    source: str  # in the checkpoint
    shape: tuple[int, ...]
    saved: torch.dtype
    out: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.out).element_size()


@dataclass
class ExportPlan:
    """The output shards (tensors in write order) of one component's export, and where their tensors come from.

    ``extra`` are the files written beside the shards (``config.json`` for a ``transformers`` model).
    """

    key: str
    manifest: CheckpointManifest
    shards: list[list[_Tensor]]
    ties: dict[str, str]
    source: FullTensors
    extra: dict[str, bytes]

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


def plan_export(store: CheckpointStore, root: str, spec: HFExport, display: str | None = None) -> ExportPlan:
    """Read the manifest and the component's index (both verified) and lay out the output shards of ``spec``.

    The component's own copy format reads its tensors (the other formats are asked next, for a component whose
    files another format wrote). The output names follow ``spec.prefix`` and the manifest's ``hf_model`` record.
    """
    manifest = read_manifest(store, root, display=display)
    root = data_root(store, root, manifest)  # where the files are (an object store's generation)
    key = spec.component
    saved = manifest.components.get(key)
    if saved is None:
        raise ComponentDeclarationError(f"the checkpoint has no component {key!r} (it holds "
                                        f"{sorted(manifest.components)}); pass --component")
    files = ComponentFiles(store, root, key, saved, VerifyMode.CHECKSUM)
    own = format_for(saved.pattern)
    source = None
    for fmt in [own, *(f for f in all_formats() if f is not own)]:
        source = fmt.full_tensors(files)
        if source is not None:
            break
    if source is None:
        raise ComponentDeclarationError(
            f"component {key!r} ({saved.pattern.name}) holds no tensors that form one model (no chunk index, "
            f"no {index_name(key)}); export a SHARDED, REPLICATED or GLOBAL component"
        )
    dtype = spec.dtype
    record = saved.hf_model
    prefix = spec.prefix if spec.prefix is not None else (record.prefix if record is not None else "")
    saved_tensors = {t.name: t for t in source.tensors}
    names = output_names(list(saved_tensors), source.ties, prefix, derived_keys(record, prefix), record is not None)
    tensors = []
    for out, name in names.pairs:
        t = saved_tensors[name]
        tensors.append(_Tensor(out, name, t.shape, t.dtype, dtype if dtype is not None and t.dtype.is_floating_point
                               else t.dtype))  # type: ignore[arg-type]
    floating = dtype or next((t.out for t in tensors if t.out.is_floating_point), None)  # type: ignore[arg-type]
    shards: list[list[_Tensor]] = [[]]
    used = 0
    for tensor in tensors:
        if shards[-1] and used + tensor.nbytes > int(spec.max_shard_size):
            shards.append([])
            used = 0
        shards[-1].append(tensor)
        used += tensor.nbytes
    extra = config_files(record, floating) if record is not None else {}
    return ExportPlan(key, manifest, shards if tensors else [], names.ties, source, extra)


def _write_shard(store: LocalStore, location: str, shard: Sequence[_Tensor], source: FullTensors,
                 progress: Callable[[int], None] | None = None) -> None:
    metas = {t.name: torch.empty(t.shape, dtype=t.out, device="meta") for t in shard}
    order = sorted(metas, key=lambda name: (-metas[name].element_size(), name))
    by_name = {t.name: t for t in shard}
    with store.open_write(location) as sink:
        sink.write(encode_header(metas, order, {"format": "pt"}))
        for name in order:
            tensor = source.tensor(by_name[name].source).to(by_name[name].out).contiguous()
            if tensor.numel():
                sink.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            if progress is not None:
                progress(by_name[name].nbytes)
            del tensor


def write_shards(plan: ExportPlan, numbers: Sequence[int], directory: str | os.PathLike[str],
                 extra: bool = False, progress: Callable[[int], None] | None = None) -> list[str]:
    """Write output shards ``numbers`` of ``plan`` into ``directory`` (all durable on return); their file names.

    ``extra``: also write the plan's other files (``config.json``, ...), which are not returned. ``progress`` is
    called with each tensor's output bytes once it is written.
    """
    store = LocalStore()
    written = []
    try:
        with store.write_batch():
            for name, data in plan.extra.items() if extra else ():
                with store.open_write(store.join(os.fspath(directory), name)) as sink:
                    sink.write(data)
            for number in numbers:
                name = plan.file_name(number)
                _write_shard(store, store.join(os.fspath(directory), name), plan.shards[number], plan.source,
                             progress)
                written.append(name)
    finally:
        plan.source.close()
    return written


class ExportDirectory:
    """An export's output directory as the target of a staged commit (``engine.commit.staged``).

    ``begin`` refuses an ``out`` that is not an earlier export and creates the hidden staging directory beside it;
    ``commit`` writes the index last and moves the finished export into place (an earlier one is removed);
    ``abort`` removes the staging directory.
    """

    def __init__(self, out: str | os.PathLike[str]) -> None:
        self.out = Path(out)
        self.store = LocalStore()

    def begin(self) -> str:
        target = self.out
        if target.exists() and not (target.is_dir() and ((target / HF_INDEX).is_file() or not any(target.iterdir()))):
            raise CheckpointError(f"refusing to write the export into {target}: it exists and is not an earlier "
                                  f"export (no {HF_INDEX}); remove it or choose another directory")
        staging = target.parent / f".{target.name}.export-{uuid.uuid4().hex}"
        staging.mkdir(parents=True)
        return str(staging)

    def commit(self, write_root: str, last: bytes) -> None:
        staging, target = Path(write_root), self.out
        with self.store.open_write(str(staging / HF_INDEX)) as sink:
            sink.write(last)
        _fsync_dir(staging)
        if target.exists():
            old = target.parent / f".{target.name}.replaced-{uuid.uuid4().hex}"
            os.rename(target, old)
            os.rename(staging, target)
            _remove_tree(old)
        else:
            os.rename(staging, target)
        _fsync_dir(target.parent)

    def abort(self, write_root: str) -> None:
        if Path(write_root).exists():
            _remove_tree(Path(write_root))


def _remove_tree(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:  # removed meanwhile
        pass


def _fsync_dir(path: Path) -> None:
    """Flush a directory's entries (new names, renames) to stable storage, where the platform can."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def export_checkpoint(path: str | os.PathLike[str], out: str | os.PathLike[str], component: str = "model",
                      dtype: torch.dtype | str | None = None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                      storage_options: dict[str, Any] | None = None, prefix: str | None = None,
                      progress: Callable[[int, int], None] | None = None) -> ExportResult:
    """Export ``component`` of the checkpoint at ``path`` into the directory ``out`` (this process alone).

    A component that wraps a ``transformers`` model gets ``config.json`` and keys ``from_pretrained`` loads
    (see the module docstring); ``prefix`` overrides the detected prefix (``""``: keep the saved names).
    ``progress(done, total)`` is called with the output bytes written so far after each tensor (a progress bar).

    Example:
        >>> export_checkpoint("runs/step=500.ckpt", "runs/hf")                             # doctest: +SKIP
        >>> AutoModelForCausalLM.from_pretrained("runs/hf")                                # doctest: +SKIP
    """
    store = store_for(path, storage_options)
    root = store.normalize(os.fspath(path))
    plan = plan_export(store, root, HFExport(out, component, dtype, max_shard_size, prefix), os.fspath(path))
    target = ExportDirectory(out)
    total, done = sum(t.nbytes for shard in plan.shards for t in shard), 0

    def advance(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        if progress is not None:
            progress(done, total)

    with staged(target, f"preparing the export to {out}", alone=True) as staging:
        files = write_shards(plan, range(len(plan.shards)), staging, extra=True, progress=advance)
        target.commit(staging, json_bytes(plan.hf_index()))
    return ExportResult(Path(out), files, sum(t.nbytes for s in plan.shards for t in s),
                        sum(len(s) for s in plan.shards))


def export_in_parallel(store: CheckpointStore, checkpoint: str, spec: HFExport, group: Any = None) -> list[str]:
    """Collective: export ``spec.component`` of the committed ``checkpoint``, every rank writing its share.

    The output shards are divided among the ranks, balanced by bytes; each rank reads (verified) only
    the chunks or input shards of its own output shards. Rank 0 writes the index last and moves the
    directory into place. A failure on any rank raises on every rank and leaves no partial export.
    Returns the files this rank wrote.

    Example:
        >>> export_in_parallel(store, "/runs/step=9.ckpt", HFExport("/runs/hf"))   # doctest: +SKIP
        ['model-00001-of-00002.safetensors']
    """
    rank, world = get_rank(), get_world_size()
    target = ExportDirectory(spec.path)
    written: list[str] = []
    with staged(target, f"preparing the export to {spec.path}", group, location=os.fspath(spec.path)) as staging:
        plan: ExportPlan | None = None
        with agreement(f"exporting {checkpoint} to {spec.path}", group):
            plan = plan_export(store, checkpoint, spec)
            written = write_shards(plan, plan.assign(world)[rank], staging, extra=rank == 0)
        with agreement(f"committing the export {spec.path}", group):
            if rank == 0 and plan is not None:
                target.commit(staging, json_bytes(plan.hf_index()))
    return written
