"""A distributed sampler for training loops that resume in mid-epoch and oversample rare classes."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class ShardedSampler(Sampler[int]):
    """DistributedSampler's contract (seeded shuffle per epoch, padded to equal shards, rank r takes every
    r-th index) plus random oversampling and a start offset for resuming in mid-epoch.

    torch's DistributedSampler offers neither oversampling nor a mid-epoch start, hence this class.
    ``labels`` holds one class per sample: its length is the dataset's, its values matter only to oversampling.
    """

    def __init__(self, labels: Sequence[int], *, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 oversample: bool = False, seed: int = 0):
        if len(labels) == 0:
            raise ValueError("no samples to train on: check the task's labels and the fold's subjects")
        self.labels = np.asarray(labels)
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.oversample, self.seed = shuffle, oversample, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, *, start: int = 0) -> None:
        """Epoch for the shuffle; ``start`` skips this rank's first ``start`` indices (resume)."""
        self.epoch, self.start = epoch, start

    def _global(self) -> np.ndarray:
        rng = np.random.default_rng((self.seed, self.epoch))
        idx = np.arange(self.labels.size)
        if self.oversample:
            classes, counts = np.unique(self.labels, return_counts=True)
            extra = [rng.choice(idx[self.labels == c], counts.max() - n) for c, n in zip(classes, counts)]
            idx = np.concatenate([idx, *extra])
        if self.shuffle:
            idx = idx[rng.permutation(idx.size)]
        total = math.ceil(idx.size / self.world_size) * self.world_size
        return np.resize(idx, total)  # pads by repeating from the start, as DistributedSampler does

    def __len__(self) -> int:
        n = self.labels.size
        if self.oversample:
            n = int(np.unique(self.labels, return_counts=True)[1].max()) * np.unique(self.labels).size
        return math.ceil(n / self.world_size) - self.start

    def __iter__(self) -> Iterator[int]:
        return iter(self._global()[self.rank::self.world_size][self.start:].tolist())
