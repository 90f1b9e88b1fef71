"""Elastic data under the Trainer strategies: the training sampler's position as GLOBAL state.

With ``elastic_data=True`` (the default) the ``DistributedSampler`` Lightning inserts for training
(``use_distributed_sampler=True``) becomes an ``ElasticSampler`` with the same dataset, seed, shuffle and
``drop_last`` (so the same order at the same world size), and every save records its position as the GLOBAL
built-in ``sampler``: ``{"epoch", "consumed"}`` per training loader. ``consumed`` counts what the loop took
(Lightning's ``batch_progress``), not what a prefetching loader or its workers fetched ahead.

A resume at another world size then:

- gives the restored position to the new sampler, which deals the rest of the epoch's global order to the new
  ranks (every sample once, padding aside);
- recomputes Lightning's batch counters of the epoch for the new world size (``ready = len(loader) - batches
  left``), so the resumed epoch ends where the data ends;
- drops the loaders' own per-rank states (``dataloader``), whose positions are the old ranks'.

Relies on Lightning's private ``fit_loop.epoch_loop.batch_progress`` counters and ``_DataConnector._resolve_sampler``
(hooked in ``integration/compat.py``).

Example:
    >>> trainer = pl.Trainer(strategy=SharingStrategy(), devices=4)   # resumes a 2-device run's epoch  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

from torch.utils.data import DistributedSampler

from lightning_sharing.statefuls.sampler import ElasticSampler

__all__ = ["ElasticData", "elastic_samplers", "to_elastic"]

log = logging.getLogger(__name__)


def to_elastic(sampler: Any) -> Any:
    """``sampler`` as an ``ElasticSampler`` when it is a plain ``DistributedSampler`` (else unchanged)."""
    if type(sampler) is not DistributedSampler:
        return sampler
    return ElasticSampler(sampler.dataset, shuffle=sampler.shuffle, seed=sampler.seed, drop_last=sampler.drop_last,
                          num_replicas=sampler.num_replicas, rank=sampler.rank)


def _loaders(value: Any) -> list[Any]:
    if isinstance(value, Mapping):
        return [loader for item in value.values() for loader in _loaders(item)]
    if isinstance(value, (list, tuple)):
        return [loader for item in value for loader in _loaders(item)]
    return [] if value is None else [value]


def _sampler_of(loader: Any) -> ElasticSampler | None:
    for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if isinstance(sampler, ElasticSampler):
            return sampler
    return None


def elastic_samplers(loaders: Any) -> list[tuple[Any, ElasticSampler]]:
    """``(loader, sampler)`` for every loader (a loader, or lists and dicts of them) drawing from an ElasticSampler."""
    found = [(loader, _sampler_of(loader)) for loader in _loaders(loaders)]
    return [(loader, sampler) for loader, sampler in found if sampler is not None]


def _batch_size(loader: Any) -> tuple[int, bool] | None:
    """``(batch size, drop_last)`` of a loader's batches, None when it has no fixed batch size."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    size = getattr(loader, "batch_size", None) or getattr(batch_sampler, "batch_size", None)
    if not isinstance(size, int) or size < 1:
        return None
    return size, bool(getattr(batch_sampler, "drop_last", getattr(loader, "drop_last", False)))


def _batches(samples: int, batch: tuple[int, bool]) -> int:
    size, drop_last = batch
    return samples // size if drop_last else math.ceil(samples / size)


class ElasticData:
    """The training samplers' positions for one strategy: recorded at each save, restored after a resume."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = bool(enabled)
        self.pending: list[dict[str, Any]] | None = None  # restored positions, for the loaders not built yet
        self._pass: tuple[int, int] | None = None  # (epoch, batches counted before this pass) of a resumed epoch

    def training_sampler(self, sampler: Any) -> Any:
        """The sampler Lightning inserts for training, made elastic (``_DataConnector._resolve_sampler``)."""
        return to_elastic(sampler) if self.enabled else sampler

    # ------------------------------------------------------------------ save
    def positions(self, trainer: Any) -> list[dict[str, Any]] | None:
        """Every elastic training loader's position, as far as the loop has taken batches (None: no such loader)."""
        if trainer is None or not self.enabled:
            return None
        found = elastic_samplers(getattr(trainer, "train_dataloader", None))
        if not found:
            return None
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        epoch = trainer.fit_loop.epoch_progress.current.processed
        taken_batches = progress.processed - (self._pass[1] if self._pass and self._pass[0] == epoch else 0)
        positions = []
        for loader, sampler in found:
            batch = _batch_size(loader)
            # Without a fixed batch size the loop's count cannot be turned into samples: what the sampler yielded.
            positions.append(sampler.state_dict() if batch is None else
                             sampler.state_dict_after(taken_batches * batch[0]))
        return positions

    # ------------------------------------------------------------------ resume
    def restore(self, trainer: Any, loader: Any) -> None:
        """Give a restored position to ``loader``'s sampler and fit the epoch's batch counters to it (first loader)."""
        if not self.pending:
            return
        sampler = _sampler_of(loader)
        if sampler is None:
            log.warning("the checkpoint holds an elastic sampler's position, but the training loader draws from %s: "
                        "the position is not restored", type(getattr(loader, "sampler", None)).__name__)
            self.pending = None
            return
        position = self.pending.pop(0)
        first = self._pass is None
        sampler.load_state_dict(position)
        batch = _batch_size(loader)
        if not first or batch is None:
            return
        # Lightning counts the batches taken this epoch (and stops at len(loader)); at another world size the
        # same samples are another number of batches: count what is left at this one and set the rest as taken.
        progress = trainer.fit_loop.epoch_loop.batch_progress
        taken = _batches(len(sampler), batch) - _batches(sampler.remaining(), batch)
        shift = taken - progress.current.processed
        for counter in (progress.current, progress.total):
            counter.ready += shift
            counter.started += shift
            counter.processed += shift
            counter.completed += shift
        self._pass = (int(position["epoch"]), taken)
        if shift:
            log.info("resumed epoch %d at sample %d of its global order: %d batches of this world size taken, %d left",
                     position["epoch"], position["consumed"], taken, _batches(sampler.remaining(), batch))

    def reset(self) -> None:
        self.pending, self._pass = None, None


def pending_positions(value: Any) -> list[dict[str, Any]] | None:
    """The saved ``sampler`` built-in as a list of positions (None when absent or malformed)."""
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes, Mapping)):
        positions = [dict(item) for item in value if isinstance(item, Mapping)]
        return positions or None
    return None
