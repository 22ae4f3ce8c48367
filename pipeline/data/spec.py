"""The loader contract both backends implement: what a loader is built for and what it answers.

The trainer only sees `Loader`; `LoaderSpec` carries one split, one stage and one DDP shard.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class LoaderSpec:
    """What one loader is built for: a split, a stage's size and batch, a device and a shard."""

    img_size: int
    batch_size: int
    train: bool
    device: torch.device
    seed: int
    workers: int = 0  # tv2: DataLoader processes; dali: DALI CPU threads (at least one)
    decode_on: str = "workers"  # workers | device
    channels_last: bool = True
    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    crop_pct: float = 0.875
    rank: int = 0
    world_size: int = 1
    on_error: str = "fail"  # a file that fails to decode: fail naming it, or skip (another sample of its batch)


class Loader(Protocol):
    """Batches of (images, labels) on the device: float, normalised, NCHW (channels_last), int64."""

    batch_size: int

    def __len__(self) -> int: ...  # batches per epoch; training drops the last partial batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    @property
    def num_samples(self) -> int: ...  # samples one epoch yields on this rank

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...  # start_batch: resume mid-epoch

    def close(self) -> None: ...


def sample_seeds(seed: int, epoch: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The epoch's sample order and one augmentation seed per position, from (seed, epoch) alone."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint64)
    g = torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))
    order = torch.randperm(n, generator=g)
    seeds = torch.randint(0, 2**62, (n,), generator=g)
    return order, seeds


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous shard `rank` of `n` items: sizes differ by at most one (DALI's readers split alike)."""
    return n * rank // world_size, n * (rank + 1) // world_size


def ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGINT/SIGTERM to the main process, which checkpoints and then stops them (a
    Ctrl-C reaches the whole process group; a scheduler's SIGTERM may too)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
