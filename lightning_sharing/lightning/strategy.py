"""``SharingStrategy``: Lightning's DDP strategy with lightning_sharing checkpoints.

``pl.Trainer(strategy=SharingStrategy())`` (or ``strategy="sharing"`` once ``lightning_sharing`` is
imported) and nothing else changes: ``ModelCheckpoint``, ``trainer.save_checkpoint`` and
``trainer.fit(ckpt_path=...)`` write and read directory checkpoints in which every piece of state is
saved from the right ranks (see ``lightning_layout`` for the built-in components). Modules and
datamodules add or re-declare components in ``configure_state_components()`` and name process groups
in ``configure_process_groups()``.

Example:
    >>> import lightning.pytorch as pl
    >>> from lightning_sharing import SharingStrategy
    >>> trainer = pl.Trainer(strategy=SharingStrategy(), accelerator="cpu", devices=2)  # doctest: +SKIP
    >>> trainer.fit(model, ckpt_path="last")                                            # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn

from lightning_sharing.core.declarations import StateComponent, ValidationLevel, check_unique_keys
from lightning_sharing.core.options import DEFAULT_MAX_SHARD_SIZE, CheckpointOptions
from lightning_sharing.distributed.collectives import agreement, all_gather_object, on_rank_zero
from lightning_sharing.engine.coordinator import CheckpointCoordinator
from lightning_sharing.errors import (
    CheckpointNotFoundError,
    ComponentDeclarationError,
    CorruptCheckpointError,
    ManifestError,
)
from lightning_sharing.integration.cleanup import adopt_default_group, default_group_exists
from lightning_sharing.integration.common import (
    LazyProcessGroups,
    check_storage_options,
    is_plain_object,
    register_strategy,
)
from lightning_sharing.integration.compat import (
    hook_checkpoint_filesystem,
    hook_last_checkpoint,
    set_restored_path,
    trainer_of,
    use_storage_options,
)
from lightning_sharing.integration.data import replace_shuffle_wrapper, set_sampler_epoch
from lightning_sharing.lightning.checkpoint_io import SharingCheckpointIO
from lightning_sharing.lightning.layout import (
    BUILTIN_KEYS,
    METRIC_COUNTS_KEY,
    builtin_components,
    check_user_components,
)
from lightning_sharing.lightning.locations import CheckpointLocations
from lightning_sharing.lightning.preemption import PreemptionHandler
from lightning_sharing.statefuls.holders import ValueHolder
from lightning_sharing.statefuls.metrics import module_metrics
from lightning_sharing.statefuls.rng import RNGState

__all__ = ["SharingStrategy"]

log = logging.getLogger(__name__)


class SharingStrategy(DDPStrategy):
    """DDP whose checkpoints are lightning_sharing directories, saved and restored on every rank.

    Args:
        process_groups: named groups for PER_GROUP components: a dict of this rank's
            ``ProcessGroup`` per name, a ``DeviceMesh``, or a callable returning either (called once,
            on every rank, after the default process group exists). Defaults to the module's or
            datamodule's ``configure_process_groups()``.
        validation_level: replication check of the model weights at each save (default QUICK).
        max_shard_size: the largest safetensors shard, in bytes.
        verify: ``"checksum"`` (default) or ``"size"``: how files are checked on load.
        fallback: when the checkpoint to resume from is corrupt or incomplete, resume from the newest
            other complete checkpoint in the same directory instead of failing (logged as an error).
            Off by default: a damaged checkpoint is an error unless you opt in.
        async_save: save in the background. ``trainer.save_checkpoint`` (and ``ModelCheckpoint``) return
            once the state is copied; files are written and committed while training continues. A failed
            background save raises on every rank at the next step boundary; the next save, a load, the
            end of ``fit`` and teardown wait for a pending save; checkpoints that retention removes are
            removed only after the newer save has committed.
        max_pending_saves: with ``async_save``, how many saves may be in flight at once; each holds one
            copy of the state this rank writes (default 1: staging memory is at most one copy).
        strict: the loading rules on resume (see docs/patterns.md). ``False`` skips what cannot be
            loaded (undeclared or missing components, rank-specific state saved under another
            topology), logging each skip, instead of refusing the checkpoint.
        preemption_checkpoint: on SIGTERM every rank stops after the same step and this final checkpoint is
            written (exit status 0): ``True`` (default) beside the ModelCheckpoint's checkpoints, where
            ``ckpt_path="last"`` finds it when ``save_last`` is set (Lightning's ``hpc_ckpt_{n}.ckpt`` under
            ``SLURMEnvironment(auto_requeue=True)``); a ``.ckpt`` path (``{step}``/``{epoch}`` filled in) or a
            directory; ``False``: stop without it. See ``lightning_sharing.lightning.preemption``.
        storage_options: fsspec filesystem arguments for checkpoint URLs (``ModelCheckpoint(dirpath="s3://...")``:
            ``endpoint_url``, ``key``, ``secret``, ``client_kwargs``, ...), used for every save, load, removal,
            ``ckpt_path="last"`` and fallback on a URL, and by ``ModelCheckpoint`` itself to list its directory.
            ``trainer.save_checkpoint(path, storage_options=...)`` replaces them for that save. Local paths do not
            use them. Default: fsspec's own configuration (for S3: the environment, ``AWS_ENDPOINT_URL``, ...).
        **kwargs: everything ``DDPStrategy`` accepts.

    Example:
        >>> trainer = pl.Trainer(strategy=SharingStrategy(validation_level="tensor"), devices=2)  # doctest: +SKIP
    """

    strategy_name = "sharing"

    def __init__(self, *, process_groups: Any = None, validation_level: ValidationLevel | str = ValidationLevel.QUICK,
                 max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, verify: str = "checksum", strict: bool = True,
                 fallback: bool = False, async_save: bool = False, max_pending_saves: int = 1,
                 preemption_checkpoint: bool | str | os.PathLike[str] | None = True,
                 storage_options: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        storage_options = check_storage_options(storage_options)
        io = kwargs.get("checkpoint_io")
        if io is None:
            kwargs["checkpoint_io"] = SharingCheckpointIO(options=CheckpointOptions(
                max_shard_size=max_shard_size, verify=verify, validation_level=validation_level,
                async_save=async_save, max_pending_saves=max_pending_saves), storage_options=storage_options)
        elif storage_options is not None and isinstance(io, SharingCheckpointIO):
            io.adopt_storage_options(storage_options, "SharingStrategy")
        super().__init__(**kwargs)
        self.strict = strict
        self.fallback = fallback
        self._resumed_from: str | None = None  # location_key() of the checkpoint this run resumed from
        self._locations = CheckpointLocations(self._options_for)
        self.preemption = PreemptionHandler(preemption_checkpoint, options_for=self._options_for)
        self._process_groups = LazyProcessGroups(process_groups)
        self._pending_rng: Any = None
        self._rng_at_first_batch = False
        self._resume_after_last_batch = False

    @property
    def sharing_io(self) -> SharingCheckpointIO:
        """The strategy's CheckpointIO, which must be a ``SharingCheckpointIO``."""
        io = self.checkpoint_io
        if not isinstance(io, SharingCheckpointIO):
            raise ComponentDeclarationError(
                f"SharingStrategy needs a SharingCheckpointIO, but the Trainer gave it {type(io).__name__}; "
                "remove the other CheckpointIO plugin or pass SharingCheckpointIO(...)"
            )
        return io

    # ------------------------------------------------------------------ declarations
    def _hook_owners(self) -> list[Any]:
        module = self.lightning_module
        trainer = trainer_of(module)
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        return [obj for obj in (module, datamodule) if obj is not None]

    def _resolve_process_groups(self) -> Any:
        return self._process_groups.resolve(self._hook_owners())

    def declared_components(self) -> tuple[list[StateComponent], dict[str, StateComponent]]:
        """The user's own components and their re-declarations of built-ins, from the hooks."""
        declared: list[StateComponent] = []
        for owner in self._hook_owners():
            hook = getattr(owner, "configure_state_components", None)
            if not callable(hook):
                continue
            result = hook()
            if result is None:
                continue
            if isinstance(result, StateComponent) or not isinstance(result, (list, tuple)):
                raise ComponentDeclarationError(
                    f"{type(owner).__name__}.configure_state_components() must return a list of StateComponent, "
                    f"got {type(result).__name__}"
                )
            declared.extend(result)
        declared = check_unique_keys(declared)
        overrides = check_user_components(declared)
        return [c for c in declared if c.key not in overrides], overrides

    def _check_declarations(self) -> None:
        """Build the full component set once, so wrong declarations fail at fit start."""
        user, overrides = self.declared_components()
        holders = {key: ValueHolder() for key in BUILTIN_KEYS}
        components = builtin_components(list(BUILTIN_KEYS), holders, overrides, self.sharing_io.validation_level)
        CheckpointCoordinator(components + user, self._resolve_process_groups())

    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        self._check_declarations()

    # ------------------------------------------------------------------ preemption (see preemption.py)
    def setup_environment(self) -> None:
        # Before the callbacks' setup: ModelCheckpoint opens its directory with these options (integration/compat.py).
        use_storage_options(self.storage_options)
        existed = default_group_exists()
        super().setup_environment()
        adopt_default_group(existed)  # a group created here is destroyed at exit (see integration/cleanup.py)
        trainer = trainer_of(self.lightning_module)
        if trainer is not None:  # before Lightning registers its signal handlers for this stage
            self.preemption.attach(trainer)

    def on_exception(self, exception: BaseException) -> None:
        """Called by Lightning on every rank that raised; writes the final checkpoint for an agreed SIGTERM only."""
        super().on_exception(exception)
        self.preemption.on_exception(exception)

    # ------------------------------------------------------------------ save / load / remove
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Collective: every rank saves its share of the checkpoint (Lightning calls this on all ranks).

        ``storage_options`` (``trainer.save_checkpoint(path, storage_options=...)``) replace the strategy's own for
        this save.
        """
        storage_options = check_storage_options(storage_options)
        user, overrides = self.declared_components()
        self.sharing_io.save_sharded(checkpoint, filepath, user, self._resolve_process_groups(), overrides,
                                     unreplicated=self._buffer_names(), metrics=module_metrics(self.lightning_module),
                                     storage_options=storage_options)

    @property
    def storage_options(self) -> dict[str, Any] | None:
        """The fsspec options used for checkpoint URLs (those of the strategy's ``SharingCheckpointIO``)."""
        io = self.checkpoint_io
        return io.storage_options if isinstance(io, SharingCheckpointIO) else None

    def _options_for(self, path: Any) -> dict[str, Any] | None:
        return self.sharing_io.storage_options_for(path)

    def _buffer_names(self) -> frozenset[str]:
        # Buffers (BatchNorm running statistics, counters) are updated from each rank's own batch and
        # only made equal by DDP's broadcast at the next forward: save rank 0's, but don't require equality.
        module = self.lightning_module
        return frozenset(name for name, _ in module.named_buffers()) if module is not None else frozenset()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Collective: restore user components in place and return Lightning's checkpoint dict.

        A regular file is an ordinary single-file Lightning checkpoint: see ``_migrate_from_file``.
        """
        user, overrides = self.declared_components()
        is_file = False
        with agreement(f"checking whether {checkpoint_path} is a file"):
            is_file = is_plain_object(checkpoint_path, self._options_for(checkpoint_path))
        if agree_on_flag(is_file, f"checking whether {checkpoint_path} is a file"):
            return self._migrate_from_file(checkpoint_path, weights_only, user)
        groups = self._resolve_process_groups()
        try:
            checkpoint, rng = self.sharing_io.load_sharded(checkpoint_path, user, groups, overrides,
                                                           strict=self.strict)
            self._resumed_from = self._locations.key(checkpoint_path)
        except CheckpointNotFoundError:
            raise  # nothing at that path: not a damaged checkpoint to fall back from (FileNotFoundError, as Lightning)
        except (CorruptCheckpointError, ManifestError) as exc:
            # Every rank raised this same error (the agreement step), so every rank gets here.
            if not self.fallback:
                log.error("%s cannot be loaded; SharingStrategy(fallback=True) would resume from the previous "
                          "complete checkpoint in %s instead", checkpoint_path, self._locations.parent(checkpoint_path))
                raise
            checkpoint, rng = self._load_previous(checkpoint_path, exc, user, groups, overrides)
            # Lightning's own "Restored all states from the checkpoint at ..." and trainer.ckpt_path must name
            # the checkpoint that was loaded, not the damaged one.
            set_restored_path(trainer_of(self.lightning_module), self._resumed_from)
        _apply_update_counts(self.lightning_module, checkpoint.pop(METRIC_COUNTS_KEY, None))
        trainer = trainer_of(self.lightning_module)  # None after strategy.connect(model) alone
        fitting = trainer is not None and trainer.state.fn == TrainerFn.FITTING
        self._resume_after_last_batch = fitting and _after_last_batch(checkpoint)
        if self._resume_after_last_batch:
            # Saved after the epoch's last batch, before the epoch ended (every_n_train_steps landing there):
            # Lightning counts that epoch as done and starts the next one from the restored loader, whose
            # state is that of a consumed epoch, so its first iterator yields nothing and a whole epoch's
            # order is skipped. The next epoch needs no loader position: start it from a fresh iterator.
            fit_state = checkpoint["loops"]["fit_loop"]["state_dict"]
            if isinstance(fit_state, dict):
                fit_state.pop("combined_loader", None)
        if rng is not None and fitting:
            # Applied now (so an epoch-boundary resume creates its data iterator from the saved
            # state) and again before the first batch of a mid-epoch resume (see on_train_start).
            RNGState().load_state_dict(rng)
            self._pending_rng = rng
        return checkpoint

    def _migrate_from_file(self, path: Any, weights_only: bool | None, user: list[StateComponent]) -> dict[str, Any]:
        """Resume from a single-file ``.ckpt`` (written by Lightning's own strategies, this version or older).

        Every rank reads the file (``weights_only=True`` unless ``fit(..., weights_only=False)``); Lightning then
        restores the model, optimizers, schedulers, loops and callbacks from it and migrates older formats. Such
        a file has no per-rank state; rank 0 says in one log line what therefore starts fresh.
        """
        checkpoint: dict[str, Any] = {}
        with agreement(f"reading the single-file checkpoint {path}"):
            checkpoint = self.sharing_io.load_file(path, weights_only)
        self._resumed_from = self._locations.key(path)
        if self.is_global_zero:
            log.warning("%s is a single-file Lightning checkpoint: resuming with its model, optimizer, scheduler, "
                        "loop and callback state; it holds no per-rank state, so %s", path,
                        "; ".join(self._missing_from_file(checkpoint, user)))
        return checkpoint

    def _missing_from_file(self, checkpoint: dict[str, Any], user: list[StateComponent]) -> list[str]:
        missing = ["each rank's RNG starts from this run's seed (rng)"]
        loops = checkpoint.get("loops") or {}
        fit_state = (loops.get("fit_loop") or {}).get("state_dict") or {}
        if self.world_size > 1 and "combined_loader" in fit_state:
            missing.append("every rank gets rank 0's dataloader position (dataloader)")
        if self.world_size > 1 and module_metrics(self.lightning_module):
            missing.append("the metric states inside the module are rank 0's on every rank (model_metrics)")
        if user:
            missing.append(f"your components {[c.key for c in user]} keep their current values")
        return missing

    def _load_previous(self, failed: Any, error: BaseException, user: list[StateComponent], groups: Any,
                       overrides: dict[str, StateComponent]) -> tuple[dict[str, Any], Any]:
        """Resume from the newest other complete checkpoint beside ``failed`` (chosen on rank 0)."""
        candidates = on_rank_zero(f"choosing a checkpoint to fall back to from {failed}",
                                  lambda: self._locations.previous_checkpoints(failed))
        for candidate in candidates:
            log.error("FALLING BACK: %s could not be loaded (%s); resuming from %s instead", failed, error, candidate)
            try:
                loaded = self.sharing_io.load_sharded(candidate, user, groups, overrides, strict=self.strict)
                self._resumed_from = self._locations.key(candidate)
                return loaded
            except (CorruptCheckpointError, ManifestError) as exc:  # agreed on every rank, like above
                error = exc
        raise CorruptCheckpointError(
            f"{failed} could not be loaded and no other complete checkpoint beside it loads either "
            f"(tried {candidates}); last error: {error}"
        ) from error

    # ------------------------------------------------------------------ resume timing
    def process_dataloader(self, dataloader: object) -> object:
        dataloader = super().process_dataloader(dataloader)
        trainer = trainer_of(self.lightning_module)
        if trainer is not None and trainer.training:
            replace_shuffle_wrapper(dataloader)
            # Lightning creates the first data iterator of a fit (in FitLoop.setup_data) before it calls
            # set_epoch on the sampler, so a run resumed in epoch e would replay epoch 0's shuffle. Set
            # the epoch the loop is in before that iterator exists (the same value Lightning sets later).
            epoch = trainer.fit_loop.epoch_progress.current.processed
            set_sampler_epoch(dataloader, epoch + 1 if self._resume_after_last_batch else epoch)
        return dataloader

    def on_train_start(self) -> None:
        super().on_train_start()
        if self._pending_rng is None:
            return
        trainer = self.lightning_module.trainer
        # A mid-epoch resume re-creates the epoch's data iterator, which the interrupted run had
        # created before it saved; re-apply the saved RNG after that, right before the first batch.
        # After an epoch's last batch the next data iterator is new (as in the interrupted run, where it was
        # created after the save): the RNG applied at restore time is already right for it.
        self._rng_at_first_batch = bool(trainer.fit_loop.restarted_mid_epoch) and not self._resume_after_last_batch
        if not self._rng_at_first_batch:
            self._pending_rng = None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self.sharing_io.poll()  # a failed background save raises here, on every rank at the same step
        if self._pending_rng is not None and self._rng_at_first_batch:
            RNGState().load_state_dict(self._pending_rng)
            self._pending_rng = None

    def on_train_end(self) -> None:
        super().on_train_end()
        self.sharing_io.wait()  # fit returns only once every checkpoint it started is committed

    def teardown(self) -> None:
        self._pending_rng = None
        self._resume_after_last_batch = False
        super().teardown()  # tears down the CheckpointIO, which waits for pending saves
        use_storage_options(None)

    # ------------------------------------------------------------------ retention
    def remove_checkpoint(self, filepath: Any) -> None:
        """Rank 0 deletes a checkpoint that retention (``ModelCheckpoint`` top-k) no longer wants.

        The newest complete checkpoint in its directory and the checkpoint this run resumed from are
        kept (logged); with ``async_save`` the deletion waits until the pending save has committed.
        """
        if self.is_global_zero:
            self.sharing_io.remove_checkpoint(filepath, keep=self._reason_to_keep)

    def _reason_to_keep(self, path: str) -> str | None:
        return self._locations.reason_to_keep(path, self._resumed_from, trainer_of(self.lightning_module))

    # ------------------------------------------------------------------ ckpt_path="last"
    def resolve_last_checkpoint(self, trainer: Any) -> Any:
        """``fit(ckpt_path="last")`` when a ``ModelCheckpoint`` saves to an object store (see integration/compat.py).

        The newest *complete* ``last*.ckpt`` of the ModelCheckpoint directories, by the step its manifest records,
        then its creation time; None when there is none (training starts from scratch, with a warning).
        ``NotImplemented`` when every directory is local: there Lightning's own resolution is used unchanged.
        """
        return self._locations.resolve_last(trainer)


def agree_on_flag(flag: bool, phase: str) -> bool:
    """Collective: ``flag`` when every rank has the same one; an error on every rank when they differ."""
    flags = all_gather_object(bool(flag), phase=phase)
    if len(set(flags)) > 1:
        raise ComponentDeclarationError(f"{phase}: ranks disagree ({flags}); every rank must see the same path")
    return bool(flags[0])


def _after_last_batch(checkpoint: dict[str, Any]) -> bool:
    """Whether Lightning's loop state was saved after an epoch's last batch and before that epoch ended."""
    fit_loop = (checkpoint.get("loops") or {}).get("fit_loop") or {}
    epochs = (fit_loop.get("epoch_progress") or {}).get("current") or {}
    batches = fit_loop.get("epoch_loop.batch_progress") or {}
    started = epochs.get("started")
    return bool(batches.get("is_last_batch")) and isinstance(started, int) and epochs.get("ready") == started \
        and epochs.get("processed") == started - 1 and isinstance(fit_loop.get("state_dict"), dict)


def _apply_update_counts(module: Any, counts: Any) -> None:
    """Restore each in-module metric's update count (its states come back through the model's state dict)."""
    if not counts:
        return
    for name, metric in module_metrics(module).items():
        if name in counts:
            metric._update_count = int(counts[name])
            metric._computed = None


register_strategy(StrategyRegistry, "sharing", SharingStrategy,
                  "DDP with lightning_sharing checkpoints (explicit sharing patterns)")
hook_last_checkpoint()
hook_checkpoint_filesystem()
