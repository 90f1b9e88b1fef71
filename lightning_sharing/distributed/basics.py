"""What every collective of the package builds on: who this rank is, the object exchanges, and how an agreed failure
reads.

Every collective function is collective: every rank calls it, in the same order, unconditionally. Without an
initialised process group they degrade to single-process behaviour. ``collectives`` re-exports these names; the
rest of the package imports them from there.

- ``all_gather_object`` / ``broadcast_object``: plain data to every rank (pickled). Every rank receives every rank's
  object from ``all_gather_object``: the package uses it on failure paths only, to name the failing ranks.
- ``reduce_ints``: one all-reduce of a few integers, on the device the group's backend needs.
- ``outcome_of`` / ``agreed_error``: a rank's failure as plain data, and the error every rank raises for the
  failures of one phase (the same message and class on every rank).

Example:
    >>> agreed_error("writing checkpoint files", {1: "OSError: disk full"}, ["OSError"]).args[0]
    'writing checkpoint files failed on rank 1: OSError: disk full'
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from lightning_sharing.distributed.exit import settle_at_exit
from lightning_sharing.errors import CheckpointError, DistributedCheckpointError, distributed_error_class

__all__ = ["active", "agreed_error", "all_gather_object", "broadcast_bytes", "broadcast_object", "broadcast_tensor",
           "collective_device", "get_rank", "get_world_size", "group_size", "local_only", "may_run_in_background",
           "outcome_of", "peer_failures", "reduce_ints", "warn_on_rank_zero"]

_LOCAL = threading.local()


def active() -> bool:
    """True when collectives run: a process group is initialised and we are not in ``local_only()``."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    settle_at_exit()  # a gloo thread may still hold our last collective's tensors when the script ends
    return not getattr(_LOCAL, "only", False)


@contextlib.contextmanager
def local_only() -> Iterator[None]:
    """Within this block this process acts alone: world size 1, rank 0, no collectives.

    For rank-local calls made by frameworks on one rank only (e.g. Lightning's spawn launcher
    saving the final weights from rank 0), where a collective would hang.
    """
    previous = getattr(_LOCAL, "only", False)
    _LOCAL.only = True
    try:
        yield
    finally:
        _LOCAL.only = previous


def may_run_in_background() -> bool:
    """False inside ``local_only()`` while a process group exists.

    There a background thread would run real collectives that the other ranks never join, so such
    saves stay synchronous.
    """
    return active() or not (dist.is_available() and dist.is_initialized())


def get_rank() -> int:
    """Global rank, 0 when not distributed."""
    return dist.get_rank() if active() else 0


def get_world_size() -> int:
    """World size, 1 when not distributed."""
    return dist.get_world_size() if active() else 1


def group_size(group: Any = None) -> int:
    """Ranks in ``group`` (None: the default group); 1 when not distributed."""
    return dist.get_world_size(group) if active() else 1


def warn_on_rank_zero(logger: logging.Logger, message: str, *args: Any) -> None:
    """Log a warning that every rank reaches alike (the same checkpoint, the same verdict) once, on rank 0.

    Not a collective: ranks other than 0 just return. Rank-specific warnings use ``logger.warning`` itself.
    """
    if get_rank() == 0:
        logger.warning(message, *args)


@contextlib.contextmanager
def peer_failures(phase: str) -> Iterator[None]:
    """Re-raise a failed collective (torch's DistBackendError, a timeout) saying what was going on."""
    try:
        yield
    except RuntimeError as exc:
        raise DistributedCheckpointError(
            f"{phase} failed on rank {dist.get_rank()}: the ranks could not communicate ({type(exc).__name__}: "
            f"{exc}); another rank probably crashed, was killed or is stuck (the process group's timeout "
            "bounds the wait)"
        ) from exc


def all_gather_object(obj: Any, group: Any = None, phase: str = "exchanging checkpoint data") -> list[Any]:
    """Every rank's ``obj``, indexed by rank (pickled: only pass plain data produced by this package).

    ``group`` must span every rank (the background saver's own group); None is the default group.
    A peer that died or stopped answering raises ``DistributedCheckpointError`` naming ``phase``.
    """
    if group_size(group) == 1:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size(group)
    with peer_failures(phase):
        dist.all_gather_object(gathered, obj, group=group)
    return gathered


def broadcast_object(obj: Any, src: int = 0, group: Any = None, phase: str = "broadcasting checkpoint data") -> Any:
    """Rank ``src``'s ``obj`` on every rank (``group``: as for ``all_gather_object``)."""
    if group_size(group) == 1:
        return obj
    box = [obj]
    with peer_failures(phase):
        dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def collective_device(group: Any = None) -> torch.device:
    """Where tensors for collectives on ``group`` live: a given group is the package's own gloo group (CPU); the
    default group takes CUDA tensors under NCCL."""
    if group is None and "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_tensor(tensor: torch.Tensor, src: int, phase: str = "comparing tensors") -> torch.Tensor:
    """Rank ``src``'s copy of ``tensor`` (same shape and dtype everywhere), on this rank's collective device."""
    if group_size() == 1:
        return tensor
    theirs = tensor.to(collective_device(), copy=True)
    with peer_failures(phase):
        dist.broadcast(theirs, src=src)
    return theirs


#: The largest piece of a file ``broadcast_bytes`` sends at once: it bounds the device buffer under NCCL.
BROADCAST_PIECE = 64 * 1024 * 1024


def broadcast_bytes(data: Any, size: int, src: int, phase: str = "sending checkpoint files") -> memoryview:
    """Rank ``src``'s ``size`` bytes (``data``: bytes-like on ``src``, ignored elsewhere) on every rank.

    Every rank must already know ``size`` (from the manifest), so no length is exchanged. The bytes travel in
    pieces of at most ``BROADCAST_PIECE`` over the default group: straight into a CPU buffer under gloo, through one
    device buffer per piece under NCCL. Returns a read-only view (of ``data`` itself on ``src``).

    Example:
        >>> broadcast_bytes(b"abc" if get_rank() == 0 else None, 3, src=0).tobytes()   # doctest: +SKIP
        b'abc'
    """
    if group_size() == 1 or get_rank() == src:
        # ``data`` was checked against the manifest (size and checksum) before: a check here could raise on this
        # rank alone while the others wait in the broadcast.
        view = memoryview(data).cast("B")
        if group_size() > 1 and size:
            _broadcast_pieces(_tensor_of(view), size, src, phase)
        return view.toreadonly()
    buffer = bytearray(size)
    if size:
        _broadcast_pieces(torch.frombuffer(buffer, dtype=torch.uint8), size, src, phase)
    return memoryview(buffer).toreadonly()


def _tensor_of(view: memoryview) -> torch.Tensor:
    with warnings.catch_warnings():  # a read-only buffer: the sending rank only reads it
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(view, dtype=torch.uint8)


def _broadcast_pieces(cpu: torch.Tensor, size: int, src: int, phase: str) -> None:
    device = collective_device()
    with peer_failures(phase):
        for start in range(0, size, BROADCAST_PIECE):
            piece = cpu[start:start + BROADCAST_PIECE]
            if device.type == "cpu":
                dist.broadcast(piece, src=src)
                continue
            staged = piece.to(device) if get_rank() == src else torch.empty_like(piece, device=device)
            dist.broadcast(staged, src=src)
            if get_rank() != src:
                piece.copy_(staged)


def reduce_ints(values: Sequence[int], op: Any, group: Any = None, phase: str = "agreeing") -> list[int]:
    """``values`` reduced element-wise over the ranks of ``group`` with ``op`` (one all-reduce of int64s)."""
    if group_size(group) == 1:
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.int64, device=collective_device(group))
    with peer_failures(phase):
        dist.all_reduce(tensor, op=op, group=group)
    return [int(v) for v in tensor.tolist()]


# ------------------------------------------------------------------------------------------------ agreed failures
def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _kind(error: BaseException) -> str | None:
    """The name of the package error class ``error`` is (or is caused by), if any."""
    seen = 0
    current: BaseException | None = error
    while current is not None and seen < 8:
        if isinstance(current, CheckpointError) and type(current).__module__ == CheckpointError.__module__:
            return type(current).__name__
        current, seen = current.__cause__, seen + 1
    return None


def outcome_of(error: BaseException | None) -> tuple[str | None, str] | None:
    """A rank's failure as plain data, ``(package error kind or None, "Type: message")``; None without one."""
    return None if error is None else (_kind(error), _describe(error))


def agreed_error(phase: str, failures: Mapping[int, str], kinds: Sequence[str | None]) -> DistributedCheckpointError:
    """The error every rank raises when ``failures`` (rank -> "Type: message") happened in ``phase``.

    The first failing rank's message is shown in full, the others by rank; when every failing rank raised the same
    package error kind, the error is of that kind too (``distributed_error_class``).
    """
    first_rank = min(failures)
    if len(failures) == 1:
        message = f"{phase} failed on rank {first_rank}: {failures[first_rank]}"
    else:
        detail = "; ".join(f"rank {r}: {m}" for r, m in sorted(failures.items()))
        message = f"{phase} failed on ranks {sorted(failures)}: {detail}"
    distinct = set(kinds)
    error_class = distributed_error_class(distinct.pop() if len(distinct) == 1 else None)
    return error_class(message, dict(failures))
