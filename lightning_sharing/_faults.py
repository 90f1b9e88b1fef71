"""Fault injection at named points of a save or load, for the fault-tolerance tests and soak.

Off unless the environment variable ``LIGHTNING_SHARING_FAULTS`` is set (it is read at every
point, so tests can set it per process). Its value is a comma-separated list of
``POINT@RANK:ACTION`` entries, optionally suffixed ``#N`` to fire only at the N-th time this
process reaches that point (1-based; default: the first time):

- ``POINT``: one of ``FAULT_POINTS``;
- ``RANK``: a global rank, or ``*`` for every rank;
- ``ACTION``: ``kill`` (SIGKILL this process), ``exit`` (``os._exit(3)``), ``raise`` (a
  ``RuntimeError``), ``enospc`` / ``eio`` (an ``OSError`` with that errno, as a full disk or a
  failing device would raise), ``hang`` (block forever, sockets open: a stuck peer, which the
  others only detect through the process group's timeout).

Example:
    LIGHTNING_SHARING_FAULTS="save:write@1:enospc,commit:rename@0:kill#2"
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from collections import Counter

__all__ = ["FAULTS_ENV", "FAULT_POINTS", "fault_point"]

FAULTS_ENV = "LIGHTNING_SHARING_FAULTS"
FAULT_POINTS = (
    "save:start",       # every rank, the staging directory exists, nothing written yet
    "save:write",       # inside a file write, after part of the file's bytes are on disk
    "save:sync",        # a file of a write batch is written, before its deferred fsync (one hit per file)
    "save:written",     # this rank's files are written, before the ranks agree on it
    "commit:manifest",  # rank 0, every file checked, before the manifest is written
    "commit:rename",    # rank 0, the manifest is written, before the staging directory is renamed
    "commit:renamed",   # rank 0, the new checkpoint is in place, before the ranks hear of it
    "load:read",        # every rank, before a file of the checkpoint is read
    "local:write",      # every rank, before a file of a local-tier save (LocalTier) is written
)
_ACTIONS = ("kill", "exit", "raise", "enospc", "eio", "hang")
_hits: Counter[str] = Counter()
_lock = threading.Lock()


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def _parse(spec: str) -> list[tuple[str, str, str, int]]:
    entries = []
    for raw in filter(None, (part.strip() for part in spec.split(","))):
        try:
            where, action = raw.rsplit(":", 1)
            point, rank = where.rsplit("@", 1)
            occurrence = 1
            if "#" in action:
                action, count = action.split("#", 1)
                occurrence = int(count)
        except ValueError as exc:
            raise ValueError(f"{FAULTS_ENV} entry {raw!r} is not POINT@RANK:ACTION[#N]") from exc
        if point not in FAULT_POINTS or action not in _ACTIONS or occurrence < 1:
            raise ValueError(f"{FAULTS_ENV} entry {raw!r}: points are {FAULT_POINTS}, actions {_ACTIONS}")
        entries.append((point, rank, action, occurrence))
    return entries


def fault_point(point: str) -> None:
    """Fire the fault configured for ``point`` on this rank, if any (a no-op when none is)."""
    spec = os.environ.get(FAULTS_ENV)
    if not spec:
        return
    with _lock:
        _hits[point] += 1
        hit = _hits[point]
    rank = _rank()
    for name, who, action, occurrence in _parse(spec):
        if name != point or occurrence != hit or who not in ("*", str(rank)):
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "exit":
            os._exit(3)
        if action == "hang":
            while True:
                time.sleep(3600)
        if action == "raise":
            raise RuntimeError(f"injected fault at {point} on rank {rank}")
        code = errno.ENOSPC if action == "enospc" else errno.EIO
        raise OSError(code, f"{os.strerror(code)} (injected at {point} on rank {rank})")
