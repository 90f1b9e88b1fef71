"""``CheckpointCoordinator``: save and load declared state from exactly the right ranks.

Saving runs plan -> validate -> write -> agree -> commit; loading runs read manifest -> apply the
loading rules -> verify files -> load. Files go through the ``CheckpointStore`` that holds the path.
Every step that can fail on one rank runs inside an agreement step, so a failure anywhere becomes an
error everywhere instead of a hang.

Example (run on every rank, e.g. under ``torchrun``):
    >>> coordinator = CheckpointCoordinator([
    ...     StateComponent("model", model, SharingPattern.REPLICATED, validate_replication=True),
    ...     StateComponent("optimizer", optimizer, SharingPattern.REPLICATED),
    ...     StateComponent("rng", RNGState(), SharingPattern.PER_RANK),
    ... ])                                                            # doctest: +SKIP
    >>> coordinator.save_checkpoint("checkpoints/step=100.ckpt")     # doctest: +SKIP
    >>> coordinator.load_checkpoint("checkpoints/step=100.ckpt")     # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any, TypeVar

from lightning_sharing.checkpoint.manifest import data_root, read_manifest
from lightning_sharing.core.declarations import StateComponent, check_unique_keys
from lightning_sharing.core.options import CheckpointOptions, VerifyMode
from lightning_sharing.core.patterns import ValidationLevel
from lightning_sharing.core.rules import Placement, placement_for_reader, placements, rule
from lightning_sharing.core.topology import Topology
from lightning_sharing.distributed.async_save import BackgroundSaver
from lightning_sharing.distributed.collectives import (
    agreement,
    all_gather_object,
    gather_topology,
    get_rank,
    may_run_in_background,
    on_rank_zero,
    resolve_process_groups,
)
from lightning_sharing.distributed.validation import check_replication, replicated_view
from lightning_sharing.engine.chunked_reader import ChunkedLoad, check_taken, prepare_chunked_load
from lightning_sharing.engine.commit import WrittenCopy
from lightning_sharing.engine.export import HFExport, export_in_parallel
from lightning_sharing.engine.load_plan import LoadResult, check_listed_files, plan_load
from lightning_sharing.engine.reader import load_component
from lightning_sharing.engine.save_plan import CopyPlan, plan_chunked_copy, plan_copy
from lightning_sharing.engine.save_steps import Plans, commit_files, with_context, write_files
from lightning_sharing.engine.staging import optimizer_owned
from lightning_sharing.errors import CheckpointError, ComponentDeclarationError
from lightning_sharing.format.codec import encode_state
from lightning_sharing.storage import CheckpointStore, is_url, store_for

__all__ = ["CheckpointCoordinator", "LoadResult"]

log = logging.getLogger(__name__)

PathT = TypeVar("PathT", str, os.PathLike)


class CheckpointCoordinator:
    """Saves and loads a set of ``StateComponent``s according to their sharing patterns.

    Args:
        components: the declared state; keys must be unique.
        process_groups: ``{name: ProcessGroup}`` with the group *this rank* belongs to for each
            name, or a ``DeviceMesh`` whose dimension names become group names.
        options: a ``CheckpointOptions``; the keyword arguments below override its fields.
        max_shard_size: the largest safetensors shard, in bytes.
        verify: ``"checksum"`` (default) checks every file read against the manifest's checksum;
            ``"size"`` only compares sizes, for very large checkpoints on trusted storage.
        async_save: ``True`` makes ``save_checkpoint`` return once the state is staged (copied),
            writing and committing it on a background thread; pass a ``BackgroundSaver`` to share
            one (and its memory bound) between coordinators. The next save, a load and ``wait()``
            wait for a pending save and raise its failure on every rank.
        storage_options: passed to the object-store backend of a URL path (credentials, endpoint).

    Both ``save_checkpoint`` and ``load_checkpoint`` are collective: every rank must call them.
    """

    def __init__(
        self,
        components: Iterable[StateComponent],
        process_groups: Any = None,
        *,
        options: CheckpointOptions | None = None,
        max_shard_size: int | None = None,
        verify: VerifyMode | str | None = None,
        async_save: bool | BackgroundSaver | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.components = check_unique_keys(components)
        self.process_groups = resolve_process_groups(process_groups)
        for component in self.components:
            name = component.process_group_name
            if name is not None and name not in self.process_groups:
                known = ", ".join(sorted(self.process_groups)) or "none were passed"
                raise ComponentDeclarationError(
                    f"component {component.key!r} uses process group {name!r}, which no one provided "
                    f"(process_groups: {known}); pass it in process_groups or as a DeviceMesh dimension"
                )
        saver = async_save if isinstance(async_save, BackgroundSaver) else None
        if async_save is not None and saver is None and not isinstance(async_save, bool):
            raise ComponentDeclarationError(f"async_save must be a bool or a BackgroundSaver, got {async_save!r}")
        overrides = {name: value for name, value in (("max_shard_size", max_shard_size), ("verify", verify),
                                                     ("async_save", saver is not None or async_save))
                     if value is not None}
        self.options = (options or CheckpointOptions()).replace(**overrides)
        self.storage_options = storage_options
        self._topology: Topology | None = None
        if saver is None and self.options.async_save:
            saver = BackgroundSaver(self.options.max_pending_saves,
                                    background_staging=self.options.background_staging)
        self._saver = saver
        #: Modules and optimizers whose parameters and state reach the checkpoint through other statefuls
        #: (Lightning's checkpoint dict): background staging copies their tensors late, as those of the components.
        self.staging_roots: list[Any] = []

    @property
    def max_shard_size(self) -> int:
        """The largest safetensors shard, in bytes."""
        return self.options.max_shard_size

    @property
    def verify(self) -> VerifyMode:
        """How files are checked on load."""
        return self.options.verify

    # ------------------------------------------------------------------ shared steps
    def _declaration(self) -> list[tuple[str, str, str | None, str]]:
        return [(c.key, c.sharing_pattern.value, c.process_group_name, c.effective_validation.value)
                for c in self.components]

    def _prepare(self, extra: Any = None) -> tuple[Topology, list[Any]]:
        """Collective: gather the topology once and check that every rank declared the same state.

        ``extra`` rides along in the same exchange; every rank's ``extra`` is returned, by rank.
        """
        if self._topology is None:
            self._topology = gather_topology(self.process_groups)
        gathered = all_gather_object((self._declaration(), extra), phase="comparing declarations")
        declarations = [declaration for declaration, _ in gathered]
        for rank, declaration in enumerate(declarations):
            if declaration != declarations[0]:
                raise ComponentDeclarationError(
                    f"rank {rank} declared components {declaration} but rank 0 declared "
                    f"{declarations[0]}; every rank must declare the same keys, patterns and groups"
                )
        return self._topology, [item for _, item in gathered]

    def _placements(self, component: StateComponent, topology: Topology) -> tuple[Placement, ...]:
        return placements(component.key, component.sharing_pattern, topology, component.process_group_name)

    @property
    def topology(self) -> Topology | None:
        """The topology gathered at the first save or load (None before that)."""
        return self._topology

    # ------------------------------------------------------------------ save
    def save_checkpoint(self, path: PathT, *, step: int | None = None, metadata: dict[str, Any] | None = None,
                        export_hf: HFExport | str | os.PathLike[str] | None = None) -> PathT:
        """Collective: write a complete checkpoint directory at ``path`` atomically; returns ``path``.

        ``step`` is recorded in the manifest (``find_latest_checkpoint`` orders by it) and
        ``metadata`` (JSON-serialisable) is stored with it. An existing checkpoint at ``path`` is
        replaced only once the new one is complete. With ``async_save``, this returns once the state
        is staged; ``wait()`` returns once it is committed.

        ``export_hf`` (a directory, or an ``HFExport`` naming the component, dtype and shard size)
        also writes the component's full tensors there as Hugging Face sharded safetensors once the
        checkpoint is committed, every rank writing its share of the files (torchtitan's
        ``last_save_in_hf``, for the last save of a run).

        Example:
            >>> coordinator.save_checkpoint("ckpt/step=1000.ckpt", step=1000,
            ...                             export_hf=HFExport("hf/final", dtype="bfloat16"))  # doctest: +SKIP
        """
        started = time.perf_counter()
        export = HFExport.of(export_hf, [c.key for c in self.components])
        saver = self._saver if self._saver is not None and may_run_in_background() else None
        if saver is not None:
            saver.make_room()  # raises a failed earlier save's error, on every rank
        store = store_for(path, self.storage_options)
        target = store.normalize(os.fspath(path))
        exported = None if export is None else (os.fspath(export.path), export.component, str(export.dtype),
                                                 export.max_shard_size)
        topology, proposals = self._prepare(extra=(target, uuid.uuid4().hex, exported))
        if len({(proposed, export_of) for proposed, _, export_of in proposals}) > 1:
            raise ComponentDeclarationError(
                f"ranks passed different checkpoint paths or exports: {[(t, e) for t, _, e in proposals]}")
        token = proposals[0][1]  # rank 0's
        group = saver.group() if saver is not None else None
        plans = self._plan_files(topology, get_rank(), saver)

        def finish() -> None:
            self._finish_save(store, target, token, plans, topology, step, metadata, group, started, export)

        if saver is None:
            finish()
        else:
            saver.submit(_display(target), finish, [t for _, plan in plans for job in plan.jobs
                                                    for t in (job.tensors or {}).values()])
            log.info("staged checkpoint %s in %.2fs; writing it in the background", target,
                     time.perf_counter() - started)
        return path

    def wait(self) -> None:
        """Block until this coordinator's pending asynchronous saves are committed; raise a failure.

        Every rank gets the same outcome. A no-op without ``async_save``.
        """
        if self._saver is not None:
            self._saver.wait()

    def _collect_states(self, topology: Topology, rank: int) -> dict[str, Any]:
        states: dict[str, Any] = {}
        for component in self.components:
            writes = any(rank in p.writers for p in self._placements(component, topology))
            if writes or component.effective_validation is not ValidationLevel.NONE:
                states[component.key] = with_context(component.key, "state_dict()", component.stateful.state_dict)
                _warn_if_empty(component, states[component.key])
        return states

    def _plan_files(self, topology: Topology, rank: int, saver: BackgroundSaver | None) -> Plans:
        """Collect, validate and encode the state, decide which files this rank writes, and (async) stage them.

        One agreement step covers it all, plus one more before validation when a component is validated.
        """
        plans: Plans = []
        states: dict[str, Any] = {}
        validated = [c for c in self.components if c.effective_validation is not ValidationLevel.NONE]
        collecting = _Attempt(lambda: states.update(self._collect_states(topology, rank)))
        if validated:
            with agreement("collecting state dicts"):
                collecting.reraise()
            for component in validated:
                copies = self._placements(component, topology)
                check_replication(component.key, replicated_view(component.stateful, states[component.key]),
                                  component.effective_validation, writer=copies[0].writer,
                                  dtensors=rule(component.sharing_pattern).chunks is not None,
                                  instances=[p.readers for p in copies], pattern=component.sharing_pattern.name)
        with agreement("preparing the checkpoint (collecting, encoding and staging state)"):
            collecting.reraise()
            for component in self.components:
                for placement in self._placements(component, topology):
                    if rank in placement.writers:
                        plan = with_context(component.key, "encoding", lambda c=component, p=placement:
                                            self._plan_copy(c, p, states[c.key], rank))
                        plans.append((component.key, plan))
            if saver is not None:  # copy what this rank writes: training may change the originals meanwhile
                owned = optimizer_owned(self.components, self.staging_roots) if saver.background_staging else None
                for _, plan in plans:
                    for job in plan.jobs:
                        if job.tensors is not None:
                            job.tensors = saver.stage(job.tensors, owned)
        return plans

    def _plan_copy(self, component: StateComponent, placement: Placement, state: Any, rank: int) -> CopyPlan:
        """The files of one copy this rank writes: whole-tensor shards, or chunks where the rule says so."""
        chunks = rule(component.sharing_pattern).chunks
        encoded = encode_state(state, component.key, dtensors=chunks is not None)
        if chunks is not None:
            return plan_chunked_copy(component.key, placement, encoded, chunks, rank)
        return plan_copy(placement.stem, encoded, placement.writers, placement.writer, rank, self.max_shard_size)

    def _finish_save(self, store: CheckpointStore, target: str, token: str, plans: Plans, topology: Topology,
                     step: int | None, metadata: dict[str, Any] | None, group: Any, started: float,
                     export: HFExport | None = None) -> None:
        """Write this rank's files, agree, and commit on rank 0 (in the background for async saves)."""
        rank = get_rank()
        write_root: str | None = None
        committed = False
        try:
            write_root = on_rank_zero(f"preparing to write {target}", lambda: store.begin_save(target, token), group)
            written = write_files(store, write_root, plans, rank, group)
            all_written: list[list[WrittenCopy]] = all_gather_object(written, group)
            with agreement(f"committing checkpoint {_display(target)}", group):
                if rank == 0:
                    commit_files(store, self.components, write_root, target, token, topology,
                                 [copy for per_rank in all_written for copy in per_rank], step, metadata)
            committed = True
        finally:
            if not committed and rank == 0 and write_root is not None:
                store.abort(write_root, target)
        log.info("saved checkpoint %s in %.2fs", target, time.perf_counter() - started)
        if export is not None:
            export_in_parallel(store, target, export, group)
            log.info("exported component %r of %s to %s", export.component, target, export.path)

    # ------------------------------------------------------------------ load
    def load_checkpoint(self, path: str | os.PathLike[str], strict: bool = True, *,
                        verify: VerifyMode | str | None = None, ignore: Collection[str] = ()) -> LoadResult:
        """Collective: load every declared component this rank reads from the checkpoint at ``path``.

        ``strict=True`` refuses missing required components, undeclared saved components, changed
        patterns and topology changes for rank-specific state; ``strict=False`` skips them and
        reports them in the returned ``LoadResult.skipped``. Files are verified against the
        manifest before they are read (``verify="checksum"`` or ``"size"``). ``ignore`` names saved
        components the caller leaves out on purpose (say, all but the model): not read, not refused,
        not reported.
        """
        mode = VerifyMode.parse(verify) if verify is not None else self.verify
        self.wait()  # a pending save of this very checkpoint must be complete before it is read
        topology, _ = self._prepare()
        rank = get_rank()
        store = store_for(path, self.storage_options)
        root = store.normalize(os.fspath(path))
        result = LoadResult(path=Path(os.fspath(path)) if not is_url(path) else os.fspath(path))
        to_load = []
        files_root = root
        chunked: dict[str, ChunkedLoad] = {}
        with agreement(f"reading checkpoint {os.fspath(path)}"):
            manifest = read_manifest(store, root, display=os.fspath(path))
            files_root = data_root(store, root, manifest)
            check_listed_files(store, files_root, manifest)
            plan = plan_load(manifest, self.components, topology, strict, ignore)
            to_load, result.skipped, result.manifest = plan.to_load, plan.skipped, manifest
            saved_topology = Topology.from_json(manifest.topology)
            for component, saved in to_load:
                if rule(component.sharing_pattern).chunks is not None:  # matched to the live state before reading
                    chunked[component.key] = with_context(
                        component.key, "planning the load", lambda c=component, s=saved: prepare_chunked_load(
                            store, files_root, c, s, saved_topology, topology, strict, mode))
        held = {key: load.held for key, load in chunked.items() if load.entries}
        identities = all_gather_object((root, result.manifest.created_at if result.manifest else "", held))
        if len({(p, c) for p, c, _ in identities}) > 1:
            listing = "; ".join(f"rank {r}: {p} (saved {c})" for r, (p, c, _) in enumerate(identities))
            raise CheckpointError(
                f"ranks are loading different checkpoints ({listing}); every rank must load the same one "
                "(choose it on rank 0 and broadcast it, or pass the same path everywhere)"
            )
        for key, reason in result.skipped.items():
            log.warning("checkpoint %s: skipped component %r (%s)", os.fspath(path), key, reason)
        with agreement(f"loading checkpoint {os.fspath(path)}"):
            for key in held:  # every rank reaches the same verdict from the same exchange
                check_taken(key, chunked[key], [h[key] for _, _, h in identities], strict, os.fspath(path))
            for component, saved in to_load:
                if component.key in chunked:
                    with_context(component.key, "loading",
                                 lambda c=component: chunked[c.key].finish(store, files_root))
                else:
                    placement = placement_for_reader(self._placements(component, topology), rank)
                    with_context(component.key, "loading", lambda c=component, s=saved, p=placement:
                                 load_component(store, files_root, c, s, p, mode))
                result.loaded.append(component.key)
        return result


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


def _display(target: str) -> Any:
    return Path(target) if not is_url(target) else target


_WARNED_EMPTY: set[tuple[str, int]] = set()


def _warn_if_empty(component: StateComponent, state: Any) -> None:
    """A declared stateful that saves nothing is almost always a mistake: say so once per component."""
    if state is not None and not (isinstance(state, dict) and not state):
        return
    marker = (component.key, id(component.stateful))
    if marker in _WARNED_EMPTY:
        return
    _WARNED_EMPTY.add(marker)
    log.warning("component %r: %s.state_dict() returned %r, so nothing of it is saved; return its state from "
                "state_dict() (a torchmetrics Metric: declare it directly or as MetricState(metric))",
                component.key, type(component.stateful).__name__, state)
