"""Every collective the package runs, and the agreement step that prevents hangs.

Every function here is collective: every rank calls it, in the same order, unconditionally.
Without an initialised process group they degrade to single-process behaviour. No other module
calls ``torch.distributed`` collectives directly (``basics``, ``ballot`` and ``settle`` beside it hold the
building blocks; their public names are re-exported here).

The agreement step is the one way a failure becomes an error on every rank; in the success path it costs one
all-reduce of one integer per rank, whatever the world size::

    with agreement("writing checkpoint files"):
        write_my_files()            # may raise on some ranks only

    chosen = on_rank_zero("choosing the checkpoint", pick_checkpoint)   # rank 0 works, all agree
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import torch.distributed as dist

from lightning_sharing.core.topology import Topology
from lightning_sharing.distributed.ballot import ABSENT, Ballot, Field, judge_equal, stable_hash
from lightning_sharing.distributed.basics import (
    active,
    agreed_error,
    all_gather_object,
    broadcast_bytes,
    broadcast_object,
    broadcast_tensor,
    get_rank,
    get_world_size,
    group_size,
    local_only,
    may_run_in_background,
    reduce_ints,
    warn_on_rank_zero,
)
from lightning_sharing.distributed.settle import report_size, settle_on_rank_zero
from lightning_sharing.errors import ComponentDeclarationError

__all__ = ["ABSENT", "Ballot", "Field", "active", "agree", "agreed_error", "agreement", "all_gather_object",
           "all_ranks", "any_rank", "broadcast_bytes", "broadcast_object", "broadcast_tensor", "gather_topology",
           "get_rank", "get_world_size", "judge_equal", "local_only", "may_run_in_background", "new_gloo_group",
           "node_index_from_env", "on_rank_zero", "report_size", "resolve_process_groups", "settle_on_rank_zero",
           "stable_hash", "warn_on_rank_zero"]

T = TypeVar("T")

log = logging.getLogger(__name__)

#: Bytes of ``on_rank_zero``'s result carried in its agreement step (longer: one broadcast follows).
_RESULT_BYTES = 256


def all_ranks(flag: bool, group: Any = None, phase: str = "agreeing on a flag") -> bool:
    """True on every rank when ``flag`` is true on every rank (one tiny all-reduce).

    ``group`` must be a gloo group (CPU tensors) when given; None is the default group.
    """
    return bool(reduce_ints([1 if flag else 0], dist.ReduceOp.MIN, group, phase)[0]) if active() else flag


def any_rank(*flags: bool, group: Any = None, phase: str = "agreeing on flags") -> list[bool]:
    """For each flag, True on every rank when it is true on some rank (one all-reduce for all of them)."""
    if not active():
        return list(flags)
    return [bool(v) for v in reduce_ints([1 if f else 0 for f in flags], dist.ReduceOp.MAX, group, phase)]


def new_gloo_group() -> Any:
    """A new gloo group over every rank (None when not distributed), e.g. for a background thread's collectives."""
    if group_size() == 1:
        return None
    return dist.new_group(backend="gloo")


def agree(local_error: BaseException | None, phase: str, group: Any = None) -> None:
    """Turn a failure on any rank into an error on every rank.

    Each rank passes the exception its own work raised (or None). In the success path the ranks exchange one
    integer (an all-reduce of a failure flag); if any rank failed, they exchange the outcomes and every rank raises
    ``DistributedCheckpointError`` naming the failing ranks and their messages, chained to the local exception
    where there is one. The local exception is never dropped: it is the ``__cause__`` on the rank that raised it.
    ``group``: as for ``all_gather_object``.
    """
    ballot = Ballot(phase, group)
    ballot.record(phase, local_error)
    ballot.agree()


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

    ``work`` must not run collectives (it runs on one rank). Its result (plain, picklable data) travels in the
    agreement step itself when it is small (one all-reduce in all); a larger one costs one broadcast more.

    Example:
        >>> path = on_rank_zero("choosing the checkpoint", lambda: find_latest_checkpoint("ckpts"))  # doctest: +SKIP
    """
    ballot = Ballot(phase, group)
    result = ballot.run(phase, work if get_rank() == 0 else None)
    shared = ballot.from_rank_zero(_RESULT_BYTES)
    shared.set(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL) if get_rank() == 0 else None)
    ballot.agree()
    return result if group_size(group) == 1 else pickle.loads(shared.value)


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


def node_index_from_env() -> int | None:
    """This node's index as the launcher set it, or None: torchrun's ``GROUP_RANK`` (the node's rank), else
    Lightning's ``NODE_RANK`` or SLURM's ``SLURM_NODEID``."""
    for var in ("GROUP_RANK", "NODE_RANK", "SLURM_NODEID"):
        value = os.environ.get(var)
        if value is not None and value.strip().lstrip("-").isdigit():
            return int(value)
    return None


def _local_node_id() -> Any:
    index = node_index_from_env()
    return ("env", index) if index is not None else ("host", socket.gethostname())


def _group_members(group: Any) -> list[int]:
    return sorted(int(r) for r in dist.get_process_group_ranks(group))


def gather_topology(process_groups: Mapping[str, Any]) -> Topology:
    """Collect the job's topology from every rank (collective).

    Each rank reports its node id and the members of each named group it was given; rank 0 alone receives the
    reports and builds the topology, which every rank receives (O(N) once per coordinator: it is part of the
    global plan). The result is identical on every rank. A rank that lacks a group name, or is not a member of the
    group it passed, makes every rank raise.
    """
    if not active():
        return Topology.build(1, group_members={name: [[0]] for name in process_groups})
    report: dict[str, Any] = {"node": None, "groups": {}}
    ballot = Ballot("collecting the topology")
    ballot.run("collecting the topology", lambda: report.update(_report(process_groups)))
    capacity = ballot.maximum(report_size(report) if get_rank() != 0 else 0)
    ballot.agree()
    verdict = settle_on_rank_zero("collecting the topology", None, report, "collecting the topology",
                                  _topology_of, capacity=capacity.value)
    if verdict[0] == "error":
        raise ComponentDeclarationError(verdict[1])
    return Topology.from_json(verdict[1])


def _report(process_groups: Mapping[str, Any]) -> dict[str, Any]:
    rank = dist.get_rank()
    groups = {}
    for name, group in process_groups.items():
        members = _group_members(group)
        if rank not in members:
            raise ComponentDeclarationError(
                f"process group {name!r} passed on rank {rank} has members {members}, which do "
                "not include this rank; pass the group this rank belongs to"
            )
        groups[name] = members
    return {"node": _local_node_id(), "groups": groups}


def _topology_of(reports: list[dict[str, Any]]) -> tuple[str, Any]:
    """Rank 0: the topology of every rank's report as JSON, or ``("error", message)``."""
    names = [sorted(rep["groups"]) for rep in reports]
    if any(n != names[0] for n in names):
        listing = ", ".join(f"rank {r}: {n}" for r, n in enumerate(names))
        return "error", (f"ranks passed different process group names ({listing}); every rank must pass the same "
                         "names")
    node_ids = [rep["node"] for rep in reports]
    group_members = {name: [rep["groups"][name] for rep in reports] for name in names[0]}
    try:
        return "ok", Topology.build(len(reports), node_of_rank=node_ids, group_members=group_members).to_json()
    except ComponentDeclarationError as exc:  # the same refusal on every rank, as a declaration error
        return "error", str(exc)
