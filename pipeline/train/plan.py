"""The run plan: for every epoch its stage, image sizes, batch and optimizer updates, known before training.

The schedule, the run's progress and ETA, resume checks and run folders all read one `RunPlan`.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from pipeline.config import SizeJumpConfig, StageSpec
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
    # across a size jump (`train.size_jumps`): this share of the batches at the run's final size...
    final_size: int | None = None
    final_share: float = 0.0
    # ...and, in the last epoch before a jump, the next size, on a share of the rest rising from 0 to 1
    next_size: int | None = None

    @property
    def train_sizes(self) -> tuple[int, ...]:
        """Every size a training batch of the epoch can have."""
        return tuple(sorted({self.img_size, self.final_size or self.img_size, self.next_size or self.img_size}))

    @property
    def load_size(self) -> int:
        """The size the loader delivers: the largest; smaller batches are resized on the device."""
        return max(self.train_sizes)

    def size_shares(self) -> dict[int, float]:
        """The expected share of the epoch's batches at each size."""
        shares = {self.img_size: 1.0 - self.final_share}
        if self.next_size:
            shares[self.img_size] = shares[self.next_size] = (1.0 - self.final_share) / 2  # a linear rise: half
        if self.final_size:
            shares[self.final_size] = shares.get(self.final_size, 0.0) + self.final_share
        return shares

    def batch_px(self, seed: int, batch: int) -> int:
        """The size of training batch `batch` (from 0): drawn from (seed, stage, epoch, batch) alone, so a
        resumed epoch and every process draw the same sizes."""
        if self.final_size is None and self.next_size is None:
            return self.img_size
        draw = random.Random(f"{seed}:{self.stage}:{self.epoch}:{batch}")
        if self.final_size is not None and draw.random() < self.final_share:
            return self.final_size
        if self.next_size is not None and draw.random() < (batch + 0.5) / max(self.batches, 1):
            return self.next_size
        return self.img_size

    @property
    def work(self) -> float:
        """Pixels trained, the unit of the run's progress: a step's cost grows with the image area."""
        return float(self.images) * sum(share * size**2 for size, share in self.size_shares().items())


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
        train = {(size, e.batch_per_process) for e in self.epochs for size in e.train_sizes}
        val = {(e.val_size, e.val_batch_per_process) for e in self.epochs}
        return len(train) + len(val)

    def batches_before(self, k: int, epoch: int) -> int:
        """Training batches (per process) of the epochs before epoch `epoch` of stage `k`: where that
        epoch starts on the run's axis of batches (TensorBoard's step)."""
        return sum(e.batches for e in self.epochs if (e.stage, e.epoch) < (k, epoch))

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
        full = per_rank // batch if batch > 0 else 0
        for epoch in range(stage.epochs):
            batches = last_epoch_batches(full, stage.last_epoch_share) if epoch == stage.epochs - 1 else full
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
    return RunPlan(tuple(mix_size_jumps(epochs, stages[0].train.size_jumps if stages else None)))


def last_epoch_batches(batches: int, share: float) -> int:
    """The batches of a stage's last epoch that trains `share` of its `batches` (at least one)."""
    return min(batches, max(1, round(share * batches))) if share < 1 else batches


def describe_epochs(stage: StageSpec, batches: int) -> str:
    """`2 epochs x 6 steps`, and `(the last epoch 3)` when its last epoch is shortened."""
    last = last_epoch_batches(batches, stage.last_epoch_share)
    return f"{stage.epochs} epochs x {batches} steps" + (f" (the last epoch {last})" if last < batches else "")


def is_jump(size: int, following: int, jumps: SizeJumpConfig) -> bool:
    return following >= jumps.ratio * size


def mix_size_jumps(epochs: list[EpochPlan], jumps: SizeJumpConfig | None) -> list[EpochPlan]:
    """`train.size_jumps`: in a run with a jump in training size, every epoch below the final size trains
    a share of its batches at the final size (its features stay in use at that scale), and the epoch
    before each jump mixes the next size in, more of it batch by batch, so no switch is abrupt."""
    sizes = [e.img_size for e in epochs]
    if jumps is None or not any(is_jump(a, b, jumps) for a, b in zip(sizes, sizes[1:])):
        return epochs
    final = sizes[-1]
    mixed = []
    for i, e in enumerate(epochs):
        following = sizes[i + 1] if i + 1 < len(sizes) else e.img_size
        anchored = jumps.final_share > 0 and e.img_size < final
        mixed.append(
            replace(
                e,
                final_size=final if anchored else None,
                final_share=jumps.final_share if anchored else 0.0,
                next_size=following if jumps.transition and is_jump(e.img_size, following, jumps) else None,
            )
        )
    return mixed


def describe_jumps(plan: RunPlan, k: int) -> str:
    """What `train.size_jumps` does in stage `k`, for its stage line ('' when nothing): `stage 1: 40 -> 64 px
    jump, 1 transition epoch; 25% of batches at the final 64 px`."""
    epochs = plan.of_stage(k)
    jumps = [f"{e.img_size} -> {e.next_size} px jump, 1 transition epoch" for e in epochs if e.next_size]
    anchored = [e for e in epochs if e.final_size]
    if anchored:
        e = anchored[0]
        where = "" if len(anchored) == len(epochs) else f" in {len(anchored)} of its {len(epochs)} epochs"
        jumps.append(f"{round(100 * e.final_share)}% of batches at the final {e.final_size} px{where}")
    return f"stage {k}: " + "; ".join(jumps) + " (train.size_jumps)" if jumps else ""


def with_last_stage_length(stages: list[dict], length: float) -> list[dict]:
    """`stages` with the last one `length` epochs long: whole epochs, then a share of one more
    (`last_epoch_share`, to a thousandth)."""
    stages = copy.deepcopy(stages)
    length = round(length, 3)
    last = stages[-1]
    last["epochs"] = max(1, math.ceil(length))
    share = round(length - (last["epochs"] - 1), 3)
    if 0 < share < 1:
        last["last_epoch_share"] = share
    else:
        last.pop("last_epoch_share", None)
    return stages


def longest(fits: Callable[[float], bool], low: float, high: float) -> float:
    """The longest length in [low, high], to a thousandth of an epoch rounded down, that `fits`
    (bisection: `fits` holds at `low` and turns false once, somewhere up to `high`)."""
    while high - low > 1e-3:
        mid = (low + high) / 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return math.floor(1000 * low) / 1000


def format_epochs(length: float) -> str:
    """`5`, or `4.37` for a run or stage whose last epoch trains a share of its batches."""
    return f"{length:.0f}" if abs(length - round(length)) < 5e-4 else f"{length:.2f}"


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
