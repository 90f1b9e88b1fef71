"""A load, top to bottom: plan -> read -> verify -> apply.

1. **plan** (every rank, one agreement step): read the manifest, refuse unlisted or strange files
   (``check_listed_files``; with ``read_once``, rank 0 alone reads and lists them, in an agreement step of its own,
   and every rank plans from what it read), apply the loading rules (``plan_load``: strict and non-strict, the
   topology check), and have each component's copy format plan this rank's load (``CopyFormat.prepare_load``: a
   chunked copy's index and structure are read, verified and matched to the live state here, before anything is
   loaded);
   rank-specific state saved at another topology gets its ``on_resize`` policy instead (``engine.resize``).
2. **agree**: the plan's agreement step (one all-reduce of a few integers) also checks, by hash, that every rank
   declared the same components (the coordinator's check) and opened the same checkpoint; only when something
   differs are the ranks' values gathered, to name them. Which saved entries of a stage-split component each rank
   takes is one more all-reduce (of one flag per entry, only when such a component is loaded): an entry no rank
   takes is refused (strict) or logged.
3. **read, verify, apply** (one agreement step): each planned load reads this rank's files, verified against the
   manifest (``PreparedLoad.finish``), and hands the state to the stateful's ``load_state_dict``. With
   ``read_once`` (``engine/read_once.py``), files every rank reads are fetched by one rank each and broadcast: one
   more agreement step per component that has such files.

Example (every rank):
    >>> result = load_components("ckpt/step=5.ckpt", store, components, topology, strict=True,
    ...                          mode=VerifyMode.CHECKSUM)                                    # doctest: +SKIP
    >>> result.loaded, result.skipped                                                         # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from lightning_sharing.checkpoint.manifest import CheckpointManifest, data_root, read_manifest
from lightning_sharing.core.declarations import StateComponent
from lightning_sharing.core.options import VerifyMode
from lightning_sharing.core.topology import Topology
from lightning_sharing.distributed.collectives import (
    Ballot,
    any_rank,
    get_rank,
    judge_equal,
    on_rank_zero,
    warn_on_rank_zero,
)
from lightning_sharing.distributed.settle import report_size
from lightning_sharing.engine.chunk_load import ChunkedLoad
from lightning_sharing.engine.component_errors import with_context
from lightning_sharing.engine.copy_format import LoadContext, PreparedLoad
from lightning_sharing.engine.formats import format_for
from lightning_sharing.engine.load_plan import LoadResult, check_listed_files, plan_load
from lightning_sharing.engine.read_once import (
    SharedFile,
    finish_loads,
    hand_over_in_memory,
    plan_shared_files,
    resolve_read_once,
)
from lightning_sharing.engine.resize import ResizedLoad
from lightning_sharing.engine.shared_pieces import find_pieces, read_and_send, route_pieces
from lightning_sharing.errors import CheckpointError
from lightning_sharing.storage import CheckpointStore, is_url

__all__ = ["load_components"]

log = logging.getLogger(__name__)
_LISTED = 8


def load_components(path: Any, store: CheckpointStore, components: Sequence[StateComponent], topology: Topology,
                    strict: bool, mode: VerifyMode, ignore: Collection[str] = (),
                    checks: Callable[[Ballot], None] | None = None, read_once: bool | None = None) -> LoadResult:
    """Collective: load every component of ``components`` this rank reads from the checkpoint at ``path``.

    See the module docstring for the steps and ``CheckpointCoordinator.load_checkpoint`` for ``strict``,
    ``mode`` (``verify``) and ``ignore``. ``checks(ballot)`` adds the caller's checks to the plan's agreement step,
    first (the coordinator's: every rank declared the same components). ``read_once``: as for
    ``CheckpointOptions`` (None: auto, ``read_once.resolve_read_once``).
    """
    rank = get_rank()
    shown = os.fspath(path)
    root = store.normalize(shown)
    result = LoadResult(path=Path(shown) if not is_url(path) else shown)
    prepared: list[tuple[StateComponent, PreparedLoad]] = []
    files_root = root
    shared: dict[int, list[SharedFile]] = {}  # read_once: the files every rank reads, by position in ``prepared``
    result.read_once = resolve_read_once(read_once, path, topology)
    # 1. plan, 2. agree
    ballot = Ballot(f"reading checkpoint {shown}")
    if checks is not None:
        checks(ballot)

    def read_and_list() -> tuple[CheckpointManifest, str]:
        manifest = read_manifest(store, root, display=shown)
        listed_root = data_root(store, root, manifest)
        check_listed_files(store, listed_root, manifest)
        return manifest, listed_root

    # read_once: rank 0 alone reads the manifest and lists the files (an object store's LIST pages through every
    # object of the checkpoint: N ranks listing it cost N times the requests), and every rank gets what it read.
    read_by_zero = on_rank_zero(f"reading checkpoint {shown}", read_and_list) if result.read_once else None

    def plan() -> None:
        nonlocal files_root
        manifest, files_root = read_by_zero if read_by_zero is not None else read_and_list()
        plan = plan_load(manifest, list(components), topology, strict, ignore)
        result.skipped, result.manifest = plan.skipped, manifest
        context = LoadContext(store, files_root, Topology.from_json(manifest.topology), topology, strict, mode, rank)
        for component, saved in plan.to_load:
            fmt = format_for(component.sharing_pattern)  # the saved pattern's, when it is read as it was saved
            prepared.append((component, with_context(component.key, "planning the load", lambda c=component,
                                                     s=saved, f=fmt: f.prepare_load(c, s, context))))
        for component, saved, reason in plan.resized:  # saved at another topology: its on_resize policy
            resized = ResizedLoad(component, saved, context, reason)
            result.resized[component.key] = resized.describe()
            prepared.append((component, resized))
        if result.read_once:
            shared.update(plan_shared_files([load for _, load in prepared], topology.world_size))
            result.shared_files = sum(len(files) for files in shared.values())

    ballot.run(f"reading checkpoint {shown}", plan)
    # read_once for SHARDED state: the largest rank's list of chunk pieces (0: no chunked load, nothing to route)
    pieces = find_pieces(prepared) if result.read_once and ballot.ok and any(
        isinstance(load, ChunkedLoad) for _, load in prepared) else None
    capacity = ballot.maximum(report_size(pieces.report()) if pieces is not None else 0)
    ballot.equal((root, result.manifest.created_at if result.manifest else ""), judge_equal(_different_checkpoints),
                 name="checkpoint")
    split = [(component.key, load) for component, load in prepared if load.entries]
    ballot.hashed([(key, list(load.entries)) for key, load in split])  # the held flags below line up
    node_local = result.read_once and hand_over_in_memory(topology)
    ballot.hashed([sorted(shared.items()), node_local])  # every rank joins the same broadcasts, or none starts
    ballot.agree()
    held = _held_anywhere(split)
    for key, reason in result.skipped.items():
        warn_on_rank_zero(log, "checkpoint %s: skipped component %r (%s)", shown, key, reason)
    # 3. read, verify, apply

    def check_taken() -> None:
        for key, load in split:  # every rank reaches the same verdict from the same all-reduce
            _check_taken(key, load, held[key], strict, shown)

    phase, first = f"loading checkpoint {shown}", check_taken
    if capacity.value:  # the chunk pieces several ranks load: read by one, sent to the others, before loads finish
        assert pieces is not None  # every rank has chunked loads when one has (the same components, checked)
        routes = route_pieces(pieces, capacity.value, phase)
        result.received_pieces = len(routes.received)
        result.sent_piece_bytes = read_and_send(prepared, pieces, routes, store, files_root, phase,
                                                first=check_taken)
        first = None
    result.shared_bytes_fetched = finish_loads(prepared, store, files_root, phase, shared, result.loaded.append,
                                               first=first, node_local=node_local)
    return result


def _different_checkpoints(identities: list[Any]) -> CheckpointError:
    listing = "; ".join(f"rank {r}: {p} (saved {c})" for r, (p, c) in enumerate(identities))
    return CheckpointError(
        f"ranks are loading different checkpoints ({listing}); every rank must load the same one "
        "(choose it on rank 0 and broadcast it, or pass the same path everywhere)"
    )


def _held_anywhere(split: list[tuple[str, PreparedLoad]]) -> dict[str, tuple[bool, ...]]:
    """Collective when a stage-split component is loaded (the same on every rank: its entries were compared):
    for each of its saved entries, whether some rank takes it (one all-reduce of one flag per entry)."""
    if not split:
        return {}
    flags = any_rank(*(taken for _, load in split for taken in load.held), phase="agreeing on the entries held")
    held, start = {}, 0
    for key, load in split:
        held[key] = tuple(flags[start:start + len(load.entries)])
        start += len(load.entries)
    return held


def _check_taken(key: str, load: PreparedLoad, held_anywhere: tuple[bool, ...], strict: bool, path: str) -> None:
    """Refuse (``strict``; else log) saved entries that no rank takes (``held_anywhere``: by entry)."""
    unheld = [name for i, name in enumerate(load.entries) if not held_anywhere[i]]
    if not unheld:
        return
    listed = f"{unheld[:_LISTED]}{f' (and {len(unheld) - _LISTED} more)' if len(unheld) > _LISTED else ''}"
    if strict:
        raise CheckpointError(f"component {key!r}: the checkpoint holds {listed}, which no rank's live state holds "
                              "(load with strict=False to skip them)")
    warn_on_rank_zero(log, "checkpoint %s: component %r: skipped %s, which no rank holds", path, key, listed)
