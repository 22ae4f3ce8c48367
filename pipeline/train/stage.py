"""Building one stage: loaders, freeze plan, EMA, optimizer (LR scaled for the batch), compile and DDP,
schedule and train step. The run, `lr-find`, `bench-loader` and the benchmarks all build stages here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from pipeline.config import Config, StageSpec, TrainConfig
from pipeline.data import Datasets, Loader, build_loader, describe_loader
from pipeline.distributed import World
from pipeline.model import FreezePlan, ParamGroups, apply_freeze, optimizer_param_groups
from pipeline.train.checkpoint import derive_seed
from pipeline.train.loop import reestimate_bn
from pipeline.train.plan import EpochPlan, RunPlan, describe_epochs, image_size, train_batch_size, validation_size
from pipeline.train.schedule import build_optimizer, build_scheduler
from pipeline.train.step import TrainStep, WeightEma, build_train_step, compile_model, resolve_precision

BN_PASSES = 2 * 10**6  # loader epochs of BatchNorm re-estimation: apart from the run's and the range test's


def use_compile(stage: StageSpec, device: torch.device, sync_bn: bool = False) -> bool:
    """`auto`: on CUDA, unless SyncBatchNorm is in use: Dynamo breaks the graph at every one of them
    (pytorch#161302), which gives dozens of small graphs, each split again by DDP."""
    auto = device.type == "cuda" and not sync_bn
    return stage.train.compile == "on" or (stage.train.compile == "auto" and auto)


class CompiledModel:
    """One compiled module for the whole run (each new input shape adds a graph to it). A stage that
    trains other parameters (or other BatchNorm modes) starts from fresh graphs, rather than
    trusting every torch version's guards on requires_grad."""

    def __init__(self):
        self.module: torch.nn.Module | None = None
        self._trainable: tuple | None = None  # what the graphs were traced with

    def of(self, model: torch.nn.Module, freeze: FreezePlan) -> torch.nn.Module:
        trainable = (tuple(freeze.frozen), len(freeze.fixed_norms), freeze.trainable)
        if self.module is not None and trainable != self._trainable:
            torch._dynamo.reset()
            self.module = None
        self._trainable = trainable
        if self.module is None:
            self.module = compile_model(model)
        return self.module


@dataclass
class RunContext:
    """What lives for the whole run, and every stage is built from: one model (so its weights and
    BatchNorm statistics go on from stage to stage), its groups, one EMA, one compiled module."""

    cfg: Config
    device: torch.device
    model: torch.nn.Module
    groups: ParamGroups
    num_classes: int
    datasets: Datasets | None = None  # None: no loaders (a benchmark feeding batches itself)
    world: World = World()
    ema: WeightEma | None = None  # made by the first stage with `ema`
    compiled: CompiledModel = field(default_factory=CompiledModel)
    memory: dict[int, int] = field(default_factory=dict)  # stage -> peak bytes of its probe (CUDA)
    scaler: torch.amp.GradScaler | None = None  # fp16's, made by the first stage that needs one

    @classmethod
    def fresh(cls, cfg: Config, device: torch.device, num_classes: int, datasets=None, pretrained=True) -> RunContext:
        """A new model of `cfg` on `device` (`pretrained` False: without its weights, for timing) and its groups."""
        from pipeline.model import build_model, param_groups

        model = build_model(cfg.model if pretrained else replace(cfg.model, pretrained=None), num_classes).to(device)
        return cls(cfg, device, model, param_groups(model), num_classes, datasets)


@dataclass
class StageParts:
    """Everything one stage trains with. Closing it (or leaving its `with`) stops the loaders' workers."""

    index: int
    stage: StageSpec
    train_cfg: TrainConfig  # the stage's settings, its LR scaled for its batch (`optimizer.scale_lr`)
    seed: int  # the stage's own seed: loaders, and each epoch's draws (derived from it)
    freeze: FreezePlan
    optimizer: torch.optim.Optimizer
    net: torch.nn.Module  # what evaluation calls: the compiled module or the model itself
    train_net: torch.nn.Module  # what the step calls: `net`, or the model in DDP (compiled)
    ema: WeightEma | None
    train_step: TrainStep | None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    train_loader: Loader | None
    val_loader: Loader | None
    compiled: bool
    sizes: tuple[int, int] = (0, 0)  # what the loaders deliver now: (training, validation) input size

    def fit_sizes(self, ctx: RunContext, train_size: int, val_size: int) -> None:
        """New loaders for the sizes they change to (a ramp's next step, validation at its own size)."""
        if self.train_loader is not None and train_size != self.sizes[0]:
            self.train_loader.close()
            self.train_loader = None  # a failed build below leaves nothing half-closed behind
            self.train_loader = stage_loader(ctx, self.stage, self.seed, train=True, size=train_size)
        if self.val_loader is not None and val_size != self.sizes[1]:
            self.val_loader.close()
            self.val_loader = None
            self.val_loader = stage_loader(ctx, self.stage, self.seed, train=False, size=val_size)
        self.sizes = (train_size, val_size)

    def reestimate_bn(self, ctx: RunContext, plan: RunPlan, planned: EpochPlan) -> None:
        """`bn_reestimate`: BatchNorm statistics measured at the new size when the training size changes."""
        previous, images = plan.previous(self.index, planned.epoch), self.train_cfg.bn_reestimate
        if images and previous is not None and previous.img_size != planned.img_size:
            self.train_loader.set_epoch(BN_PASSES + plan.epochs.index(planned))  # draws apart from the epochs'
            reestimate_bn(ctx.model, self.train_loader, images, self.train_step.precision, ctx.device)

    def close(self) -> None:
        for loader in (self.train_loader, self.val_loader):
            if loader is not None:
                loader.close()
        if torch.cuda.is_initialized():  # the next stage's shapes differ: hand the cached blocks back
            torch.cuda.empty_cache()

    def __enter__(self) -> StageParts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # also on a stop or an error: the workers end now, not at exit

    def describe(self, world: World = World(), peak_bytes: int | None = None) -> str:
        """The stage line printed when it starts; `peak_bytes`: its memory probe's (CUDA)."""
        stage, tc, train_step = self.stage, self.train_cfg, self.train_step
        per_process = train_batch_size(stage, world.world_size)
        batches = len(self.train_loader) if self.train_loader is not None else 0
        sizes = f"{stage.start_size}->{stage.img_size}px" if stage.start_size else f"{stage.img_size}px"
        compiled = "on" if self.compiled else "off"
        if not self.compiled and stage.train.compile == "auto" and stage.train.sync_bn and world.distributed:
            compiled += " (auto, with SyncBatchNorm)"
        if stage.val_size:
            sizes += f" (validation {stage.val_size}px)"
        return (
            f"stage {self.index}: {sizes}, batch {per_process * world.world_size}"
            + (f" ({per_process} per process)" if world.distributed else "")
            + f", {describe_epochs(stage, batches)}; amp {train_step.precision.name}, "
            f"compile {compiled}, mixup {'on' if train_step.mixup else 'off'}; "
            f"loader {describe_loader(stage.data, getattr(self.train_loader, 'path', None))}"
            + (f"; frozen {', '.join(self.freeze.frozen)}" if self.freeze.frozen else "")
            + (f"; {len(self.freeze.fixed_norms)} BatchNorm layers fixed" if self.freeze.fixed_norms else "")
            + (f"; {tc.accum_steps} micro-batches per step" if tc.accum_steps > 1 else "")
            + (f"; EMA {tc.ema.decay}" if tc.ema else "")
            + (f"; memory {peak_bytes / 2**30:.1f} GiB at its largest size (probe)" if peak_bytes else "")
        )


def scaled_lr(stage: StageSpec) -> TrainConfig:
    """The stage's train settings with `optimizer.scale_lr` applied: the LR times (samples per
    optimizer step / `base_batch`), or its square root; unchanged for `lr: find`."""
    tc = stage.train
    opt = tc.optimizer
    if opt.lr == "find" or opt.scale_lr == "none":
        return tc
    ratio = stage.batch_size * tc.accum_steps / opt.base_batch  # samples per optimizer step (global)
    factor = ratio if opt.scale_lr == "linear" else math.sqrt(ratio)
    return replace(tc, optimizer=replace(opt, lr=opt.lr * factor))


def build_stage(
    ctx: RunContext,
    k: int,
    plan: RunPlan | None = None,
    *,
    validation: bool = True,
    choose_lr: Callable[[StageParts], float] | None = None,
) -> StageParts:
    """Stage `k` of `ctx.cfg`, ready to train. `plan`: the run plan its schedule spans (None: no
    schedule, as for the range test and benchmarks). `validation`: build the validation loader too.
    With `lr: find`, `choose_lr(parts)` returns the base LR (from a range test) before the schedule
    is built; without it the LR stays the placeholder 1.0 (a resumed stage loads its optimizer)."""
    cfg, device = ctx.cfg, ctx.device
    stage = cfg.stages[k]
    tc = scaled_lr(stage)
    seed = derive_seed(cfg.run.seed, k)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the progress bar's `mem`: this stage's peak
    train_loader, val_loader = _loaders(ctx, stage, seed, validation)
    try:
        model = ctx.model
        model.to(memory_format=torch.channels_last if tc.channels_last else torch.contiguous_format)
        freeze = apply_freeze(model, tc, ctx.groups, f"stages.{k}")
        freeze.train_mode(model)
        ema = _stage_ema(ctx, tc)
        find = tc.optimizer.lr == "find"
        optimizer = build_optimizer(
            optimizer_param_groups(model, tc, ctx.groups, f"stages.{k}"),
            replace(tc.optimizer, lr=1.0) if find else tc.optimizer,  # the placeholder keeps each group's ratio
            fused=device.type == "cuda" and resolve_precision(tc.amp, device).needs_scaler,
        )
        net, train_net = _networks(ctx, stage, freeze)
        parts = StageParts(
            index=k,
            stage=stage,
            train_cfg=tc,
            seed=seed,
            freeze=freeze,
            optimizer=optimizer,
            net=net,
            train_net=train_net,
            ema=ema,
            train_step=None,  # below: after the LR is known and the schedule built
            scheduler=None,
            train_loader=train_loader,
            val_loader=val_loader,
            compiled=net is not model,
            sizes=(image_size(stage, 0), validation_size(stage, 0)),
        )
        if find and choose_lr is not None:
            lr = choose_lr(parts)
            for group in optimizer.param_groups:
                group["lr"] *= lr  # the placeholder 1.0 kept each group's ratio
        if plan is not None:
            parts.scheduler = build_scheduler(optimizer, tc.schedule, *schedule_span(plan, k, tc.schedule.scope))
        parts.train_step = build_train_step(
            train_net, optimizer, parts.scheduler, tc, device, ctx.num_classes, ema=ema, scaler=ctx.scaler
        )
        ctx.scaler = parts.train_step.scaler or ctx.scaler  # fp16: the loss scale goes on to the next stage
        return parts
    except BaseException:
        for loader in (train_loader, val_loader):
            if loader is not None:
                loader.close()
        raise


def schedule_span(plan: RunPlan, k: int, scope: str) -> tuple[int, int, int]:
    """(total updates, updates per epoch, where stage `k` starts) of the curve its schedule follows:
    the stage's own, or with `scope: run` one over the whole run (its epoch: the run's mean)."""
    if scope == "run":
        return plan.total_updates, max(1, round(plan.total_updates / len(plan.epochs))), plan.updates_before(k)
    per_epoch = [e.updates for e in plan.of_stage(k)]
    return sum(per_epoch), per_epoch[0], 0


def stage_loader(ctx: RunContext, stage: StageSpec, seed: int, *, train: bool, size: int) -> Loader:
    """The stage's training loader (this process's shard of its global batch) or validation loader."""
    world = ctx.world
    return build_loader(
        stage.data,
        ctx.datasets.train if train else ctx.datasets.val,
        train=train,
        img_size=size,
        batch_size=train_batch_size(stage, world.world_size) if train else stage.batch_size // world.world_size,
        device=ctx.device,
        seed=seed,
        channels_last=stage.train.channels_last,
        rank=world.rank,
        world_size=world.world_size,
    )


def _loaders(ctx: RunContext, stage: StageSpec, seed: int, validation: bool) -> tuple[Loader | None, Loader | None]:
    """The loaders a stage starts with, at its first epoch's sizes."""
    if ctx.datasets is None:
        return None, None
    train = stage_loader(ctx, stage, seed, train=True, size=image_size(stage, 0))
    if not validation:
        return train, None
    try:
        return train, stage_loader(ctx, stage, seed, train=False, size=validation_size(stage, 0))
    except BaseException:
        train.close()
        raise


def _networks(ctx: RunContext, stage: StageSpec, freeze: FreezePlan) -> tuple[torch.nn.Module, torch.nn.Module]:
    """What evaluation calls (compiled, or the model) and what the step calls (that, or DDP)."""
    model, device = ctx.model, ctx.device
    sync_bn = ctx.world.distributed and ctx.cfg.train.sync_bn
    net = ctx.compiled.of(model, freeze) if use_compile(stage, device, sync_bn) else model
    if not ctx.world.distributed:
        return net, net
    # DDP, then torch.compile, as timm's train.py: the compiled backward then overlaps the gradient
    # all-reduce (DDPOptimizer); evaluation calls `net`, with no DDP
    ids = [device.index] if device.type == "cuda" else None
    # no buffer broadcast at every forward (timm's --no-ddp-bb): evaluation and checkpoints take rank
    # 0's BatchNorm statistics anyway (distributed.same_buffers), and training uses batch statistics
    train_net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    return net, (compile_model(train_net) if net is not model else train_net)


def _stage_ema(ctx: RunContext, tc: TrainConfig) -> WeightEma | None:
    """The run's EMA with this stage's settings (made by the first stage that asks), or None."""
    if tc.ema is None:
        return None
    if ctx.ema is None:
        ctx.ema = WeightEma(ctx.model, tc.ema)
    ctx.ema.configure(tc.ema)
    if tc.channels_last:
        ctx.ema.module.to(memory_format=torch.channels_last)
    return ctx.ema
