"""Which samples an epoch of the tv2 loader visits, in which order, with which augmentation seeds."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from pipeline.data.spec import LoaderSpec, sample_seeds, shard_bounds


class EpochSampler(Sampler):
    """Yields (index, augmentation seed); training shuffles per epoch, validation keeps order.

    Seeds depend only on (seed, epoch, position), so a resumed epoch sees the same crops
    whatever the number of workers.
    """

    def __init__(self, n: int, spec: LoaderSpec):
        self.n, self.spec, self.epoch = n, spec, 0
        self.skip = 0  # samples of the epoch already trained (a run resumed mid-epoch)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _positions(self) -> torch.Tensor:
        # Training: every rank takes an equal share (the remainder is dropped, as DistributedSampler
        # with drop_last); validation: contiguous shards, each sample on exactly one rank.
        spec = self.spec
        if spec.train:
            per_rank = self.n // spec.world_size
            return torch.arange(spec.rank, per_rank * spec.world_size, spec.world_size)
        return torch.arange(*shard_bounds(self.n, spec.rank, spec.world_size))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order, seeds = sample_seeds(self.spec.seed, self.epoch, self.n)
        positions = self._positions()
        indices = order[positions] if self.spec.train else positions
        return iter(zip(indices[self.skip :].tolist(), seeds[positions][self.skip :].tolist()))

    def full_length(self) -> int:
        return len(self._positions())

    def __len__(self) -> int:
        return max(0, self.full_length() - self.skip)
