"""Data loaders that resume exactly: the sampler epoch, shuffling without the global RNG, the epoch counter.

Shared by ``SharingStrategy`` (Trainer) and ``FabricSharingStrategy``. The order of a resumed epoch must depend
only on what the checkpoint holds; three things in Lightning and Fabric get in the way:

- a shuffled torchdata ``StatefulDataLoader`` is wrapped in a ``DistributedSamplerWrapper``, whose order is drawn
  from the global RNG each time an iterator is created: ``replace_shuffle_wrapper`` puts an epoch-seeded
  ``DistributedSampler(shuffle=True)`` in its place (the order then depends only on the seed and the epoch);
- creating an iterator draws the workers' base seed from the global RNG, which a mid-epoch resume does once more
  than the interrupted run did: with ``own_generator=True`` the loader gets a generator of its own, reseeded from
  (seed, epoch, rank) whenever the sampler's epoch is set, so the global RNG is left alone;
- Fabric's loader wrapper sets the sampler's epoch from a counter of its own, which nothing saves:
  ``SeededLoaderState`` saves the sampler's epoch with the loader's state, and after a restore the sampler
  maps the wrapper's next ``set_epoch`` to the epoch to continue (the saved one, or the next if it had run out).

Example:
    >>> StateComponent("loader", loader_state(inner_loader), SharingPattern.PER_RANK)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from torch.utils.data import DistributedSampler

from lightning_sharing.statefuls.sampler import ElasticSampler

__all__ = ["SeededLoaderState", "loader_state", "replace_shuffle_wrapper", "set_sampler_epoch"]

log = logging.getLogger(__name__)


def set_sampler_epoch(dataloader: object, epoch: int) -> None:
    """``set_epoch(epoch)`` on the loader's sampler and batch sampler's sampler, where they have one."""
    samplers = {id(s): s for s in (getattr(dataloader, "sampler", None),
                                   getattr(getattr(dataloader, "batch_sampler", None), "sampler", None))
                if s is not None}
    for sampler in samplers.values():
        set_epoch = getattr(sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)


class _EpochSeededSampler(DistributedSampler):
    """``DistributedSampler`` that also reseeds its loader's generator at each ``set_epoch``."""

    def __init__(self, *args: Any, generator: torch.Generator, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loader_generator = generator
        self._offset = 0
        self._resume_epoch: int | None = None
        self._reseed()

    def _reseed(self) -> None:
        self._loader_generator.manual_seed(int(self.seed) + 104729 * (int(self.epoch) + 1) + 7919 * int(self.rank))

    def resume_at(self, epoch: int) -> None:
        """After a restore: the next ``set_epoch(n)`` means ``epoch`` (and ``n + k`` means ``epoch + k``)."""
        self._resume_epoch = int(epoch)
        super().set_epoch(int(epoch))
        self._reseed()

    def set_epoch(self, epoch: int) -> None:
        if self._resume_epoch is not None:  # the caller's counter restarted with this process
            self._offset, self._resume_epoch = self._resume_epoch - int(epoch), None
        super().set_epoch(int(epoch) + self._offset)
        self._reseed()


def replace_shuffle_wrapper(dataloader: object, own_generator: bool = False, elastic: bool = False) -> bool:
    """Give a shuffled stateful loader an epoch-seeded ``DistributedSampler`` instead of Lightning's wrapper.

    Lightning and Fabric inject ``DistributedSampler`` only for torch's own Random/SequentialSampler.
    torchdata's ``StatefulDataLoader(shuffle=True)`` has its own RandomSampler, so it is wrapped in a
    ``DistributedSamplerWrapper`` whose order is drawn from the global RNG whenever an iterator is
    created, which a mid-epoch resume cannot reproduce. A plain shuffle is equivalent to
    ``DistributedSampler(shuffle=True)``, whose order depends only on (seed, epoch). With ``own_generator``
    the loader also gets a generator of its own (see the module docstring); with ``elastic`` the sampler is an
    ``ElasticSampler`` (the same order, a position that resumes at any world size). Returns whether it replaced it.
    """
    batch_sampler = getattr(dataloader, "batch_sampler", None)
    wrapper = getattr(batch_sampler, "sampler", None)
    if not isinstance(wrapper, DistributedSamplerWrapper):
        return False
    inner = getattr(wrapper.dataset, "_sampler", None)
    # Lightning itself does the same for torch's RandomSampler (ignoring its generator).
    plain_shuffle = (type(inner).__name__ == "RandomSampler" and not getattr(inner, "replacement", True)
                     and getattr(inner, "_num_samples", 0) is None)
    dataset = getattr(dataloader, "dataset", None)
    if not plain_shuffle or dataset is None:
        return False
    kwargs = {"num_replicas": wrapper.num_replicas, "rank": wrapper.rank, "shuffle": True, "seed": wrapper.seed,
              "drop_last": wrapper.drop_last}
    if elastic:
        batch_sampler.sampler = ElasticSampler(dataset, **kwargs)
    elif own_generator and getattr(dataloader, "generator", None) is None:
        generator = torch.Generator()
        batch_sampler.sampler = _EpochSeededSampler(dataset, generator=generator, **kwargs)
        dataloader.generator = generator  # type: ignore[attr-defined]
    else:
        batch_sampler.sampler = DistributedSampler(dataset, **kwargs)
    log.debug("replaced DistributedSamplerWrapper(RandomSampler) with DistributedSampler(shuffle=True, seed=%d)",
              wrapper.seed)
    return True


class SeededLoaderState:
    """The state of a loader whose sampler ``replace_shuffle_wrapper(own_generator=True)`` installed.

    Fabric's loader wrapper calls ``set_epoch(n)`` with ``n`` counted by the wrapper itself (``fabric.save``
    and ``fabric.load`` only ever see the loader inside it), so the sampler's epoch is saved with the loader's
    state and, after a load, the next ``set_epoch(n)`` is mapped to the epoch the run must continue with:
    the saved epoch when it was in progress (the restored position continues it), the next one when it had
    run out (then the loader's own state, that of a consumed epoch whose first iterator would yield nothing,
    is not restored, and the next ``iter`` starts that epoch afresh, as in the uninterrupted run).
    """

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.sampler: _EpochSeededSampler = loader.batch_sampler.sampler

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict(), "epoch": int(self.sampler.epoch)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not (isinstance(state, dict) and set(state) == {"loader", "epoch"}):
            self.loader.load_state_dict(state)  # saved by a loader without this sampler: its own state only
            return
        loader_state, epoch = state["loader"], int(state["epoch"])
        finished = isinstance(loader_state, dict) and bool(loader_state.get("_iterator_finished"))
        if not finished:
            self.loader.load_state_dict(loader_state)
        self.sampler.resume_at(epoch + 1 if finished else epoch)


def loader_state(loader: Any) -> Any:
    """The stateful to checkpoint ``loader`` with: ``SeededLoaderState`` for a loader with our sampler, else itself."""
    sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    return SeededLoaderState(loader) if isinstance(sampler, _EpochSeededSampler) else loader
