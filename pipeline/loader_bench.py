"""Loaders and the train step, measured as a run sees them.

For each stage (size, batch), backend and worker count: steady-state images/s, time to the first
batch and CPU use (GPU memory on CUDA); per stage, the train step's images/s on batches already in
memory. `bench-loader` reports them. `endless` and `timed` are how every measurement here and in the
planner (`pipeline.speeds`) passes over batches: warm up, synchronize, time.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count, cycle
from pathlib import Path

import torch

from pipeline.config import Config, DataConfig, StageSpec
from pipeline.data import Loader, build_loader
from pipeline.data.index import ImageFolderIndex
from pipeline.data.spec import IMAGENET_MEAN, IMAGENET_STD
from pipeline.data.tv2 import shutdown_workers
from pipeline.train.plan import train_batch_size
from pipeline.train.step import synchronize

BACKENDS = ("tv2", "cache", "dali", "classic")  # cache: tv2 with data.cache: decoded


@dataclass(frozen=True)
class LoaderSpeed:
    images_per_s: float  # after the warm-up batches, across epoch boundaries
    first_batch_s: float  # from the first iteration to the first batch
    cpu_percent: float = 0.0  # CPU time of this process and its workers over wall time, x100


@dataclass(frozen=True)
class Timing:
    first_s: float  # from the first `next` to the first batch, `run` on it included
    seconds: float  # of the timed batches (with none timed: the first batch's)
    batches: int
    images: int
    cpu_s: float = 0.0  # CPU seconds of this process and its workers over the timed batches

    @property
    def per_batch_s(self) -> float:
        return self.seconds / self.batches

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


def timed(batches: Iterator, run, timed_batches: int, warmup: int, device: torch.device | None = None) -> Timing:
    """`run(batch)` on the first batch (timed on its own), on `warmup` more, then on `timed_batches` more,
    timed together between two synchronizations of `device` (default: the first batch's)."""
    t0 = time.perf_counter()
    batch = next(batches)
    run(batch)
    device = device or batch[0].device
    synchronize(device)
    first_s = time.perf_counter() - t0
    if not timed_batches:
        return Timing(first_s, first_s, 1, batch[0].shape[0])
    for _ in range(warmup):
        run(next(batches))
    synchronize(device)
    cpu0, t0, images = cpu_seconds(), time.perf_counter(), 0
    for _ in range(timed_batches):
        batch = next(batches)
        run(batch)
        images += batch[0].shape[0]
    synchronize(device)
    return Timing(first_s, time.perf_counter() - t0, timed_batches, images, cpu_seconds() - cpu0)


def endless(loader: Loader, first_epoch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's batches epoch after epoch (from `first_epoch`), as a run consumes them."""
    for epoch in count(first_epoch):
        loader.set_epoch(epoch)
        yield from loader


def measure_loader(loader: Loader, batches: int, warmup: int = 5) -> LoaderSpeed:
    """Time `batches` batches after `warmup` batches; the loader is left open."""
    t = timed(endless(loader), lambda batch: None, batches, warmup - 1)
    return LoaderSpeed(t.images_per_s, t.first_s, 100 * t.cpu_s / t.seconds)


def gpu_free_mb(device: torch.device) -> float | None:
    """Free device memory after handing torch's cached blocks back (CUDA only), so the drop across a
    loader's life is what the loader itself holds: its batches, DALI's pools, the JPEG decoder."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0] / 2**20


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live children (DataLoader workers)."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        pids = [os.getpid()]
        for task in os.listdir(f"/proc/{pids[0]}/task"):
            with open(f"/proc/{pids[0]}/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
        total = 0.0
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
            except (OSError, IndexError, ValueError):
                pass  # a worker that just exited
        return total
    except OSError:  # no /proc: this process only
        return time.process_time()


class ClassicLoader:
    """The reference point: torchvision ImageFolder + PIL + RandomResizedCrop/ToTensor/Normalize +
    a shuffling DataLoader, batches moved to the device as they come."""

    def __init__(self, root: Path, img_size: int, batch_size: int, workers: int, device: torch.device, cfg: DataConfig):
        from torchvision import datasets, transforms

        transform = transforms.Compose(
            [
                transforms.RandomResizedCrop(img_size, scale=cfg.scale, ratio=cfg.ratio),
                transforms.RandomHorizontalFlip(cfg.hflip),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
        self.batch_size, self.device = batch_size, device
        self._loader = torch.utils.data.DataLoader(
            datasets.ImageFolder(str(root), transform=transform),
            batch_size=batch_size,
            shuffle=True,
            num_workers=workers,
            drop_last=True,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
        )

    def __len__(self) -> int:
        return len(self._loader)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self._loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def close(self) -> None:
        shutdown_workers(self._loader)


def make_loader(
    cfg: Config, stage: StageSpec, index: ImageFolderIndex, backend: str, workers: int, device: torch.device
):
    if backend == "classic":
        return ClassicLoader(index.root, stage.img_size, stage.batch_size, workers, device, stage.data)
    data = dataclasses.replace(
        stage.data,
        backend="tv2" if backend == "cache" else backend,
        workers=workers,
        cache="decoded" if backend == "cache" else None,
    )
    return build_loader(
        data,
        index,
        train=True,
        img_size=stage.img_size,
        batch_size=stage.batch_size,
        device=device,
        seed=cfg.run.seed,
        channels_last=stage.train.channels_last,
    )


def measure_step(cfg: Config, k: int, device: torch.device, num_classes: int, batches: int) -> float:
    """Images/s of stage `k`'s train step (its model, freezing, AMP, compile, Mixup, EMA), built as a
    run builds it, on batches already in memory."""
    from pipeline.train.stage import RunContext, build_stage

    stage = cfg.stages[k]
    torch.manual_seed(cfg.run.seed)
    ctx = RunContext.fresh(cfg, device, num_classes, pretrained=False)
    # `lr: find`: time a usable LR, not the range test's placeholder 1.0 (which may diverge)
    with build_stage(ctx, k, choose_lr=lambda parts: 0.01) as parts:
        train_step = parts.train_step
    bs = train_batch_size(stage)
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(min(batches, 8)):  # a few distinct batches, cycled
        x = torch.randn(bs, 3, stage.img_size, stage.img_size, generator=g).to(device)
        x = x.contiguous(memory_format=torch.channels_last) if stage.train.channels_last else x
        data.append((x, torch.randint(0, num_classes, (bs,), generator=g).to(device)))
    # two batches of warm-up (and compilation, when on), then `batches` timed
    return timed(cycle(data), lambda batch: train_step(*batch), batches, 1, device).images_per_s


def run_bench(
    cfg: Config,
    index: ImageFolderIndex,
    num_classes: int,
    device: torch.device,
    backends: list[str],
    workers: list[int],
    batches: int,
    repeats: int = 1,
    log=print,
) -> list[dict]:
    """Every stage x backend x worker count, then the step; rows as written to bench_loader.json.
    With `repeats`, the settings of a stage are measured in turn that many times (so a slow moment
    of the machine spreads over all of them) and each row holds the medians."""
    rows: list[dict] = []
    for k, stage in enumerate(cfg.stages):
        key = {"img_size": stage.img_size, "batch_size": stage.batch_size}
        settings = [
            (backend, w)
            for backend in backends
            for w in (sorted({max(1, w) for w in workers}) if backend == "dali" else workers)  # DALI: >= 1 thread
        ]
        runs: dict[tuple[str, int], list[tuple[LoaderSpeed, float, float | None]]] = {s: [] for s in settings}
        for _ in range(repeats):
            for backend, w in settings:
                free = gpu_free_mb(device)
                setup = time.perf_counter()
                loader = make_loader(cfg, stage, index, backend, w, device)
                setup = time.perf_counter() - setup
                try:
                    speed = measure_loader(loader, batches)
                    held = None if free is None else free - gpu_free_mb(device)  # pools, buffers, decoder
                    runs[(backend, w)].append((speed, setup, held))
                finally:
                    loader.close()
        for (backend, w), measured in runs.items():
            speeds = [m for m, _, _ in measured]
            row = {
                **key,
                "backend": backend,
                "workers": w,
                "images_per_s": round(statistics.median(m.images_per_s for m in speeds), 1),
                "first_batch_s": round(statistics.median(m.first_batch_s for m in speeds), 3),
                "cpu_percent": round(statistics.median(m.cpu_percent for m in speeds), 1),
                "setup_s": round(max(setup for _, setup, _ in measured), 3),
            }
            if measured[0][2] is not None:
                row["gpu_memory_mb"] = round(max(held for _, _, held in measured), 1)
            if repeats > 1:
                row["passes"] = [round(m.images_per_s, 1) for m in speeds]
            rows.append(row)
            log(
                f"{stage.img_size:>4}px batch {stage.batch_size:<4} {backend:<8} workers {w}: "
                f"{row['images_per_s']:>9.1f} img/s, first batch {row['first_batch_s']:.2f} s, "
                f"CPU {row['cpu_percent']:.0f}%"
            )
        step = statistics.median(
            measure_step(cfg, k, device, num_classes, batches=max(8, batches // 2)) for _ in range(repeats)
        )
        rows.append({**key, "backend": "step", "images_per_s": round(step, 1)})
        log(f"{stage.img_size:>4}px batch {stage.batch_size:<4} model step: {step:9.1f} img/s")
    return rows
