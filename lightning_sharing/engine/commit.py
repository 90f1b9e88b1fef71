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

from lightning_sharing.distributed.collectives import get_rank, on_rank_zero
from lightning_sharing.engine.copy_format import WrittenCopy
from lightning_sharing.errors import CheckpointError
from lightning_sharing.storage import CheckpointStore

__all__ = ["CheckpointTarget", "StagedTarget", "check_visible", "staged"]


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


@contextmanager
def staged(target: StagedTarget, phase: str, group: Any = None, *, alone: bool = False) -> Iterator[str]:
    """Collective: begin a staged write on rank 0 (agreed, ``phase`` names it) and yield its write root to every
    rank; if the block fails, rank 0 aborts it before the error goes on.

    The block writes and commits (``target.commit`` on rank 0, inside an agreement step, as its last act).
    ``alone``: this process acts by itself (no collective; it is "rank 0"), e.g. an export from the command line.
    """
    rank = 0 if alone else get_rank()
    write_root: str | None = None
    try:
        write_root = target.begin() if alone else on_rank_zero(phase, target.begin, group)
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
