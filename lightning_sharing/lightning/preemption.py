"""Preemption: SIGTERM (and SLURM's requeue signal) end in a checkpoint that every rank agrees on.

Lightning 2.6 reacts to signals from inside the signal handler, at whatever point each rank happens to be:

- SIGTERM: ``_SignalConnector._sigterm_notifier_fn`` runs ``dist.broadcast`` *in the handler*, and the
  loops raise ``SIGTERMException`` from rank-local checks of the flag. A SIGTERM that reaches only some
  ranks, or reaches them at different moments, pairs that broadcast with an unrelated collective of
  another rank: the job hangs (reproduced: SIGTERM to rank 1 only, plain Lightning, gloo).
- SIGUSR1 under ``SLURMEnvironment(auto_requeue=True)``: ``_slurm_sigusr_handler_fn`` calls
  ``trainer.save_checkpoint`` in the handler. With ``SharingStrategy`` that save is collective, so ranks
  interrupted at different points (mid-backward, a step apart) pair its collectives with DDP's: it hangs
  or mixes state from different steps (reproduced: the signal reaching the two ranks 0.13 s apart hangs).

``SharingStrategy`` therefore takes both signals over while it fits. The handlers only set a flag.
After every optimizer step (``on_train_batch_end`` of the last micro-batch), all ranks all-reduce the
flags (one tiny collective), so every rank acts at the same step:

- requeue signal: every rank saves Lightning's ``hpc_ckpt_{n}.ckpt`` (the name a requeued job resumes
  from with ``ckpt_path=None`` or ``"hpc"``) after the step, or after its validation when one follows;
  rank 0 runs ``scontrol requeue``; training goes on. Once per ``fit``: the copies of the signal that
  reach other ranks later are not a second request.
- SIGTERM: every rank sets Lightning's ``received_sigterm`` at that step; Lightning finishes the step
  (validation included) and raises ``SIGTERMException`` on every rank at the same place, where
  ``SharingStrategy.on_exception`` writes the final checkpoint. ``SIGTERMException`` is a ``SystemExit``
  without a code: every process exits with status 0. Any other exception never triggers a save. At the
  last step of an epoch the stop moves to the first step of the next one: Lightning raises there only
  after counting the epoch as completed, a state from which it resumes by skipping the next epoch. A
  SIGTERM during the very last step of training lets training finish normally.

Where the final checkpoint goes (``SharingStrategy(preemption_checkpoint=...)``):

- ``True`` (default): under ``SLURMEnvironment(auto_requeue=True)`` Lightning's next ``hpc_ckpt_{n}.ckpt``
  in ``default_root_dir``. Otherwise beside the ``ModelCheckpoint``'s checkpoints: with
  ``save_last=True`` it replaces ``last.ckpt``; with ``save_last="link"`` it is ``preempted-step={N}.ckpt``
  and ``last.ckpt`` links to it (so ``fit(ckpt_path="last")`` resumes from it in both cases); without
  ``save_last`` it is ``preempted-step={N}.ckpt``. Without a ``ModelCheckpoint``:
  ``{default_root_dir}/checkpoints/preempted-step={N}.ckpt``. ``find_latest_checkpoint`` of that
  directory finds it in every case.
- a path ending in ``.ckpt`` (``{step}`` and ``{epoch}`` are filled in), or a directory (the file is
  ``preempted-step={N}.ckpt`` in it);
- ``False``: no final checkpoint; the ranks still stop together, cleanly.

Example:
    >>> import lightning.pytorch as pl
    >>> from lightning_sharing import SharingStrategy
    >>> strategy = SharingStrategy(preemption_checkpoint="checkpoints/preempted-{step}.ckpt")
    >>> trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=2)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_sharing.distributed.collectives import agreement, any_rank, broadcast_object, on_rank_zero
from lightning_sharing.integration.compat import (
    cluster_environment,
    lightning_sigterm_handler,
    monitor_candidates,
    ready_batches_reached,
    route_signals,
    set_received_sigterm,
    should_accumulate,
    validates_after_this_step,
)
from lightning_sharing.lightning.slurm import hpc_checkpoint_path, requeue_slurm_job
from lightning_sharing.storage import remove_checkpoint

__all__ = ["PREEMPTED_NAME", "PreemptionHandler", "hpc_checkpoint_path", "requeue_slurm_job"]

log = logging.getLogger(__name__)

PREEMPTED_NAME = "preempted-step={step}.ckpt"


class PreemptionHandler:
    """Turns SIGTERM and SLURM's requeue signal into actions all ranks take at the same step.

    ``SharingStrategy`` owns one (``preemption_checkpoint`` is its constructor keyword) and wires it
    into the Trainer in ``setup_environment``; see the module docstring for the behaviour.

    Args:
        checkpoint: ``True`` (the default location), ``False``/``None`` (no final checkpoint), a
            ``.ckpt`` path (``{step}`` and ``{epoch}`` are filled in) or a directory (local or a URL).
        options_for: the storage options for a URL (the strategy's), to list an object-store ``default_root_dir``.

    Example:
        >>> handler = PreemptionHandler("runs/ckpts/preempted-{step}.ckpt")
        >>> handler.enabled
        True
    """

    def __init__(self, checkpoint: bool | str | os.PathLike[str] | None = True,
                 options_for: Callable[[Any], dict[str, Any] | None] | None = None) -> None:
        if checkpoint is None:
            checkpoint = False
        if not isinstance(checkpoint, (bool, str, os.PathLike)):
            raise TypeError(f"preemption_checkpoint must be True, False, or a path, not {type(checkpoint).__name__} "
                            f"({checkpoint!r})")
        if not isinstance(checkpoint, bool):
            text = os.fspath(checkpoint)
            if not text:
                raise ValueError("preemption_checkpoint='' is not a path; pass False to write no final checkpoint")
            try:
                text.format(step=0, epoch=0)
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"preemption_checkpoint={text!r} may only use the fields {{step}} and {{epoch}} "
                                 f"(double other braces): {exc!r}") from None
        self.checkpoint: bool | str | os.PathLike[str] = checkpoint
        self._options_for = options_for or (lambda path: None)
        self._trainer: Any = None
        self.reset()

    @property
    def enabled(self) -> bool:
        """Whether a final checkpoint is written when the ranks stop on SIGTERM."""
        return self.checkpoint is not False

    def reset(self) -> None:
        """Forget received signals (at the start of each ``fit``/``validate``/...)."""
        self.sigterm_received = False
        self.requeue_received = False
        self.requeued = False
        self.requeue_after_validation = False
        self.stop_next = False
        self.stopping = False
        self.saved_path: str | None = None

    # ------------------------------------------------------------------ wiring
    def attach(self, trainer: Any) -> None:
        """Route the Trainer's SIGTERM / requeue handling through this handler (before Lightning registers it).

        Lightning builds its handlers from the connector's ``_sigterm_notifier_fn`` and
        ``_slurm_sigusr_handler_fn`` when a stage starts, composing them with the SLURM bypass and any
        handler the user installed before; replacing those two keeps the rest of the composition.
        """
        self._trainer = trainer
        self.reset()
        route_signals(trainer, self._on_sigterm, self._on_requeue_signal)
        if not any(isinstance(cb, _PreemptionCallback) and cb.handler is self for cb in trainer.callbacks):
            trainer.callbacks.append(_PreemptionCallback(self))

    def _fitting(self) -> bool:
        trainer = self._trainer
        return trainer is not None and trainer.state.fn == TrainerFn.FITTING

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        """Signal handler: only note the signal (no collectives, no I/O beyond a log line)."""
        if not self._fitting():  # validate/test/predict: Lightning's own handling
            lightning_sigterm_handler(self._trainer, signum, frame)
            return
        if not self.sigterm_received:
            log.info("[rank: %d] received signal %d: all ranks stop after the next optimizer step they agree on",
                     self._trainer.global_rank, signum)
        self.sigterm_received = True

    def _on_requeue_signal(self, signum: int, frame: FrameType | None) -> None:
        """Signal handler for SLURM's requeue signal: only note it while fitting."""
        trainer = self._trainer
        if not self._fitting():  # nothing to resume outside of training: requeue only, save nothing
            if trainer is not None and trainer.is_global_zero:
                requeue_slurm_job()
            return
        if not self.requeue_received:
            log.info("[rank: %d] received requeue signal %d: saving an HPC checkpoint after the next optimizer step",
                     trainer.global_rank, signum)
        self.requeue_received = True

    # ------------------------------------------------------------------ the agreed step
    def on_step_end(self, trainer: Any) -> None:
        """After each optimizer step, on every rank: agree on the flags and act on them together."""
        epoch_loop = trainer.fit_loop.epoch_loop
        if self.stopping or should_accumulate(epoch_loop):
            return
        if self.requeue_after_validation:  # the validation expected after the last step did not come
            self.requeue_after_validation = False
            self._requeue(trainer, save=True)
        if self.stop_next:  # agreed one step ago, at the end of an epoch
            sigterm, requeue = True, False
        else:
            sigterm, requeue = _agree_flags(self.sigterm_received,
                                            self.requeue_received and not self.requeued)
        if requeue:
            # Once per fit: the signal reaches the ranks at different moments, and a rank that notes it only
            # after this step must not cause a second save and a second requeue of the same job.
            self.requeued = True
            if sigterm:  # the final checkpoint follows at the end of this step (or the next)
                self._requeue(trainer)
            elif _validates_after_this_step(trainer):
                self.requeue_after_validation = True  # save once this step is complete
            else:
                self._requeue(trainer, save=True)
        if sigterm and ready_batches_reached(epoch_loop) and not self.stop_next:
            # Lightning raises at the end of an epoch only after counting the epoch as completed, a state
            # it resumes from by skipping the next epoch's batches; stop one step into the next epoch instead.
            self.stop_next = True
            return
        if sigterm:
            self.stopping = True
            # From here Lightning's own checks see the flag, on every rank at once: it ends this step
            # (validation included) and raises SIGTERMException on every rank at the same place.
            set_received_sigterm(trainer, True)
            if trainer.is_global_zero:
                log.warning("SIGTERM: every rank stops after step %d%s", trainer.global_step,
                            "; writing the final checkpoint" if self.enabled else " (preemption_checkpoint=False)")

    def _requeue(self, trainer: Any, save: bool = False) -> None:
        if save:
            root = trainer.default_root_dir
            path = on_rank_zero("choosing the HPC checkpoint's path",
                                lambda: hpc_checkpoint_path(root, self._options_for(root)))
            self.save(trainer, path, "requeue")
        for logger in trainer.loggers:
            logger.save()
        if trainer.is_global_zero:
            requeue_slurm_job()

    def on_validation_start(self, trainer: Any) -> None:
        # Lightning's evaluation loop raises SIGTERMException after any but the last validation batch;
        # let the step's validation finish instead, so the checkpoint is taken at the step's end.
        if self.stopping:
            set_received_sigterm(trainer, False)

    def on_validation_end(self, trainer: Any) -> None:
        if self.stopping:
            set_received_sigterm(trainer, True)
        if self.requeue_after_validation:
            # Saved after the step's validation, like ModelCheckpoint(monitor="val_..."): a resumed run skips
            # that validation, so a checkpoint taken before it would miss what it changed (the RNG draws of
            # the validation data iterator).
            self.requeue_after_validation = False
            self._requeue(trainer, save=True)

    def on_exception(self, exception: BaseException) -> None:
        """``Strategy.on_exception``: the final checkpoint, for an agreed SIGTERM only."""
        trainer = self._trainer
        if trainer is None or not self.stopping or not isinstance(exception, SIGTERMException):
            return  # a crash (or anything else) never overwrites good checkpoints with bad state
        if not self.enabled:
            return
        try:
            path, last, link = self.final_path(trainer)
            callback = trainer.checkpoint_callback
            if last is not None and isinstance(callback, ModelCheckpoint):
                # Recorded in the checkpoint: the resumed ModelCheckpoint keeps using (not versioning) this file.
                callback.last_model_path = last
            self.save(trainer, path, "SIGTERM", link=last if link else None)
        except BaseException:
            log.error("[rank: %d] the final checkpoint after SIGTERM could not be written; earlier checkpoints "
                      "are intact", trainer.global_rank)
            raise

    # ------------------------------------------------------------------ where and how
    def final_path(self, trainer: Any) -> tuple[str, str | None, bool]:
        """Where the SIGTERM checkpoint goes (decided on rank 0, the same on every rank).

        Returns ``(path, last, link)``: ``last`` is the ModelCheckpoint's ``last`` checkpoint when the
        final checkpoint takes its role (``path`` itself, or a symlink to ``path`` when ``link``).
        """
        path, last, link = on_rank_zero("choosing the preemption checkpoint's path", lambda: self._final_path(trainer))
        return path, last, link

    def _final_path(self, trainer: Any) -> tuple[str, str | None, bool]:
        step, epoch = trainer.global_step, trainer.current_epoch
        if not isinstance(self.checkpoint, bool):
            text = os.fspath(self.checkpoint)
            if text.endswith(".ckpt"):
                return text.format(step=step, epoch=epoch), None, False
            return os.path.join(text, PREEMPTED_NAME.format(step=step)), None, False
        env = cluster_environment(trainer)
        if isinstance(env, SLURMEnvironment) and env.auto_requeue:
            root = trainer.default_root_dir
            return hpc_checkpoint_path(root, self._options_for(root)), None, False
        callback = trainer.checkpoint_callback
        if not isinstance(callback, ModelCheckpoint) or not callback.dirpath:
            return os.path.join(trainer.default_root_dir, "checkpoints", PREEMPTED_NAME.format(step=step)), None, False
        preempted = os.path.join(callback.dirpath, PREEMPTED_NAME.format(step=step))
        if not callback.save_last:
            return preempted, None, False
        last = _last_path(callback, trainer)
        # "link" is local only (Lightning refuses it for URLs); a URL's last.ckpt is replaced like any checkpoint.
        if callback.save_last == "link" and os.path.abspath(last) != os.path.abspath(preempted):
            return preempted, last, True
        return last, last, False

    def save(self, trainer: Any, path: str, reason: str, link: str | None = None) -> None:
        """Collective: save a full training checkpoint at ``path``, then point the symlink ``link`` at it.

        ``path`` and ``link`` are taken from rank 0, so that every rank writes the same checkpoint.
        """
        path, link = broadcast_object((path, link) if trainer.is_global_zero else None)
        trainer.save_checkpoint(path, weights_only=False)
        wait = getattr(getattr(trainer.strategy, "checkpoint_io", None), "wait", None)
        if callable(wait):  # with async_save: committed before anything links to it, or the process exits
            wait()
        if link is not None:
            with agreement(f"pointing {link} at {path}"):
                if trainer.is_global_zero:
                    _point_link(Path(link), Path(path))
        self.saved_path = path
        if trainer.is_global_zero:
            log.warning("%s: saved checkpoint %s at step %d%s", reason, path, trainer.global_step,
                        f" ({link} links to it)" if link else "")


class _PreemptionCallback(Callback):
    """The per-step agreement, hooked after every other callback's ``on_train_batch_end``."""

    def __init__(self, handler: PreemptionHandler) -> None:
        self.handler = handler

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.handler.on_step_end(trainer)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self.handler.on_validation_start(trainer)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self.handler.on_validation_end(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        handler = self.handler
        if (handler.stop_next or handler.sigterm_received) and not handler.stopping and trainer.is_global_zero:
            log.warning("SIGTERM arrived during the last step: training finished normally (no preemption checkpoint)")


def _agree_flags(sigterm: bool, requeue: bool) -> tuple[bool, bool]:
    """Collective: whether any rank received each signal (one all-reduce of two integers)."""
    agreed_sigterm, agreed_requeue = any_rank(sigterm, requeue, phase="agreeing on preemption signals")
    return agreed_sigterm, agreed_requeue


def _validates_after_this_step(trainer: Any) -> bool:
    """Whether Lightning runs validation at the end of the current training step (asked in on_train_batch_end)."""
    try:
        return validates_after_this_step(trainer)
    except Exception:  # a Lightning without these internals: save right away
        return False


def _last_path(callback: ModelCheckpoint, trainer: Any) -> str:
    """The ``last`` checkpoint path of a ModelCheckpoint (the one it uses, or would use, for ``save_last``)."""
    if callback.last_model_path:
        return callback.last_model_path
    try:
        return callback.format_checkpoint_name(monitor_candidates(callback, trainer), callback.CHECKPOINT_NAME_LAST)
    except Exception:  # a last-name template with a metric that does not exist yet
        return os.path.join(callback.dirpath or "", callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION)


def _point_link(link: Path, target: Path) -> None:
    """Make ``link`` a symlink to ``target``, replacing what was there in one rename."""
    temp = link.parent / f".{link.name}.link-{uuid.uuid4().hex}"
    os.symlink(os.path.relpath(target, link.parent), temp)
    if link.is_dir() and not link.is_symlink():  # a copied last.ckpt: remove it as a checkpoint first
        remove_checkpoint(link)
    os.replace(temp, link)
