"""Loading rank-specific state saved at another topology, as its component's ``on_resize`` policy says.

``plan_load`` sets such a component aside (instead of refusing it) when its policy is not ``ERROR``; the load
then runs a ``ResizedLoad`` for it, like any other prepared load, inside the same agreement step:

- ``DROP``: nothing is read; the component keeps its current (fresh) value; rank 0 logs it.
- ``RESEED``: nothing is read; every rank calls ``stateful.reseed(seed)`` with a seed derived from the saved
  copies' checksums (as the manifest records them) and its own rank: reproducible, different per rank.
- ``MERGE``: rank 0 reads every saved copy (verified) and loads their merge: the first copy, then each other
  one through ``stateful.merge_state`` (or the callable given as ``on_resize``, over all of them); every other
  rank empties its stateful (``reset()``, where it has one).

Example:
    >>> ResizedLoad(component, saved, context, "it was saved at world_size=2").finish(store, root)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import xxhash

from lightning_sharing.checkpoint.manifest import ComponentManifest
from lightning_sharing.core.declarations import ResizePolicy, StateComponent
from lightning_sharing.core.rules import placements
from lightning_sharing.distributed.collectives import warn_on_rank_zero
from lightning_sharing.engine.copy_format import LoadContext
from lightning_sharing.engine.whole_format import read_copy
from lightning_sharing.storage import CheckpointStore

__all__ = ["ResizedLoad", "resize_seed"]

log = logging.getLogger(__name__)


def resize_seed(saved: ComponentManifest, rank: int) -> int:
    """A seed for ``rank`` derived from what was saved of the component (its files' checksums), not from its bytes."""
    digest = xxhash.xxh64()
    for entry in sorted(saved.files, key=lambda e: e.path):
        digest.update(f"{entry.path}={entry.checksum};".encode())
    digest.update(f"rank={rank}".encode())
    return digest.intdigest() & (2**63 - 1)


@dataclass
class ResizedLoad:
    """The load of a component saved at another topology (a ``PreparedLoad``: no entries split across ranks)."""

    component: StateComponent
    saved: ComponentManifest
    context: LoadContext
    reason: str
    entries: tuple[str, ...] = ()
    held: tuple[bool, ...] = ()

    @property
    def policy(self) -> ResizePolicy:
        return self.component.resize_policy

    def describe(self) -> str:
        """What was done, for ``LoadResult.resized`` and the log."""
        done = {ResizePolicy.DROP: "it starts fresh",
                ResizePolicy.RESEED: "reseeded on every rank",
                ResizePolicy.MERGE: "merged onto rank 0 (the other ranks start empty)"}[self.policy]
        return f"{self.reason}; on_resize={self.policy.value!r}: {done}"

    def finish(self, store: CheckpointStore, root: str) -> None:
        stateful, rank = self.component.stateful, self.context.rank
        warn_on_rank_zero(log, "component %r: %s", self.component.key, self.describe())
        if self.policy is ResizePolicy.RESEED:
            stateful.reseed(resize_seed(self.saved, rank))
        elif self.policy is ResizePolicy.MERGE and rank == 0:
            self._merge(store, root)
        elif self.policy is ResizePolicy.MERGE and callable(getattr(stateful, "reset", None)):
            stateful.reset()

    def _merge(self, store: CheckpointStore, root: str) -> None:
        """Rank 0: read every saved copy (verified) and load their merge."""
        saved, context, stateful = self.saved, self.context, self.component.stateful
        copies = placements(self.component.key, saved.pattern, context.saved_topology, saved.group_name)
        states = [read_copy(store, root, self.component, saved, copy.stem, context.mode) for copy in copies]
        merge = self.component.on_resize
        if callable(merge):
            stateful.load_state_dict(merge(states))
            return
        first, *others = states
        stateful.load_state_dict(first)
        for state in others:
            stateful.merge_state(state)
