"""What a rank puts into a local tier step and takes back out: its own bundle, its part of the node's shared copy,
the steps it can serve on restore (``inventory``), and the states handed back to the components.

Every rank of a node holds the same REPLICATED state, so the node's one copy of it is spread over the node's ranks:
rank ``j`` stages, writes and sends part ``j`` (``local_plan.assign_parts``, by tensor, largest first), which cuts
the time a save blocks training (the staging copy) and its write by the node's rank count. GLOBAL state, and the
structures of every shared component, go whole into part 0, which the node's first rank writes. The split needs the
ranks to name the same REPLICATED tensors with the same shapes and dtypes; when they do not (a declaration that is
not really replicated), the node's first rank writes the whole copy, as ``spread=False``.

Example (every rank):
    >>> collected = collect(components, lay)                                               # doctest: +SKIP
    >>> bundles = collected.bundles(lay, spread=True)       # {file name: tensors} this rank writes  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_sharing.core.declarations import StateComponent
from lightning_sharing.core.patterns import SharingPattern
from lightning_sharing.core.topology import Topology
from lightning_sharing.distributed.ballot import stable_hash
from lightning_sharing.engine import local_files as files
from lightning_sharing.engine.local_plan import Layout, assign_parts
from lightning_sharing.errors import CorruptCheckpointError
from lightning_sharing.format.codec import is_dtensor
from lightning_sharing.format.safetensors_io import nbytes

__all__ = ["SHARED", "Collected", "apply_states", "collect", "inventory"]

log = logging.getLogger(__name__)

#: The patterns of which each node keeps one copy, spread over its ranks.
SHARED = (SharingPattern.GLOBAL, SharingPattern.REPLICATED)


@dataclass(frozen=True)
class Collected:
    """A rank's state for one local step: its own bundle's tensors, the shared components' bundle, and the names of
    the shared tensors that may be spread (those of REPLICATED components)."""

    own: dict[str, torch.Tensor]
    shared: dict[str, torch.Tensor]
    spreadable: frozenset[str]

    def structure_hash(self) -> int:
        """A hash of the spreadable tensors' names, shapes and dtypes: the ranks may split the copy alike only when
        it is the same on every rank."""
        return stable_hash(sorted((name, list(self.shared[name].shape), str(self.shared[name].dtype))
                                  for name in self.spreadable))

    def bundles(self, lay: Layout, spread: bool) -> dict[str, dict[str, torch.Tensor]]:
        """The files this rank writes, by name: its own bundle and its part of the node's shared copy (with
        ``spread=False``, the node's first rank writes the whole copy and the other ranks empty parts)."""
        parts = len(lay.nodes[lay.node]) if spread else 1
        chosen = assign_parts([(name, nbytes(self.shared[name])) for name in self.spreadable], parts)
        local = lay.local
        mine = {name: tensor for name, tensor in self.shared.items() if chosen.get(name, 0) == local}
        return {files.rank_file(lay.rank): self.own, files.shared_file(local): mine}


def collect(components: Sequence[StateComponent], lay: Layout) -> Collected:
    """This rank's state of every component, as the tensors of its own bundle and of the node's shared bundle."""
    own = files.bundle_tensors([(c.key, c.stateful.state_dict()) for c in components
                                if c.sharing_pattern not in SHARED])
    shared_components = [c for c in components if c.sharing_pattern in SHARED]
    shared = files.bundle_tensors([(c.key, c.stateful.state_dict()) for c in shared_components])
    prefixes = tuple(f"{index}/" for index, c in enumerate(shared_components)
                     if c.sharing_pattern is SharingPattern.REPLICATED)
    return Collected(own, shared, frozenset(name for name in shared if name.startswith(prefixes)))


def inventory(node_dir: Path, lay: Layout, topology: Topology, declaration: Any) -> dict[str, Any]:
    """What this rank can serve: ``held`` (origin node, step) pairs saved at this topology with these components, and
    ``other``: why the first step saved otherwise (another world size, node count or declaration) is ignored."""
    held: list[tuple[int, int]] = []
    other: str | None = None
    if not node_dir.is_dir():
        log.warning("local tier: node %d's directory %s does not exist (a new machine or a wiped disk)", lay.node,
                    node_dir)
        return {"held": held, "other": other}
    wanted = topology.to_json()
    places = [(lay.node, files.own_dir(node_dir), lay.rank)]
    places += [(origin, files.replica_dir(node_dir, origin), lay.nodes[origin][lay.local]) for origin in lay.origins()]
    for origin, parent, owner in places:
        for step in files.list_steps(parent):
            folder = files.step_dir(parent, step)
            try:
                body = files.read_complete(folder)
            except CorruptCheckpointError as exc:
                log.warning("local tier: ignoring %s: %s", folder, exc)
                continue
            if body["topology"] != wanted:
                saved = Topology.from_json(body["topology"]).describe()
                other = other or (f"the local checkpoint {folder} was saved at {saved} and this job runs at "
                                  f"{topology.describe()}")
                continue
            if body["declaration"] != declaration:
                other = other or (f"the local checkpoint {folder} was saved with the components "
                                  f"{body['declaration']}, this job declares {declaration}")
                continue
            listed = body["files"]
            if body["node"] == origin and files.rank_file(owner) in listed and files.shared_file(lay.local) in listed:
                held.append((origin, step))
    return {"held": held, "other": other}


def apply_states(components: Sequence[StateComponent], states: Mapping[str, Any]) -> None:
    """Hand each component its restored state (DTensor pieces wrapped like the live ones)."""
    for component in components:
        if component.key not in states:
            raise CorruptCheckpointError(f"the local checkpoint has no state of component {component.key!r}")
        state = states[component.key]
        if component.sharing_pattern is SharingPattern.SHARDED:
            state = _like_live(state, component.stateful.state_dict())
        component.stateful.load_state_dict(state)


def _like_live(saved: Any, live: Any) -> Any:
    """``saved`` with every tensor that is a DTensor in ``live`` made one again (same mesh, placements, shape)."""
    if isinstance(saved, torch.Tensor) and is_dtensor(live):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(saved.to(live.device), live.device_mesh, live.placements, run_check=False,
                                  shape=live.shape, stride=live.stride())
    if isinstance(saved, dict) and isinstance(live, Mapping):
        return {key: _like_live(value, live[key]) if key in live else value for key, value in saved.items()}
    if isinstance(saved, (list, tuple)) and isinstance(live, (list, tuple)) and len(saved) == len(live):
        return type(saved)(_like_live(s, v) for s, v in zip(saved, live, strict=True))
    return saved
