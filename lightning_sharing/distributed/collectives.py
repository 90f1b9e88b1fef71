"""The few collectives the coordinator uses, and the agreement step that prevents hangs.

Every function here is collective: every rank calls it, in the same order, unconditionally.
Without an initialised process group they degrade to single-process behaviour.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import torch.distributed as dist

from lightning_sharing.core.topology import Topology
from lightning_sharing.errors import (
    CheckpointError,
    ComponentDeclarationError,
    DistributedCheckpointError,
    distributed_error_class,
)

__all__ = [
    "active",
    "agree",
    "all_gather_object",
    "broadcast_object",
    "gather_topology",
    "get_rank",
    "get_world_size",
    "local_only",
    "resolve_process_groups",
]

log = logging.getLogger(__name__)


_LOCAL = threading.local()


def active() -> bool:
    """True when collectives run: a process group is initialised and we are not in ``local_only()``."""
    return _active()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and not getattr(_LOCAL, "only", False)


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


def get_rank() -> int:
    """Global rank, 0 when not distributed."""
    return dist.get_rank() if _active() else 0


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


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not _active() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    with _peer_failures("broadcasting checkpoint data"):
        dist.broadcast_object_list(box, src=src)
    return box[0]


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
    local_error: BaseException | None = None
    report: dict[str, Any] = {"node": None, "groups": {}}
    try:
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
    except Exception as exc:  # made an error on every rank by agree() just below
        local_error = exc
    agree(local_error, "collecting the topology")
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
