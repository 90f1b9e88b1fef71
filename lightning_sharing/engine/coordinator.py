"""``CheckpointCoordinator``: save and load declared state from exactly the right ranks.

The coordinator holds the declarations and the options; a save runs ``engine/save.py`` (plan -> write -> agree
-> commit), a load ``engine/load.py`` (plan -> read -> verify -> apply), both through the ``CheckpointStore``
that holds the path and each component's copy format. Every step that can fail on one rank runs inside an
agreement step, so a failure anywhere becomes an error everywhere instead of a hang.

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
from collections.abc import Collection, Iterable
from typing import Any, TypeVar

from lightning_sharing.core.declarations import StateComponent, check_unique_keys
from lightning_sharing.core.local_tier import LocalTier
from lightning_sharing.core.options import CheckpointOptions, VerifyMode, checkpoint_options
from lightning_sharing.core.topology import Topology
from lightning_sharing.distributed.async_save import BackgroundSaver
from lightning_sharing.distributed.collectives import (
    Ballot,
    gather_topology,
    judge_equal,
    may_run_in_background,
    resolve_process_groups,
)
from lightning_sharing.engine.commit import CheckpointTarget
from lightning_sharing.engine.export import HFExport, export_in_parallel
from lightning_sharing.engine.load import load_components
from lightning_sharing.engine.load_plan import LoadResult
from lightning_sharing.engine.local_tier import LocalTierRunner, restore_persistent
from lightning_sharing.engine.plan_cache import PlanCache
from lightning_sharing.engine.save import commit_save, display, plan_save
from lightning_sharing.errors import ComponentDeclarationError
from lightning_sharing.storage import store_for

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
        read_once: loads fetch each file every rank reads (GLOBAL, REPLICATED) once, on one rank, and broadcast it;
            ``None`` (auto): on for object-store URLs and multi-node jobs, off for one node on a local disk.
        incremental: a save hard-links (local) or copies server-side (object store) the files whose content equals
            the newest complete checkpoint's in the same directory instead of writing them (``CheckpointOptions``).
        storage_options: passed to the object-store backend of a URL path (credentials, endpoint).
        plan_cache: the ``PlanCache`` of the previous saves' plans and the topology; pass one to share it between
            coordinators made one per save (as the Lightning and Fabric adapters do), so that a repeat save reuses
            the plan and gathers the topology once. Default: a cache of this coordinator's own.
        local_tier: a ``LocalTier``: node-local checkpoints copied to peer nodes, written by ``save_local`` and
            considered by ``restore`` (docs/local_tier.md).

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
        read_once: bool | None = None,
        incremental: bool | None = None,
        storage_options: dict[str, Any] | None = None,
        plan_cache: PlanCache | None = None,
        local_tier: LocalTier | LocalTierRunner | None = None,
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
        self.options = checkpoint_options(options, max_shard_size=max_shard_size, verify=verify,
                                          async_save=saver is not None or async_save, read_once=read_once,
                                          incremental=incremental)
        self.storage_options = storage_options
        self._topology: Topology | None = None
        self._plans = plan_cache if plan_cache is not None else PlanCache()
        if saver is None and self.options.async_save:
            saver = BackgroundSaver.for_options(self.options)
        self._saver = saver
        #: Modules and optimizers whose parameters and state reach the checkpoint through other statefuls
        #: (Lightning's checkpoint dict): background staging copies their tensors late, as those of the components.
        self.staging_roots: list[Any] = []
        if local_tier is not None and not isinstance(local_tier, (LocalTier, LocalTierRunner)):
            raise ComponentDeclarationError(f"local_tier must be a LocalTier, got {type(local_tier).__name__}")
        #: The local tier's runner (it holds the tier's process group: adapters share one between coordinators).
        self.local_tier = LocalTierRunner(local_tier) if isinstance(local_tier, LocalTier) else local_tier

    @property
    def max_shard_size(self) -> int:
        """The largest safetensors shard, in bytes."""
        return self.options.max_shard_size

    @property
    def verify(self) -> VerifyMode:
        """How files are checked on load."""
        return self.options.verify

    @property
    def topology(self) -> Topology | None:
        """The topology gathered at the first save or load (None before that)."""
        return self._topology

    @property
    def plan_stats(self) -> dict[str, int]:
        """This rank's copies planned anew and reused from the previous save's plans, in the last save.

        Example:
            >>> coordinator.save_checkpoint("ckpt/step=2.ckpt"); coordinator.plan_stats   # doctest: +SKIP
            {'planned': 0, 'reused': 3}
        """
        return dict(self._plans.stats)

    def _declaration(self) -> list[tuple[str, str, str | None, str]]:
        return [(c.key, c.sharing_pattern.value, c.process_group_name, c.effective_validation.value)
                for c in self.components]

    def _topology_now(self) -> Topology:
        """Collective the first time (and after the world size or the process groups changed): the job's topology."""
        self._topology = self._plans.topology(self.process_groups, lambda: gather_topology(self.process_groups))
        return self._topology

    def _check_declarations(self, ballot: Ballot) -> None:
        """Add to ``ballot`` the check that every rank declared the same components (by hash; the declarations
        themselves are gathered only when they differ, to name the rank)."""
        ballot.equal(self._declaration(), judge_equal(_declarations_differ), name="declarations")


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
        location = store.normalize(os.fspath(path))
        exported = None if export is None else (os.fspath(export.path), export.component, str(export.dtype),
                                                 export.max_shard_size)
        topology = self._topology_now()
        target = CheckpointTarget(store, location, uuid.uuid4().hex)  # rank 0 begins, commits or aborts: its token
        group = saver.group() if saver is not None else None

        def checks(ballot: Ballot) -> None:
            self._check_declarations(ballot)
            ballot.equal((location, exported), judge_equal(_paths_differ), name="path")

        planned = plan_save(target, self.components, topology, self.options, saver, self._plans, checks,
                            self.staging_roots)

        def finish() -> None:
            """Write, agree and commit (on the saver's thread for a background save), then export."""
            self._plans.report_size = commit_save(target, self.components, topology, planned, step, metadata, group)
            log.info("saved checkpoint %s in %.2fs", location, time.perf_counter() - started)
            if export is not None:
                export_in_parallel(store, location, export, group)
                log.info("exported component %r of %s to %s", export.component, location, export.path)

        if saver is None:
            finish()
        else:
            saver.submit(display(location), finish, planned.tensors())
            log.info("staged checkpoint %s in %.2fs; writing it in the background", location,
                     time.perf_counter() - started)
        return path

    def wait(self) -> None:
        """Block until this coordinator's pending asynchronous saves are committed; raise a failure.

        Every rank gets the same outcome. A no-op without ``async_save``.
        """
        if self._saver is not None:
            self._saver.wait()

    # ------------------------------------------------------------------ local tier
    def save_local(self, step: int) -> None:
        """Collective: save every rank's state of ``step`` into the local tier and copy it to peer nodes.

        Every node writes what its own ranks need to restore (their own state of every component, one copy of the
        GLOBAL and REPLICATED ones) into its directory, atomically, then sends its files to ``replicas`` peer nodes
        over the process group; returns once its files and the replicas it holds are durable. A failure on any rank
        (a full disk) is an error on every rank, and no step is committed half-written. With ``async_save``, it
        returns once the state is staged (copied) and the rest runs on the background saver after the pending saves:
        ``wait()`` (or the next save or load) waits for it and raises its failure on every rank.

        Example:
            >>> tier = LocalTier("/local/ckpt/{node}", replicas=1)                   # doctest: +SKIP
            >>> coordinator = CheckpointCoordinator(components, local_tier=tier)     # doctest: +SKIP
            >>> coordinator.save_local(step=120)                                     # doctest: +SKIP
        """
        if self.local_tier is None:
            raise ComponentDeclarationError("save_local needs a local tier: CheckpointCoordinator(..., "
                                            "local_tier=LocalTier('/local/ckpt/{node}'))")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ComponentDeclarationError(f"save_local(step={step!r}): step must be a non-negative integer")
        started = time.perf_counter()
        saver = self._saver if self._saver is not None and may_run_in_background() else None
        self.local_tier.save_local(step, self.components, self._topology_now(), self._declaration(), saver,
                                   self.staging_roots)
        log.debug("local save of step %d %s in %.2fs", step, "staged" if saver else "done",
                  time.perf_counter() - started)

    def restore(self, directory: str | os.PathLike[str] | None, strict: bool = True) -> int | None:
        """Collective: load the newest state of the local tier and of the persistent checkpoints under
        ``directory``; returns its step (None: nothing to restore).

        The local step chosen is the newest one every node can restore from its own copy or a peer's replica, every
        file verified; it is used when it is at least as new as the newest complete persistent checkpoint (whose
        step is the one ``save_checkpoint(path, step=...)`` recorded), else that checkpoint is loaded as
        ``load_checkpoint(path, strict)`` would. A local checkpoint saved at another topology makes the tier be
        skipped (logged). Without a local tier this loads the newest persistent checkpoint.

        Example:
            >>> step = coordinator.restore("checkpoints")            # doctest: +SKIP
        """
        self.wait()
        def load(path: Any) -> None:
            self.load_checkpoint(path, strict=strict)

        if self.local_tier is None:
            return restore_persistent(directory, load, self.storage_options)
        return self.local_tier.restore(directory, self.components, self._topology_now(), self._declaration(), load,
                                       self.storage_options)

    def restore_local(self, newer_than: int | None = None) -> int | None:
        """Collective: load the newest step of the local tier every rank can get (own copy or a peer's replica),
        not older than ``newer_than``; its step, or None (nothing loaded) when there is none or the tier was saved
        at another topology. ``restore`` is this plus the persistent checkpoints; the Trainer strategies use this
        with the step of the checkpoint ``ckpt_path="last"`` finds."""
        if self.local_tier is None:
            raise ComponentDeclarationError("restore_local needs a local tier: CheckpointCoordinator(..., "
                                            "local_tier=LocalTier('/local/ckpt/{node}'))")
        self.wait()
        return self.local_tier.restore_local(self.components, self._topology_now(), self._declaration(), newer_than,
                                             "loading the persistent checkpoint")

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
        return load_components(path, store_for(path, self.storage_options), self.components, self._topology_now(),
                               strict, mode, ignore, checks=self._check_declarations, read_once=self.options.read_once)


def _declarations_differ(declarations: list[Any]) -> ComponentDeclarationError:
    for rank, declaration in enumerate(declarations):
        if declaration != declarations[0]:
            return ComponentDeclarationError(
                f"rank {rank} declared components {declaration} but rank 0 declared "
                f"{declarations[0]}; every rank must declare the same keys, patterns and groups"
            )
    raise AssertionError("the declarations do not differ")


def _paths_differ(proposals: list[Any]) -> ComponentDeclarationError:
    listing = [(target, export) for target, export in proposals]
    return ComponentDeclarationError(f"ranks passed different checkpoint paths or exports: {listing}")
