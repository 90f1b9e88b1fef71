"""``CheckpointCoordinator``: save and load declared state from exactly the right ranks.

Saving runs plan -> validate -> write -> agree -> commit; loading runs read manifest -> apply the
loading rules -> verify files -> load. Every step that can fail on one rank ends in an agreement
collective, so a failure anywhere becomes an error everywhere instead of a hang.

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
import shutil
import time
import uuid
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist

from lightning_sharing._faults import fault_point
from lightning_sharing.core.declarations import StateComponent, check_unique_keys
from lightning_sharing.core.rules import Placement, placement_for_reader, placements
from lightning_sharing.core.topology import Topology
from lightning_sharing.distributed.async_save import BackgroundSaver
from lightning_sharing.distributed.collectives import (
    active,
    agree,
    all_gather_object,
    gather_topology,
    get_rank,
    resolve_process_groups,
)
from lightning_sharing.distributed.validation import check_replication, replicated_view
from lightning_sharing.engine.commit import build_manifest, commit_checkpoint
from lightning_sharing.engine.load_plan import LoadResult, check_listed_files, plan_load
from lightning_sharing.engine.reader import load_component
from lightning_sharing.engine.save_plan import CopyPlan, plan_copy, write_copy
from lightning_sharing.errors import (
    CheckpointError,
    ComponentDeclarationError,
    DistributedCheckpointError,
)
from lightning_sharing.format.codec import encode_state
from lightning_sharing.format.layout import DEFAULT_MAX_SHARD_SIZE
from lightning_sharing.format.manifest import CheckpointManifest
from lightning_sharing.storage.local import remove_stale_staging, staging_path

__all__ = ["CheckpointCoordinator", "LoadResult"]

log = logging.getLogger(__name__)

PathT = TypeVar("PathT", str, os.PathLike)
_VERIFY_MODES = ("checksum", "size")


class CheckpointCoordinator:
    """Saves and loads a set of ``StateComponent``s according to their sharing patterns.

    Args:
        components: the declared state; keys must be unique.
        process_groups: ``{name: ProcessGroup}`` with the group *this rank* belongs to for each
            name, or a ``DeviceMesh`` whose dimension names become group names.
        max_shard_size: the largest safetensors shard, in bytes.
        verify: ``"checksum"`` (default) checks every file read against the manifest's checksum;
            ``"size"`` only compares sizes, for very large checkpoints on trusted storage.
        async_save: ``True`` makes ``save_checkpoint`` return once the state is staged (copied),
            writing and committing it on a background thread; pass a ``BackgroundSaver`` to share
            one (and its memory bound) between coordinators. The next save, a load and ``wait()``
            wait for a pending save and raise its failure on every rank.

    Both ``save_checkpoint`` and ``load_checkpoint`` are collective: every rank must call them.
    """

    def __init__(
        self,
        components: Iterable[StateComponent],
        process_groups: Any = None,
        *,
        max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
        verify: str = "checksum",
        async_save: bool | BackgroundSaver = False,
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
        if max_shard_size < 1:
            raise ComponentDeclarationError(f"max_shard_size must be positive, got {max_shard_size}")
        self.max_shard_size = int(max_shard_size)
        self.verify = _check_verify(verify)
        self._topology: Topology | None = None
        if isinstance(async_save, BackgroundSaver):
            self._saver: BackgroundSaver | None = async_save
        elif isinstance(async_save, bool):
            self._saver = BackgroundSaver() if async_save else None
        else:
            raise ComponentDeclarationError(f"async_save must be a bool or a BackgroundSaver, got {async_save!r}")

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
    def save_checkpoint(self, path: PathT, *, step: int | None = None,
                        metadata: dict[str, Any] | None = None) -> PathT:
        """Collective: write a complete checkpoint directory at ``path`` atomically; returns ``path``.

        ``step`` is recorded in the manifest (``find_latest_checkpoint`` orders by it) and
        ``metadata`` (JSON-serialisable) is stored with it. An existing checkpoint at ``path`` is
        replaced only once the new one is complete. With ``async_save``, this returns once the state
        is staged; ``wait()`` returns once it is committed.
        """
        started = time.perf_counter()
        saver = self._saver if self._saver is not None and _may_run_in_background() else None
        if saver is not None:
            saver.make_room()  # raises a failed earlier save's error, on every rank
        _refuse_url(path)
        target = Path(os.path.abspath(os.fspath(path)))
        topology, proposals = self._prepare(extra=(str(target), uuid.uuid4().hex))
        if len({proposed_target for proposed_target, _ in proposals}) > 1:
            raise ComponentDeclarationError(
                f"ranks passed different checkpoint paths: {[t for t, _ in proposals]}")
        token = proposals[0][1]  # rank 0's
        staging = staging_path(target, token)
        group = saver.group() if saver is not None else None
        rank = get_rank()
        plans = self._plan_files(topology, rank, saver)

        def finish() -> None:
            self._finish_save(staging, target, token, plans, topology, step, metadata, group, started)

        if saver is None:
            finish()
        else:
            saver.submit(target, finish, [t for _, plan in plans for job in plan.jobs
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

    def _create_staging(self, staging: Path, rank: int, group: Any) -> None:
        error: BaseException | None = None
        if rank == 0:
            try:
                staging.parent.mkdir(parents=True, exist_ok=True)
                # Saves run one at a time (the background ones in order), so any other staging
                # directory here is a leftover of an interrupted save.
                remove_stale_staging(staging.parent)
                staging.mkdir()
            except Exception as exc:  # made an error on every rank by agree() just below
                error = exc
        agree(error, f"creating the staging directory {staging}", group)

    def _collect_states(self, topology: Topology, rank: int) -> dict[str, Any]:
        states: dict[str, Any] = {}
        for component in self.components:
            writes = any(rank in p.writers for p in self._placements(component, topology))
            if writes or component.effective_validation.value != "none":
                states[component.key] = _with_context(component.key, "state_dict()", component.stateful.state_dict)
                _warn_if_empty(component, states[component.key])
        return states

    def _plan_files(self, topology: Topology, rank: int, saver: BackgroundSaver | None) -> list[tuple[str, CopyPlan]]:
        """Collect, validate and encode the state, decide which files this rank writes, and (async) stage them.

        One agreement step covers it all, plus one more before validation when a component is validated.
        """
        plans: list[tuple[str, CopyPlan]] = []
        error: BaseException | None = None
        states: dict[str, Any] = {}
        validated = [c for c in self.components if c.effective_validation.value != "none"]
        try:
            states = self._collect_states(topology, rank)
        except Exception as exc:  # made an error on every rank by agree() below
            error = exc
        if validated:
            agree(error, "collecting state dicts")
            for component in validated:
                check_replication(component.key, replicated_view(component.stateful, states[component.key]),
                                  component.effective_validation,
                                  writer=self._placements(component, topology)[0].writer)
        try:
            if error is not None:
                raise error
            for component in self.components:
                for placement in self._placements(component, topology):
                    if rank in placement.writers:
                        encoded = _with_context(component.key, "encoding",
                                                lambda c=component: encode_state(states[c.key], c.key))
                        plans.append((component.key, plan_copy(placement.stem, encoded, placement.writers,
                                                               placement.writer, rank, self.max_shard_size)))
            if saver is not None:  # copy what this rank writes: training may change the originals meanwhile
                for _, plan in plans:
                    for job in plan.jobs:
                        if job.tensors is not None:
                            job.tensors = saver.stage(job.tensors)
        except Exception as exc:  # made an error on every rank by agree() just below
            error = exc
        agree(error, "preparing the checkpoint (collecting, encoding and staging state)")
        return plans

    def _finish_save(self, staging: Path, target: Path, token: str, plans: list[tuple[str, CopyPlan]],
                     topology: Topology, step: int | None, metadata: dict[str, Any] | None, group: Any,
                     started: float) -> None:
        """Write this rank's files, agree, and commit on rank 0 (in the background for async saves)."""
        rank = get_rank()
        committed = False
        try:
            self._create_staging(staging, rank, group)
            written = self._write_files(staging, plans, rank, group)
            all_written = all_gather_object(written, group)
            error: BaseException | None = None
            if rank == 0:
                try:
                    manifest = build_manifest(self.components, topology, staging, all_written, step, metadata)
                    commit_checkpoint(staging, target, token, manifest)
                except Exception as exc:  # made an error on every rank by agree() just below
                    error = exc
            agree(error, f"committing checkpoint {target}", group)
            committed = True
        finally:
            if not committed and rank == 0 and staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        log.info("saved checkpoint %s in %.2fs", target, time.perf_counter() - started)

    def _write_files(self, staging: Path, plans: list[tuple[str, CopyPlan]], rank: int,
                     group: Any) -> dict[str, list[dict[str, Any]]]:
        """Write this rank's files; returns ``{key: [copy record, ...]}`` for the manifest."""
        written: dict[str, list[dict[str, Any]]] = {}
        error: BaseException | None = None
        try:
            if not staging.is_dir():
                raise CheckpointError(
                    f"rank {rank} cannot see the staging directory {staging} that rank 0 created: the "
                    "checkpoint directory must be on a filesystem shared by all ranks"
                )
            fault_point("save:start")
            for key, plan in plans:
                entries = _with_context(key, "writing", lambda p=plan: write_copy(staging, p, rank))
                written.setdefault(key, []).append(
                    {"stem": plan.stem, "files": entries, "index": plan.index, "layout": plan.layout_digest,
                     "rank": rank, "shard_writers": plan.shard_writers})
            fault_point("save:written")
        except Exception as exc:  # made an error on every rank by agree() just below
            error = exc
        agree(error, "writing checkpoint files", group)
        return written

    # ------------------------------------------------------------------ load
    def load_checkpoint(self, path: str | os.PathLike[str], strict: bool = True, *,
                        verify: str | None = None, ignore: Collection[str] = ()) -> LoadResult:
        """Collective: load every declared component this rank reads from the checkpoint at ``path``.

        ``strict=True`` refuses missing required components, undeclared saved components, changed
        patterns and topology changes for rank-specific state; ``strict=False`` skips them and
        reports them in the returned ``LoadResult.skipped``. Files are verified against the
        manifest before they are read (``verify="checksum"`` or ``"size"``). ``ignore`` names saved
        components the caller leaves out on purpose (say, all but the model): not read, not refused,
        not reported.
        """
        mode = _check_verify(verify or self.verify)
        self.wait()  # a pending save of this very checkpoint must be complete before it is read
        topology, _ = self._prepare()
        rank = get_rank()
        _refuse_url(path)
        root = Path(os.fspath(path))
        error: BaseException | None = None
        result = LoadResult(path=root)
        to_load = []
        try:
            manifest = CheckpointManifest.load(root)
            check_listed_files(root, manifest)
            plan = plan_load(manifest, self.components, topology, strict, ignore)
            to_load, result.skipped, result.manifest = plan.to_load, plan.skipped, manifest
        except Exception as exc:  # made an error on every rank by agree() just below
            error = exc
        agree(error, f"reading checkpoint {root}")
        identities = all_gather_object((os.path.abspath(root), result.manifest.created_at if result.manifest else ""))
        if len(set(identities)) > 1:
            listing = "; ".join(f"rank {r}: {p} (saved {c})" for r, (p, c) in enumerate(identities))
            raise CheckpointError(
                f"ranks are loading different checkpoints ({listing}); every rank must load the same one "
                "(choose it on rank 0 and broadcast it, or pass the same path everywhere)"
            )
        for key, reason in result.skipped.items():
            log.warning("checkpoint %s: skipped component %r (%s)", root, key, reason)
        error = None
        try:
            for component, saved in to_load:
                _with_context(component.key, "loading",
                              lambda c=component, s=saved: load_component(
                                  root, c, s, placement_for_reader(self._placements(c, topology), rank), mode))
                result.loaded.append(component.key)
        except Exception as exc:  # made an error on every rank by agree() just below
            error = exc
        agree(error, f"loading checkpoint {root}")
        return result

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


def _with_context(key: str, action: str, fn: Any) -> Any:
    """Run ``fn``; re-raise any failure as a ``CheckpointError`` (of the same kind) that names the component."""
    try:
        return fn()
    except DistributedCheckpointError:
        raise
    except CheckpointError as exc:
        if f"component {key!r}" in str(exc):
            raise
        raise type(exc)(f"component {key!r}: {action} failed: {exc}") from exc
    except Exception as exc:
        raise CheckpointError(f"component {key!r}: {action} failed: {type(exc).__name__}: {exc}") from exc


def _may_run_in_background() -> bool:
    # Inside local_only() (a rank-local save on one rank), a background thread would run real
    # collectives that the other ranks never join: such saves stay synchronous.
    return active() or not (dist.is_available() and dist.is_initialized())


def _refuse_url(path: Any) -> None:
    if "://" in os.fspath(path):
        raise ComponentDeclarationError(
            f"{os.fspath(path)!r} is a URL; lightning_sharing writes directories on a filesystem every rank "
            "can see (local or a mounted shared filesystem), so pass a filesystem path"
        )


def _check_verify(mode: str) -> str:
    if mode not in _VERIFY_MODES:
        raise ComponentDeclarationError(f"verify={mode!r} must be one of {_VERIFY_MODES}")
    return mode
