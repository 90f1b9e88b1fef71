"""``SharingStrategyBase``: what ``SharingStrategy`` and ``SharingModelParallelStrategy`` share.

Options, declarations (``configure_state_components()`` / ``configure_process_groups()``), saving, retention,
``ckpt_path="last"``, preemption and (through ``ResumeMixin``) loading. A strategy class puts this first in its
bases, before the Lightning strategy it extends, and says how it differs as data:

- ``builtin_defaults()``: its default declarations of the built-in components (``model`` SHARDED, ...), applied
  below the user's own re-declarations;
- ``live_statefuls(overrides)``: the built-ins it loads straight into live objects (a sharded model and its
  optimizers) rather than handing them to Lightning in the checkpoint dict;
- ``unreplicated_entries()``: model entries that may differ between ranks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from functools import partial
from typing import Any

from lightning_sharing.core.declarations import StateComponent, ValidationLevel, check_unique_keys
from lightning_sharing.core.local_tier import LocalTier
from lightning_sharing.core.options import DEFAULT_MAX_SHARD_SIZE, checkpoint_options
from lightning_sharing.engine.coordinator import CheckpointCoordinator
from lightning_sharing.engine.local_tier import LocalTierRunner
from lightning_sharing.errors import ComponentDeclarationError
from lightning_sharing.integration.cleanup import adopt_default_group, default_group_exists
from lightning_sharing.integration.common import LazyProcessGroups, check_storage_options
from lightning_sharing.integration.compat import (
    given_checkpoint_io,
    hook_checkpoint_filesystem,
    hook_last_checkpoint,
    hook_training_sampler,
    trainer_of,
    use_storage_options,
)
from lightning_sharing.lightning.builtins import BUILTIN_KEYS, builtin_components, check_user_components
from lightning_sharing.lightning.checkpoint_io import SharingCheckpointIO
from lightning_sharing.lightning.elastic import ElasticData
from lightning_sharing.lightning.local_tier import (
    LocalResume,
    LocalTierSaves,
    agree_on_last,
    log_failed_local_save,
    resolve_last,
    save_local,
)
from lightning_sharing.lightning.locations import CheckpointLocations
from lightning_sharing.lightning.preemption import PreemptionHandler
from lightning_sharing.lightning.restore import ResumeMixin
from lightning_sharing.statefuls.holders import ValueHolder
from lightning_sharing.statefuls.metrics import module_metrics

__all__ = ["SharingStrategyBase", "refuse_ignored_io"]

log = logging.getLogger(__name__)


class SharingStrategyBase(ResumeMixin):
    """Mixin for a Lightning strategy whose checkpoints are lightning_sharing directories (see the module docstring).

    The keyword arguments are documented on ``SharingStrategy``; the rest go to the Lightning strategy.
    """

    def __init__(self, *, process_groups: Any = None, validation_level: ValidationLevel | str = ValidationLevel.QUICK,
                 max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, verify: str = "checksum", strict: bool = True,
                 fallback: bool = False, async_save: bool = False, max_pending_saves: int = 1,
                 background_staging: bool = False, read_once: bool | None = None,
                 incremental: bool = False,
                 preemption_checkpoint: bool | str | os.PathLike[str] | None = True,
                 storage_options: Mapping[str, Any] | None = None, elastic_data: bool = True,
                 local_tier: LocalTier | None = None, **kwargs: Any) -> None:
        storage_options = check_storage_options(storage_options)
        io = kwargs.pop("checkpoint_io", None)
        if io is None:  # the strategy's option keywords become its SharingCheckpointIO's one options object
            options = checkpoint_options(max_shard_size=max_shard_size, verify=verify,
                                         validation_level=validation_level, async_save=async_save,
                                         max_pending_saves=max_pending_saves, background_staging=background_staging,
                                         read_once=read_once, incremental=incremental)
            io = SharingCheckpointIO(options=options, storage_options=storage_options)
        elif storage_options is not None and isinstance(io, SharingCheckpointIO):
            io.adopt_storage_options(storage_options, type(self).__name__)
        super().__init__(**kwargs)
        self.checkpoint_io = io  # not through the constructor: ModelParallelStrategy takes no checkpoint_io
        self.strict = strict
        self.fallback = fallback
        self._resumed_from: str | None = None  # location_key() of the checkpoint this run resumed from
        self._locations = CheckpointLocations(self._options_for)
        self.preemption = PreemptionHandler(preemption_checkpoint, options_for=self._options_for)
        self._process_groups = LazyProcessGroups(process_groups)
        self._pending_rng: Any = None
        self._rng_at_first_batch = False
        self._resume_after_last_batch = False
        self.elastic = ElasticData(elastic_data)
        if local_tier is not None and not isinstance(local_tier, LocalTier):
            raise ComponentDeclarationError(f"local_tier must be a LocalTier, got {type(local_tier).__name__}")
        #: The fast recovery tier (``LocalTier``), or None; its runner keeps the tier's process group between saves.
        self.local_tier = local_tier
        failed = partial(log_failed_local_save, background=True)  # an async local save's failure: logged
        self._local_runner = LocalTierRunner(local_tier, failed) if local_tier is not None else None
        self._local_resume: LocalResume | None = None
        self._asked_last = False  # fit(ckpt_path="last") resolved here; agreed in setup_environment

    @property
    def sharing_io(self) -> SharingCheckpointIO:
        """The strategy's CheckpointIO, which must be a ``SharingCheckpointIO``."""
        io = self.checkpoint_io
        if not isinstance(io, SharingCheckpointIO):
            raise ComponentDeclarationError(
                f"{type(self).__name__} needs a SharingCheckpointIO, but the Trainer gave it {type(io).__name__}; "
                "remove the other CheckpointIO plugin or pass SharingCheckpointIO(...)"
            )
        return io

    # ------------------------------------------------------------------ what a strategy changes (data)
    def builtin_defaults(self) -> dict[str, StateComponent]:
        """This strategy's default declarations of built-in components (none: the layout's defaults)."""
        return {}

    def live_statefuls(self, overrides: dict[str, StateComponent]) -> tuple[dict[str, Any], set[str],
                                                                             dict[str, StateComponent]]:
        """For a load: built-ins read into live objects, saved built-ins not to read, and the declarations."""
        return {}, set(), overrides

    def unreplicated_entries(self) -> frozenset[str]:
        # Buffers (BatchNorm running statistics, counters) are updated from each rank's own batch and
        # only made equal by DDP's broadcast at the next forward: save rank 0's, but don't require equality.
        module = self.lightning_module
        return frozenset(name for name, _ in module.named_buffers()) if module is not None else frozenset()

    # ------------------------------------------------------------------ declarations
    def _hook_owners(self) -> list[Any]:
        module = self.lightning_module
        trainer = trainer_of(module)
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        return [obj for obj in (module, datamodule) if obj is not None]

    def _resolve_process_groups(self) -> Any:
        return self._process_groups.resolve(self._hook_owners())

    def declared_components(self, defaults: bool = True) -> tuple[list[StateComponent], dict[str, StateComponent]]:
        """The user's own components and the declarations of built-ins (the strategy's, then the user's).

        A load passes ``defaults=False``: a built-in the user does not re-declare is read the way it was saved
        (a DDP checkpoint's REPLICATED model into the model-parallel strategy's sharded one, say).
        """
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
        return [c for c in declared if c.key not in overrides], {**(self.builtin_defaults() if defaults else {}),
                                                                 **overrides}

    def _check_declarations(self) -> None:
        """Build the full component set once, so wrong declarations fail at fit start."""
        user, overrides = self.declared_components()
        holders = {key: ValueHolder() for key in BUILTIN_KEYS}
        components = builtin_components(list(BUILTIN_KEYS), holders, overrides, self.sharing_io.validation_level)
        CheckpointCoordinator(components + user, self._resolve_process_groups())

    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        self._check_declarations()
        every = self.local_tier.every_n_steps if self.local_tier is not None else None
        if every and not any(isinstance(cb, LocalTierSaves) and cb.strategy is self for cb in trainer.callbacks):
            trainer.callbacks.append(LocalTierSaves(self, every))

    # ------------------------------------------------------------------ the local tier (lightning/local_tier.py)
    def save_local(self, trainer: Any) -> None:
        """Collective: save the Trainer's state now into the local tier (``LocalTier``; every rank calls it)."""
        if self._local_runner is None:
            raise ComponentDeclarationError(f"save_local needs {type(self).__name__}(local_tier=LocalTier(...))")
        user, overrides = self.declared_components()
        module = self.lightning_module
        save_local(trainer, self._local_runner, user, overrides, self._resolve_process_groups(),
                   saver=self.sharing_io.saver, staging_roots=[module, *self.optimizers],
                   unreplicated=self.unreplicated_entries(), metrics=module_metrics(module), module=module,
                   sampler_positions=self.elastic.positions(trainer))

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
        if self._asked_last and self.local_tier is not None and trainer is not None:  # the same on every rank
            self._asked_last = False
            self._local_resume = agree_on_last(trainer, self.local_tier, self._local_resume)

    def on_exception(self, exception: BaseException) -> None:
        """Called by Lightning on every rank that raised; writes the final checkpoint for an agreed SIGTERM only."""
        super().on_exception(exception)
        self.preemption.on_exception(exception)

    # ------------------------------------------------------------------ save
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Collective: every rank saves its share of the checkpoint (Lightning calls this on all ranks).

        ``storage_options`` (``trainer.save_checkpoint(path, storage_options=...)``) replace the strategy's own for
        this save.
        """
        storage_options = check_storage_options(storage_options)
        user, overrides = self.declared_components()
        self.sharing_io.save_sharded(checkpoint, filepath, user, self._resolve_process_groups(), overrides,
                                     unreplicated=self.unreplicated_entries(),
                                     metrics=module_metrics(self.lightning_module), storage_options=storage_options,
                                     staging_roots=[self.lightning_module, *self.optimizers],
                                     module=self.lightning_module,
                                     # A weights-only save has no loop state: no data position either.
                                     sampler_positions=self.elastic.positions(trainer_of(self.lightning_module))
                                     if "loops" in checkpoint else None)

    def training_sampler(self, sampler: Any) -> Any:
        """The sampler Lightning inserts for training (``integration.compat.hook_training_sampler``): elastic."""
        return self.elastic.training_sampler(sampler)

    @property
    def storage_options(self) -> dict[str, Any] | None:
        """The fsspec options used for checkpoint URLs (those of the strategy's ``SharingCheckpointIO``)."""
        io = self.checkpoint_io
        return io.storage_options if isinstance(io, SharingCheckpointIO) else None

    def _options_for(self, path: Any) -> dict[str, Any] | None:
        return self.sharing_io.storage_options_for(path)

    def teardown(self) -> None:
        self._pending_rng = None
        self._resume_after_last_batch = False
        self.elastic.reset()
        super().teardown()
        if isinstance(self.checkpoint_io, SharingCheckpointIO):
            self.checkpoint_io.close()  # waits for pending saves (ModelParallelStrategy does not tear its IO down)
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
        resolved = self._locations.resolve_last(trainer)
        if self.local_tier is None:
            return resolved
        self._local_resume = resolve_last(trainer, self.local_tier, resolved, self._options_for)
        self._asked_last = True  # every rank asked: setup_environment agrees on the answer (agree_on_last)
        return None if self._local_resume is None else self._local_resume.marker


def refuse_ignored_io(strategy: Any) -> None:
    """Refuse a ``SharingCheckpointIO`` given to a Lightning strategy that saves without it (at its setup).

    Our own strategies pass; see ``integration.compat.hook_ignored_checkpoint_io``.
    """
    if not isinstance(given_checkpoint_io(strategy), SharingCheckpointIO):
        return
    if isinstance(strategy, SharingStrategyBase):
        return
    name = type(strategy).__name__
    raise ComponentDeclarationError(
        f"SharingCheckpointIO was passed to {name}, whose save_checkpoint writes its own distributed checkpoint "
        "without calling the CheckpointIO plugin: none of your checkpoints would be lightning_sharing ones. Use "
        "strategy=SharingModelParallelStrategy(data_parallel_size=..., tensor_parallel_size=...) (or "
        "strategy=\"sharing_model_parallel\") with fully_shard / tensor parallelism in configure_model(), and drop "
        "SharingCheckpointIO from plugins"
    )


# Lightning's private API that both Trainer strategies rely on (integration/compat.py), hooked once.
hook_last_checkpoint()
hook_checkpoint_filesystem()
hook_training_sampler()
