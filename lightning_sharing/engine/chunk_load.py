"""Loading a chunked (SHARDED) copy into whatever its live state is now: any mesh, any world size.

Two halves, one per agreement step of a load:

- ``prepare_chunked_load`` (every rank, while the checkpoint is read): read and verify the chunk index
  and the structure JSON, match them against the live state (names, global shapes, dtypes: a
  mismatch is refused before any byte lands) and plan the byte ranges this rank reads;
- ``ChunkedLoad.finish`` (the loading step): read those ranges, verified block by block, straight
  into the live tensors (a ``DTensor``'s local piece, a plain tensor whole), then ``load_state_dict``.

When the state was saved by, or is loaded into, several group instances (pipeline stages), each
rank takes only the entries its live state holds; ``ChunkedLoad.entries``/``held`` let the load
refuse (``strict``) a saved entry that no rank holds.

Example:
    >>> load = prepare_chunked_load(component, saved, context, ChunkFiles())       # doctest: +SKIP
    >>> load.finish(store, root)                                                     # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lightning_sharing.checkpoint.manifest import ComponentManifest
from lightning_sharing.core.declarations import StateComponent
from lightning_sharing.core.rules import ChunkFiles, Placement, placement_for_reader, placements
from lightning_sharing.core.topology import Topology
from lightning_sharing.distributed.collectives import warn_on_rank_zero
from lightning_sharing.engine.copy_format import LoadContext
from lightning_sharing.engine.verified_files import ComponentFiles
from lightning_sharing.errors import CheckpointError, CorruptCheckpointError
from lightning_sharing.format.codec import (
    decode_state,
    encode_state,
    tree_entries,
    tree_from_entries,
    tree_tensor_names,
)
from lightning_sharing.format.copy_files import TREE_FORMAT, parse_json, tree_name
from lightning_sharing.sharded.chunkfile import StoreFiles
from lightning_sharing.sharded.index import ShardedIndex
from lightning_sharing.sharded.load import ReadPlan, ReadStats, plan_reads, read_chunks
from lightning_sharing.storage import CheckpointStore

__all__ = ["ChunkedLoad", "prepare_chunked_load", "read_index"]

log = logging.getLogger(__name__)
_LISTED = 8


@dataclass
class ChunkedLoad:
    """One component's planned load on this rank.

    Attributes:
        component: the declared component.
        index: the verified chunk index.
        plan: the byte ranges this rank reads, into ``state``'s tensors.
        state: what ``load_state_dict`` receives once the reads are done.
        entries: the saved entries checked across ranks (names or keys), empty when every rank loads
            the whole state; ``held`` says which of them this rank takes.
    """

    component: StateComponent
    index: ShardedIndex
    plan: ReadPlan
    state: Any
    entries: tuple[str, ...] = ()
    held: tuple[bool, ...] = ()
    #: The tensors were filled already (``read_now``; read-once, ``engine/shared_pieces.py``).
    prefetched: bool = False

    def read_now(self, store: CheckpointStore, root: str, plan: ReadPlan | None = None) -> ReadStats:
        """Read ``plan`` (a part of ``self.plan``; the rest arrives from other ranks) into the live tensors now;
        ``finish`` then only hands the state over."""
        with StoreFiles(store, root) as files:
            stats = read_chunks(self.plan if plan is None else plan, self.index, files)
        self.prefetched = True
        return stats

    def finish(self, store: CheckpointStore, root: str) -> ReadStats:
        """Read the planned ranges into the live tensors and hand the state to ``load_state_dict``."""
        stats = ReadStats() if self.prefetched else self.read_now(store, root)
        self.component.stateful.load_state_dict(self.state)
        return stats


def _name(key: Any) -> str:
    return key if isinstance(key, str) else repr(key)


def _listing(names: list[str]) -> str:
    more = f" (and {len(names) - _LISTED} more)" if len(names) > _LISTED else ""
    return f"{names[:_LISTED]}{more}"


def read_index(files: ComponentFiles, rel: str) -> ShardedIndex:
    """The chunk index ``rel``, verified, and checked against the manifest's entries of the files it lists."""
    index = ShardedIndex.from_json(parse_json(files.read_file(rel), "chunk index", rel))
    for record in index.files.values():
        entry = files.entries.get(record.path)
        if entry is None or (entry.size, entry.checksum) != (record.size, record.checksum):
            raise CorruptCheckpointError(
                f"component {files.key!r}: the chunk index lists {record.path} ({record.size} bytes, "
                f"{record.checksum}) but the manifest {'does not list it' if entry is None else 'records '}"
                f"{'' if entry is None else f'{entry.size} bytes, {entry.checksum}'}: the checkpoint was tampered "
                "with or mixed with another"
            )
    return index


def _read_tree(files: ComponentFiles, rel: str) -> tuple[Any, dict[str, str]]:
    body = parse_json(files.read_file(rel), "state structure", rel)
    if not (isinstance(body, dict) and body.get("format") == TREE_FORMAT and body.get("version") == 1
            and isinstance(body.get("ties") or {}, dict)):
        raise CorruptCheckpointError(f"{rel} is not a lightning_sharing state structure (version 1)")
    return body.get("tree"), {str(k): str(v) for k, v in (body.get("ties") or {}).items()}


def _same_layout(saved: Topology, now: Topology, saved_group: str | None, group: str | None) -> bool:
    return saved_group == group and (group is None or saved.groups.get(group) == now.groups.get(group))


def _merged(key: str, trees: list[tuple[str, Any]]) -> list[tuple[Any, Any, Any]]:
    """The entries of every copy's mapping, joined (a key in several copies must hold the same value)."""
    merged: dict[Any, tuple[Any, Any, Any]] = {}
    for rel, tree in trees:
        entries = tree_entries(tree)
        if entries is None:
            raise CheckpointError(
                f"component {key!r} was saved by several groups (pipeline stages) and its state is not a "
                f"mapping ({rel}), so it cannot be split differently now; load it with the layout it was "
                "saved with, or return a dict from state_dict()"
            )
        for entry in entries:
            previous = merged.setdefault(entry[0], entry)
            if json.dumps(previous[2], sort_keys=True) != json.dumps(entry[2], sort_keys=True):
                raise CorruptCheckpointError(f"component {key!r}: entry {entry[0]!r} holds different values "
                                             f"in the copies of different groups ({rel})")
    return list(merged.values())


def prepare_chunked_load(component: StateComponent, saved: ComponentManifest, context: LoadContext,
                         chunk_files: ChunkFiles) -> ChunkedLoad:
    """Plan this rank's load of a chunked component (see the module docstring); nothing is read into it yet.

    Raises ``CheckpointError`` naming the tensor for a global shape or dtype that differs from the
    saved one and, with ``strict``, for live entries the checkpoint lacks (and, on a rank that should
    hold the whole state, saved ones the live state lacks).
    """
    key, strict = component.key, context.strict
    saved_topology, topology = context.saved_topology, context.topology
    files = ComponentFiles(context.store, context.root, key, saved, context.mode)
    index = read_index(files, chunk_files.index_for(key))
    saved_copies = placements(key, saved.sharing_pattern, saved_topology, saved.group_name)
    live_copies = placements(key, component.sharing_pattern, topology, component.process_group_name)
    split = len(saved_copies) > 1 or len(live_copies) > 1
    trees = [tree_name(p.stem) for p in saved_copies if tree_name(p.stem) in files.entries]
    live = component.stateful.state_dict()
    encoded = encode_state(live, key, dtensors=True)
    live_names = set(encoded.tensors) | set(encoded.ties)
    if not trees:
        return _flat(component, index, live, encoded.tensors, live_names, split, strict)
    # Saved by several groups and loaded with the same ones: each rank reads its own group's structure.
    own = len(saved_copies) > 1 and _same_layout(saved_topology, topology, saved.group_name,
                                                 component.process_group_name)
    if own:
        mine: Placement = placement_for_reader(saved_copies, context.rank)
        chosen = [tree_name(mine.stem)]
    else:
        chosen = trees
    loaded = [(rel, *_read_tree(files, rel)) for rel in chosen]
    ties = dict(index.ties)
    for _, _, tree_ties in loaded:
        ties.update(tree_ties)
    entries: tuple[str, ...] = ()
    held: tuple[bool, ...] = ()
    tree = loaded[0][1]
    if split:
        if not isinstance(live, Mapping):
            raise CheckpointError(f"component {key!r}: state_dict() returned a {type(live).__name__}; a SHARDED "
                                  "state split over groups must be a mapping")
        saved_entries = _merged(key, [(rel, t) for rel, t, _ in loaded])
        keys = {entry[0] for entry in saved_entries}
        missing = sorted(_name(k) for k in live if k not in keys)
        if missing and strict:
            raise CheckpointError(f"component {key!r}: the live state holds entries {_listing(missing)} that the "
                                  "checkpoint lacks (load with strict=False to keep their current values)")
        if missing:
            warn_on_rank_zero(log, "component %r: entries %s are not in the checkpoint; they keep their values", key,
                                   _listing(missing))
        tree = tree_from_entries([entry for entry in saved_entries if entry[0] in live])
        if not own:  # ranks take different entries of the same saved list: the coordinator checks all are taken
            entries = tuple(sorted(_name(entry[0]) for entry in saved_entries))
            taken = {_name(k) for k in live}
            held = tuple(name in taken for name in entries)
        elif strict and len(keys) != len(live):
            extra = sorted(_name(k) for k in keys if k not in live)
            raise CheckpointError(f"component {key!r}: the checkpoint holds entries {_listing(extra)} that the live "
                                  "state of this rank's group lacks (load with strict=False to skip them)")
    targets = _targets(key, index, tree_tensor_names(tree), ties, encoded.tensors)
    state = decode_state(tree, targets, ties)
    if split and isinstance(state, dict):
        for name, value in live.items():  # entries the checkpoint lacks keep their current values
            state.setdefault(name, value)
    plan = plan_reads(index, targets, strict=False)
    return ChunkedLoad(component, index, plan, state, entries, held)


def _flat(component: StateComponent, index: ShardedIndex, live: Any, tensors: dict[str, torch.Tensor],
          live_names: set[str], split: bool, strict: bool) -> ChunkedLoad:
    """A state saved as tensors alone (a module's ``state_dict()``): read into the live tensors by name.

    A stateful with no live state (``state_dict()`` is None: a holder such as ``ValueHolder()``, as used by
    ``load_from_checkpoint`` or a load into another strategy) gets every saved tensor whole, as plain tensors.
    """
    saved_names = set(index.tensors) | set(index.ties)
    if live is None:
        whole = {name: torch.empty(record.shape, dtype=record.torch_dtype) for name, record in index.tensors.items()}
        state = {**whole, **{name: whole[stored] for name, stored in index.ties.items() if stored in whole}}
        return ChunkedLoad(component, index, plan_reads(index, whole, strict=False), state)
    missing = sorted(live_names - saved_names)
    unexpected = sorted(saved_names - live_names)
    if strict and (missing or (unexpected and not split)):
        raise CheckpointError(
            f"component {component.key!r}: the sharded checkpoint and the live state hold different tensors: missing "
            f"from the checkpoint {_listing(missing) if missing else 'none'}, not in the live state "
            f"{_listing(unexpected) if unexpected and not split else 'none'} (load with strict=False to skip them)"
        )
    if not strict and (missing or (unexpected and not split)):
        warn_on_rank_zero(log, "component %r: loading without tensors %s (not in the checkpoint: they keep their "
                               "values) and %s (not in the live state)", component.key, _listing(missing),
                               _listing(unexpected if not split else []))
    targets: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        stored = name if name in index.tensors else index.ties.get(name)
        if stored is not None:
            targets.setdefault(stored, tensor)
    entries = tuple(sorted(index.tensors)) if split else ()
    held = tuple(name in targets for name in entries)
    return ChunkedLoad(component, index, plan_reads(index, targets, strict=False), live, entries, held)


def _targets(key: str, index: ShardedIndex, names: set[str], ties: Mapping[str, str],
             live: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensor to read each saved name into: the live one of that name, else a new full plain tensor."""
    targets: dict[str, torch.Tensor] = {}
    for name in sorted(names):
        stored = ties.get(name, name)
        record = index.tensors.get(stored)
        if record is None:
            raise CorruptCheckpointError(f"component {key!r}: the state structure refers to tensor {stored!r}, "
                                         "which the chunk index does not hold")
        if stored in targets:
            continue
        existing = live.get(stored)
        if existing is None:
            alias = next((n for n, s in ties.items() if s == stored and n in live), None)
            existing = live.get(alias) if alias is not None else None
        targets[stored] = existing if existing is not None else torch.empty(record.shape, dtype=record.torch_dtype)
    return targets
