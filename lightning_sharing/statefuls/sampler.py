"""``ElasticSampler``: DistributedSampler's order, with a position that survives a change of world size.

One epoch is one *global order*: the epoch's permutation of the dataset (seeded by ``seed + epoch``), padded
(or cut, with ``drop_last``) to a multiple of the world size exactly as ``torch.utils.data.DistributedSampler``
pads it, and dealt to the ranks in turn: rank ``r`` takes entries ``r, r + W, r + 2W, ...``. So at a fixed
world size every rank yields exactly what DistributedSampler yields, and after ``k`` samples per rank the ranks
together have consumed the first ``k * W`` entries of the global order.

The state is that position, the same on every rank (GLOBAL): ``{"epoch", "consumed"}``. Loaded at another
world size ``W'``, the sampler deals what is left of the epoch's permutation (``permutation[consumed:]``,
padded or cut for ``W'`` the same way) to the new ranks, so across the interrupted run and the resumed one
every sample of the epoch is seen exactly once, apart from the padding each world size adds; at the same
world size the resumed stream is the uninterrupted one, entry for entry. The next epoch is the permutation the
uninterrupted run would have used.

Example:
    >>> sampler = ElasticSampler(range(10), shuffle=False, num_replicas=2, rank=1)
    >>> list(sampler)
    [1, 3, 5, 7, 9]
    >>> it = iter(sampler); _ = [next(it), next(it)]
    >>> sampler.state_dict()
    {'epoch': 0, 'consumed': 4}
    >>> resumed = ElasticSampler(range(10), shuffle=False, num_replicas=3, rank=0)
    >>> resumed.load_state_dict({"epoch": 0, "consumed": 4})
    >>> list(resumed)
    [4, 7]
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from lightning_sharing.errors import ComponentDeclarationError

__all__ = ["ElasticSampler"]


class ElasticSampler(DistributedSampler):
    """A ``DistributedSampler`` whose position (GLOBAL state) resumes at any world size (see the module docstring).

    Args:
        dataset: anything with ``len()``.
        shuffle: permute each epoch (seeded by ``seed + epoch``), as DistributedSampler.
        seed: the seed every rank shares.
        drop_last: cut the tail that does not fill a round of ``num_replicas`` instead of padding it.
        num_replicas: the world size (default: the default process group's, else 1).
        rank: this rank (default: the default process group's, else 0).

    Call ``set_epoch(epoch)`` at the start of every epoch, as with DistributedSampler; calling it with the
    epoch a checkpoint restored keeps the restored position. It is a ``DistributedSampler`` (a subclass), so
    Lightning and other tools that look for one leave it in place.
    """

    def __init__(self, dataset: Sized, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 num_replicas: int | None = None, rank: int | None = None) -> None:
        initialized = dist.is_available() and dist.is_initialized()
        self.num_replicas = num_replicas if num_replicas is not None else (
            dist.get_world_size() if initialized else 1)
        self.rank = rank if rank is not None else (dist.get_rank() if initialized else 0)
        if not isinstance(self.num_replicas, int) or self.num_replicas < 1:
            raise ComponentDeclarationError(f"ElasticSampler: num_replicas must be a positive integer, got "
                                            f"{self.num_replicas!r}")
        if not isinstance(self.rank, int) or not 0 <= self.rank < self.num_replicas:
            raise ComponentDeclarationError(f"ElasticSampler: rank must be in [0, {self.num_replicas - 1}], got "
                                            f"{self.rank!r}")
        super().__init__(dataset, num_replicas=self.num_replicas, rank=self.rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self._resume_at = 0  # where the next pass over the epoch begins (a restored position, else 0)
        self._begin = 0  # where the current pass began
        self._taken = 0  # entries this rank's current pass has yielded
        self._done = False  # the current pass ran to its end

    # ------------------------------------------------------------------ the global order
    def _permutation(self) -> list[int]:
        size = len(self.dataset)
        if not self.shuffle:
            return list(range(size))
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        return torch.randperm(size, generator=generator).tolist()

    def _round_length(self, left: int) -> int:
        """How many entries of the global order follow ``left`` unconsumed samples at this world size."""
        if left <= 0:
            return 0
        if self.drop_last:
            return left // self.num_replicas * self.num_replicas
        return math.ceil(left / self.num_replicas) * self.num_replicas

    def _next_start(self) -> int:
        # A position at (or past) the epoch's end means the epoch is used up: another pass starts at its
        # beginning, as DistributedSampler's does when set_epoch is not called.
        return 0 if self._resume_at >= len(self.dataset) else self._resume_at

    def _order(self) -> list[int]:
        """What is left of this epoch's global order, padded or cut for this world size (DistributedSampler's way)."""
        permutation = self._permutation()
        order = permutation[self._begin:]
        total = self._round_length(len(order))
        if total <= len(order):
            return order[:total]
        padding = total - len(order)
        # DistributedSampler repeats the list from its start; for a fresh epoch that list is the permutation.
        source = permutation if permutation else order
        order += (source * math.ceil(padding / len(source)))[:padding]
        return order

    # ------------------------------------------------------------------ Sampler
    def __iter__(self) -> Iterator[int]:
        self._begin, self._resume_at, self._taken, self._done = self._next_start(), 0, 0, False
        order = self._order()
        for index in order[self.rank::self.num_replicas]:
            self._taken += 1
            yield index
        self._done = True  # used up: a checkpoint now records the epoch complete

    def __len__(self) -> int:
        """Samples per rank in a whole epoch at this world size (DistributedSampler's ``len``), also after a
        restore: a loader counts the batches already taken this epoch and stops where the data ends."""
        return self._round_length(len(self.dataset)) // self.num_replicas

    def remaining(self) -> int:
        """Samples per rank the next pass yields: the rest of the epoch after a restore, else a whole epoch."""
        return self._round_length(len(self.dataset) - self._next_start()) // self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` (its own permutation); the epoch a checkpoint restored keeps its position."""
        if epoch != self.epoch:
            self.epoch, self._resume_at, self._begin, self._taken, self._done = epoch, 0, 0, 0, False

    # ------------------------------------------------------------------ state (GLOBAL)
    @property
    def consumed(self) -> int:
        """Entries of this epoch's global order the ranks together have taken (the same on every rank)."""
        return self._position(self._taken)

    def _position(self, taken: int) -> int:
        if self._done and taken >= self._taken:
            return len(self.dataset)
        pass_length = self._round_length(len(self.dataset) - self._begin) // self.num_replicas
        return min(self._begin + min(max(taken, 0), pass_length) * self.num_replicas, len(self.dataset))

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "consumed"}``: the position in the epoch's global order, independent of the world size."""
        return {"epoch": self.epoch, "consumed": self.consumed}

    def state_dict_after(self, taken: int) -> dict[str, Any]:
        """``state_dict()`` once every rank has taken ``taken`` samples of the current pass.

        For a training loop that knows what it took while its loader ran ahead (prefetching): Lightning's
        batch counters, say, rather than what the iterator yielded.
        """
        return {"epoch": self.epoch, "consumed": self._position(taken)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the global order of ``state["epoch"]`` after ``state["consumed"]`` entries, at this world size."""
        epoch, consumed = state.get("epoch"), state.get("consumed")
        if not isinstance(epoch, int) or not isinstance(consumed, int) or epoch < 0 or consumed < 0:
            raise ComponentDeclarationError(
                f"ElasticSampler.load_state_dict needs non-negative integers 'epoch' and 'consumed', got {state!r}")
        self.epoch, self._resume_at = epoch, min(consumed, len(self.dataset))
        self._begin, self._taken, self._done = self._resume_at, 0, False
