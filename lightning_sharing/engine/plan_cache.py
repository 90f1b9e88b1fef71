"""Plan caching: a save whose state has the previous save's layout reuses that save's plan (no planning again).

Planning a copy (``CopyFormat.plan_encoded``) decides from the layout of the state alone (its tensors' names, shapes,
dtypes and, for ``DTensor``s, placements and mesh; its ties; whether it is flat), the copy's placement and the
options which files this rank writes and which tensors go in each. A coordinator keeps the plans of its last save,
tensors dropped, under that *signature*; the next save of a copy with the same signature refills the cached plan with
the new tensors and structure (``CopyFormat.refill``) instead. A changed shape, dtype, name, tie, declaration,
option or topology changes the signature (the placement holds the writers and readers of the copy, which the
declaration and the topology decide), and that copy is planned again.

Each rank's cache is its own: whether a rank planned or reused, its collectives are the same (a save's agreement
step compares every rank's declarations and path by hash, whichever it did), so the ranks never need to agree on it.

The cache also keeps the job's topology (``topology``), gathered once per world size and set of process groups (the
group objects themselves, which every rank creates together: a new set is new objects on every rank). A coordinator
has one cache; coordinators made one per save (the Lightning and Fabric adapters) share their host's.

Example:
    >>> cache = PlanCache()
    >>> plan = cache.plan(fmt, "model", placement, state, rank, options)   # doctest: +SKIP
    >>> cache.stats                                                        # doctest: +SKIP
    {'planned': 1, 'reused': 0}
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

from lightning_sharing.core.options import CheckpointOptions
from lightning_sharing.core.rules import Placement
from lightning_sharing.core.topology import Topology
from lightning_sharing.distributed.collectives import get_rank, get_world_size
from lightning_sharing.engine.copy_format import CopyFormat, CopyPlan, FileJob
from lightning_sharing.engine.incremental import IncrementalMemory
from lightning_sharing.format.codec import EncodedState
from lightning_sharing.sharded.dtensor_boxes import is_dtensor

__all__ = ["PlanCache", "signature"]


def _mesh(mesh: Any, seen: dict[int, Hashable]) -> Hashable:
    key = id(mesh)
    if key not in seen:
        seen[key] = (tuple(mesh.shape), tuple(mesh.mesh_dim_names or ()), tuple(mesh.mesh.flatten().tolist()))
    return seen[key]


def signature(placement: Placement, encoded: EncodedState, options: CheckpointOptions) -> Hashable:
    """What a copy's plan depends on: its placement, the options, and the layout of the encoded state (its shard
    groups included)."""
    meshes: dict[int, Hashable] = {}
    tensors = []
    for name, tensor in encoded.tensors.items():
        layout: Hashable = None
        if is_dtensor(tensor):
            layout = (tuple(map(str, tensor.placements)), _mesh(tensor.device_mesh, meshes),
                      tuple(tensor.to_local().shape))
        tensors.append((name, tensor.dtype, tuple(tensor.shape), layout))
    groups = tuple(sorted(encoded.groups.items()))
    return placement, options, encoded.flat, tuple(sorted(encoded.ties.items())), tuple(tensors), groups


def _skeleton(plan: CopyPlan) -> CopyPlan:
    """``plan`` without its tensors (their names kept), so that the cache holds no state between saves."""
    jobs = [FileJob(job.rel, tensors=dict.fromkeys(job.tensors) if job.tensors is not None else None, data=job.data)
            for job in plan.jobs]
    return CopyPlan(plan.key, plan.stem, jobs, plan.detail)


class PlanCache:
    """The plans of one coordinator's last save, by copy, and what the current save did with them (``stats``)."""

    def __init__(self) -> None:
        self._plans: dict[tuple[str, str], tuple[Hashable, CopyPlan]] = {}
        self._next: dict[tuple[str, str], tuple[Hashable, CopyPlan]] = {}
        self.stats = {"planned": 0, "reused": 0}
        #: The bytes of this rank's commit report in the last save (sizes the next save's gather); None before one.
        self.report_size: int | None = None
        self._topologies: dict[Hashable, tuple[Topology, tuple[Any, ...]]] = {}
        self._planned_for: Topology | None = None
        #: What an incremental save compares with: the last committed one's tensors and files on this rank.
        self.incremental = IncrementalMemory()

    def topology(self, process_groups: Mapping[str, Any], gather: Callable[[], Topology]) -> Topology:
        """The topology for this world size and these process groups: ``gather()``ed (collective) the first time.

        The same decision on every rank: the world size is the same everywhere, and a new set of groups is new
        objects on every rank (``dist.new_group`` is collective). The groups are kept, so their ids stay theirs.
        """
        names = sorted(process_groups)
        key = (get_world_size(), get_rank(), tuple((name, id(process_groups[name])) for name in names))
        if key not in self._topologies:
            self._topologies[key] = (gather(), tuple(process_groups[name] for name in names))
        return self._topologies[key][0]

    def begin(self, topology: Topology | None = None) -> None:
        """A save starts: count afresh; the plans it makes or reuses replace the cached ones at ``end``.

        A save under another topology than the last one's (a new world size, new process groups) plans afresh:
        the same placement may mean other files and other ranks there.
        """
        if topology is not self._planned_for:
            self._plans = {}
        self._planned_for = topology
        self._next = {}
        self.stats = {"planned": 0, "reused": 0}

    def plan(self, fmt: CopyFormat, key: str, placement: Placement, state: Any, rank: int,
             options: CheckpointOptions, groups: Callable[[EncodedState], dict[str, str]] | None = None) -> CopyPlan:
        """This rank's plan of copy ``placement`` of ``key``: the cached one refilled, or a new one. ``groups``: the
        shard group of each tensor (an incremental save's, ``IncrementalSave.grouping``), part of the layout."""
        encoded = fmt.encode(state, key)
        if groups is not None:
            encoded.groups = groups(encoded)
        wanted = signature(placement, encoded, options)
        cached = self._plans.get((key, placement.stem))
        if cached is not None and cached[0] == wanted:
            plan = fmt.refill(cached[1], encoded)
            self.stats["reused"] += 1
        else:
            plan = fmt.plan_encoded(key, placement, encoded, rank, options)
            self.stats["planned"] += 1
        self._next[(key, placement.stem)] = (wanted, _skeleton(plan))
        return plan

    def end(self) -> None:
        """The save's plans are made: they are the cached ones from now on (copies no longer written are dropped)."""
        self._plans, self._next = self._next, {}
