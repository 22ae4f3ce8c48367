"""Loader throughput: images/s in steady state and time to the first batch, for any `Loader`.

Batches are consumed as the training step would take them (on the device, synchronised at the end).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import count

from pipeline.data import Loader
from pipeline.train.step import synchronize


@dataclass(frozen=True)
class LoaderSpeed:
    images_per_s: float  # after the warm-up batches, across epoch boundaries
    first_batch_s: float  # from the first iteration to the first batch


def endless(loader: Loader):
    """The loader's batches epoch after epoch, as a run consumes them."""
    for epoch in count():
        loader.set_epoch(epoch)
        yield from loader


def measure_loader(loader: Loader, batches: int, warmup: int = 5) -> LoaderSpeed:
    """Time `batches` batches after `warmup` batches; the loader is left open."""
    stream = endless(loader)
    start = time.perf_counter()
    x, _ = next(stream)
    first = time.perf_counter() - start
    device = x.device
    for _ in range(warmup - 1):
        next(stream)
    synchronize(device)
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        x, _ = next(stream)
        images += x.shape[0]
    synchronize(device)
    return LoaderSpeed(images / (time.perf_counter() - start), first)
