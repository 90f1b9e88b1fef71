"""A save, top to bottom: plan -> write -> agree -> commit.

1. **plan** (``plan_save``, every rank, in the caller's thread): collect ``state_dict()`` of what this rank writes
   or validates; prove validated components identical across ranks; have each component's copy format plan the
   files this rank writes (``CopyFormat.plan``): one agreement step covers it all (one more before validation).
   With a ``BackgroundSaver`` the planned tensors are copied here (staged), and the rest runs on its thread.
2. **write** (``commit_save``, every rank): rank 0 begins the save (``staged``: the store's write root); every
   rank writes its files in one ``store.write_batch()`` inside an agreement step (``CopyFormat.write``).
3. **agree**: the ranks' ``WrittenCopy`` records are gathered.
4. **commit** (rank 0, inside an agreement step): every file visible (``check_visible``), each format's merged
   files (``CopyFormat.merge``: indexes), the manifest (``build_manifest``), then ``store.commit`` writes it last.
   A failure anywhere aborts the save on rank 0, and the previous checkpoint is untouched.

Example (every rank):
    >>> planned = plan_save(components, topology, get_rank(), CheckpointOptions(), saver=None)   # doctest: +SKIP
    >>> commit_save(CheckpointTarget(store, target, token), components, topology, planned,
    ...             step=5, metadata={})                                                         # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_sharing._faults import fault_point
from lightning_sharing.checkpoint.manifest import FileEntry
from lightning_sharing.core.declarations import StateComponent
from lightning_sharing.core.options import CheckpointOptions
from lightning_sharing.core.patterns import ValidationLevel
from lightning_sharing.core.rules import Placement, placements
from lightning_sharing.core.topology import Topology
from lightning_sharing.distributed.async_save import BackgroundSaver
from lightning_sharing.distributed.collectives import agreement, all_gather_object, get_rank, warn_on_rank_zero
from lightning_sharing.distributed.validation import check_replication, replicated_view
from lightning_sharing.engine.commit import CheckpointTarget, check_visible, staged
from lightning_sharing.engine.component_errors import with_context
from lightning_sharing.engine.copy_format import CopyFormat, CopyPlan, WrittenCopy, write_file
from lightning_sharing.engine.formats import format_for
from lightning_sharing.engine.manifest_builder import build_manifest
from lightning_sharing.engine.staging import optimizer_owned
from lightning_sharing.storage import CheckpointStore, is_url

__all__ = ["PlannedCopy", "commit_save", "display", "plan_save"]

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
def plan_save(components: Sequence[StateComponent], topology: Topology, rank: int, options: CheckpointOptions,
              saver: BackgroundSaver | None, staging_roots: Sequence[Any] = ()) -> list[PlannedCopy]:
    """Collective: collect, validate and encode the state and plan the files this rank writes; stage them
    (``saver``) so that training may change the originals meanwhile. ``staging_roots``: modules and optimizers
    whose state reaches the checkpoint through other statefuls (background staging copies their tensors late)."""
    planned: list[PlannedCopy] = []
    states: dict[str, Any] = {}
    validated = [c for c in components if c.effective_validation is not ValidationLevel.NONE]
    collecting = _Attempt(lambda: states.update(_collect_states(components, topology, rank)))
    if validated:
        with agreement("collecting state dicts"):
            collecting.reraise()
        for component in validated:
            copies = _placements(component, topology)
            check_replication(component.key, replicated_view(component.stateful, states[component.key]),
                              component.effective_validation, writer=copies[0].writer,
                              dtensors=format_for(component.sharing_pattern).holds_dtensors,
                              instances=[p.readers for p in copies], pattern=component.sharing_pattern.name)
    with agreement("preparing the checkpoint (collecting, encoding and staging state)"):
        collecting.reraise()
        for component in components:
            fmt = format_for(component.sharing_pattern)
            for placement in _placements(component, topology):
                if rank in placement.writers:
                    plan = with_context(component.key, "encoding", lambda c=component, p=placement, f=fmt:
                                        f.plan(c.key, p, states[c.key], rank, options))
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


# ------------------------------------------------------------------------------- 2. write, 3. agree, 4. commit
def commit_save(target: CheckpointTarget, components: Sequence[StateComponent], topology: Topology,
                planned: list[PlannedCopy], step: int | None, metadata: dict[str, Any] | None,
                group: Any = None) -> None:
    """Collective: write this rank's planned files, gather what every rank wrote, and commit on rank 0.

    ``group`` spans every rank (a background saver's own group; None: the default group).
    """
    rank = get_rank()
    store = target.store
    with staged(target, f"preparing to write {target.target}", group) as write_root:
        written = _write(store, write_root, planned, rank, group)
        copies = [copy for per_rank in all_gather_object(written, group) for copy in per_rank]
        with agreement(f"committing checkpoint {display(target.target)}", group):
            if rank == 0:
                _commit(target, write_root, components, topology, copies, step, metadata)


def _write(store: CheckpointStore, write_root: str, planned: list[PlannedCopy], rank: int,
           group: Any) -> list[WrittenCopy]:
    """Write this rank's files, all durable when it returns (one ``store.write_batch()``: a local store starts
    each file's write-back when it is closed and fsyncs them together at the end, so a failing fsync fails this
    step, on every rank, before anything is committed)."""
    written: list[WrittenCopy] = []
    with agreement("writing checkpoint files", group):
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
    text = manifest.dumps()  # fails here, before anything is committed, if metadata is not JSON
    target.commit(write_root, text.encode("utf-8"))
