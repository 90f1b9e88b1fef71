"""A save, top to bottom: plan -> write -> agree -> commit, in two synchronisation steps of the ranks.

1. **plan** (``plan_save``, every rank, in the caller's thread): collect ``state_dict()`` of what this rank writes
   or validates; digest validated components; have each component's copy format plan the files this rank writes
   (``CopyFormat.plan_encoded``, or the previous save's plan refilled: ``PlanCache``); with a ``BackgroundSaver``,
   copy (stage) the planned tensors; on a synchronous save rank 0 then begins the write (the store's write root).
   **The agreement**: one ``Ballot`` (one all-reduce of a few integers) carries every rank's outcome of all of it,
   the hashes of the declarations and path (the coordinator's checks) and of the replicas' digests, rank 0's write
   root, and the size of the largest commit report; a failure anywhere is raised on every rank (rank 0 aborting
   what it began), with today's message of the phase that failed first. Validations that need more than a hash
   (``FULL``, or several group instances) run right after, each its own exchange.
2. **write** (``commit_save``, every rank, on the saver's thread for a background save, which begins the write
   there in one agreement step on the saver's group): every rank writes its files in one ``store.write_batch()``
   (``CopyFormat.write``).
3. **agree and commit** (``settle_on_rank_zero``): every rank's ``WrittenCopy`` records, or its failure, go to
   rank 0 alone; rank 0 checks every file is visible (``check_visible``), writes each format's merged files
   (``CopyFormat.merge``: indexes), the manifest (``build_manifest``), then ``store.commit`` writes it last; its
   verdict is broadcast. A failure anywhere aborts the save on rank 0, and the previous checkpoint is untouched.
   The first save of a plan (no report size known yet) agrees on the reports' size first (one all-reduce more).

Example (every rank):
    >>> planned = plan_save(target, components, topology, CheckpointOptions(), saver=None, cache=PlanCache(),
    ...                     checks=lambda ballot: None)                                    # doctest: +SKIP
    >>> commit_save(target, components, topology, planned, step=5, metadata={})          # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_sharing._faults import fault_point
from lightning_sharing.checkpoint.manifest import MAX_MANIFEST_BYTES, FileEntry
from lightning_sharing.core.declarations import StateComponent
from lightning_sharing.core.options import CheckpointOptions
from lightning_sharing.core.patterns import ValidationLevel
from lightning_sharing.core.rules import Placement, placements
from lightning_sharing.core.topology import Topology
from lightning_sharing.distributed.async_save import BackgroundSaver
from lightning_sharing.distributed.collectives import (
    Ballot,
    get_rank,
    report_size,
    settle_on_rank_zero,
    warn_on_rank_zero,
)
from lightning_sharing.distributed.validation import (
    check_replication,
    combined_digest,
    mismatch_error,
    references,
    replicated_view,
    replication_digests,
)
from lightning_sharing.engine.commit import (
    CheckpointTarget,
    check_visible,
    root_field,
    set_root,
    shared_root,
    staged,
)
from lightning_sharing.engine.component_errors import with_context
from lightning_sharing.engine.copy_format import CopyFormat, CopyPlan, WrittenCopy, write_file
from lightning_sharing.engine.formats import format_for
from lightning_sharing.engine.incremental import IncrementalSave
from lightning_sharing.engine.manifest_builder import build_manifest
from lightning_sharing.engine.plan_cache import PlanCache
from lightning_sharing.engine.staging import optimizer_owned
from lightning_sharing.errors import CheckpointError
from lightning_sharing.storage import CheckpointStore, is_url

__all__ = ["PlannedCopy", "PlannedSave", "commit_save", "display", "plan_save"]

log = logging.getLogger(__name__)


@dataclass
class PlannedCopy:
    """One copy of a component this rank writes part of: the component, its copy format and this rank's plan."""

    component: StateComponent
    format: CopyFormat
    plan: CopyPlan

    def tensors(self) -> list[torch.Tensor]:
        """The tensors this rank writes of the copy (staged ones, after a background save's copy)."""
        return [t for job in self.plan.jobs for t in (job.tensors or {}).values()]


def display(target: str) -> Any:
    """A checkpoint location as messages show it: a ``Path`` for a local one, the URL itself otherwise."""
    return Path(target) if not is_url(target) else target


# ---------------------------------------------------------------------------------------------------- 1. plan
@dataclass
class PlannedSave:
    """What the agreement step decided: this rank's planned copies, the write root when it was begun (a synchronous
    save), and the capacity of the commit's gather (None: agree on it after writing, the plan being new)."""

    copies: list[PlannedCopy]
    write_root: str | None
    capacity: int | None
    incremental: IncrementalSave | None = None

    def tensors(self) -> list[torch.Tensor]:
        """The tensors this rank writes (staged ones, after a background save's copy)."""
        return [t for copy in self.copies for t in copy.tensors()]


_PREPARING = "preparing the checkpoint (collecting, encoding and staging state)"


def plan_save(target: CheckpointTarget, components: Sequence[StateComponent], topology: Topology,
              options: CheckpointOptions, saver: BackgroundSaver | None, cache: PlanCache,
              checks: Callable[[Ballot], None], staging_roots: Sequence[Any] = ()) -> PlannedSave:
    """Collective: collect, validate and encode the state, plan (or reuse the plans of) the files this rank writes,
    stage them (``saver``: training may change the originals meanwhile), begin the write on rank 0 (without a
    saver), all agreed in one step. ``checks(ballot)`` adds the caller's checks first (the declarations and path
    alike on every rank). ``staging_roots``: modules and optimizers whose state reaches the checkpoint through
    other statefuls (background staging copies their tensors late)."""
    rank = get_rank()
    ballot = Ballot(_PREPARING)
    checks(ballot)
    replicas = ballot.hashed()  # reserved on every rank, whatever it declared: the ballot's layout must match
    root = root_field(ballot, None, target.target)
    capacity, new_plan = ballot.maximum(), ballot.maximum()
    cache.begin(topology)
    states: dict[str, Any] = {}
    validated = [c for c in components if c.effective_validation is not ValidationLevel.NONE]
    folded = [c for c in validated if _foldable(c, topology)]
    collecting = _Attempt(lambda: states.update(_collect_states(components, topology, rank)))
    if validated:
        ballot.record("collecting state dicts", collecting.error)
    digests = {c.key: _digest(ballot, c, states, topology) for c in folded}
    replicas.set([combined_digest(digests[c.key]) if digests[c.key] is not None else None for c in folded])
    incremental = _Incremental()
    planned: list[PlannedCopy] = ballot.run(_PREPARING, lambda: _plan(
        target, components, topology, rank, options, saver, cache, states, collecting, staging_roots, incremental)
    ) or []
    begun = ballot.run(f"preparing to write {target.target}", target.begin if saver is None and rank == 0 else None)
    set_root(root, begun, target.target)
    if ballot.ok:
        reused = not cache.stats["planned"] and cache.report_size is not None
        new_plan.set(0 if reused else 1)
        capacity.set(cache.report_size + cache.report_size // 8 + 256 if reused and rank != 0 else 0)
    try:
        ballot.agree()
        for component in validated:  # those a hash cannot settle: FULL, several group instances (declared alike now)
            if component not in folded:
                _check(component, states, topology)
    except BaseException:
        if begun is not None:
            target.abort(begun)
        raise
    cache.end()
    return PlannedSave(planned, shared_root(root, target.target), None if new_plan.value else capacity.value,
                       incremental.save)


def _foldable(component: StateComponent, topology: Topology) -> bool:
    """Validated by one hash in the agreement step: below ``FULL``, every rank compared with one writer."""
    return component.effective_validation is not ValidationLevel.FULL and len(_placements(component, topology)) == 1


def _digest(ballot: Ballot, component: StateComponent, states: dict[str, Any], topology: Topology
            ) -> dict[str, str] | None:
    """This rank's digests of a folded validated component (a phase of ``ballot``), and the item naming a mismatch."""
    key, level = component.key, component.effective_validation
    fmt = format_for(component.sharing_pattern)
    digests = ballot.run(f"replication check of component {key!r}", lambda: replication_digests(
        key, replicated_view(component.stateful, states[key]), level, dtensors=fmt.holds_dtensors)[0])
    copies = _placements(component, topology)
    refs = references(topology.world_size, copies[0].writer, [p.readers for p in copies])
    ballot.judge(f"replicas of {key!r}", lambda: digests, lambda per_rank: mismatch_error(
        key, level, refs, per_rank, component.sharing_pattern.name))
    return digests


def _check(component: StateComponent, states: dict[str, Any], topology: Topology) -> None:
    copies = _placements(component, topology)
    check_replication(component.key, replicated_view(component.stateful, states[component.key]),
                      component.effective_validation, writer=copies[0].writer,
                      dtensors=format_for(component.sharing_pattern).holds_dtensors,
                      instances=[p.readers for p in copies], pattern=component.sharing_pattern.name)


@dataclass
class _Incremental:
    """An incremental save's state on this rank, once ``_plan`` made it (inside the agreement step)."""

    save: IncrementalSave | None = None


def _plan(target: CheckpointTarget, components: Sequence[StateComponent], topology: Topology, rank: int,
          options: CheckpointOptions, saver: BackgroundSaver | None, cache: PlanCache, states: dict[str, Any],
          collecting: _Attempt, staging_roots: Sequence[Any], incremental: _Incremental) -> list[PlannedCopy]:
    collecting.reraise()
    planned: list[PlannedCopy] = []
    if options.incremental and any(rank in p.writers for c in components for p in _placements(c, topology)):
        incremental.save = IncrementalSave(cache.incremental, target.store, target.target)
    step = incremental.save
    for component in components:
        fmt = format_for(component.sharing_pattern)
        for placement in _placements(component, topology):
            if rank in placement.writers:
                # Tensors seen unchanged get files of their own only where no other rank must plan alike (its version
                # counters may differ: DDP's buffer broadcast bumps them on every rank but the first).
                observed = len(placement.writers) == 1 or not fmt.shared_layout
                groups = step.grouping(component, placement.stem, observed) if step is not None else None
                plan = with_context(component.key, "encoding", lambda c=component, p=placement, f=fmt, g=groups:
                                    cache.plan(f, c.key, p, states[c.key], rank, options, g))
                if step is not None:
                    step.mark(component.key, plan, fmt)
                planned.append(PlannedCopy(component, fmt, plan))
    if saver is not None:  # copy what this rank writes: training may change the originals meanwhile
        owned = optimizer_owned(components, staging_roots) if saver.background_staging else None
        for copy in planned:
            for job in copy.plan.jobs:
                if job.tensors is not None:
                    job.tensors = saver.stage(job.tensors, owned)
    return planned


def _placements(component: StateComponent, topology: Topology) -> tuple[Placement, ...]:
    return placements(component.key, component.sharing_pattern, topology, component.process_group_name)


def _collect_states(components: Sequence[StateComponent], topology: Topology, rank: int) -> dict[str, Any]:
    states: dict[str, Any] = {}
    for component in components:
        writes = any(rank in p.writers for p in _placements(component, topology))
        if writes or component.effective_validation is not ValidationLevel.NONE:
            states[component.key] = with_context(component.key, "state_dict()", component.stateful.state_dict)
            _warn_if_empty(component, states[component.key])
    return states


class _Attempt:
    """Run ``work`` now; keep its exception, to raise inside a later agreement step."""

    def __init__(self, work: Callable[[], Any]) -> None:
        self.error: Exception | None = None
        try:
            work()
        except Exception as exc:  # re-raised by reraise() inside an agreement step
            self.error = exc

    def reraise(self) -> None:
        if self.error is not None:
            raise self.error


_WARNED_EMPTY: set[tuple[str, int]] = set()


def _warn_if_empty(component: StateComponent, state: Any) -> None:
    """A declared stateful that saves nothing is almost always a mistake: say so once per component."""
    if state is not None and not (isinstance(state, dict) and not state):
        return
    marker = (component.key, id(component.stateful))
    if marker in _WARNED_EMPTY:
        return
    _WARNED_EMPTY.add(marker)
    warn_on_rank_zero(log, "component %r: %s.state_dict() returned %r, so nothing of it is saved; return its state "
                           "from state_dict() (a torchmetrics Metric: declare it directly or as MetricState(metric))",
                           component.key, type(component.stateful).__name__, state)


# ------------------------------------------------------------------------------- 2. write, 3. agree and commit
_WRITING = "writing checkpoint files"


def commit_save(target: CheckpointTarget, components: Sequence[StateComponent], topology: Topology,
                planned: PlannedSave, step: int | None, metadata: dict[str, Any] | None, group: Any = None) -> int:
    """Collective: write this rank's planned files, send what it wrote to rank 0, which commits; every rank hears the
    outcome. Begins the write first when ``planned`` has no write root (a background save). Returns the size of this
    rank's report (the next save's capacity).

    ``group`` spans every rank (a background saver's own group; None: the default group).
    """
    rank = get_rank()
    store = target.store
    shown = display(target.target)
    with staged(target, f"preparing to write {target.target}", group, location=target.target,
                write_root=planned.write_root) as write_root:
        written: list[WrittenCopy] = []
        error: Exception | None = None
        try:
            written = _write(store, write_root, planned.copies, rank)
        except Exception as exc:  # every rank raises it, as a failure of the write, in the commit step below
            error = exc
        size = report_size(written, error)
        capacity = planned.capacity
        if capacity is None:  # a new plan: the reports' size is agreed first
            ballot = Ballot(_WRITING, group)
            ballot.record(_WRITING, error)
            largest = ballot.maximum(size if rank != 0 else 0)
            ballot.agree()
            capacity = largest.value

        def commit(reports: list[list[WrittenCopy]]) -> None:
            copies = [copy for per_rank in reports for copy in per_rank]
            _commit(target, write_root, components, topology, copies, step, metadata)

        settle_on_rank_zero(_WRITING, error, written, f"committing checkpoint {shown}", commit, capacity=capacity,
                            group=group)
    if planned.incremental is not None:  # committed: what the next incremental save compares with
        planned.incremental.remember(written)
    return size


def _write(store: CheckpointStore, write_root: str, planned: list[PlannedCopy], rank: int) -> list[WrittenCopy]:
    """Write this rank's files, all durable when it returns (one ``store.write_batch()``: a local store starts
    each file's write-back when it is closed and fsyncs them together at the end, so a failing fsync fails this
    step, on every rank, before anything is committed)."""
    written: list[WrittenCopy] = []
    store.check_write_root(write_root, rank)
    fault_point("save:start")
    with store.write_batch():
        for copy in planned:
            written.append(with_context(copy.component.key, "writing",
                                        lambda c=copy: c.format.write(store, write_root, c.plan, rank)))
    fault_point("save:written")
    return written


def _commit(target: CheckpointTarget, write_root: str, components: Sequence[StateComponent], topology: Topology,
            copies: list[WrittenCopy], step: int | None, metadata: dict[str, Any] | None) -> None:
    """Rank 0: check what every rank wrote, add each format's merged files, write the manifest last, commit."""
    store = target.store
    check_visible(store, write_root, copies)
    extra: dict[str, list[FileEntry]] = {}
    with store.write_batch():  # durable before the manifest that lists them is written
        for component in components:
            mine = [copy for copy in copies if copy.key == component.key]
            for job in format_for(component.sharing_pattern).merge(component, mine):
                extra.setdefault(component.key, []).append(write_file(store, write_root, job, rank=0))
    manifest = build_manifest(list(components), topology, copies, extra, step, metadata)
    manifest.data_prefix = store.data_prefix(write_root, target.target)  # an object store's generation, else None
    text = manifest.dumps().encode("utf-8")  # fails here, before anything is committed, if metadata is not JSON
    if len(text) > MAX_MANIFEST_BYTES:  # a load would refuse it: never commit a checkpoint that cannot load
        raise CheckpointError(f"the manifest would be {len(text)} bytes, over the {MAX_MANIFEST_BYTES}-byte limit a "
                              "load accepts; keep the metadata passed to save_checkpoint small")
    target.commit(write_root, text)
