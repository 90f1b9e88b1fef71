"""Asynchronous saves: training resumes once the state is copied; writing and committing run behind it.

A ``BackgroundSaver`` owns one worker thread per process and a process group of its own (gloo),
so the collectives of a save in the background never interleave with training's collectives.
Saves run one after another in the order they were started, identically on every rank; each ends
in an agreement step on the saver's group, so every rank's save succeeds or fails together.

Memory: each pending save holds one staged copy of the tensors this rank writes. At most
``max_pending`` saves are pending (default 1: at most one copy of the state); starting another
first waits for the oldest. Staging buffers are reused from save to save, so steady-state saves
allocate nothing.

Background staging (``background_staging=True``, off by default): the tensors that only an optimizer
step changes (the parameters of the saved modules and the optimizers' state) are copied by the
background thread too, so ``save_checkpoint`` returns before they are copied; every other tensor is
copied before it returns, as without it. Every ``optimizer.step()`` in the process first waits until the
copies are done (a global optimizer step pre-hook), so the next step cannot change a tensor before it is
copied, while the forward and backward passes run beside the copy. A tensor changed in place in any
other way before it is copied (its version counter moved) fails that save, on every rank, instead of
writing a checkpoint that mixes two steps; a change through ``tensor.data`` cannot be seen, so code that
writes parameters that way between a save and the next optimizer step must call ``wait_staged()`` first.
This is DCP's ``StagingOptions(use_async_staging=True)``, with the wait built in.

Errors: a failed background save is never lost. It is raised, on every rank, by the next call that
waits: the next save, a load, ``wait()``, or ``poll()`` (which Lightning's strategy calls at each
step boundary).

Example:
    >>> saver = BackgroundSaver(background_staging=True)
    >>> coordinator = CheckpointCoordinator(components, async_save=saver)   # doctest: +SKIP
    >>> coordinator.save_checkpoint("ckpt/step=100.ckpt", step=100)         # returns once staged
    >>> saver.wait()                                                         # committed (or raises)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from lightning_sharing.core.options import CheckpointOptions
from lightning_sharing.distributed.collectives import agreement, all_ranks, new_gloo_group
from lightning_sharing.errors import CheckpointError, ComponentDeclarationError

__all__ = ["BackgroundSaver"]

log = logging.getLogger(__name__)

_PoolKey = tuple[tuple[int, ...], torch.dtype, bool]
_Copy = tuple[str, torch.Tensor, torch.Tensor, int]  # name, staging buffer, source, source version when staged


class BackgroundSaver:
    """Runs the write-and-commit half of checkpoint saves on a background thread.

    Args:
        max_pending: how many saves may be in flight at once; each holds one staged copy of the
            tensors this rank writes. The default, 1, bounds staging memory to one copy of the state.
        background_staging: copy the tensors only an optimizer step changes on the background thread
            too (see the module's documentation); the next ``optimizer.step()`` waits for the copy.

    ``poll()`` and the first ``submit()`` are collective; ``wait()`` is per rank but every rank gets
    the same outcome.
    """

    def __init__(self, max_pending: int = 1, *, background_staging: bool = False) -> None:
        if not isinstance(max_pending, int) or isinstance(max_pending, bool) or max_pending < 1:
            raise ComponentDeclarationError(f"max_pending must be a positive integer, got {max_pending!r}")
        if not isinstance(background_staging, bool):
            raise ComponentDeclarationError(f"background_staging must be True or False, got {background_staging!r}")
        self.max_pending = max_pending
        self.background_staging = background_staging
        self._deferred: list[_Copy] = []  # copies staged by stage() for the next submit()
        self._staged = threading.Event()  # set while no submitted save has copies left to make
        self._staged.set()
        self._unstaged_saves = 0
        self._step_hook: Any = None
        self._executor: ThreadPoolExecutor | None = None
        self._group: Any = None
        self._group_ready = False
        self._pending: list[tuple[Path, Future[None]]] = []
        self._pool: dict[_PoolKey, list[torch.Tensor]] = {}
        self._lock = threading.Lock()
        self._last_failed = False
        self._cleanups: list[Future[None]] = []  # retention deletions queued behind saves (failures are logged)

    @classmethod
    def for_options(cls, options: CheckpointOptions) -> BackgroundSaver:
        """The saver ``options`` ask for (``max_pending_saves``, ``background_staging``).

        Example:
            >>> BackgroundSaver.for_options(CheckpointOptions(async_save=True, max_pending_saves=2)).max_pending
            2
        """
        return cls(options.max_pending_saves, background_staging=options.background_staging)

    # ------------------------------------------------------------------ state
    @property
    def pending_targets(self) -> list[Path]:
        """Targets of the saves started and not yet waited for, oldest first."""
        return [target for target, _ in self._pending]

    def has_pending(self) -> bool:
        """True while a started save has not been waited for (the same on every rank)."""
        return bool(self._pending)

    def group(self) -> Any:
        """Collective on first use: the saver's own process group over every rank (None if not distributed)."""
        if not self._group_ready:
            # A separate gloo group: the background thread's collectives must not share a
            # communicator with training, and gloo works for CPU objects under any backend.
            self._group = new_gloo_group()
            self._group_ready = True
        return self._group

    # ------------------------------------------------------------------ staging
    def stage(self, tensors: dict[str, torch.Tensor],
              optimizer_owned: Callable[[torch.Tensor], bool] | None = None) -> dict[str, torch.Tensor]:
        """Copies of ``tensors`` on the CPU, in reused buffers, that training cannot change.

        With background staging, the tensors ``optimizer_owned`` accepts (those only an optimizer step
        changes) get their buffer now and are copied by the next ``submit``'s background work.
        """
        defer = optimizer_owned if self.background_staging else None
        staged: dict[str, torch.Tensor] = {}
        now: list[tuple[torch.Tensor, torch.Tensor]] = []
        with self._lock:
            for name, tensor in tensors.items():
                tensor = tensor.detach()
                on_gpu = tensor.device.type == "cuda"
                key: _PoolKey = (tuple(tensor.shape), tensor.dtype, on_gpu)
                free = self._pool.get(key)
                if free:
                    buffer = free.pop()
                else:
                    buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=on_gpu)
                version = _version(tensor) if defer is not None and defer(tensor) else None
                if version is not None:
                    self._deferred.append((name, buffer, tensor, version))
                else:
                    now.append((buffer, tensor))
                staged[name] = buffer
        _copy_all(now)
        return staged

    def wait_staged(self) -> None:
        """Block until the background copies of every submitted save are made (at once without background staging).

        Per rank, no communication. Every ``optimizer.step()`` calls it first while background staging is
        on; call it before changing a saved parameter or optimizer tensor in any other way. A failed copy
        is not raised here but by the next call that waits for the save (``wait``, ``poll``, a save, a load),
        on every rank.
        """
        self._staged.wait()

    def _copy_deferred(self, copies: list[_Copy]) -> None:
        _copy_all([(buffer, source) for _, buffer, source, _ in copies])
        changed = [name for name, _, source, version in copies if _version(source) != version]
        if changed:
            raise CheckpointError(
                f"{len(changed)} tensor(s) were changed in place after save_checkpoint returned and before the "
                f"background staging copied them (first: {changed[0]!r}); this save is abandoned rather than "
                "written with state from two different steps. Call wait_staged() before changing saved "
                "tensors outside optimizer.step()"
            )

    def _copied_one(self) -> None:
        with self._lock:
            self._unstaged_saves -= 1
            if not self._unstaged_saves:
                self._staged.set()

    def _install_step_hook(self) -> None:
        if self._step_hook is None:
            self._step_hook = register_optimizer_step_pre_hook(
                lambda optimizer, args, kwargs: self.wait_staged())

    def _recycle(self, buffers: list[torch.Tensor]) -> None:
        with self._lock:
            self._pool.clear()  # buffers of earlier shapes are dropped: at most one save's worth is kept
            for buffer in buffers:
                key = (tuple(buffer.shape), buffer.dtype, buffer.is_pinned())
                self._pool.setdefault(key, []).append(buffer)

    # ------------------------------------------------------------------ running saves
    def make_room(self) -> None:
        """Before staging a new save: wait until fewer than ``max_pending`` saves are pending.

        Copies staged for a save that failed before it was submitted are forgotten.
        """
        self._deferred.clear()
        while len(self._pending) >= self.max_pending:
            self._wait_oldest()

    def submit(self, target: Path, work: Callable[[], None], staged: list[torch.Tensor],
               tolerated: Callable[[CheckpointError], None] | None = None) -> None:
        """Run ``work`` (which writes and commits ``target``) in the background, after earlier saves.

        ``staged`` are the staging buffers the save holds; they are reused once it has committed. With
        ``tolerated``, a ``CheckpointError`` of this save (which ``work``'s agreement steps raise alike on every
        rank) is handed to it instead of failing the saver: later calls do not raise it (a local tier save whose
        failure must not stop training or the persistent saves).
        """
        copies, self._deferred = self._deferred, []  # before make_room(), which forgets them
        self.make_room()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightning_sharing-save")
        if self.background_staging:
            self._install_step_hook()
            with self._lock:
                self._unstaged_saves += 1
                self._staged.clear()
        group = self.group() if self.background_staging else None

        def run() -> None:
            try:
                if self.background_staging:
                    with agreement("staging the state in the background", group):
                        try:
                            self._copy_deferred(copies)
                        finally:  # training may go on as soon as this rank's copies are made, before the agreement
                            self._copied_one()
                work()
            except CheckpointError as error:
                if tolerated is None:
                    self._last_failed = True
                    raise
                tolerated(error)
            except BaseException:
                self._last_failed = True
                raise
            self._last_failed = False
            self._recycle(staged)

        self._pending.append((target, self._executor.submit(run)))

    def after_pending(self, action: Callable[[], None], what: str) -> None:
        """Run ``action`` once every pending save has committed; skip it if the save before it failed.

        Used for retention: an older checkpoint is deleted only after its successor is complete.
        """
        if not self._pending or self._executor is None:
            action()
            return

        def run_if_saved() -> None:
            if self._last_failed:
                log.warning("not %s: the checkpoint save before it failed", what)
                return
            action()

        future = self._executor.submit(run_if_saved)
        future.add_done_callback(_log_failure(what))
        self._cleanups.append(future)

    def _wait_oldest(self) -> None:
        target, future = self._pending.pop(0)
        error = future.exception()
        if error is not None:
            log.error("the background save of %s failed: %s", target, error)
            self._pending.clear()  # later saves ran after a failure; their outcome is reported by wait()
            raise error

    def wait(self) -> None:
        """Block until every pending save is committed; raise the first failure (on every rank).

        Deletions queued behind the saves (``after_pending``) are finished too; their failures are logged.
        """
        try:
            while self._pending:
                self._wait_oldest()
        finally:
            cleanups, self._cleanups = self._cleanups, []
            for future in cleanups:
                future.exception()  # waits; _log_failure has reported a failure

    def poll(self) -> None:
        """Collective: if every rank's pending saves are done, surface their outcome (raise a failure).

        Cheap while nothing is pending (no communication). The decision is agreed among ranks, so
        every rank raises at the same step boundary.
        """
        if not self._pending:
            return
        done = all_ranks(all(future.done() for _, future in self._pending), phase="polling a background save")
        if done:
            self.wait()

    def close(self) -> None:
        """Wait for pending saves, then stop the worker thread (the saver can be used again after)."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            if self._step_hook is not None:
                self._step_hook.remove()
                self._step_hook = None
            with self._lock:
                self._pool.clear()
                self._deferred.clear()


def _log_failure(what: str) -> Callable[[Future[None]], None]:
    def report(future: Future[None]) -> None:
        error = future.exception()
        if error is not None:
            log.error("%s failed in the background: %s", what, error)

    return report

def _copy_all(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy each source into its staging buffer; GPU copies are asynchronous and waited for, device by device
    (the calling thread's current CUDA device need not be the tensors' one)."""
    devices = set()
    for buffer, source in pairs:
        on_gpu = source.device.type == "cuda"
        buffer.copy_(source, non_blocking=on_gpu)
        if on_gpu:
            devices.add(source.device)
    for device in devices:
        torch.cuda.synchronize(device)


def _version(tensor: torch.Tensor) -> int | None:
    """The tensor's in-place version counter (None for an inference tensor, which has none)."""
    try:
        return tensor._version
    except RuntimeError:
        return None
