"""Exits after collectives: the interpreter is not finalized while gloo's threads still hold tensors.

A gloo collective completes on one of the process group's worker threads: it marks the work done (the caller's
``wait()`` returns) and only then drops the work and, with it, the tensors the work held. When the caller has
already dropped its own references, dropping the last one needs the GIL (to free the tensor's Python object).
If the script ended meanwhile, the interpreter is finalizing: Python 3.11 ends any thread that asks for the
GIL then, with ``pthread_exit``, whose unwinding through gloo's C++ frames calls ``std::terminate``. The
process aborts after all its work is done ("terminate called without an active exception", exit status -6),
and under ``torchrun`` the whole job is reported failed. ``destroy_process_group`` does not prevent it: it
does not stop a group's threads; they stop only when the last reference to the group is dropped. The window
is short, so it is seen on loaded machines, about once in a hundred ``torchrun`` runs on a busy 2-core VM.

So an ``atexit`` hook, registered when this package first runs collectives or a strategy sets up its process
group, waits before finalization until no other thread of the process is running: every round sleeps (the
GIL is free meanwhile, so a thread waiting for it gets it) and then reads the threads' scheduler states from
``/proc``. Three quiet rounds in a row end the wait; a thread that keeps running (a user's busy thread) ends
it after ``timeout`` seconds instead. Where ``/proc`` is missing the hook returns at once.

Example:
    >>> settle_at_exit()            # registered once; safe to call on every collective
    >>> settle_native_threads(0.5)  # or wait now: True when every other thread is idle
    True
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time

__all__ = ["settle_at_exit", "settle_native_threads"]

log = logging.getLogger(__name__)

_QUIET_ROUNDS = 3
_ROUND_S = 0.005
_TIMEOUT_S = 2.0
_BUSY_STATES = frozenset("RD")  # running or runnable; uninterruptible sleep (I/O)

_registered = False
_register_lock = threading.Lock()


def settle_at_exit() -> None:
    """Register the exit hook that lets the process's native threads settle (once per process)."""
    global _registered
    if _registered:
        return
    with _register_lock:
        if not _registered:
            atexit.register(settle_native_threads)
            _registered = True


def settle_native_threads(timeout: float = _TIMEOUT_S) -> bool:
    """Wait until no other thread of this process is running; False if one still was after ``timeout`` s.

    The caller's thread sleeps between looks, so threads waiting for the GIL get it.
    """
    start = time.monotonic()
    quiet = looks = 0
    while quiet < _QUIET_ROUNDS:
        time.sleep(_ROUND_S)
        states = _other_thread_states()
        if states is None:
            return True  # no /proc: nothing to observe
        looks += 1
        busy = [tid for tid, state in states.items() if state in _BUSY_STATES]
        quiet = 0 if busy else quiet + 1
        if busy and time.monotonic() - start > timeout:
            log.debug("threads %s were still running after %.1f s; not waiting longer", busy, timeout)
            return False
    log.debug("other threads were idle after %d looks (%d threads, %.0f ms)", looks, len(states),
              1000 * (time.monotonic() - start))
    return True


def _other_thread_states() -> dict[int, str] | None:
    """Every other thread's scheduler state letter (``/proc/self/task/*/stat``); None without ``/proc``."""
    try:
        names = os.listdir("/proc/self/task")
    except OSError:
        return None
    me = threading.get_native_id()
    states: dict[int, str] = {}
    for name in names:
        if int(name) == me:
            continue
        try:
            with open(f"/proc/self/task/{name}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue  # the thread ended meanwhile
        # "tid (comm) S ...": the command may hold spaces and parentheses, the state follows the last ")".
        states[int(name)] = chr(stat[stat.rindex(b")") + 2])
    return states
