"""Every use of Lightning's private API by lightning_sharing, in one place.

Lightning does not promise to keep these names; when an upgrade moves one, this is the file to fix. Each
function says what it relies on, and fails loudly (or logs once) rather than misbehaving silently. The
adapters (``lightning/*``, ``fabric/*``) reach Lightning's internals only through this module; what remains
elsewhere is Lightning's public API (and the loop progress counters, which Lightning documents as state).

``load_from_checkpoint`` of a checkpoint directory: ``LightningModule.load_from_checkpoint`` and
``LightningDataModule.load_from_checkpoint`` both call ``lightning.pytorch.core.saving._load_from_checkpoint``,
which reads the path with one function, the module global ``pl_load`` of ``lightning.pytorch.core.saving``
(``lightning.fabric.utilities.cloud_io._load``, imported under that name). That global is replaced by a function
that reads a *local directory* with ``SharingCheckpointIO.load_for_module`` and hands anything else (a file, a
URL, a file object) to Lightning's own ``pl_load`` unchanged. It is the narrowest hook there is: it changes
what one name in one module does, only for directories, which Lightning itself cannot read (``IsADirectoryError``),
and everything after the read (legacy migration, ``hparams_file``, overriding kwargs, ``strict``,
``on_load_checkpoint``, moving the module to the weights' device) stays Lightning's own code. Wrapping
``cloud_io._load`` itself would not work (``saving`` holds its own reference) and would also change
``torch.load``-based readers elsewhere; replacing ``load_from_checkpoint`` would duplicate Lightning's logic.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

__all__ = [
    "allow_launch_under_fabric_cli",
    "cluster_environment",
    "hook_load_from_checkpoint",
    "lightning_sigterm_handler",
    "monitor_candidates",
    "ready_batches_reached",
    "route_signals",
    "set_received_sigterm",
    "set_restored_path",
    "should_accumulate",
    "trainer_of",
    "unwrap_fabric_objects",
    "validates_after_this_step",
]

log = logging.getLogger(__name__)

_HOOK_FLAG = "__lightning_sharing_hook__"


def hook_load_from_checkpoint(read_directory: Callable[[str | os.PathLike[str], Any], dict[str, Any]]) -> bool:
    """Make ``load_from_checkpoint`` read checkpoint directories through ``read_directory(path, map_location)``.

    Idempotent. Returns False (and logs a warning once) if this Lightning has no ``saving.pl_load`` to hook.
    """
    from lightning.pytorch.core import saving

    original = getattr(saving, "pl_load", None)
    if not callable(original):
        log.warning("this Lightning version has no lightning.pytorch.core.saving.pl_load: "
                    "LightningModule.load_from_checkpoint cannot read lightning_sharing directories; use "
                    "SharingCheckpointIO().load_for_module(path) instead")
        return False
    if getattr(original, _HOOK_FLAG, False):
        return True

    def pl_load(path_or_url: Any, map_location: Any = None, weights_only: bool | None = None) -> Any:
        if isinstance(path_or_url, (str, os.PathLike)) and "://" not in os.fspath(path_or_url) \
                and os.path.isdir(path_or_url):
            # A directory checkpoint never unpickles anything: weights_only does not apply to it.
            return read_directory(path_or_url, map_location)
        return original(path_or_url, map_location=map_location, weights_only=weights_only)

    setattr(pl_load, _HOOK_FLAG, True)
    pl_load.__wrapped__ = original  # type: ignore[attr-defined]
    pl_load.__doc__ = original.__doc__
    saving.pl_load = pl_load
    return True


def trainer_of(module: Any) -> Any:
    """The Trainer a LightningModule is attached to, or None (``module.trainer`` raises when there is none).

    Relies on ``LightningModule._trainer``.
    """
    return getattr(module, "_trainer", None) if module is not None else None


def set_restored_path(trainer: Any, path: str) -> None:
    """Make ``trainer.ckpt_path`` (and Lightning's "Restored all states from ..." line) name ``path``.

    Used when the strategy loaded another checkpoint than the one Lightning asked for (``fallback=True``).
    Relies on ``Trainer._checkpoint_connector._ckpt_path`` (the public setter would also mark the path
    user-managed, which changes how the next ``fit`` picks its checkpoint).
    """
    connector = getattr(trainer, "_checkpoint_connector", None)
    if connector is not None and hasattr(connector, "_ckpt_path"):
        connector._ckpt_path = path


# ---------------------------------------------------------------------- Fabric
def unwrap_fabric_objects(value: Any) -> Any:
    """The module, optimizer or loader inside Fabric's wrappers (``lightning.fabric.wrappers._unwrap_objects``)."""
    from lightning.fabric.wrappers import _unwrap_objects

    return _unwrap_objects(value)


_CLI_FLAG = "LT_CLI_USED"  # set by ``fabric run`` (lightning.fabric.cli._set_env_variables)


def allow_launch_under_fabric_cli() -> bool:
    """Under ``fabric run``, let the script's own ``fabric.launch()`` through (it would raise otherwise).

    ``fabric run`` starts the processes (through torchrun) and sets ``LT_CLI_USED=1``; ``Fabric.__init__`` then
    sets up the environment itself, and ``Fabric.launch()`` raises "This script was launched through the CLI ...
    Calling .launch() again is not allowed". Scripts written for plain ``python`` (Fabric's own launcher) or
    ``torchrun`` call ``launch()``. Called from the strategy's ``setup_environment`` (by ``Fabric.__init__``,
    after Fabric has read the variable), this clears it in this process, so ``launch()`` sees processes that
    already exist (torchrun's environment) and only finishes the setup, as under ``torchrun``. Returns whether
    the CLI was in use.
    """
    if os.environ.get(_CLI_FLAG, "0") not in ("", "0"):
        os.environ[_CLI_FLAG] = "0"
        return True
    return False


# ---------------------------------------------------------------------- Trainer internals used by preemption.py
def route_signals(trainer: Any, on_sigterm: Callable[..., None], on_requeue: Callable[..., None]) -> None:
    """Make the Trainer's signal connector build its SIGTERM / SLURM-requeue handlers from these functions.

    Relies on ``Trainer._signal_connector`` and its ``_sigterm_notifier_fn`` / ``_slurm_sigusr_handler_fn``, which
    Lightning composes into the handlers it registers when a stage starts.
    """
    connector = trainer._signal_connector
    connector._sigterm_notifier_fn = on_sigterm
    connector._slurm_sigusr_handler_fn = on_requeue


def lightning_sigterm_handler(trainer: Any, signum: int, frame: Any) -> None:
    """Lightning's own SIGTERM handling (``_SignalConnector._sigterm_notifier_fn``)."""
    from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

    _SignalConnector._sigterm_notifier_fn(trainer._signal_connector, signum, frame)


def set_received_sigterm(trainer: Any, value: bool) -> None:
    """Lightning's loops raise ``SIGTERMException`` while ``Trainer._signal_connector.received_sigterm`` is set."""
    trainer._signal_connector.received_sigterm = value


def should_accumulate(epoch_loop: Any) -> bool:
    """Whether the current batch only accumulates gradients (``_TrainingEpochLoop._should_accumulate``)."""
    return bool(epoch_loop._should_accumulate())


def ready_batches_reached(epoch_loop: Any) -> bool:
    """Whether the current batch is the epoch's last (``_TrainingEpochLoop._num_ready_batches_reached``)."""
    return bool(epoch_loop._num_ready_batches_reached())


def validates_after_this_step(trainer: Any) -> bool:
    """Whether validation runs at the end of the current step (``_should_check_val_fx`` with the data fetcher)."""
    fit_loop = trainer.fit_loop
    return bool(fit_loop.epoch_loop._should_check_val_fx(fit_loop._data_fetcher))


def cluster_environment(trainer: Any) -> Any:
    """The Trainer's cluster environment (``Trainer._accelerator_connector.cluster_environment``)."""
    return trainer._accelerator_connector.cluster_environment


def monitor_candidates(callback: Any, trainer: Any) -> dict[str, Any]:
    """The values a ModelCheckpoint formats its file names with (``ModelCheckpoint._monitor_candidates``)."""
    return callback._monitor_candidates(trainer)  # type: ignore[no-any-return]
