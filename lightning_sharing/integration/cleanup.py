"""Clean exits: the default process group a strategy (or Lightning for it) created is destroyed before exit.

torch 2.13's gloo backend can abort a process at interpreter exit, after all its work is done ("terminate called
without an active exception", exit status -6). Two things make that likely, and the strategies deal with both:
a default process group still alive when the interpreter tears down (this module), and a gloo worker thread
still dropping the last collective's tensors then (``distributed/exit.py``, whose exit hook is registered here
too, so that it runs after the group is destroyed). Lightning creates the group in ``setup_environment`` and
never destroys it for gloo (it registers an exit hook for NCCL only), so the strategies record, when they set
up the environment, whether the default group existed before:

- a group the strategy or Lightning created is *owned*: it is destroyed by an ``atexit`` hook, which runs
  after the script's last line and before the interpreter tears down (and gloo's threads with it);
- a group that existed before (the user's own ``dist.init_process_group``) is never destroyed: the user
  still uses it, and destroys it.

The group is not destroyed when ``fit``/``validate``/``test``/``predict`` returns: Lightning keeps it between
stages, and code after ``fit`` relies on that (``trainer.save_checkpoint``, ``trainer.test`` under
``torchrun``, whose rendezvous store cannot form a second default group, and torchmetrics' ``compute()``,
which silently stops syncing across ranks without a group). See docs/troubleshooting.md, "exit status -6".

Example:
    >>> existed = default_group_exists()
    >>> # ... the strategy sets up the environment (Lightning calls init_process_group) ...
    >>> adopt_default_group(existed)  # owned if it was created in between; destroyed at exit
"""

from __future__ import annotations

import atexit
import logging
import signal
import threading
from typing import Any

import torch.distributed as dist

from lightning_sharing.distributed.exit import settle_at_exit

__all__ = ["adopt_default_group", "default_group_exists", "destroy_owned_group", "owns_default_group"]

log = logging.getLogger(__name__)

_owned: Any = None  # the default group this process's strategies created (None: none, or already destroyed)
_hook_registered = False


def default_group_exists() -> bool:
    """Whether the default process group is initialised now."""
    return dist.is_available() and dist.is_initialized()


def adopt_default_group(existed_before: bool) -> None:
    """After a strategy set up its environment: own the default group if it did not exist before.

    The owned group is destroyed at interpreter exit. A group that ``existed_before`` is the user's (or
    another strategy's, which already owns it) and is left alone.
    """
    global _owned, _hook_registered
    if not default_group_exists():
        return
    settle_at_exit()  # first, so that it runs after the group's destruction (exit hooks run last-in first-out)
    if existed_before:
        return
    _owned = dist.group.WORLD
    if not _hook_registered:
        # Registered now, after anything the script registered at start: hooks run last-in first-out,
        # so the script's own exit hooks still find the group destroyed only if they were registered first.
        atexit.register(destroy_owned_group)
        _hook_registered = True
    log.debug("the default process group was created for this strategy; it is destroyed at exit")


def owns_default_group() -> bool:
    """Whether the current default group is one a strategy created (and will destroy at exit)."""
    return _owned is not None and default_group_exists() and dist.group.WORLD is _owned


def destroy_owned_group() -> None:
    """Destroy the owned default group (and every group created from it) if it is still the default group.

    Local to this process (gloo and NCCL do not synchronise on destruction), so it is safe at exit even when
    other ranks have exited or failed. A no-op for a group the user created, or one already destroyed.
    """
    global _owned
    if not owns_default_group():
        _owned = None
        return
    _owned = None
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        dist.destroy_process_group()
        return
    # Ctrl+C during the teardown would leave the group half destroyed (and the abort this avoids).
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        dist.destroy_process_group()
    finally:
        signal.signal(signal.SIGINT, previous)
