"""Per-stage optimizer (timm's create_optimizer_v2) and the LR schedule, stepped per optimizer step.

Norm and bias parameters get no weight decay; each parameter group's LR is the optimizer LR times
its `lr_scale` (layer decay x `lr_mult`), and every schedule scales each group from its own peak.
"""

from __future__ import annotations

import math
import warnings

import torch
from timm.optim import create_optimizer_v2, get_optimizer_class
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from pipeline.config import OptimizerConfig, ScheduleConfig

FUSED = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)  # torch's optimizers with a fused CUDA kernel


def build_optimizer(
    model_or_groups: torch.nn.Module | list[dict], cfg: OptimizerConfig, fused: bool = False
) -> torch.optim.Optimizer:
    """timm's optimizer over a model (decay/no-decay groups) or over prepared param groups, whose
    `lr_scale` becomes each group's LR here (torch schedulers read a group's LR as its peak).
    `fused`: torch's fused kernel where the optimizer has one (fp16 on CUDA: the GradScaler then
    checks for overflow on the device, without a host sync at every step)."""
    # timm's `sgd` is Nesterov SGD and `momentum` plain momentum SGD
    name = "momentum" if cfg.name == "sgd" and not cfg.nesterov else cfg.name
    extra = {k: v for k, v in (("betas", cfg.betas), ("eps", cfg.eps)) if v is not None}
    optimizer_class = get_optimizer_class(name)
    if fused and getattr(optimizer_class, "func", optimizer_class) in FUSED:
        extra["fused"] = True
    optimizer = create_optimizer_v2(
        model_or_groups, opt=name, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, **extra
    )
    for group in optimizer.param_groups:
        group["lr_scale"] = group.get("lr_scale", 1.0)
        group["lr"] = cfg.lr * group["lr_scale"]
    return optimizer


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    cfg: ScheduleConfig,
    total_steps: int,
    steps_per_epoch: int | None = None,
    offset: int = 0,
) -> LRScheduler:
    """A schedule over exactly `total_steps` optimizer steps (`steps_per_epoch` of them an epoch: the
    unit of warm-up, milestones and cycles) that starts at step `offset` of them: a stage's part of a
    run-wide curve (0: the curve's start, a stage's own schedule). Each group peaks at its own LR."""
    total = total_steps
    if cfg.name == "onecycle":
        defaults = optimizer.defaults
        pct_start = cfg.pct_start
        if total >= 2:  # a warm-up under two steps divides by zero inside OneCycleLR
            pct_start = max(pct_start, min(0.75, 2 / total))
        scheduler = OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=total,
            pct_start=pct_start,
            div_factor=cfg.div_factor,
            final_div_factor=cfg.final_div_factor,
            cycle_momentum="momentum" in defaults or "betas" in defaults,
            base_momentum=cfg.base_momentum,
            max_momentum=cfg.max_momentum,
        )
        if offset:  # go to step `offset` of the curve: LR and momentum as they are there
            scheduler.last_epoch = offset - 1
            with warnings.catch_warnings():  # torch warns of a first step() before optimizer.step(); none ran
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
                scheduler.step()
        return scheduler
    return LambdaLR(optimizer, LRFactor(cfg, total, steps_per_epoch or total, offset))


class LRFactor:
    """The LR multiplier at optimizer step `step` (from 0) for the schedules other than onecycle:
    a linear warm-up, then cosine (with restarts), exponential, multistep, cyclic or constant.
    A plain object, so LambdaLR's state_dict carries it into checkpoints."""

    def __init__(self, cfg: ScheduleConfig, total: int, per_epoch: int, offset: int = 0):
        self.name, self.offset = cfg.name, offset
        self.per_epoch, self.total = per_epoch, total
        epochs = total / per_epoch
        self.warmup = min(round(cfg.warmup_epochs * per_epoch), max(total - 1, 0))
        self.warmup_factor, self.floor = cfg.warmup_factor, cfg.min_lr_ratio
        self.cycles, self.cycle_decay = cfg.cycles, cfg.cycle_decay
        default_gamma = {"exponential": 0.8, "multistep": 0.1}.get(cfg.name, 1.0)
        self.gamma = cfg.gamma if cfg.gamma is not None else default_gamma
        milestones = cfg.milestones if cfg.milestones is not None else [epochs / 2, epochs * 3 / 4]
        self.milestones = sorted(round(m * per_epoch) for m in milestones)
        cycle = cfg.cycle_epochs if cfg.cycle_epochs is not None else epochs / 2
        self.cycle_steps = max(2, round(cycle * per_epoch))

    def __call__(self, step: int) -> float:
        step += self.offset  # where this stage starts on a run-wide curve
        if step < self.warmup:
            return self.warmup_factor + (1 - self.warmup_factor) * step / self.warmup
        t = step - self.warmup  # steps after the warm-up
        rest = max(self.total - self.warmup, 1)
        if self.name == "cosine":
            length = rest / self.cycles
            k = min(int(t // length), self.cycles - 1)
            phase = min((t - k * length) / max(length - 1, 1), 1.0)
            peak = self.cycle_decay**k
            return self.floor + (peak - self.floor) * 0.5 * (1 + math.cos(math.pi * phase))
        if self.name == "exponential":
            return self.gamma ** (t / self.per_epoch)
        if self.name == "multistep":
            return self.gamma ** sum(step >= m for m in self.milestones)
        if self.name == "cyclic":  # triangular: floor -> peak -> floor, once per cycle
            pos = (t % self.cycle_steps) / self.cycle_steps
            return self.floor + (1 - self.floor) * (1 - abs(2 * pos - 1))
        return 1.0  # constant


def current_lr_momentum(optimizer: torch.optim.Optimizer) -> tuple[float, float | None]:
    """The highest group LR (the peak, where groups differ) and the momentum (or beta1)."""
    group = max(optimizer.param_groups, key=lambda g: g["lr"])
    momentum = group.get("momentum", group.get("betas", (None,))[0])
    return float(group["lr"]), momentum


def respan_scheduler(
    scheduler: LRScheduler, optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, span: tuple[int, int, int]
) -> LRScheduler:
    """`scheduler`, stretched or shortened to a new span (total, per epoch, where the stage starts: as
    `build_scheduler`'s) at the step it has reached: the curve the plan now has, from the same step, each
    group from its own peak. A run re-planned mid-way (`run --budget`) goes on with it."""
    total, per_epoch, offset = span
    reached = scheduler.last_epoch  # steps taken: from the curve's start (onecycle) or the stage's
    if isinstance(scheduler, OneCycleLR):
        for group in optimizer.param_groups:
            group["lr"] = group["max_lr"]  # build_scheduler reads each group's peak from its LR
        return build_scheduler(optimizer, cfg, max(total, reached + 1), per_epoch, offset=reached)
    respanned = build_scheduler(optimizer, cfg, total, per_epoch, offset)  # each group's `initial_lr` is kept
    respanned.last_epoch = reached - 1
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
        respanned.step()
    return respanned
