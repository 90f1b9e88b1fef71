"""ElasticSampler: DistributedSampler's order at a fixed world size; the same global order at any other one."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from torch.utils.data import DistributedSampler

from lightning_sharing import ElasticSampler
from lightning_sharing.errors import ComponentDeclarationError


def _samplers(size: int, world: int, **kwargs: object) -> list[ElasticSampler]:
    return [ElasticSampler(range(size), num_replicas=world, rank=rank, **kwargs) for rank in range(world)]


@pytest.mark.parametrize("size,world", [(10, 1), (10, 2), (10, 3), (7, 4), (3, 4), (16, 4), (1, 2)])
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [False, True])
def test_same_indices_and_length_as_distributed_sampler(size: int, world: int, shuffle: bool,
                                                        drop_last: bool) -> None:
    for epoch, rank in itertools.product((0, 3), range(world)):
        ours = ElasticSampler(range(size), shuffle=shuffle, seed=7, drop_last=drop_last, num_replicas=world,
                              rank=rank)
        theirs = DistributedSampler(range(size), num_replicas=world, rank=rank, shuffle=shuffle, seed=7,
                                    drop_last=drop_last)
        ours.set_epoch(epoch)
        theirs.set_epoch(epoch)
        assert list(ours) == list(theirs) and len(ours) == len(theirs), (epoch, rank)


def _in_global_order(per_rank: list[list[int]]) -> list[int]:
    """Rank r's k-th sample is entry k * W + r of the global order: put the ranks' samples back in that order."""
    return [x for round_ in itertools.zip_longest(*per_rank) for x in round_ if x is not None]


def _permutation(size: int, seed: int, epoch: int) -> list[int]:
    sampler = ElasticSampler(range(size), seed=seed, num_replicas=1, rank=0)
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("before,after", [(2, 4), (2, 1), (2, 3), (4, 2), (3, 3)])
def test_resume_at_another_world_size_sees_every_sample_once(before: int, after: int) -> None:
    size, steps, batch = 23, 2, 2
    first = _samplers(size, before, seed=3)
    for s in first:
        s.set_epoch(1)
    iterators = [iter(s) for s in first]
    seen = [list(itertools.islice(it, steps * batch)) for it in iterators]  # two steps of two samples per rank
    states = [s.state_dict() for s in first]
    assert states == [{"epoch": 1, "consumed": steps * batch * before}] * before  # GLOBAL: the same everywhere
    resumed = _samplers(size, after, seed=3)
    for s in resumed:
        s.load_state_dict(states[0])
        s.set_epoch(1)  # Lightning calls it with the restored epoch: the position holds
    rest = [list(s) for s in resumed]
    permutation = _permutation(size, seed=3, epoch=1)
    done = steps * batch * before
    # Entry by entry: the first run took the start of the epoch's permutation, the resumed ranks deal the rest.
    assert _in_global_order(seen) == permutation[:done]
    assert _in_global_order(rest)[:size - done] == permutation[done:]
    counts = Counter(x for part in seen + rest for x in part)
    assert set(counts) == set(range(size))
    padding = sum(map(len, seen + rest)) - size
    assert padding == -(size - done) % after  # only the resumed world size pads what was left
    assert sum(count - 1 for count in counts.values()) == padding


def test_resume_at_the_same_world_size_is_the_uninterrupted_stream() -> None:
    size, world = 19, 4
    reference = _samplers(size, world, seed=11)
    for s in reference:
        s.set_epoch(2)
    uninterrupted = [list(s) for s in reference]
    first = _samplers(size, world, seed=11)
    for s in first:
        s.set_epoch(2)
    iterators = [iter(s) for s in first]
    head = [list(itertools.islice(it, 3)) for it in iterators]
    state = first[0].state_dict()
    resumed = _samplers(size, world, seed=11)
    for s in resumed:
        s.load_state_dict(state)
        s.set_epoch(2)
    for rank, s in enumerate(resumed):
        assert len(s) == len(uninterrupted[rank])  # a whole epoch's length, as DistributedSampler's
        assert s.remaining() == len(uninterrupted[rank]) - 3
        assert head[rank] + list(s) == uninterrupted[rank]


def test_next_epoch_is_the_uninterrupted_runs_order_at_the_new_world_size() -> None:
    resumed = _samplers(10, 3)
    for s in resumed:
        s.load_state_dict({"epoch": 0, "consumed": 4})
        list(s)
        s.set_epoch(1)
    fresh = _samplers(10, 3)
    for s in fresh:
        s.set_epoch(1)
    assert [list(s) for s in resumed] == [list(s) for s in fresh]


def test_a_used_up_epoch_is_recorded_complete_and_passed_over_again() -> None:
    sampler = ElasticSampler(range(5), shuffle=False, num_replicas=2, rank=0)
    assert list(sampler) == [0, 2, 4] and sampler.state_dict() == {"epoch": 0, "consumed": 5}
    assert list(sampler) == [0, 2, 4] and len(sampler) == 3  # another pass, like DistributedSampler


def test_bad_arguments_and_states_are_refused() -> None:
    with pytest.raises(ComponentDeclarationError, match="rank must be in"):
        ElasticSampler(range(4), num_replicas=2, rank=2)
    with pytest.raises(ComponentDeclarationError, match="num_replicas must be a positive integer"):
        ElasticSampler(range(4), num_replicas=0, rank=0)
    with pytest.raises(ComponentDeclarationError, match="'epoch' and 'consumed'"):
        ElasticSampler(range(4), num_replicas=1, rank=0).load_state_dict({"epoch": 0})


def test_state_after_what_a_loop_took_while_its_loader_ran_ahead() -> None:
    sampler = ElasticSampler(range(10), shuffle=False, num_replicas=2, rank=0)
    iterator = iter(sampler)
    assert [next(iterator) for _ in range(4)] == [0, 2, 4, 6]  # the loader fetched four, the loop took two
    assert sampler.state_dict() == {"epoch": 0, "consumed": 8}
    assert sampler.state_dict_after(2) == {"epoch": 0, "consumed": 4}
    assert sampler.state_dict_after(99) == {"epoch": 0, "consumed": 10}  # never past the epoch


def test_a_resumed_pass_run_to_its_end_records_the_epoch_complete() -> None:
    sampler = ElasticSampler(range(24), num_replicas=4, rank=1)
    sampler.load_state_dict({"epoch": 0, "consumed": 12})
    assert sampler.remaining() == 3 and len(sampler) == 6
    assert sampler.state_dict() == {"epoch": 0, "consumed": 12}
    assert len(list(sampler)) == 3
    assert sampler.state_dict() == sampler.state_dict_after(3) == {"epoch": 0, "consumed": 24}
    assert sampler.state_dict_after(1) == {"epoch": 0, "consumed": 16}
