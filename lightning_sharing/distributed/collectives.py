"""Every collective the package runs, and the agreement step that prevents hangs.

Every function here is collective: every rank calls it, in the same order, unconditionally.
Without an initialised process group they degrade to single-process behaviour. No other module
calls ``torch.distributed`` collectives directly.

The agreement step is the one way a failure becomes an error on every rank::

    with agreement("writing checkpoint files"):
        write_my_files()            # may raise on some ranks only

    chosen = on_rank_zero("choosing the checkpoint", pick_checkpoint)   # rank 0 works, all agree
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from lightning_sharing.core.topology import Topology
from lightning_sharing.distributed.exit import settle_at_exit
from lightning_sharing.errors import (
    CheckpointError,
    ComponentDeclarationError,
    DistributedCheckpointError,
    distributed_error_class,
)

__all__ = ["active", "agree", "agreement", "all_gather_object", "all_ranks", "any_rank", "broadcast_object",
           "broadcast_tensor", "gather_topology", "get_rank", "get_world_size", "local_only",
           "may_run_in_background", "new_gloo_group", "on_rank_zero", "resolve_process_groups", "warn_on_rank_zero"]

T = TypeVar("T")

log = logging.getLogger(__name__)


_LOCAL = threading.local()


def active() -> bool:
    """True when collectives run: a process group is initialised and we are not in ``local_only()``."""
    return _active()


def _active() -> bool:
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
    return _active() or not (dist.is_available() and dist.is_initialized())


def get_rank() -> int:
    """Global rank, 0 when not distributed."""
    return dist.get_rank() if _active() else 0


def warn_on_rank_zero(logger: logging.Logger, message: str, *args: Any) -> None:
    """Log a warning that every rank reaches alike (the same checkpoint, the same verdict) once, on rank 0.

    Not a collective: ranks other than 0 just return. Rank-specific warnings use ``logger.warning`` itself.
    """
    if get_rank() == 0:
        logger.warning(message, *args)


def get_world_size() -> int:
    """World size, 1 when not distributed."""
    return dist.get_world_size() if _active() else 1


def all_gather_object(obj: Any, group: Any = None, phase: str = "exchanging checkpoint data") -> list[Any]:
    """Every rank's ``obj``, indexed by rank (pickled: only pass plain data produced by this package).

    ``group`` must span every rank (the background saver's own group); None is the default group.
    A peer that died or stopped answering raises ``DistributedCheckpointError`` naming ``phase``.
    """
    if not _active() or dist.get_world_size(group) == 1:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size(group)
    with _peer_failures(phase):
        dist.all_gather_object(gathered, obj, group=group)
    return gathered


@contextlib.contextmanager
def _peer_failures(phase: str) -> Iterator[None]:
    """Re-raise a failed collective (torch's DistBackendError, a timeout) saying what was going on."""
    try:
        yield
    except RuntimeError as exc:
        raise DistributedCheckpointError(
            f"{phase} failed on rank {dist.get_rank()}: the ranks could not communicate ({type(exc).__name__}: "
            f"{exc}); another rank probably crashed, was killed or is stuck (the process group's timeout "
            "bounds the wait)"
        ) from exc


def broadcast_object(obj: Any, src: int = 0, group: Any = None) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``group``: as for ``all_gather_object``)."""
    if not _active() or dist.get_world_size(group) == 1:
        return obj
    box = [obj]
    with _peer_failures("broadcasting checkpoint data"):
        dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def _collective_device() -> torch.device:
    """Where tensors for collectives on the default group must live (NCCL takes CUDA tensors only)."""
    if "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_tensor(tensor: torch.Tensor, src: int, phase: str = "comparing tensors") -> torch.Tensor:
    """Rank ``src``'s copy of ``tensor`` (same shape and dtype everywhere), on this rank's collective device."""
    if not _active() or dist.get_world_size() == 1:
        return tensor
    theirs = tensor.to(_collective_device(), copy=True)
    with _peer_failures(phase):
        dist.broadcast(theirs, src=src)
    return theirs


def _reduce_flags(flags: list[bool], op: Any, group: Any, phase: str) -> list[bool]:
    if not _active() or dist.get_world_size(group) == 1:
        return list(flags)
    device = _collective_device() if group is None else torch.device("cpu")
    values = torch.tensor([1 if flag else 0 for flag in flags], dtype=torch.int32, device=device)
    with _peer_failures(phase):
        dist.all_reduce(values, op=op, group=group)
    return [bool(v) for v in values.tolist()]


def all_ranks(flag: bool, group: Any = None, phase: str = "agreeing on a flag") -> bool:
    """True on every rank when ``flag`` is true on every rank (one tiny all-reduce).

    ``group`` must be a gloo group (CPU tensors) when given; None is the default group.
    """
    return _reduce_flags([flag], dist.ReduceOp.MIN, group, phase)[0]


def any_rank(*flags: bool, group: Any = None, phase: str = "agreeing on flags") -> list[bool]:
    """For each flag, True on every rank when it is true on some rank (one all-reduce for all of them)."""
    return _reduce_flags(list(flags), dist.ReduceOp.MAX, group, phase)


def new_gloo_group() -> Any:
    """A new gloo group over every rank (None when not distributed), e.g. for a background thread's collectives."""
    if not _active() or dist.get_world_size() == 1:
        return None
    return dist.new_group(backend="gloo")


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def agree(local_error: BaseException | None, phase: str, group: Any = None) -> None:
    """Turn a failure on any rank into an error on every rank.

    Each rank passes the exception its own work raised (or None). All ranks exchange the outcome;
    if any rank failed, every rank raises ``DistributedCheckpointError`` naming the failing ranks
    and their messages, chained to the local exception where there is one. The local exception is
    never dropped: it is the ``__cause__`` on the rank that raised it. ``group``: as for
    ``all_gather_object``.
    """
    outcome = None if local_error is None else (_kind(local_error), _describe(local_error))
    outcomes = all_gather_object(outcome, group, phase=phase)
    failures = {rank: out[1] for rank, out in enumerate(outcomes) if out is not None}
    if not failures:
        return
    # Show the first failing rank's message in full; others are listed by rank.
    first_rank = min(failures)
    if len(failures) == 1:
        message = f"{phase} failed on rank {first_rank}: {failures[first_rank]}"
    else:
        detail = "; ".join(f"rank {r}: {m}" for r, m in sorted(failures.items()))
        message = f"{phase} failed on ranks {sorted(failures)}: {detail}"
    kinds = {out[0] for out in outcomes if out is not None}
    error_class = distributed_error_class(kinds.pop() if len(kinds) == 1 else None)
    if local_error is None:
        raise error_class(message, failures)
    raise error_class(message, failures) from local_error


@contextlib.contextmanager
def agreement(phase: str, group: Any = None) -> Iterator[None]:
    """Run the block on every rank; a failure on any rank becomes the same error on every rank.

    The block's own exception is caught (``Exception``, not ``BaseException``: an interrupt still
    interrupts) and handed to ``agree()``, which every rank reaches whatever happened in the block.

    Example:
        >>> with agreement("writing checkpoint files"):   # doctest: +SKIP
        ...     write_files()
    """
    error: BaseException | None = None
    try:
        yield
    except Exception as exc:  # re-raised on every rank by agree() just below
        error = exc
    agree(error, phase, group)


def on_rank_zero(phase: str, work: Callable[[], T], group: Any = None) -> T:
    """Run ``work`` on rank 0 only and return its result on every rank; a failure there is raised everywhere.

    ``work`` must not run collectives (it runs on one rank).
    """
    result: Any = None
    with agreement(phase, group):
        if get_rank() == 0:
            result = work()
    return broadcast_object(result, group=group)


def _kind(error: BaseException) -> str | None:
    """The name of the package error class ``error`` is (or is caused by), if any."""
    seen = 0
    current: BaseException | None = error
    while current is not None and seen < 8:
        if isinstance(current, CheckpointError) and type(current).__module__ == CheckpointError.__module__:
            return type(current).__name__
        current, seen = current.__cause__, seen + 1
    return None


def resolve_process_groups(process_groups: Any) -> dict[str, Any]:
    """Normalise ``process_groups`` (None, a name->ProcessGroup mapping, or a DeviceMesh)."""
    if process_groups is None:
        return {}
    names = getattr(process_groups, "mesh_dim_names", None)
    if names is not None or type(process_groups).__name__ == "DeviceMesh":
        if not names:
            raise ComponentDeclarationError(
                "a DeviceMesh passed as process_groups needs mesh_dim_names, e.g. "
                "init_device_mesh('cpu', (2, 2), mesh_dim_names=('dp', 'pp'))"
            )
        return {name: process_groups.get_group(name) for name in names}
    if isinstance(process_groups, Mapping):
        return {str(name): group for name, group in process_groups.items()}
    raise ComponentDeclarationError(
        "process_groups must be None, a dict of name -> ProcessGroup, or a DeviceMesh; "
        f"got {type(process_groups).__name__}"
    )


def _local_node_id() -> Any:
    # torchrun sets GROUP_RANK (the node's rank); Lightning and SLURM set NODE_RANK / SLURM_NODEID.
    for var in ("GROUP_RANK", "NODE_RANK", "SLURM_NODEID"):
        value = os.environ.get(var)
        if value is not None and value.strip().lstrip("-").isdigit():
            return ("env", int(value))
    return ("host", socket.gethostname())


def _group_members(group: Any) -> list[int]:
    return sorted(int(r) for r in dist.get_process_group_ranks(group))


def gather_topology(process_groups: Mapping[str, Any]) -> Topology:
    """Collect the job's topology from every rank (collective).

    Each rank reports its node id and the members of each named group it was given; the result is
    identical on every rank. A rank that lacks a group name, or is not a member of the group it
    passed, makes every rank raise.
    """
    if not _active():
        return Topology.build(1, group_members={name: [[0]] for name in process_groups})
    report: dict[str, Any] = {"node": None, "groups": {}}
    with agreement("collecting the topology"):
        report["node"] = _local_node_id()
        rank = dist.get_rank()
        for name, group in process_groups.items():
            members = _group_members(group)
            if rank not in members:
                raise ComponentDeclarationError(
                    f"process group {name!r} passed on rank {rank} has members {members}, which do "
                    "not include this rank; pass the group this rank belongs to"
                )
            report["groups"][name] = members
    reports = all_gather_object(report)
    names = [sorted(rep["groups"]) for rep in reports]
    if any(n != names[0] for n in names):
        listing = ", ".join(f"rank {r}: {n}" for r, n in enumerate(names))
        raise ComponentDeclarationError(
            f"ranks passed different process group names ({listing}); every rank must pass the same names"
        )
    node_ids = [rep["node"] for rep in reports]
    group_members = {name: [rep["groups"][name] for rep in reports] for name in names[0]}
    return Topology.build(len(reports), node_of_rank=node_ids, group_members=group_members)
