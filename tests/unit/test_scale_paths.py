"""The faster paths that the scale simulation (benchmarks/scale_sim.py) led to give the answers of the slow ones.

- ``sharded.save._LeastLoaded`` (a heap per holder set) picks what ``min(holders, key=(load, rank))`` picks;
- ``sharded.index._valid_chunk`` accepts exactly what ``_chunk_record`` accepts, with the same record, and never
  raises (anything it refuses goes to ``_chunk_record``, which names the problem);
- ``format.gc_pause.collection_paused`` leaves the collector as it found it;
- ``engine.whole_format.assign_writers`` (a heap) gives every shard the writer ``min`` over the ranks gives it.
"""

from __future__ import annotations

import copy
import gc
import random

import pytest

from lightning_sharing.errors import ManifestError
from lightning_sharing.format.gc_pause import collection_paused
from lightning_sharing.sharded.index import FileRecord, _chunk_record, _valid_chunk
from lightning_sharing.sharded.save import _LeastLoaded


@pytest.mark.parametrize("seed", range(5))
def test_the_heap_picks_the_least_loaded_holder_as_min_does(seed: int) -> None:
    rng = random.Random(seed)
    ranks = list(range(40))
    holder_sets = [tuple(sorted(rng.sample(ranks, rng.choice([1, 2, 3, 8, 40])))) for _ in range(12)]
    fast_load: dict[int, int] = {}
    slow_load: dict[int, int] = {}
    least = _LeastLoaded(fast_load)
    for _ in range(2000):
        holders = rng.choice(holder_sets)
        size = rng.choice([1, 4, 4, 16, 1000])  # repeated sizes: ties broken by the lowest rank
        slow = min(holders, key=lambda r: (slow_load.get(r, 0), r))
        fast = holders[0] if len(holders) == 1 else least.pick(holders)
        assert fast == slow
        slow_load[slow] = slow_load.get(slow, 0) + size
        fast_load[fast] = fast_load.get(fast, 0) + size


_FILES = {"m/chunks-00001.safetensors": FileRecord("m/chunks-00001.safetensors", 10_000, "xxh3_128:" + "0" * 32,
                                                   64, 1)}
_VALID = {"offsets": [2, 0], "sizes": [2, 3], "file": "m/chunks-00001.safetensors", "key": "w@2,0", "begin": 96,
          "length": 24, "writer": 1, "blocks": ["a" * 32]}
_BAD_VALUES = [None, True, -1, 0, 7, 10_000, 2.0, "2", [], [1], [2, 0, 0], ["a" * 31], ["A" * 32], "x/../y",
               "m/other.safetensors", {"k": 1}]


def _mutations():
    yield copy.deepcopy(_VALID)
    for field in _VALID:
        for value in _BAD_VALUES:
            entry = copy.deepcopy(_VALID)
            entry[field] = value
            yield entry
        entry = copy.deepcopy(_VALID)
        del entry[field]
        yield entry
    yield {**copy.deepcopy(_VALID), "extra": 1}
    yield [1, 2]
    for dim in range(2):
        for field in ("offsets", "sizes"):
            for value in _BAD_VALUES[:8]:
                entry = copy.deepcopy(_VALID)
                entry[field][dim] = value
                yield entry


def test_the_fast_chunk_check_accepts_what_the_full_one_accepts() -> None:
    accepted = 0
    for entry in _mutations():
        fast = _valid_chunk(entry, (6, 3), 4, _FILES)
        try:
            full = _chunk_record("w", entry, (6, 3), 4, _FILES)
        except ManifestError:
            assert fast is None, entry
            continue
        assert fast is None or fast == full, entry
        accepted += fast is not None
    assert accepted >= 1  # the valid entry took the fast path


@pytest.mark.parametrize("enabled", [True, False])
def test_the_collector_is_left_as_it_was_found(enabled: bool) -> None:
    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        with collection_paused():
            assert not gc.isenabled()
        assert gc.isenabled() is enabled
        with pytest.raises(ValueError), collection_paused():
            raise ValueError("inside")
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


@pytest.mark.parametrize("seed", range(5))
def test_shard_writers_are_the_least_loaded_ranks_as_min_picks_them(seed: int) -> None:
    from lightning_sharing.engine.whole_format import assign_writers

    rng = random.Random(seed)
    sizes = [rng.choice([1, 5, 5, 64, 1000]) for _ in range(rng.randint(0, 300))]
    spread = tuple(sorted(rng.sample(range(100), rng.randint(1, 60))))
    load = dict.fromkeys(spread, 0)
    expected = [spread[0]] * len(sizes)
    for shard in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):  # the reference: min over every rank
        expected[shard] = min(spread, key=lambda r: (load[r], r))
        load[expected[shard]] += sizes[shard]
    assert assign_writers(sizes, spread) == expected
