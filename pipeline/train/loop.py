"""The epoch loop and evaluation: batches through the train step, metrics flushed every `log_every`
batches (one sync each), mid-epoch checkpoints at optimizer-update boundaries; exact top-1/top-5.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from pipeline import distributed
from pipeline.data import Loader
from pipeline.distributed import World
from pipeline.errors import UserError
from pipeline.report import MetricsLog, epoch_bar
from pipeline.train.checkpoint import rng_state, set_rng_state
from pipeline.train.schedule import current_lr_momentum
from pipeline.train.signals import StopSignals
from pipeline.train.step import Precision, TrainStep, keep_modes


@dataclass
class LoopSettings:
    """What the loop needs to know of the run around it."""

    run_dir: Path
    device: torch.device
    world: World
    metrics: MetricsLog
    stop: StopSignals
    log_every: int  # batches between metric flushes
    checkpoint_every: float  # seconds between mid-epoch checkpoints


@dataclass
class EpochResult:
    seconds: float  # training seconds of the epoch (across a resume)
    images: int  # over every process
    loss: float  # mean training loss of its batches


# Called at an update boundary with (batches done, the epoch's partial sums) to checkpoint mid-epoch.
SaveMidEpoch = Callable[[int, dict[str, float]], None]


class MetricsWindow:
    """The losses of the batches since the last flush, kept on the device: a flush reduces them over
    the processes once, checks they are finite, writes one record per batch and moves the bar."""

    def __init__(self, loop: LoopSettings, stage: int, epoch: int, train_step: TrainStep, bar, partial: dict):
        self.loop, self.stage, self.epoch, self.train_step, self.bar = loop, stage, epoch, train_step, bar
        self.pending: list[tuple[int, torch.Tensor, float, float | None]] = []
        self.loss_sum, self.batches = partial.get("loss_sum", 0.0), int(partial.get("steps", 0))
        self.started = time.perf_counter()

    def add(self, batch_idx: int, loss: torch.Tensor, lr: float, momentum: float | None) -> None:
        self.pending.append((batch_idx, loss, lr, momentum))

    def __len__(self) -> int:
        return len(self.pending)

    def flush(self, batch_images: int, postfix: dict[str, str]) -> None:
        """`batch_images`: images in one global batch (for the rate)."""
        world = self.loop.world
        # the global batch's loss: the mean over the processes (one collective per flush)
        stacked = distributed.sum_all(torch.stack([p[1] for p in self.pending]).float())
        losses = (stacked / world.world_size).tolist()
        now = time.perf_counter()
        rate = len(self.pending) * batch_images / (now - self.started)
        self.started = now
        for (batch_idx, _, lr, momentum), loss in zip(self.pending, losses):
            if not math.isfinite(loss) and self.train_step.scaler is None:
                k = self.stage
                raise UserError(
                    f"stage {k} epoch {self.epoch} batch {batch_idx}: the loss is {loss}; training diverged. Lower "
                    f"the LR (stages.{k}.lr or train.optimizer.lr) and start a new run; the last good "
                    f"weights are in {self.loop.run_dir / 'checkpoints' / 'last.pt'}"
                )
            self.loop.metrics.write(
                {
                    "kind": "batch",
                    "stage": self.stage,
                    "epoch": self.epoch,
                    "batch": batch_idx,
                    "lr": lr,
                    "momentum": momentum,
                    "loss": loss,
                    "images_per_s": round(rate, 1),
                }
            )
        self.loss_sum += sum(losses)
        self.batches += len(losses)
        self.bar.update(len(self.pending))
        lr = self.pending[-1][2]
        shown = {"loss": f"{losses[-1]:.3f}", "lr": f"{lr:.3g}", "img/s": f"{rate:.0f}", **postfix}
        if self.loop.device.type == "cuda":
            shown["mem"] = f"{torch.cuda.max_memory_allocated(self.loop.device) / 2**30:.1f}G"
        self.bar.set_postfix(shown)
        self.pending = []


def train_epoch(
    loop: LoopSettings,
    train_step: TrainStep,
    loader: Loader,
    optimizer: torch.optim.Optimizer,
    *,
    stage: int,
    epoch: int,
    label: str,
    start: int = 0,
    partial: dict[str, float] | None = None,
    rng: dict[str, Any] | None = None,
    save_mid_epoch: SaveMidEpoch | None = None,
    run_status: Callable[[int], str] | None = None,
    batch_px: Callable[[int], int] | None = None,
    batches: int | None = None,
    retarget: Callable[[int, float], int | None] | None = None,
) -> EpochResult:
    """One pass over `loader` (from batch `start` when resumed mid-epoch, with the RNGs `rng` put
    back), or over its first `batches` (a stage's shortened last epoch, `last_epoch_share`). Every
    `checkpoint_every` seconds, and when a stop is asked for, `save_mid_epoch` checkpoints at an
    update boundary. `run_status(batches_done)`: the run's progress, shown on the bar.
    `batch_px(batch)`: the size batch `batch` trains at (`train.size_jumps`), resized on the device.
    `retarget(batches_done, seconds)`: asked at each flush that ends on an update boundary; a new
    number of batches for this epoch (more than those done), or None (`run --budget`'s last epoch)."""
    world = loop.world
    n = len(loader) if batches is None else min(batches, len(loader))
    bar = epoch_bar(n, label, world.is_main)
    bar.update(start)
    partial = partial or {}
    images, before = int(partial.get("images", 0)), partial.get("seconds", 0.0)
    window = MetricsWindow(loop, stage, epoch, train_step, bar, partial)
    t0 = last_save = time.perf_counter()
    due = False  # a checkpoint at the next update boundary (every process agrees on it)
    stream = iter(loader)  # creating the iterator may draw from torch's RNG:
    if rng is not None:  # a resumed epoch puts the RNGs back after it
        set_rng_state(rng, loop.device)
    try:
        for batch_idx, (x, y) in enumerate(stream, start=start):
            lr, momentum = current_lr_momentum(optimizer)
            if batch_px is not None:
                x = resize_batch(x, batch_px(batch_idx))
            window.add(batch_idx, train_step(x, y), lr, momentum)
            images += x.shape[0] * world.world_size
            last = batch_idx == n - 1
            if not world.distributed and save_mid_epoch is not None:  # one process: at any batch
                due = due or time.perf_counter() - last_save >= loop.checkpoint_every or loop.stop.requested is not None
            checkpoint = due and train_step.at_boundary and not last  # the epoch's end saves anyway
            if len(window) == loop.log_every or last or checkpoint:
                status = {"run": run_status(batch_idx + 1)} if run_status is not None else {}
                window.flush(x.shape[0] * world.world_size, status)
                if retarget is not None and not last and train_step.at_boundary:
                    n = retarget(batch_idx + 1, before + time.perf_counter() - t0) or n
                    bar.total = n
                if world.distributed and not due and save_mid_epoch is not None and not last:
                    # under torchrun the processes decide together, at flushes (one collective)
                    due = loop.stop.agree(time.perf_counter() - last_save >= loop.checkpoint_every, loop.device)
                    checkpoint = due and train_step.at_boundary
            if checkpoint:
                loop.metrics.flush()
                seconds = before + time.perf_counter() - t0
                sums = {"loss_sum": window.loss_sum, "steps": window.batches, "images": images, "seconds": seconds}
                save_mid_epoch(batch_idx + 1, sums)
                last_save, due = time.perf_counter(), False
                if loop.stop.agree(False, loop.device):  # a stop asked for, on any process: all stop here
                    where = f"stage {stage}, epoch {epoch}, batch {batch_idx + 1} of {n}"
                    raise loop.stop.stopped(loop.run_dir, where)
            if last:  # a shortened epoch ends before the loader does
                break
    finally:
        bar.close()  # clears the bar, so an error message starts on a line of its own
    return EpochResult(before + time.perf_counter() - t0, images, window.loss_sum / max(window.batches, 1))


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """A B x C x H x W batch at size x size, antialiased (a smaller size sees what a loader at that size
    would deliver), in the memory format it came in."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1
    out = F.interpolate(x if x.is_floating_point() else x.float(), size=(size, size), mode="bilinear", antialias=True)
    if not x.is_floating_point():
        out = out.round_().clamp_(0, 255).to(x.dtype)
    return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's top-k classes (best first) and whether each of them is its label: top-1 is
    `hits[:, 0]`, top-k `hits.any(dim=1)`."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return top, top.eq(labels[:, None])


@torch.no_grad()
def evaluate(net: torch.nn.Module, loader: Loader, precision: Precision, device: torch.device) -> dict[str, float]:
    """Loss, top-1 and top-5 (percent) over every validation sample exactly once; leaves every
    module in the train/eval mode it found (frozen BatchNorm layers stay in eval)."""
    with keep_modes(net):
        net.eval()
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        correct1 = torch.zeros((), device=device, dtype=torch.long)
        correct5 = torch.zeros((), device=device, dtype=torch.long)
        count = 0
        for x, y in loader:
            n = y.shape[0]
            if n < loader.batch_size:  # pad the last batch: a new shape would mean a new compiled graph
                pad = x.new_zeros((loader.batch_size - n, *x.shape[1:])).contiguous(memory_format=torch.channels_last)
                x = torch.cat([x, pad])
            with precision.autocast(device):
                logits = net(x)[:n].float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            _, hits = topk_hits(logits, y)
            correct1 += hits[:, 0].sum()
            correct5 += hits.any(dim=1).sum()
            count += n
    # under torchrun each process saw its own shard: the sums over every process
    totals = torch.stack([loss_sum, correct1.double(), correct5.double(), torch.tensor(float(count), device=device)])
    loss_sum, correct1, correct5, count = distributed.sum_all(totals).tolist()
    count = max(int(count), 1)
    return {
        "loss": round(loss_sum / count, 5),
        "top1": round(100.0 * correct1 / count, 3),
        "top5": round(100.0 * correct5 / count, 3),
        "samples": count,
    }


@torch.no_grad()
def reestimate_bn(
    model: torch.nn.Module, batches: Iterable, images: int, precision: Precision, device: torch.device
) -> int:
    """Measure the BatchNorm running statistics afresh on about `images` training images: reset, then
    a cumulative average over the batches, forward only, in train mode. Only the statistics change:
    weights, other buffers, frozen BatchNorm layers (in eval mode) and the RNGs are left as they were.
    Returns the images used."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    counts = [m.num_batches_tracked.clone() for m in norms]
    rng = rng_state(device)
    seen = 0
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over every batch, not an exponential one
        for x, _ in batches:
            with precision.autocast(device):
                model(x)
            seen += x.shape[0]
            if seen >= images:
                break
    finally:
        for m, momentum, count in zip(norms, momenta, counts):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)
        set_rng_state(rng, device)
    return seen
