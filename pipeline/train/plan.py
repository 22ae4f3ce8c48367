"""The run plan: for every epoch its stage, image sizes, batch and optimizer updates, known before training.

The schedule, the run's progress and ETA, resume checks and run folders all read one `RunPlan`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.config import StageSpec
from pipeline.train.step import TrainStep


def train_batch_size(stage: StageSpec, world_size: int = 1) -> int:
    """Each process's share of the stage's (global) batch. Mixup/CutMix pair each sample with its
    mirror in the batch, so that share must be even."""
    batch = stage.batch_size // world_size
    if stage.train.mixup is not None and batch % 2:
        return batch - 1
    return batch


RAMP_MULTIPLE = 8  # a ramp's sizes are multiples of it: few distinct sizes, so few compiled graphs


def image_size(stage: StageSpec, epoch: int) -> int:
    """The resolution schedule: the training size of epoch `epoch` of `stage` (see `ramp_size`)."""
    return ramp_size(stage.start_size, stage.img_size, stage.epochs, epoch)


def ramp_size(start: int | None, end: int, epochs: int, epoch: int) -> int:
    """Epoch `epoch` of `epochs` on a ramp from `start` to `end` (no ramp: `start` None): a straight
    line from `start` at the first epoch to `end` at the last, the sizes between rounded to a
    multiple of RAMP_MULTIPLE (as FFCV's `get_resolution`)."""
    last = epochs - 1
    if start is None or epoch >= last:
        return end
    if epoch <= 0:
        return start
    size = start + (end - start) * epoch / last
    return min(end, max(start, RAMP_MULTIPLE * round(size / RAMP_MULTIPLE)))


def validation_size(stage: StageSpec, epoch: int) -> int:
    """The input size validation runs at after epoch `epoch` of `stage`: its `val_size`, else the
    epoch's training size."""
    return stage.val_size or image_size(stage, epoch)


@dataclass(frozen=True)
class EpochPlan:
    """One epoch of one stage. `batches` and `batch_per_process` are per process; `images` counts
    every process (the global batch times the batches)."""

    stage: int
    epoch: int  # within its stage, from 0
    img_size: int
    val_size: int
    batch_size: int  # the stage's global batch
    batch_per_process: int
    val_batch_per_process: int
    batches: int  # training batches per process (the last partial batch is dropped)
    updates: int  # optimizer updates: batches / accum_steps, rounded up
    images: int

    @property
    def work(self) -> float:
        """Pixels trained, the unit of the run's progress: a step's cost grows with the image area."""
        return float(self.images) * self.img_size**2


@dataclass(frozen=True)
class RunPlan:
    """Every epoch of the run, in order."""

    epochs: tuple[EpochPlan, ...]

    def of_stage(self, k: int) -> tuple[EpochPlan, ...]:
        return tuple(e for e in self.epochs if e.stage == k)

    def epoch(self, k: int, epoch: int) -> EpochPlan:
        return next(e for e in self.epochs if (e.stage, e.epoch) == (k, epoch))

    def stage_updates(self, k: int) -> int:
        """Optimizer updates of stage `k`: the length of its own schedule."""
        return sum(e.updates for e in self.of_stage(k))

    def updates_before(self, k: int) -> int:
        """Optimizer updates of the stages before stage `k`: where it starts in a run-wide schedule."""
        return sum(e.updates for e in self.epochs if e.stage < k)

    def previous(self, k: int, epoch: int) -> EpochPlan | None:
        """The epoch trained just before epoch `epoch` of stage `k` (None: it is the run's first)."""
        i = self.epochs.index(self.epoch(k, epoch))
        return self.epochs[i - 1] if i > 0 else None

    def compiled_shapes(self) -> int:
        """Distinct input shapes the model meets: each is one compiled graph (training and evaluation
        graphs apart)."""
        train = {(e.img_size, e.batch_per_process) for e in self.epochs}
        val = {(e.val_size, e.val_batch_per_process) for e in self.epochs}
        return len(train) + len(val)

    @property
    def total_updates(self) -> int:
        return sum(e.updates for e in self.epochs)

    def fraction_done(self, k: int, epoch: int, batches_done: int = 0) -> float:
        """The share of the run's work done once `batches_done` batches of epoch `epoch` of stage `k`
        (and everything before it) are trained."""
        current = self.epoch(k, epoch)
        total = sum(e.work for e in self.epochs)
        done = sum(e.work for e in self.epochs if (e.stage, e.epoch) < (k, epoch))
        done += current.work * batches_done / max(current.batches, 1)
        return done / total if total else 1.0

    def status(self, k: int, epoch: int, batches_done: int, elapsed: float) -> str:
        """The run's share done and the time it should still take, at the pace of the `elapsed`
        seconds so far: `37%, 2 min 10 s left`."""
        done = self.fraction_done(k, epoch, batches_done)
        left = f", {format_duration(elapsed * (1 - done) / done)} left" if done > 0 else ""
        return f"{math.floor(100 * done)}%{left}"

    def records(self) -> list[dict[str, Any]]:
        """One mapping per epoch (plan.json, checkpoints)."""
        return [asdict(e) for e in self.epochs]


def plan_run(stages: list[StageSpec], train_size: int, world_size: int = 1) -> RunPlan:
    """The plan for `stages` over a training set of `train_size` images split over `world_size`
    processes (equal shards, the remainder left out: what every loader does)."""
    per_rank = train_size // world_size
    epochs = []
    for k, stage in enumerate(stages):
        batch = train_batch_size(stage, world_size)
        batches = per_rank // batch if batch > 0 else 0
        for epoch in range(stage.epochs):
            epochs.append(
                EpochPlan(
                    stage=k,
                    epoch=epoch,
                    img_size=image_size(stage, epoch),
                    val_size=validation_size(stage, epoch),
                    batch_size=stage.batch_size,
                    batch_per_process=batch,
                    val_batch_per_process=stage.batch_size // world_size,
                    batches=batches,
                    updates=TrainStep.steps_per_epoch(batches, stage.train.accum_steps),
                    images=batches * batch * world_size,
                )
            )
    return RunPlan(tuple(epochs))


def format_duration(seconds: float) -> str:
    """`42 s`, `3 min 05 s`, `1 h 02 min`."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m:02d} min"
