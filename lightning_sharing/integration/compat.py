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
An object-store URL is ours when it is a prefix holding objects (``s3://bucket/run/last.ckpt/...``), not a plain
object (a ``torch.save`` file) and not nothing; ``claims`` decides.

``fit(ckpt_path="last")`` with checkpoints on an object store: Lightning resolves ``"last"`` in
``_CheckpointConnector._parse_ckpt_path`` from ``ModelCheckpoint._find_last_checkpoints`` and ``fs.modified``
of each candidate. On ``s3://`` the listed names lose their protocol (the candidates become local paths that do
not exist: "no last checkpoint available", and training silently starts over), and ``modified`` of a prefix is
no answer anyway. ``hook_last_checkpoint`` wraps that method (on the class, once) so that ``"last"`` is first
offered to the strategy's ``resolve_last_checkpoint(trainer)``, which returns a path, None (nothing to resume
from) or ``NotImplemented`` (let Lightning decide, as for local directories, where its logic works).

``ModelCheckpoint`` takes no storage options: it opens its directory with ``get_filesystem(dirpath)`` (the name
imported into ``lightning.pytorch.callbacks.model_checkpoint``) and lists it, checks names and warns about a
non-empty directory through that filesystem. With credentials or an endpoint given only as ``storage_options``
it would reach the wrong store (or none: ``NoCredentialsError`` in its ``setup``). ``hook_checkpoint_filesystem``
replaces that one name with a function that adds the options ``use_storage_options`` made current (the running
strategy's) to a URL that comes without any; everything else is passed through unchanged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import PurePath
from typing import Any

from lightning_sharing.storage import library_options

__all__ = [
    "allow_launch_under_fabric_cli",
    "checkpoint_dir",
    "cluster_environment",
    "dump_checkpoint",
    "given_checkpoint_io",
    "hook_checkpoint_filesystem",
    "hook_ignored_checkpoint_io",
    "hook_last_checkpoint",
    "hook_load_from_checkpoint",
    "hook_training_sampler",
    "lightning_sigterm_handler",
    "monitor_candidates",
    "ready_batches_reached",
    "route_signals",
    "set_received_sigterm",
    "set_restored_path",
    "should_accumulate",
    "trainer_of",
    "unwrap_fabric_objects",
    "use_storage_options",
    "validates_after_this_step",
]

log = logging.getLogger(__name__)

_HOOK_FLAG = "__lightning_sharing_hook__"


def _wrap_once(owner: Any, name: str, make_wrapper: Callable[[Callable[..., Any]], Callable[..., Any]],
               missing: str | None = None) -> bool:
    """Replace ``owner.<name>`` by ``make_wrapper(original)``, once: a wrapper is marked and never wrapped again.

    Returns False, logging ``missing`` (when given), if ``owner`` has no such callable.
    """
    original = getattr(owner, name, None)
    if not callable(original):
        if missing is not None:
            log.warning(missing)
        return False
    if getattr(original, _HOOK_FLAG, False):
        return True
    wrapper = make_wrapper(original)
    setattr(wrapper, _HOOK_FLAG, True)
    wrapper.__wrapped__ = original  # type: ignore[attr-defined]
    wrapper.__doc__ = original.__doc__
    setattr(owner, name, wrapper)
    return True


def hook_load_from_checkpoint(read_directory: Callable[[str | os.PathLike[str], Any], dict[str, Any]],
                              claims: Callable[[str], bool] | None = None) -> bool:
    """Make ``load_from_checkpoint`` read checkpoint directories through ``read_directory(path, map_location)``.

    A local directory is always read that way; a URL when ``claims(url)`` says it is ours (default: never).
    Idempotent (the first hook's functions stay). Returns False (and logs a warning once) if this Lightning has
    no ``saving.pl_load`` to hook.
    """
    from lightning.pytorch.core import saving

    def ours(path_or_url: Any) -> bool:
        if not isinstance(path_or_url, (str, os.PathLike)):
            return False  # a file object: Lightning's
        text = os.fspath(path_or_url)
        if "://" not in text:
            return os.path.isdir(text)
        return claims is not None and claims(text)

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def pl_load(path_or_url: Any, map_location: Any = None, weights_only: bool | None = None) -> Any:
            if ours(path_or_url):
                # A directory checkpoint never unpickles anything: weights_only does not apply to it.
                return read_directory(path_or_url, map_location)
            return original(path_or_url, map_location=map_location, weights_only=weights_only)

        return pl_load

    return _wrap_once(saving, "pl_load", wrap, "this Lightning version has no lightning.pytorch.core.saving.pl_load: "
                      "LightningModule.load_from_checkpoint cannot read lightning_sharing directories; use "
                      "SharingCheckpointIO().load_for_module(path) instead")


#: Lightning strategies whose ``save_checkpoint`` never calls the CheckpointIO plugin (they write DCP themselves).
IGNORING_STRATEGIES = (("lightning.pytorch.strategies", "ModelParallelStrategy"),
                       ("lightning.pytorch.strategies", "FSDPStrategy"))


def hook_ignored_checkpoint_io(check: Callable[[Any], None]) -> None:
    """Run ``check(strategy)`` first in ``setup_environment`` of each of ``IGNORING_STRATEGIES`` (and subclasses).

    ``ModelParallelStrategy``/``FSDPStrategy.save_checkpoint`` write checkpoints without their CheckpointIO, so a
    ``SharingCheckpointIO`` given to them is silently ignored; ``check`` refuses that when the Trainer sets the
    strategy up (``Trainer._run`` calls ``strategy.setup_environment()`` first). Relies on ``setup_environment``
    being the first strategy hook of a stage and on the plugin being in ``strategy._checkpoint_io`` (reading the
    public ``checkpoint_io`` property would create a default one). Idempotent.
    """
    import importlib

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def setup_environment(self: Any, *args: Any, **kwargs: Any) -> Any:
            check(self)
            return original(self, *args, **kwargs)

        return setup_environment

    for module_name, name in IGNORING_STRATEGIES:
        cls = getattr(importlib.import_module(module_name), name, None)
        if cls is not None:
            _wrap_once(cls, "setup_environment", wrap)


def given_checkpoint_io(strategy: Any) -> Any:
    """The CheckpointIO a strategy was given, or None (``Strategy._checkpoint_io``, without creating a default)."""
    return getattr(strategy, "_checkpoint_io", None)


def hook_training_sampler() -> bool:
    """Offer the sampler Lightning inserts for training to ``trainer.strategy.training_sampler(sampler)``.

    Relies on ``_DataConnector._resolve_sampler(dataloader, shuffle, mode)`` and its ``trainer``; a sampler the user
    set (a ``DistributedSampler`` of their own, say) never passes there. Idempotent; returns False (logged) when this
    Lightning has no such method (then the training sampler stays Lightning's: no elastic resume).
    """
    from lightning.pytorch.trainer.connectors.data_connector import _DataConnector
    from lightning.pytorch.trainer.states import RunningStage

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def _resolve_sampler(self: Any, dataloader: Any, shuffle: bool, mode: Any = None) -> Any:
            sampler = original(self, dataloader, shuffle, mode)
            convert = getattr(getattr(self.trainer, "strategy", None), "training_sampler", None)
            return convert(sampler) if mode == RunningStage.TRAINING and callable(convert) else sampler

        return _resolve_sampler

    return _wrap_once(_DataConnector, "_resolve_sampler", wrap,
                      "this Lightning version has no _DataConnector._resolve_sampler: the training sampler stays "
                      "Lightning's DistributedSampler, which resumes only at the world size it was saved at")


def hook_last_checkpoint() -> bool:
    """Offer ``ckpt_path="last"`` to ``trainer.strategy.resolve_last_checkpoint(trainer)`` before Lightning.

    Relies on ``_CheckpointConnector._parse_ckpt_path(state_fn, ckpt_path, model_provided, model_connected)`` and
    its ``trainer``. A strategy without that method, or one returning ``NotImplemented``, gets Lightning's own
    resolution. Idempotent; returns False (logged) when this Lightning has no such method.
    """
    from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def _parse_ckpt_path(self: Any, state_fn: Any, ckpt_path: Any, model_provided: bool,
                             model_connected: bool) -> Any:
            if ckpt_path == "last":
                resolve = getattr(getattr(self.trainer, "strategy", None), "resolve_last_checkpoint", None)
                if callable(resolve):
                    resolved = resolve(self.trainer)
                    if resolved is not NotImplemented:
                        return resolved
            return original(self, state_fn, ckpt_path, model_provided=model_provided, model_connected=model_connected)

        return _parse_ckpt_path

    return _wrap_once(_CheckpointConnector, "_parse_ckpt_path", wrap,
                      "this Lightning version has no _CheckpointConnector._parse_ckpt_path: fit(ckpt_path='last') is "
                      "resolved by Lightning alone, which cannot find checkpoints on object stores; pass the URL "
                      "(lightning_sharing.find_latest_checkpoint(dirpath)) instead")


def checkpoint_dir(callback: Any, trainer: Any) -> str | None:
    """The directory a ``ModelCheckpoint`` saves into (``dirpath``, else the one it derives from the Trainer).

    Relies on the name-mangled ``ModelCheckpoint.__resolve_ckpt_dir`` for a callback whose ``dirpath`` is not set
    yet (before its ``setup``); None when that cannot be found (a callback with no directory of its own yet, or a
    stand-in such as a test's mock that has no real path).
    """
    dirpath = getattr(callback, "dirpath", None)
    if isinstance(dirpath, (str, PurePath)) and os.fspath(dirpath):
        return os.fspath(dirpath)
    resolve = getattr(callback, "_ModelCheckpoint__resolve_ckpt_dir", None)
    if not callable(resolve):
        return None
    try:
        resolved = resolve(trainer)
    except Exception as exc:  # a logger without a save_dir, ...: Lightning reports it in setup
        log.debug("could not derive the checkpoint directory of %r: %s", callback, exc)
        return None
    return os.fspath(resolved) if isinstance(resolved, (str, PurePath)) else None


_current_storage_options: dict[str, Any] | None = None


def use_storage_options(storage_options: dict[str, Any] | None) -> None:
    """The storage options ``ModelCheckpoint`` gets for URLs from now on (None: fsspec's defaults).

    Our own keys (the object client, the retry policy: ``storage.OWN_OPTIONS``) are not fsspec's and stay out.
    """
    global _current_storage_options
    _current_storage_options = library_options(dict(storage_options)) if storage_options else None


def hook_checkpoint_filesystem() -> bool:
    """Make ``ModelCheckpoint`` open URLs with the options of ``use_storage_options`` (see the module docstring).

    Relies on the module global ``get_filesystem`` of ``lightning.pytorch.callbacks.model_checkpoint``.
    Idempotent; returns False (logged) when there is no such name.
    """
    from lightning.pytorch.callbacks import model_checkpoint

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def get_filesystem(path: Any, **kwargs: Any) -> Any:
            options = _current_storage_options
            text = str(path)
            if options and not kwargs and "://" in text and not text.startswith("file://"):
                kwargs = options
            return original(path, **kwargs)

        return get_filesystem

    return _wrap_once(model_checkpoint, "get_filesystem", wrap,
                      "this Lightning version has no lightning.pytorch.callbacks.model_checkpoint.get_filesystem: "
                      "ModelCheckpoint opens URLs without the strategy's storage_options")


def dump_checkpoint(trainer: Any) -> dict[str, Any]:
    """Lightning's full checkpoint dict of ``trainer`` now, as ``ModelCheckpoint`` saves it (the local tier's saves).

    Relies on ``Trainer._checkpoint_connector.dump_checkpoint(weights_only=False)``.
    """
    return trainer._checkpoint_connector.dump_checkpoint(weights_only=False)


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


def restore_from(trainer: Any, path: str) -> None:
    """Make the Trainer's coming restore load ``path`` on this rank, where its ``ckpt_path`` resolved to nothing.

    Relies on ``Trainer._checkpoint_connector.resume_start(checkpoint_path, ...)``, which ``Trainer._run`` calls
    after the strategy's ``setup_environment``: wrapped once, on this instance, to read ``path`` for a missing one.
    """
    connector = trainer._checkpoint_connector

    def resume_start(checkpoint_path: Any = None, *args: Any, **kwargs: Any) -> Any:
        del connector.resume_start  # once: the class's method again
        return connector.resume_start(checkpoint_path or path, *args, **kwargs)

    connector.resume_start = resume_start


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
