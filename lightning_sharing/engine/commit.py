"""Staged commits: files are written under a hidden write root, then made to appear at their target in one step.

A checkpoint save and a Hugging Face export commit the same way, through ``staged``: rank 0 begins (the target
creates the write root, cleaning leftovers), every rank writes its files there, rank 0 writes the last file (the
manifest, or the export's index) and the target makes the whole appear atomically; if anything fails on any rank,
rank 0 aborts (the write root is removed) and what was at the target before is untouched. A ``StagedTarget`` says
where: ``CheckpointTarget`` (a checkpoint in a ``CheckpointStore``) or the export's directory (``engine/export.py``).

Example (every rank):
    >>> target = CheckpointTarget(store, "/runs/step=5.ckpt", token)                   # doctest: +SKIP
    >>> with staged(target, "preparing to write /runs/step=5.ckpt") as write_root:     # doctest: +SKIP
    ...     with agreement("writing checkpoint files"):
    ...         write_my_files(write_root)
    ...     with agreement("committing checkpoint /runs/step=5.ckpt"):
    ...         if get_rank() == 0:
    ...             target.commit(write_root, manifest_bytes)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from lightning_sharing.distributed.collectives import Ballot, Field, get_rank
from lightning_sharing.engine.copy_format import WrittenCopy
from lightning_sharing.errors import CheckpointError
from lightning_sharing.storage import CheckpointStore

__all__ = ["ROOT_BYTES", "CheckpointTarget", "StagedTarget", "check_visible", "root_field", "set_root",
           "shared_root", "staged"]

#: Bytes of a write root carried in an agreement step (its part after what it shares with the target); a longer
#: one costs one broadcast more.
ROOT_BYTES = 96


class StagedTarget(Protocol):
    """Where a staged write lands: begin it (rank 0), commit it with its last file (rank 0), or abort it."""

    def begin(self) -> str:
        """Create the write root (and clean leftovers of interrupted writes); return it."""

    def commit(self, write_root: str, last: bytes) -> None:
        """Write ``last`` (the file whose presence means complete) and make the write root appear at the target."""

    def abort(self, write_root: str) -> None:
        """Remove what a failed write left under ``write_root`` (never a committed target)."""


@dataclass(frozen=True)
class CheckpointTarget:
    """A checkpoint at ``target`` in ``store``, committed by the store (manifest last, then a rename or a
    conditional put); ``token`` is rank 0's, the same on every rank."""

    store: CheckpointStore
    target: str
    token: str

    def begin(self) -> str:
        return self.store.begin_save(self.target, self.token)

    def commit(self, write_root: str, last: bytes) -> None:
        self.store.commit(write_root, self.target, self.token, last)

    def abort(self, write_root: str) -> None:
        self.store.abort(write_root, self.target)


def root_field(ballot: Ballot, write_root: str | None, location: str) -> Field:
    """Reserve, in ``ballot``, the write root rank 0 began (``write_root``) for every rank; ``shared_root`` reads it.

    Only its part after what it shares with ``location`` (the target, the same on every rank) travels: a staging
    directory's or a generation's name, a few dozen bytes.
    """
    field = ballot.from_rank_zero(ROOT_BYTES)
    set_root(field, write_root, location)
    return field


def set_root(field: Field, write_root: str | None, location: str) -> None:
    """Put the write root rank 0 began (None: none) in a ``root_field``."""
    if write_root is not None:
        common = next((i for i, (a, b) in enumerate(zip(write_root, location, strict=False)) if a != b),
                      min(len(write_root), len(location)))
        field.set(common.to_bytes(4, "little") + write_root[common:].encode("utf-8"))


def shared_root(field: Field, location: str) -> str | None:
    """The write root ``root_field`` carried (None when rank 0 began none)."""
    if field.value is None:
        return None
    return location[:int.from_bytes(field.value[:4], "little")] + field.value[4:].decode("utf-8")


def _begin(target: StagedTarget, phase: str, location: str, group: Any) -> str:
    """Collective: ``target.begin()`` on rank 0, agreed; its write root on every rank (one all-reduce)."""
    ballot = Ballot(phase, group)
    begun = ballot.run(phase, target.begin if get_rank() == 0 else None)
    field = root_field(ballot, begun, location)
    try:
        ballot.agree()
    except BaseException:
        if begun is not None:
            target.abort(begun)
        raise
    root = shared_root(field, location)
    assert root is not None  # rank 0 began it, or the ballot raised
    return root


@contextmanager
def staged(target: StagedTarget, phase: str, group: Any = None, *, alone: bool = False,
           location: str | None = None, write_root: str | None = None) -> Iterator[str]:
    """Collective: begin a staged write on rank 0 (agreed, ``phase`` names it) and yield its write root to every
    rank; if the block fails, rank 0 aborts it before the error goes on.

    The block writes and commits (``target.commit`` on rank 0, inside an agreement step, as its last act).
    ``alone``: this process acts by itself (no collective; it is "rank 0"), e.g. an export from the command line.
    ``location``: the target's location, the same on every rank (the write root travels relative to it).
    ``write_root``: begun already on rank 0 and known to every rank (a save's agreement step carried it): no
    collective here.
    """
    rank = 0 if alone else get_rank()
    try:
        if write_root is None:
            write_root = target.begin() if alone else _begin(target, phase, location or "", group)
        yield write_root
    except BaseException:
        if rank == 0 and write_root is not None:
            target.abort(write_root)
        raise


def check_visible(store: CheckpointStore, root: str, copies: list[WrittenCopy]) -> None:
    """Rank 0 must see every file the other ranks wrote, at the size they wrote it."""
    sizes = store.sizes(root, [entry.path for copy in copies for entry in copy.files])
    for copy in copies:
        for entry in copy.files:
            size = sizes[entry.path]
            if size != entry.size:
                raise CheckpointError(
                    f"rank 0 sees {entry.path} written by rank {entry.rank} "
                    f"{'missing' if size is None else f'with {size} bytes, not {entry.size}'}: the "
                    "checkpoint directory must be on a filesystem shared by all ranks, with "
                    "close-to-open consistency"
                )
