"""``load_hf_weights``: start training from a Hugging Face checkpoint, each rank reading only what it holds.

A Hugging Face safetensors directory (``model.safetensors.index.json`` and its shards, or one
``model.safetensors``; a local path or a URL) is described as the SHARDED reader's index, one chunk per tensor at
its offset in its file (``engine.hf_files``), and read with that reader (``sharded.load``): every rank reads, for
each tensor, only the byte ranges of the piece its module holds (a DTensor's local piece under FSDP2 or tensor
parallelism, the whole tensor for a plain or DDP module), straight into the parameter where the layout allows. No
rank ever holds the whole model. Files carry no digests, so the bytes are read unverified (said explicitly).

When a process group is initialised, every step that can fail runs inside an agreement step
(``distributed.collectives.agreement``): a failure on one rank (a missing key, a short file) is an error on every
rank. Rank 0 reads the index and the file headers and sends them to the others.

Example:
    >>> model = MyLightningModule()                                         # holds self.model = GPT2LMHeadModel(...)
    >>> fully_shard(model)                                                  # doctest: +SKIP
    >>> result = load_hf_weights(model, "hf/gpt2", prefix="model.")        # doctest: +SKIP
    >>> result.missing, result.unexpected                                   # doctest: +SKIP
    ([], [])
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_sharing.distributed.collectives import active, agreement, broadcast_object, get_rank
from lightning_sharing.engine.hf_files import HFFiles, open_hf_files, read_hf_directory
from lightning_sharing.errors import CheckpointError
from lightning_sharing.sharded.dtensor_boxes import local_box, local_tensor
from lightning_sharing.sharded.index import ShardedIndex
from lightning_sharing.sharded.load import ReadPlan, plan_box, read_chunks

__all__ = ["HFLoadResult", "load_hf_weights"]

log = logging.getLogger(__name__)
_LISTED = 10


@dataclass(frozen=True)
class HFLoadResult:
    """What ``load_hf_weights`` did.

    Attributes:
        loaded: the module's keys that were read from the files (tied names each count).
        missing: the module's keys under the prefix that the files lack (they keep their values).
        unexpected: the files' keys with no module key (not read).
        mismatched: the module's keys whose shape differs from the file's (not read; ``strict=False`` only).
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _step(phase: str) -> Iterator[None]:
    """An agreement step when a process group is initialised; the plain error otherwise."""
    if active():
        with agreement(phase):
            yield
    else:
        yield


def _listing(names: list[str]) -> str:
    more = f" (and {len(names) - _LISTED} more)" if len(names) > _LISTED else ""
    return f"{names[:_LISTED]}{more}"


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module whose keys the files name: DDP's and ``torch.compile``'s wrappers taken off."""
    while True:
        if type(module).__name__ in ("DistributedDataParallel", "DataParallel"):
            module = module.module  # type: ignore[assignment]
        elif type(module).__name__ == "OptimizedModule":
            module = module._orig_mod  # type: ignore[assignment]
        else:
            return module


@dataclass
class _Match:
    """Module key -> (file key, live tensor) to read, and the result lists."""

    reads: dict[str, tuple[str, torch.Tensor]]
    result: HFLoadResult


def _match(module: torch.nn.Module, index: ShardedIndex, prefix: str, strict: bool, where: str) -> _Match:
    live = module.state_dict(keep_vars=True)
    names = [name for name in live if name.startswith(prefix)]
    groups: dict[int, list[str]] = {}  # tied keys: one Parameter (or buffer) under several names
    for name in names:
        groups.setdefault(id(live[name]), []).append(name)
    reads: dict[str, tuple[str, torch.Tensor]] = {}
    loaded: list[str] = []
    missing: list[str] = []
    mismatched: list[str] = []
    details: list[str] = []
    for group in groups.values():
        present = [name for name in group if name[len(prefix):] in index.tensors]
        if not present:
            missing.extend(group)
            continue
        name = present[0]
        key = name[len(prefix):]
        saved, tensor = index.tensors[key].shape, live[name]
        if tensor.device.type == "meta":
            raise CheckpointError(f"{name} is on the meta device, which holds no data to load into; materialize the "
                                  "module first (module.to_empty(device=...)), then call load_hf_weights")
        if tuple(tensor.shape) != saved:
            mismatched.extend(group)
            details.append(f"{name}: {list(saved)} in the files, {list(tensor.shape)} in the module")
            continue
        reads[name] = (key, tensor)
        loaded.extend(group)
    wanted = {name[len(prefix):] for name in names}
    unexpected = sorted(key for key in index.tensors if key not in wanted)
    result = HFLoadResult(sorted(loaded), sorted(missing), unexpected, sorted(mismatched))
    if mismatched:
        message = f"{where}: shapes differ for {len(details)} tensors: {'; '.join(details[:_LISTED])}"
        if strict:
            raise CheckpointError(f"{message} (the module is not the model of these files)")
        log.warning("%s; they are not loaded", message)
    if strict and (result.missing or result.unexpected):
        raise CheckpointError(
            f"{where} and the module (prefix {prefix!r}) hold different tensors: the files lack "
            f"{_listing(result.missing) if result.missing else 'none'}; the module lacks "
            f"{_listing(result.unexpected) if result.unexpected else 'none'}{_prefix_hint(live, index, prefix)} "
            "(pass strict=False to load the rest)"
        )
    if result.missing or result.unexpected:
        log.warning("%s: loading without %s (not in the files: they keep their values); not loaded: %s", where,
                    _listing(result.missing), _listing(result.unexpected))
    return _Match(reads, result)


def _prefix_hint(live: dict[str, Any], index: ShardedIndex, prefix: str) -> str:
    """Where the files' keys are in the module, when ``prefix`` is not it (a module key ending with a file key)."""
    for key in sorted(index.tensors, key=len, reverse=True):
        found = sorted(name[:-len(key)] for name in live if name.endswith(key) and (name == key or
                                                                                name[-len(key) - 1] == "."))
        if found and found[0] != prefix:
            return f"; the module holds {key!r} under the prefix {found[0]!r}: pass prefix={found[0]!r}"
        if found:
            return ""
    return ""


def _read(match: _Match, index: ShardedIndex, files: HFFiles) -> None:
    """Read this rank's piece of every matched tensor, casting where the file's dtype differs from the module's."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    order = sorted(match.reads.items(), key=lambda item: (index.tensors[item[1][0]].chunks[0].file,
                                                          index.tensors[item[1][0]].chunks[0].begin))
    with torch.no_grad():
        for name, (key, tensor) in order:
            record = index.tensors[key]
            box = local_box(name, tensor, rank=rank)
            local = local_tensor(tensor)
            same = record.torch_dtype == local.dtype
            target = local if same else torch.empty(box.sizes, dtype=record.torch_dtype)
            read_chunks(ReadPlan((plan_box(key, record, box, target),)), index, files, verified=False)
            if not same:
                local.copy_(target)


def load_hf_weights(module: torch.nn.Module, path: str | os.PathLike[str], prefix: str = "",
                    strict: bool = True, *, storage_options: dict[str, Any] | None = None) -> HFLoadResult:
    """Load the Hugging Face safetensors weights at ``path`` into ``module`` in place; every rank calls it.

    Args:
        module: a plain, DDP, FSDP2 (``fully_shard``) or tensor-parallel module; each rank reads only the piece of
            each tensor it holds. A tie (one Parameter under two names, ``lm_head.weight`` and
            ``transformer.wte.weight``) counts as present when either name is in the files.
        path: a directory holding ``model.safetensors.index.json`` and its shards, or one ``model.safetensors``
            (what ``save_pretrained`` and ``lightning-sharing export`` write); a local path or an fsspec URL.
        prefix: where the Hugging Face model sits in ``module``: the file's key ``k`` is read into the module's key
            ``prefix + k`` (``"model."`` for ``self.model`` in a LightningModule). Module keys outside the prefix
            are left alone.
        strict: raise ``CheckpointError`` naming them for module keys under the prefix that the files lack, file
            keys the module lacks, and shapes that differ; with False they are skipped and listed in the result.
        storage_options: fsspec options for a URL ``path``.

    A tensor whose dtype in the files differs from the module's is cast to the module's dtype, as
    ``from_pretrained(..., dtype=...)`` does (a bfloat16 file into a float32 module: the float32 values of the
    bfloat16 ones). The files carry no checksums: their bytes are read as they are.

    Returns:
        ``HFLoadResult(loaded, missing, unexpected, mismatched)``: module keys read, module keys the files lack, file
        keys the module lacks, module keys whose shape differs.

    Example:
        >>> result = load_hf_weights(model, "hf/gpt2", prefix="model.")   # doctest: +SKIP
        >>> result.loaded[:2]                                             # doctest: +SKIP
        ['model.lm_head.weight', 'model.transformer.h.0.attn.c_attn.bias']
    """
    where = os.fspath(path)
    target = _unwrap(module)
    index: ShardedIndex | None = None
    with _step(f"reading the Hugging Face index of {where}"):
        if get_rank() == 0:
            files = open_hf_files(path, storage_options)
            try:
                index = read_hf_directory(files, where)
            finally:
                files.close()
    index = broadcast_object(index) if active() else index
    assert index is not None
    match: _Match | None = None
    with _step(f"matching the Hugging Face weights of {where} to the module"):
        match = _match(target, index, prefix, strict, where)
    with _step(f"loading the Hugging Face weights of {where}"):
        assert match is not None
        files = open_hf_files(path, storage_options)
        try:
            _read(match, index, files)
        finally:
            files.close()
    assert match is not None
    return match.result
