"""The Trainer strategies' elastic_data switch: which training sampler Lightning's inserted one becomes."""

from __future__ import annotations

from torch.utils.data import DistributedSampler

from lightning_sharing import ElasticSampler, SharingModelParallelStrategy, SharingStrategy


def test_the_inserted_training_sampler_becomes_elastic_unless_switched_off() -> None:
    inserted = DistributedSampler(range(10), num_replicas=2, rank=1, shuffle=True, seed=3, drop_last=True)
    elastic = SharingStrategy().training_sampler(inserted)
    assert isinstance(elastic, ElasticSampler)
    settings = (elastic.num_replicas, elastic.rank, elastic.shuffle, elastic.seed, elastic.drop_last)
    assert settings == (2, 1, True, 3, True)
    inserted.set_epoch(4)
    elastic.set_epoch(4)
    assert list(elastic) == list(inserted) and len(elastic) == len(inserted)  # the same order
    assert SharingStrategy(elastic_data=False).training_sampler(inserted) is inserted
    assert isinstance(SharingModelParallelStrategy(elastic_data=True).training_sampler(inserted), ElasticSampler)
    own = ElasticSampler(range(10), num_replicas=2, rank=0)
    assert SharingStrategy().training_sampler(own) is own  # already elastic: left alone
