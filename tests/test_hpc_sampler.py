"""hpc.sampler.ShardedSampler: equal padded shards, oversampling to balanced classes, mid-epoch resume."""

from hpc.sampler import ShardedSampler


def test_sampler_shards_pad_oversample_and_resume():
    labels = [0] * 7 + [1] * 2
    shards = [list(ShardedSampler(labels, rank=r, world_size=2, seed=1)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 5
    assert set(shards[0] + shards[1]) == set(range(9))
    over = ShardedSampler(labels, oversample=True, seed=1)
    idx = list(over)
    assert len(idx) == len(over) == 14 and sum(labels[i] for i in idx) == 7
    s = ShardedSampler(labels, seed=1)
    s.set_epoch(3)
    full = list(s)
    s.set_epoch(3, start=4)
    assert list(s) == full[4:] and len(s) == 5
    s.set_epoch(4)
    assert list(s) != full
