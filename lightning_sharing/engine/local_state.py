"""What a rank puts into a local tier step and takes back out: its own bundle, its part of the node's shared copy,
and the states handed back to the components on restore.

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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lightning_sharing.core.declarations import StateComponent
from lightning_sharing.core.patterns import SharingPattern
from lightning_sharing.distributed.ballot import stable_hash
from lightning_sharing.engine import local_files as files
from lightning_sharing.engine.local_plan import Layout, assign_parts
from lightning_sharing.errors import CorruptCheckpointError
from lightning_sharing.format.codec import is_dtensor

__all__ = ["SHARED", "Collected", "apply_states", "collect"]

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
        chosen = assign_parts([(name, _nbytes(self.shared[name])) for name in self.spreadable], parts)
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


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


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
