"""``SharingCheckpointIO``: Lightning's CheckpointIO plugin for lightning_sharing directory checkpoints.

``SharingStrategy`` drives it collectively (``save_sharded`` / ``load_sharded`` on every rank).
Lightning also calls the plain CheckpointIO methods on a single rank in a few places (the spawn
launcher saves the final weights from rank 0 and reads them back in the parent process); those
calls act alone, without collectives, so they never hang.

Example:
    >>> import lightning.pytorch as pl
    >>> from lightning_sharing import SharingCheckpointIO, SharingStrategy
    >>> trainer = pl.Trainer(strategy=SharingStrategy(checkpoint_io=SharingCheckpointIO(verify="size")))
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO

from lightning_sharing.checkpoint.manifest import CheckpointManifest
from lightning_sharing.core.declarations import SharingPattern, StateComponent, ValidationLevel
from lightning_sharing.core.options import CheckpointOptions, VerifyMode, checkpoint_options
from lightning_sharing.distributed.collectives import (
    agreement,
    get_world_size,
    local_only,
    resolve_process_groups,
    warn_on_rank_zero,
)
from lightning_sharing.engine.coordinator import CheckpointCoordinator
from lightning_sharing.errors import CheckpointError, ComponentDeclarationError
from lightning_sharing.integration.common import CheckpointHost, is_object_url
from lightning_sharing.lightning.builtins import (
    BUILTIN_KEYS,
    METRIC_COUNTS_KEY,
    RESIZE_POLICIES,
    builtin_components,
    join_checkpoint,
    split_checkpoint,
)
from lightning_sharing.statefuls.holders import ValueHolder
from lightning_sharing.statefuls.metrics import ModuleMetricsHolder, persistent_state_keys
from lightning_sharing.statefuls.rng import RNGHolder, RNGState
from lightning_sharing.storage import remove_checkpoint, store_for

__all__ = ["SharingCheckpointIO", "save_holders"]

log = logging.getLogger(__name__)

_RAW_KEY = "raw"  # a plain dict saved by a rank-local call (e.g. the spawn launcher's weights)
_MODULE_KEYS = ("model", "trainer")  # what load_from_checkpoint needs


def move_tensors(value: Any, map_location: Any) -> Any:
    """``value`` with its CPU tensors moved as ``torch.load(map_location=...)`` would move CPU-saved tensors."""
    if map_location is None:
        return value
    if isinstance(value, torch.Tensor):
        if callable(map_location):  # torch.load's fn(storage, location): None keeps the storage where it is
            moved = map_location(value.untyped_storage(), "cpu")
            return value if moved is None else value.to(moved.device)
        if isinstance(map_location, Mapping):
            target = map_location.get("cpu")
            return value if target is None else value.to(target)
        return value.to(map_location)
    if isinstance(value, Mapping):
        return {k: move_tensors(v, map_location) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(move_tensors(v, map_location) for v in value)
    return value


class SharingCheckpointIO(CheckpointHost, CheckpointIO):
    """Writes and reads lightning_sharing checkpoints for Lightning.

    Args:
        options: a ``CheckpointOptions``; the keyword arguments below override its fields.
        max_shard_size, verify, validation_level, async_save, max_pending_saves, background_staging, read_once,
            incremental: as for ``CheckpointOptions`` (``validation_level`` is the replication check of the model
            weights at each save; ``NONE`` turns it off).
        storage_options: fsspec filesystem arguments for checkpoint URLs (``s3://...``: ``endpoint_url``,
            ``key``, ``secret``, ...), used for every save, load and removal of a URL; a ``storage_options``
            passed to one save (``trainer.save_checkpoint(path, storage_options=...)``) replaces them for it.
            Local paths do not use them. Default: fsspec's own configuration (the environment).
    """

    def __init__(self, *, options: CheckpointOptions | None = None, max_shard_size: int | None = None,
                 verify: VerifyMode | str | None = None, validation_level: ValidationLevel | str | None = None,
                 async_save: bool | None = None, max_pending_saves: int | None = None,
                 background_staging: bool | None = None, read_once: bool | None = None,
                 incremental: bool | None = None, storage_options: Mapping[str, Any] | None = None) -> None:
        super().__init__(checkpoint_options(options, max_shard_size=max_shard_size, verify=verify,
                                            validation_level=validation_level, async_save=async_save,
                                            max_pending_saves=max_pending_saves, background_staging=background_staging,
                                            read_once=read_once, incremental=incremental),
                         storage_options)
        self._warned_rank_local = False

    def adopt_storage_options(self, storage_options: dict[str, Any], owner: str) -> None:
        """Take ``storage_options`` given to ``owner`` (the strategy holding this plugin), unless they conflict."""
        if self.storage_options is not None and self.storage_options != storage_options:
            raise ComponentDeclarationError(
                f"{owner}(storage_options=...) and its SharingCheckpointIO(storage_options=...) differ; pass them "
                "to one of the two")
        self.storage_options = storage_options

    @property
    def validation_level(self) -> ValidationLevel:
        """The replication check applied to the model weights at each save."""
        return self.options.validation_level

    def _coordinator(self, components: list[StateComponent], process_groups: Any, path: Any,
                     storage_options: Mapping[str, Any] | None = None) -> CheckpointCoordinator:
        return self.coordinator(components, process_groups, self.storage_options_for(path, storage_options))

    def teardown(self) -> None:
        """Called by Lightning at the end of a stage: waits for pending saves, then stops the background thread."""
        self.close()

    def save_sharded(self, checkpoint: Mapping[str, Any], path: str | os.PathLike[str],
                     user_components: list[StateComponent], process_groups: Any,
                     overrides: Mapping[str, StateComponent], unreplicated: frozenset[str] = frozenset(),
                     metrics: Mapping[str, Any] | None = None,
                     storage_options: Mapping[str, Any] | None = None, staging_roots: Sequence[Any] = (),
                     module: Any = None, sampler_positions: list[dict[str, Any]] | None = None) -> None:
        """Collective: save Lightning's checkpoint dict plus the user's components.

        ``unreplicated`` names model entries that may differ between ranks (buffers such as
        BatchNorm statistics): one copy is saved, but they are left out of the replication check.
        ``metrics`` (``{name: Metric}`` inside the module): their persistent states in the model's state dict
        differ between ranks; each rank's copy (and update count) is saved as the PER_RANK ``model_metrics``.
        ``staging_roots``: the live module and optimizers, whose tensors background staging may copy late.
        ``module``: the LightningModule whose state dict ``checkpoint["state_dict"]`` is (a ``transformers`` model in it
        is described in the manifest, for the export).
        ``sampler_positions``: the elastic training samplers' positions (the GLOBAL built-in ``sampler``).
        """
        holders = save_holders(checkpoint, unreplicated, metrics, module, sampler_positions)
        keys = [key for key in BUILTIN_KEYS if key in holders]
        components = builtin_components(keys, holders, overrides, self.validation_level) + list(user_components)
        metadata = {"lightning": {key: checkpoint[key] for key in ("epoch", "global_step", "pytorch-lightning_version")
                                  if key in checkpoint}}
        step = checkpoint.get("global_step")
        coordinator = self._coordinator(components, process_groups, path, storage_options)
        coordinator.staging_roots = list(staging_roots)
        coordinator.save_checkpoint(path, step=step if isinstance(step, int) else None, metadata=metadata)

    def load_sharded(self, path: str | os.PathLike[str], user_components: list[StateComponent],
                     process_groups: Any, overrides: Mapping[str, StateComponent],
                     strict: bool = True, live: Mapping[str, Any] | None = None,
                     skip: Collection[str] = (), module: Any = None) -> tuple[dict[str, Any], Any]:
        """Collective: load the user's components in place; return Lightning's dict and this rank's RNG state.

        ``live`` maps built-in keys to statefuls loaded in place (a sharded model, its optimizers), which are then
        not part of the returned dict; saved built-ins named in ``skip`` are not read. Built-ins saved at another
        topology follow ``RESIZE_POLICIES`` (``module``: the LightningModule whose metrics ``model_metrics`` merges);
        the RNG state returned may then be a ``Reseed``.
        """
        live = dict(live or {})
        self.wait()
        keys: list[str] = []
        saved: dict[str, StateComponent] = {}
        with agreement(f"reading checkpoint {path}"):
            manifest = CheckpointManifest.load(path, self.storage_options_for(path))
            if _RAW_KEY in manifest.components and not set(manifest.components) & set(BUILTIN_KEYS):
                raise ValueError(f"{path} holds a raw state dict, not a Lightning training checkpoint")
            skip = set(skip) | _groups_gone(manifest, overrides, process_groups, strict, path)
            keys = [key for key in BUILTIN_KEYS if key in manifest.components and key not in skip]
            # A built-in that the user does not re-declare is read the way it was saved.
            saved = {key: StateComponent(key, ValueHolder(), manifest.components[key].pattern,
                                         manifest.components[key].group_name) for key in keys}
        holders = {key: live[key] if key in live else ValueHolder() for key in keys}
        resize = dict(RESIZE_POLICIES)
        if "rng" in holders:
            holders["rng"] = RNGHolder()
        if "model_metrics" in holders and module is not None:
            holders["model_metrics"] = ModuleMetricsHolder(module)
        else:
            resize.pop("model_metrics")
        if "sampler" not in keys:  # without the global position, the per-rank loader states cannot be resized
            resize.pop("dataloader")
        declared = {**saved, **overrides}
        components = builtin_components(keys, holders, declared, ValidationLevel.NONE, resize) + list(user_components)
        self._coordinator(components, process_groups, path).load_checkpoint(
            path, strict=strict, ignore=sorted(key for key in skip if key in BUILTIN_KEYS))
        parts = {key: holder.value for key, holder in holders.items()
                 if key not in live and holder.loaded and key != "rng"}
        rng = holders["rng"].value if "rng" in holders and holders["rng"].loaded else None
        return join_checkpoint(parts), rng

    # ------------------------------------------------------------------ Lightning's CheckpointIO API
    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike[str],
                        storage_options: Any | None = None) -> None:
        """Rank-local save (no collectives): used by Lightning outside ``SharingStrategy``'s own saves.

        ``storage_options`` replace this plugin's own for this save.
        """
        if get_world_size() > 1 and not self._warned_rank_local and "state_dict" in checkpoint:
            log.warning("SharingCheckpointIO.save_checkpoint was called on one rank only: per-rank state of the "
                        "other ranks is not saved. Use SharingStrategy to save every rank's state.")
            self._warned_rank_local = True
        with local_only():
            if "state_dict" in checkpoint and "pytorch-lightning_version" in checkpoint:
                self.save_sharded(checkpoint, path, [], None, {}, storage_options=storage_options)
            else:
                component = StateComponent(_RAW_KEY, ValueHolder(dict(checkpoint)), SharingPattern.GLOBAL)
                self._coordinator([component], None, path, storage_options).save_checkpoint(path)

    def load_checkpoint(self, path: str | os.PathLike[str], map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Rank-local load (no collectives): rank-specific state saved under another topology is skipped."""
        self.wait()
        with local_only():
            manifest = CheckpointManifest.load(path, self.storage_options_for(path))
            if _RAW_KEY in manifest.components:
                holder = ValueHolder()
                self._coordinator([StateComponent(_RAW_KEY, holder, SharingPattern.GLOBAL)], None,
                                  path).load_checkpoint(path, strict=False)
                return dict(holder.value)
            checkpoint, _ = self.load_sharded(path, [], None, {}, strict=False)
            checkpoint.pop(METRIC_COUNTS_KEY, None)
            return checkpoint

    def load_file(self, path: str | os.PathLike[str], weights_only: bool | None = None) -> dict[str, Any]:
        """Rank-local: an ordinary single-file Lightning checkpoint (``torch.save``), e.g. to migrate from it.

        Read with ``torch.load(weights_only=True)`` unless ``weights_only=False`` is passed (for a trusted file
        that holds other objects), as Lightning does on torch >= 2.6; tensors are read onto the CPU. A URL is read
        through the object store, with this plugin's storage options.
        """
        safe = True if weights_only is None else weights_only
        if is_object_url(path):
            store = store_for(path, self.storage_options_for(path))
            data = io.BytesIO(store.read_bytes(store.normalize(os.fspath(path))))
            checkpoint = torch.load(data, map_location="cpu", weights_only=safe)
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=safe)
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise ValueError(f"{path} is not a Lightning training checkpoint (a dict with a 'state_dict'), but a "
                             f"{type(checkpoint).__name__}")
        return checkpoint

    def load_for_module(self, path: str | os.PathLike[str], map_location: Any = None) -> dict[str, Any]:
        """Rank-local: what ``LightningModule.load_from_checkpoint`` reads, from a checkpoint directory.

        Lightning's dict with the model's weights (``state_dict``, in the module's order) and the trainer part
        (hyper-parameters, ``hparams_type``, epoch, global step, loops, callbacks, datamodule state); the
        optimizer, scheduler, data position, RNG and user components are not read. Tensors are read onto the
        CPU; ``map_location`` (a device, a ``{"cpu": device}`` mapping, or torch.load's
        ``fn(storage, "cpu")``) moves them, as ``torch.load`` would.

        Example:
            >>> ck = SharingCheckpointIO().load_for_module("ckpts/last.ckpt", map_location="cpu")  # doctest: +SKIP
            >>> model = MyModule(**ck["hyper_parameters"]); model.load_state_dict(ck["state_dict"])  # doctest: +SKIP
        """
        self.wait()
        with local_only():
            manifest = CheckpointManifest.load(path, self.storage_options_for(path))
            if _RAW_KEY in manifest.components and not set(manifest.components) & set(BUILTIN_KEYS):
                return move_tensors(self.load_checkpoint(path), map_location)
            keys = [key for key in _MODULE_KEYS if key in manifest.components]
            holders = {key: ValueHolder() for key in keys}
            components = [StateComponent(key, holders[key], manifest.components[key].pattern,
                                         manifest.components[key].group_name) for key in keys]
            self._coordinator(components, None, path).load_checkpoint(
                path, strict=True, ignore=set(manifest.components) - set(keys))
            checkpoint = join_checkpoint({key: holder.value for key, holder in holders.items()})
        return move_tensors(checkpoint, map_location)

    def remove_checkpoint(self, path: str | os.PathLike[str], keep: Callable[[str], str | None] | None = None) -> None:
        """Delete a checkpoint atomically (it is never seen half-deleted); rank-local, run it on one rank.

        While a background save is pending, the deletion waits until that save has committed, and is
        skipped if it fails, so retention never removes the last good checkpoint. ``keep(path)``,
        evaluated when the deletion runs, may return a reason to keep the checkpoint instead. What cannot be
        removed (on an object store: a prefix holding objects lightning_sharing did not write) is logged and
        left in place: retention never stops training.
        """
        target = os.fspath(path)

        def remove() -> None:
            reason = keep(target) if keep is not None else None
            if reason:
                log.warning("not removing checkpoint %s: %s", target, reason)
                return
            try:
                remove_checkpoint(target, self.storage_options_for(target))
            except CheckpointError as exc:  # rank-local, no collective here: refusing to delete is not fatal
                log.error("not removing checkpoint %s: %s", target, exc)

        if self.saver is not None:
            self.saver.after_pending(remove, f"removing checkpoint {target}")
        else:
            remove()



def save_holders(checkpoint: Mapping[str, Any], unreplicated: frozenset[str] = frozenset(),
                 metrics: Mapping[str, Any] | None = None, module: Any = None,
                 sampler_positions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The built-in components' statefuls of a save of Lightning's ``checkpoint`` dict, by key (see ``save_sharded``
    for the arguments); ``rng`` is this process's live RNG state."""
    parts = split_checkpoint(checkpoint)
    if sampler_positions is not None:
        parts["sampler"] = list(sampler_positions)
    model_state = parts.get("model")
    metric_keys: list[str] = []
    if metrics and isinstance(model_state, Mapping):
        metric_keys = [key for name, metric in metrics.items() for key in persistent_state_keys(name, metric)
                       if key in model_state]
        if metric_keys:
            parts["model_metrics"] = {
                "states": {key: model_state[key] for key in metric_keys},
                "update_counts": {name: int(metric._update_count) for name, metric in metrics.items()
                                  if any(key.startswith(f"{name}.") for key in metric_keys)}}
    holders: dict[str, Any] = {key: ValueHolder(value) for key, value in parts.items()}
    if "model" in holders:
        holders["model"].exempt = unreplicated | frozenset(metric_keys)
        holders["model"].source_module = module
    holders["rng"] = RNGState()
    return holders


def _groups_gone(manifest: CheckpointManifest, overrides: Mapping[str, StateComponent], process_groups: Any,
                 strict: bool, path: Any) -> set[str]:
    """Saved built-ins (not re-declared) of a group this run does not have: refused, or (not strict) skipped.

    A model-parallel checkpoint keeps the dataloader position per tensor-parallel group; a DDP run has no such group.
    """
    names = set(resolve_process_groups(process_groups)) if process_groups is not None else set()
    gone = {key: saved.group_name for key, saved in manifest.components.items()
            if key in BUILTIN_KEYS and key not in overrides and saved.group_name and saved.group_name not in names}
    for key, group in sorted(gone.items()):
        message = (f"{path}: component {key!r} was saved {manifest.components[key].pattern.name} over the process "
                   f"group {group!r}, which this run does not have (its groups: {sorted(names) or 'none'})")
        if strict:
            raise ComponentDeclarationError(
                f"{message}; load with strict=False to skip it (it keeps its current value), or provide that group "
                "in configure_process_groups()")
        warn_on_rank_zero(log, "%s: skipped (strict=False), it keeps its current value", message)
    return set(gone)
