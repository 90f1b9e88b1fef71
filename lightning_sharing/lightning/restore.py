"""Resuming a Trainer from a lightning_sharing checkpoint: the load, fallback, migration and resume timing.

Shared by ``SharingStrategy`` (DDP) and ``SharingModelParallelStrategy`` through ``ResumeMixin``: the strategies
differ only in data (which built-ins they read into live objects, see ``SharingStrategyBase.live_statefuls``),
never in this logic.
"""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch.trainer.states import TrainerFn

from lightning_sharing.core.declarations import StateComponent
from lightning_sharing.distributed.collectives import agreement, all_gather_object, on_rank_zero
from lightning_sharing.errors import (
    CheckpointNotFoundError,
    ComponentDeclarationError,
    CorruptCheckpointError,
    ManifestError,
)
from lightning_sharing.integration.common import is_plain_object
from lightning_sharing.integration.compat import set_restored_path, trainer_of
from lightning_sharing.integration.data import replace_shuffle_wrapper, set_sampler_epoch
from lightning_sharing.lightning.builtins import METRIC_COUNTS_KEY, SAMPLER_KEY
from lightning_sharing.lightning.elastic import ElasticData, pending_positions
from lightning_sharing.lightning.local_tier import LocalResume, load_local
from lightning_sharing.statefuls.metrics import module_metrics
from lightning_sharing.statefuls.rng import restore_rng

__all__ = ["ResumeMixin", "agree_on_flag"]

log = logging.getLogger(__name__)


class ResumeMixin:
    """``load_checkpoint`` and the hooks that make a resumed run continue exactly (for ``SharingStrategyBase``)."""

    _pending_rng: Any
    elastic: ElasticData
    _rng_at_first_batch: bool
    _resume_after_last_batch: bool
    _resumed_from: str | None
    _local_resume: LocalResume | None
    _local_runner: Any
    local_tier: Any

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Collective: restore user components in place and return Lightning's checkpoint dict.

        A regular file is an ordinary single-file Lightning checkpoint: see ``_migrate_from_file``.
        """
        local, self._local_resume = self._local_resume, None
        if local is not None and checkpoint_path == local.marker:  # ckpt_path="last" with a local tier
            loaded = self._load_local_tier(local)
            if loaded is not None:
                return self._resumed(*loaded)
            if local.persistent is None:
                raise CheckpointNotFoundError(
                    f'ckpt_path="last": no local step of {self.local_tier} can be restored on every node and the '
                    "ModelCheckpoint directories hold no complete checkpoint; start without ckpt_path")
            checkpoint_path = local.persistent
        user, overrides = self.declared_components(defaults=False)
        is_file = False
        with agreement(f"checking whether {checkpoint_path} is a file"):
            is_file = is_plain_object(checkpoint_path, self._options_for(checkpoint_path))
        if agree_on_flag(is_file, f"checking whether {checkpoint_path} is a file"):
            return self._migrate_from_file(checkpoint_path, weights_only, user)
        groups = self._resolve_process_groups()
        live, skip, overrides = self.live_statefuls(overrides)
        try:
            checkpoint, rng = self._load_one(checkpoint_path, user, groups, overrides, live, skip)
        except CheckpointNotFoundError:
            raise  # nothing at that path: not a damaged checkpoint to fall back from (FileNotFoundError, as Lightning)
        except (CorruptCheckpointError, ManifestError) as exc:
            # Every rank raised this same error (the agreement step), so every rank gets here.
            if not self.fallback:
                log.error("%s cannot be loaded; %s(fallback=True) would resume from the previous complete checkpoint "
                          "in %s instead", checkpoint_path, type(self).__name__,
                          self._locations.parent(checkpoint_path))
                raise
            checkpoint, rng = self._load_previous(checkpoint_path, exc, user, groups, overrides, live, skip)
            # Lightning's own "Restored all states from the checkpoint at ..." and trainer.ckpt_path must name
            # the checkpoint that was loaded, not the damaged one.
            set_restored_path(trainer_of(self.lightning_module), self._resumed_from)
        return self._resumed(checkpoint, rng)

    def _load_local_tier(self, local: LocalResume) -> tuple[dict[str, Any], Any] | None:
        """Collective: Lightning's dict and the RNG state of the newest local step every node can get, when it is at
        least as new as the persistent checkpoint ``ckpt_path="last"`` found; None otherwise (logged)."""
        user, overrides = self.declared_components()  # as the local saves declared them
        live, _, overrides = self.live_statefuls(overrides)
        return load_local(self._local_runner, user, overrides, self._resolve_process_groups(), live,
                          local.persistent_step)

    def _resumed(self, checkpoint: dict[str, Any], rng: Any) -> dict[str, Any]:
        """Lightning's dict after a load, made ready for an exact resume (metrics, sampler, RNG, epoch end)."""
        module = self.lightning_module
        _apply_update_counts(module, checkpoint.pop(METRIC_COUNTS_KEY, None))
        self.elastic.pending = pending_positions(checkpoint.pop(SAMPLER_KEY, None))
        trainer = trainer_of(module)  # None after strategy.connect(model) alone
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
            restore_rng(rng)
            self._pending_rng = rng
        return checkpoint

    def _load_one(self, path: Any, user: list[StateComponent], groups: Any, overrides: dict[str, StateComponent],
                  live: dict[str, Any], skip: set[str]) -> tuple[dict[str, Any], Any]:
        loaded = self.sharing_io.load_sharded(path, user, groups, overrides, strict=self.strict, live=live,
                                              skip=skip, module=self.lightning_module)
        self._resumed_from = self._locations.key(path)
        return loaded

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
        several = self.world_size > 1
        if several and "combined_loader" in fit_state:
            missing.append("every rank gets rank 0's dataloader position (dataloader)")
        if several and module_metrics(self.lightning_module):
            missing.append("the metric states inside the module are rank 0's on every rank (model_metrics)")
        if user:
            missing.append(f"your components {[c.key for c in user]} keep their current values")
        return missing

    def _load_previous(self, failed: Any, error: BaseException, user: list[StateComponent], groups: Any,
                       overrides: dict[str, StateComponent], live: dict[str, Any],
                       skip: set[str]) -> tuple[dict[str, Any], Any]:
        """Resume from the newest other complete checkpoint beside ``failed`` (chosen on rank 0)."""
        candidates = on_rank_zero(f"choosing a checkpoint to fall back to from {failed}",
                                  lambda: self._locations.previous_checkpoints(failed))
        for candidate in candidates:
            log.error("FALLING BACK: %s could not be loaded (%s); resuming from %s instead", failed, error, candidate)
            try:
                return self._load_one(candidate, user, groups, overrides, live, skip)
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
            replace_shuffle_wrapper(dataloader, elastic=self.elastic.enabled)
            self.elastic.restore(trainer, dataloader)
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
        self.sharing_io.poll()  # a failed background save raises here, on every rank
        if self._pending_rng is not None and self._rng_at_first_batch:
            restore_rng(self._pending_rng)
            self._pending_rng = None

    def on_train_end(self) -> None:
        super().on_train_end()
        self.sharing_io.wait()  # fit returns once every checkpoint it started is committed


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
