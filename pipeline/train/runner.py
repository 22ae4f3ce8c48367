"""The stage runner: one model through every stage; per stage new loaders, optimizer and OneCycleLR.

Each epoch trains, validates, and checkpoints (last.pt, best.pt; stageK.pt when a stage ends).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from timm.layers import convert_sync_batchnorm

from pipeline import distributed
from pipeline.config import Config, DataConfig, EmaConfig, StageSpec
from pipeline.data import Datasets, Loader, build_loader, require_backend, resolve_workers, scan_datasets
from pipeline.distributed import World
from pipeline.errors import ConfigError, DataError, Stopped, UserError
from pipeline.files import write_json, write_text
from pipeline.lr_finder import RangeTest, find_lr, plot, write_csv
from pipeline.model import FreezePlan, ParamGroups, apply_freeze, build_model, optimizer_param_groups, param_groups
from pipeline.report import MetricsLog, epoch_bar, format_summary, plot_run
from pipeline.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, seed_everything, set_rng_state
from pipeline.train.schedule import build_optimizer, build_scheduler, current_lr_momentum
from pipeline.train.step import Precision, TrainStep, WeightEma, build_train_step, compile_model, keep_modes


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint, restored on resume."""

    stage: int = 0  # the stage being trained
    epoch: int = 0  # epochs of `stage` already completed
    best_val_top1: float = 0.0
    stages: list[dict[str, Any]] = field(default_factory=list)  # summaries of finished stages
    stage_seconds: float = 0.0  # training seconds spent in `stage` so far
    stage_images: int = 0
    seconds: float = 0.0  # wall seconds of finished stages
    elapsed: float = 0.0  # wall seconds of the whole run so far (validation included; across resumes)
    step: int = 0  # batches of epoch `epoch` already trained: > 0 in a checkpoint taken mid-epoch
    partial: dict[str, float] = field(default_factory=dict)  # that epoch's loss sum, steps, images, seconds

    @property
    def started(self) -> bool:
        """Whether the stage `stage` has trained at all."""
        return self.epoch > 0 or self.step > 0


def resolve_device(name: str, world: World = World()) -> torch.device:
    """`auto`: CUDA if present; under torchrun each process takes the GPU of its local rank."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device: cuda was asked for but no CUDA device is available (use auto or cpu)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and world.distributed:
        if world.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"torchrun: local rank {world.local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                "use --nproc_per_node at most the number of GPUs"
            )
        return torch.device("cuda", world.local_rank)
    return torch.device(name)


def use_compile(stage: StageSpec, device: torch.device) -> bool:
    return stage.train.compile == "on" or (stage.train.compile == "auto" and device.type == "cuda")


def derive_seed(*parts: int) -> int:
    """An independent seed for each (run seed, stage, epoch)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def train_batch_size(stage: StageSpec, world_size: int = 1) -> int:
    """Each process's share of the stage's (global) batch. Mixup/CutMix pair each sample with its
    mirror in the batch, so that share must be even."""
    batch = stage.batch_size // world_size
    if stage.train.mixup is not None and batch % 2:
        return batch - 1
    return batch


def check_stages(cfg: Config, datasets: Datasets, world: World = World()) -> None:
    """Catch, before any training, a stage whose batch cannot be filled by the training set or
    split evenly over the processes."""
    n = len(datasets.train)
    for i, stage in enumerate(cfg.stages):
        if stage.batch_size % world.world_size:
            raise ConfigError(
                f"stages.{i}.batch_size: {stage.batch_size} is the global batch and does not divide by the "
                f"{world.world_size} processes; use a multiple of {world.world_size}"
            )
        per_rank = n // world.world_size
        if train_batch_size(stage, world.world_size) > per_rank or train_batch_size(stage, world.world_size) < 1:
            share = f" ({per_rank} per process)" if world.distributed else ""
            raise ConfigError(
                f"stages.{i}.batch_size: {stage.batch_size} is larger than the training set "
                f"({n} images in {datasets.train.root}{share}); use at most {per_rank * world.world_size}"
            )
        if world.distributed and stage.train.mixup is not None and (stage.batch_size // world.world_size) % 2:
            raise ConfigError(
                f"stages.{i}.batch_size: {stage.batch_size} gives each of the {world.world_size} processes an odd "
                f"share, and Mixup pairs samples; use a multiple of {2 * world.world_size}"
            )
        if stage.train.sync_bn != cfg.train.sync_bn:
            raise ConfigError(f"stages.{i}.sync_bn: set for the whole run, in train.sync_bn")


def resolve_num_classes(cfg: Config, datasets: Datasets) -> int:
    found = len(datasets.classes)
    if cfg.model.num_classes == "auto":
        return found
    if cfg.model.num_classes < found:
        raise ConfigError(f"model.num_classes: {cfg.model.num_classes} is fewer than the {found} class folders")
    return int(cfg.model.num_classes)


def new_run_dir(out_dir: Path, name: str) -> Path:
    base = out_dir / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir, n = base, 1
    while run_dir.exists():
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    try:
        run_dir.mkdir(parents=True)
    except OSError as e:
        raise ConfigError(f"run.out_dir: cannot create {run_dir} ({e.strerror or e})") from None
    return run_dir


def newest_run(out_dir: Path, name: str) -> Path | None:
    """The most recent run folder `<name>-<timestamp>[-N]` in `out_dir` that has a checkpoint."""
    pattern = re.compile(re.escape(name) + r"-\d{8}-\d{6}(-\d+)?")
    runs = [
        d
        for d in (out_dir.iterdir() if out_dir.is_dir() else [])
        if pattern.fullmatch(d.name) and (d / "checkpoints" / "last.pt").is_file()
    ]
    return max(runs, key=lambda d: (d / "checkpoints" / "last.pt").stat().st_mtime, default=None)


# On resume these may change; so may stages not yet started. Anything else would make the
# checkpoint's optimizer, scheduler or weights disagree with the configuration.
RESUME_MUTABLE = ("run.", "data.workers", "data.decode_on", "data.on_error", "model.pretrained")


def check_resume_changes(saved: dict[str, Any], current: dict[str, Any], progress: Progress) -> None:
    """Refuse `--set` changes on resume that touch what has already been trained."""
    first_open = progress.stage + (1 if progress.started else 0)  # first stage not yet begun
    for path, old, new in _differences(saved, current):
        if path.startswith(RESUME_MUTABLE):
            continue
        parts = path.split(".")
        if parts[0] == "stages" and len(parts) > 1 and parts[1].isdigit() and int(parts[1]) >= first_open:
            continue
        if path == "stages" and len(new) >= first_open and new[:first_open] == old[:first_open]:
            continue
        raise ConfigError(
            f"{path}: cannot change on resume ({old!r} -> {new!r}): the run has already trained with it; "
            "start a new run instead"
        )


def check_resume_data(checkpoint: dict[str, Any], datasets: Datasets, progress: Progress) -> None:
    """The class folders, and mid-stage the training-set size, must be what the run trained on."""
    if checkpoint["classes"] != datasets.classes:
        raise DataError(
            f"data.train: the class folders of {datasets.train.root} changed since the checkpoint "
            "(classes added, removed or renamed); resume needs the same classes, or start a new run"
        )
    if progress.started and checkpoint.get("train_size", len(datasets.train)) != len(datasets.train):
        raise DataError(
            f"data.train: {datasets.train.root} now has {len(datasets.train)} images, the run trained on "
            f"{checkpoint['train_size']}; resume mid-stage needs the same set (or start a new run)"
        )


def check_optimizers(cfg: Config, device: torch.device) -> None:
    """Build each stage's optimizer on a dummy parameter: some need CUDA or an optional package."""
    probe = torch.nn.Linear(2, 2).to(device)
    for i, stage in enumerate(cfg.stages):
        opt = stage.train.optimizer
        try:
            build_optimizer(probe, replace(opt, lr=1.0) if opt.lr == "find" else opt)
        except Exception as e:
            field = "train.optimizer.name" if opt == cfg.train.optimizer else f"stages.{i}.optimizer.name"
            raise ConfigError(f"{field}: {opt.name!r} cannot be used here ({type(e).__name__}: {e})") from None


def check_input_sizes(model: torch.nn.Module, cfg: Config, device: torch.device) -> None:
    """A forward pass at each stage's size: fixed-size models (ViT at 224) fail here, not at hour 2."""
    model.eval()
    try:
        with torch.no_grad():
            for i, stage in enumerate(cfg.stages):
                try:
                    model(torch.zeros(1, 3, stage.img_size, stage.img_size, device=device))
                except Exception as e:
                    raise ConfigError(
                        f"stages.{i}.img_size: model.arch {cfg.model.arch!r} cannot take {stage.img_size}px "
                        f"input ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
                    ) from None
    finally:
        model.train()


def check_groups(model: torch.nn.Module, cfg: Config, groups: ParamGroups) -> None:
    """Every stage's `freeze` and `lr_mult` name groups this model has, before any training."""
    try:
        for i, stage in enumerate(cfg.stages):
            apply_freeze(model, stage.train, groups, f"stages.{i}")
            optimizer_param_groups(model, stage.train, groups, f"stages.{i}")
    finally:
        for p in model.parameters():
            p.requires_grad_(True)


def _differences(old: Any, new: Any, path: str = ""):
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            yield from _differences(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            yield from _differences(a, b, f"{path}.{i}")
    elif old != new:
        yield path, old, new


def prepare(cfg: Config, world: World = World()) -> tuple[torch.device, Datasets, int]:
    """Device, scanned datasets and class count; every user error surfaces here, before training."""
    device = resolve_device(cfg.run.device, world)
    if cfg.train.sync_bn and world.distributed and device.type != "cuda":
        raise ConfigError(
            "train.sync_bn: SyncBatchNorm needs CUDA (NCCL); on CPU each process keeps its own statistics"
        )
    for stage in cfg.stages:  # a stage may choose its own loader
        require_backend(stage.data.backend)
    datasets = scan_datasets(cfg.data)
    check_stages(cfg, datasets, world)
    check_optimizers(cfg, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device, datasets, resolve_num_classes(cfg, datasets)


def describe_loader(data: DataConfig) -> str:
    cache = " + decoded cache" if data.cache else ""
    unit = "threads" if data.backend == "dali" else "workers"
    return f"{data.backend}{cache}, {resolve_workers(data.workers)} {unit}"


def run_training(cfg: Config, out_dir: Path | None = None, resume: Path | None = None) -> Path:
    """Train through every stage; returns the run folder. `resume`: a run folder to continue.
    Under torchrun every process runs this; rank 0 alone writes and prints."""
    world = distributed.from_environment()
    device, datasets, num_classes = prepare(cfg, world)
    distributed.init(world, device.type == "cuda")
    try:
        quiet = contextlib.redirect_stdout(open(os.devnull, "w")) if not world.is_main else contextlib.nullcontext()
        with quiet:
            return _train(cfg, out_dir, resume, world, device, datasets, num_classes)
    finally:
        distributed.shutdown()


def _train(cfg: Config, out_dir, resume, world: World, device, datasets: Datasets, num_classes: int) -> Path:
    seed_everything(cfg.run.seed)
    checkpoint = None
    progress = Progress()
    if resume is not None:
        run_dir = Path(resume)
        checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.pt")
        progress = Progress(**checkpoint["progress"])
        check_resume_changes(checkpoint["config"], cfg.raw, progress)
        check_resume_data(checkpoint, datasets, progress)
        saved_world = checkpoint.get("world_size", 1)
        if progress.step > 0 and saved_world != world.world_size:  # shards, and so the batches done, differ
            raise ConfigError(
                f"--resume: the checkpoint was taken mid-epoch by {saved_world} process(es); resume it with "
                f"{saved_world} (at an epoch's end any number may go on)"
            )
        model = build_model(replace(cfg.model, pretrained=None), num_classes).to(device)  # weights: below
        model.load_state_dict(checkpoint["state_dict"])
        distributed.barrier()  # every rank has read the checkpoint before rank 0 cuts the metrics back
        if world.is_main:
            MetricsLog.keep_before(run_dir / "metrics.jsonl", progress.stage, progress.epoch, progress.step)
        where = f", batch {progress.step}" if progress.step else ""
        print(f"resuming {run_dir} at stage {progress.stage}, epoch {progress.epoch}{where}")
    else:
        model = build_model(cfg.model, num_classes).to(device)
        check_input_sizes(model, cfg, device)
    groups = param_groups(model)
    check_groups(model, cfg, groups)
    if cfg.train.sync_bn and world.distributed:
        model = convert_sync_batchnorm(model)  # timm's: keeps BatchNormAct2d's activation
    if resume is None:
        run_dir = distributed.from_main(
            new_run_dir(Path(out_dir or cfg.run.out_dir), cfg.run.name) if world.is_main else None
        )
    if world.is_main:
        write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.raw, sort_keys=False))
    processes = f" x {world.world_size} processes (torchrun)" if world.distributed else ""
    print(
        f"run folder {run_dir}\ndevice {device}{processes}; {len(datasets.train)} train / {len(datasets.val)} val "
        f"images, {num_classes} classes; model {cfg.model.arch} (groups {groups.describe()})"
    )
    runner = StageRunner(cfg, run_dir, device, datasets, model, num_classes, groups, world)
    try:
        with StopSignals() as stop:
            runner.stop = stop
            runner.run(progress, checkpoint)
    finally:
        runner.metrics.close()
    return run_dir


class StopSignals:
    """SIGTERM (preemption) and SIGINT (Ctrl-C) ask the run to stop: it checkpoints at the next
    optimizer step and exits with a message saying how to resume. A second Ctrl-C stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.requested == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now (the last checkpoint stays whole)
        self.requested = signum
        # os.write, not print: the handler may run in the middle of another write to stderr
        os.write(2, f"\n{signal.Signals(signum).name}: stopping at the next step, after a checkpoint\n".encode())

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def stopped(self, run_dir: Path, where: str) -> Stopped:
        name = signal.Signals(self.requested).name
        return Stopped(
            f"stopped by {name} at {where}; checkpoint saved. Resume with: python -m pipeline run --resume {run_dir}",
            128 + int(self.requested),
        )


class StageRunner:
    """Holds what lives for the whole run: the model, its compiled form, the metrics log."""

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        device: torch.device,
        datasets: Datasets,
        model,
        num_classes: int,
        groups: ParamGroups,
        world: World = World(),
    ):
        self.cfg, self.run_dir, self.device, self.datasets = cfg, run_dir, device, datasets
        self.model, self.num_classes, self.groups, self.world = model, num_classes, groups, world
        self.ema: WeightEma | None = None  # created by the first stage with `ema`; lives through the run
        self.stop = StopSignals()  # run_training installs its handlers
        self.metrics = MetricsLog(run_dir / "metrics.jsonl") if world.is_main else MetricsLog(None)
        self._compiled: torch.nn.Module | None = None
        self._trainable: tuple | None = None  # what the compiled graphs were traced with
        # Each stage compiles one training and one evaluation graph; keep them all cached.
        torch._dynamo.config.recompile_limit = max(8, 2 * len(cfg.stages) + 2)

    def network(self, stage: StageSpec, plan: FreezePlan) -> torch.nn.Module:
        """The module to call: compiled (one object for the whole run) or the plain model. A stage
        that trains other parameters (or other BatchNorm modes) starts from fresh graphs, rather
        than trusting every torch version's guards on requires_grad."""
        if not use_compile(stage, self.device):
            return self.model
        trainable = (tuple(plan.frozen), len(plan.fixed_norms), plan.trainable)
        if self._compiled is not None and trainable != self._trainable:
            torch._dynamo.reset()
            self._compiled = None
        self._trainable = trainable
        if self._compiled is None:
            self._compiled = compile_model(self.model)
        return self._compiled

    def run(self, progress: Progress, checkpoint: dict[str, Any] | None) -> None:
        cfg = self.cfg
        run_start = self._mark = time.perf_counter()
        if checkpoint is not None and checkpoint.get("state_dict_ema") is not None:
            self.ema = WeightEma(self.model, cfg.stages[progress.stage].train.ema or cfg.train.ema or EmaConfig())
            self.ema.load_state_dict(checkpoint["state_dict_ema"], checkpoint.get("ema_updates", 0))
        for k in range(progress.stage, len(cfg.stages)):
            stage = cfg.stages[k]
            resume_state = checkpoint if (checkpoint is not None and progress.started) else None
            self.run_stage(k, stage, progress, resume_state)
            checkpoint = None
        summary = {
            "stages": progress.stages,
            "final_val_top1": progress.stages[-1]["val_top1"] if progress.stages else 0.0,
            "best_val_top1": progress.best_val_top1,
            "seconds": round(progress.seconds, 2),
            "wall_seconds": round(self.tick(progress), 2),
        }
        if self.world.is_main:
            write_json(self.run_dir / "summary.json", summary)
        print(format_summary(summary))
        print(f"done in {time.perf_counter() - run_start:.1f} s; outputs in {self.run_dir}")

    def run_stage(self, k: int, stage: StageSpec, progress: Progress, resume_state: dict | None) -> None:
        cfg, device, tc = self.cfg, self.device, stage.train
        stage_seed = derive_seed(cfg.run.seed, k)
        loader_args = dict(img_size=stage.img_size, device=device, seed=stage_seed, channels_last=tc.channels_last)
        world = self.world
        loader_args.update(rank=world.rank, world_size=world.world_size)  # each process reads its own shard
        train_loader = build_loader(
            stage.data,
            self.datasets.train,
            train=True,
            batch_size=train_batch_size(stage, world.world_size),
            **loader_args,
        )
        val_loader = build_loader(
            stage.data, self.datasets.val, train=False, batch_size=stage.batch_size // world.world_size, **loader_args
        )
        try:
            if tc.channels_last:
                self.model.to(memory_format=torch.channels_last)
            plan = apply_freeze(self.model, tc, self.groups, f"stages.{k}")
            plan.train_mode(self.model)
            if tc.ema is not None:
                if self.ema is None:
                    self.ema = WeightEma(self.model, tc.ema)
                self.ema.configure(tc.ema)
                if tc.channels_last:
                    self.ema.module.to(memory_format=torch.channels_last)
            ema = self.ema if tc.ema is not None else None
            find = tc.optimizer.lr == "find"
            if not find and tc.optimizer.scale_lr != "none":  # the rule for the stage's global batch
                ratio = stage.batch_size * tc.accum_steps / tc.optimizer.base_batch  # samples per optimizer step
                tc = replace(
                    tc,
                    optimizer=replace(
                        tc.optimizer,
                        lr=tc.optimizer.lr * (ratio if tc.optimizer.scale_lr == "linear" else math.sqrt(ratio)),
                    ),
                )
            optimizer = build_optimizer(
                optimizer_param_groups(self.model, tc, self.groups, f"stages.{k}"),
                replace(tc.optimizer, lr=1.0) if find else tc.optimizer,
            )
            net = self.network(stage, plan)
            train_net = net
            if self.world.distributed:  # DDP, then torch.compile, as timm's train.py: the compiled backward
                # then overlaps the gradient all-reduce (DDPOptimizer); evaluation calls `net`, with no DDP
                ids = [self.device.index] if self.device.type == "cuda" else None
                train_net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
                if net is not self.model:
                    train_net = compile_model(train_net)
            if find and resume_state is None:  # a resumed stage gets its LRs back from the optimizer state
                result = stage_range_test(
                    self.model, train_net, optimizer, stage, train_loader, device, self.num_classes, stage_seed, world
                )
                if self.world.is_main:
                    save_range_test(result, self.run_dir / f"lr_find_stage{k}", f"stage {k}: {stage.img_size}px")
                lr = distributed.from_main(recommended_lr(result, f"stages.{k}.lr"))  # every rank trains with rank 0's
                for group in optimizer.param_groups:
                    group["lr"] *= lr  # the placeholder 1.0 kept each group's ratio
                self.metrics.write({"kind": "lr_find", "stage": k, "epoch": 0, "lr": lr, **result.suggestions})
                print(f"stage {k}: lr find suggests {lr:.3g} ({result.recommendation}); {result.stop_reason}")
            per_epoch = TrainStep.steps_per_epoch(len(train_loader), tc.accum_steps)
            scheduler = build_scheduler(optimizer, tc.schedule, per_epoch * stage.epochs, per_epoch)
            step = build_train_step(train_net, optimizer, scheduler, tc, device, self.num_classes, ema=ema)
            precision, scaler = step.precision, step.scaler
            if resume_state is not None:
                optimizer.load_state_dict(resume_state["optimizer"])
                scheduler.load_state_dict(resume_state["scheduler"])
                if scaler is not None and resume_state.get("scaler"):
                    scaler.load_state_dict(resume_state["scaler"])
            print(
                f"stage {k}: {stage.img_size}px, batch {train_loader.batch_size * world.world_size}"
                + (f" ({train_loader.batch_size} per process)" if world.distributed else "")
                + f", {stage.epochs} epochs x "
                f"{len(train_loader)} steps; amp {precision.name}, compile {'on' if net is not self.model else 'off'}, "
                f"mixup {'on' if step.mixup else 'off'}; loader {describe_loader(stage.data)}"
                + (f"; frozen {', '.join(plan.frozen)}" if plan.frozen else "")
                + (f"; {len(plan.fixed_norms)} BatchNorm layers fixed" if plan.fixed_norms else "")
                + (f"; {tc.accum_steps} micro-batches per step" if tc.accum_steps > 1 else "")
                + (f"; EMA {tc.ema.decay}" if tc.ema else "")
            )

            def state() -> dict[str, Any]:
                return {
                    "state_dict": self.model.state_dict(),
                    "arch": cfg.model.arch,
                    "num_classes": self.num_classes,
                    "classes": self.datasets.classes,
                    "train_size": len(self.datasets.train),
                    "world_size": self.world.world_size,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "state_dict_ema": self.ema.state_dict() if self.ema is not None else None,
                    "ema_updates": self.ema.updates if self.ema is not None else 0,
                    "progress": asdict(progress),
                    "rng": rng_state(),
                    "config": cfg.raw,
                }

            ckpt_dir = self.run_dir / "checkpoints"

            def save_mid_epoch(batches_done: int, partial: dict[str, float]) -> None:
                progress.step, progress.partial = batches_done, partial
                self.tick(progress)
                self.save([ckpt_dir / "last.pt"], state())

            for epoch in range(progress.epoch, stage.epochs):
                start, rng = progress.step, None
                if start == 0:
                    seed_everything(derive_seed(stage_seed, epoch))  # Mixup draws; resumed epochs repeat exactly
                else:  # resumed mid-epoch: the RNGs as they were when the checkpoint was taken
                    rng = resume_state["rng"]
                train_loader.set_epoch(epoch, start_batch=start)
                step.start_epoch(len(train_loader), start)
                seconds, images, train_loss = self.train_epoch(
                    k, epoch, stage, step, train_loader, optimizer, start, progress.partial, rng, save_mid_epoch
                )
                progress.step, progress.partial = 0, {}
                distributed.same_buffers(self.model, self.ema.module if ema is not None else None)
                val = evaluate(net, val_loader, precision, device)
                val_ema = evaluate(ema.module, val_loader, precision, device) if ema is not None else None
                progress.epoch = epoch + 1
                progress.stage_seconds += seconds
                progress.stage_images += images
                improved = val["top1"] > progress.best_val_top1
                progress.best_val_top1 = max(progress.best_val_top1, val["top1"])
                record = {
                    "kind": "epoch",
                    "stage": k,
                    "epoch": epoch,
                    "img_size": stage.img_size,
                    "train_loss": train_loss,
                    "train_seconds": round(seconds, 3),
                    "train_images_per_s": round(images / seconds, 1),
                    **{f"val_{key}": v for key, v in val.items()},
                    **{f"val_ema_{key}": v for key, v in (val_ema or {}).items() if key != "samples"},
                }
                record["elapsed_s"] = round(self.tick(progress), 2)
                self.metrics.write(record)
                self.metrics.flush()
                if self.world.is_main:
                    try:
                        plot_run(self.run_dir)  # refreshed every epoch, to be watched
                    except OSError as e:
                        print(f"warning: plots not written ({e.strerror or e})", file=sys.stderr)
                print(
                    f"stage {k} epoch {epoch}: train loss {train_loss:.4f}, val loss {val['loss']:.4f}, "
                    f"top-1 {val['top1']:.2f}%, top-5 {val['top5']:.2f}%"
                    + (f", EMA top-1 {val_ema['top1']:.2f}%" if val_ema else "")
                    + f" ({seconds:.1f} s, {images / seconds:.0f} img/s)"
                )
                if progress.epoch == stage.epochs:  # the stage is done: record it before saving
                    progress.stages.append(
                        {
                            "img_size": stage.img_size,
                            "batch_size": stage.batch_size,
                            "epochs": stage.epochs,
                            "seconds": round(progress.stage_seconds, 2),
                            "train_images_per_s": round(progress.stage_images / progress.stage_seconds, 1),
                            "val_top1": val["top1"],
                            **({"val_ema_top1": val_ema["top1"]} if val_ema else {}),
                        }
                    )
                    progress.seconds += progress.stage_seconds
                paths = [ckpt_dir / "best.pt"] if improved else []
                if progress.epoch == stage.epochs:
                    paths.append(ckpt_dir / f"stage{k}.pt")
                paths.append(ckpt_dir / "last.pt")  # last: a crash before it replays this epoch, rewriting all
                self.save(paths, state())
                finished = k == len(cfg.stages) - 1 and progress.epoch == stage.epochs
                if self.agree(False) and not finished:  # a stop asked for; in the run's last epoch it just ends
                    raise self.stop.stopped(self.run_dir, f"stage {k}, after epoch {epoch}")
        finally:  # also on a stop or an error: the workers end now, not at exit
            train_loader.close()
            val_loader.close()
        progress.stage, progress.epoch = k + 1, 0
        progress.stage_seconds, progress.stage_images = 0.0, 0

    def tick(self, progress: Progress) -> float:
        """Add the wall time since the last call to `progress.elapsed` (which checkpoints carry)."""
        now = time.perf_counter()
        progress.elapsed += now - self._mark
        self._mark = now
        return progress.elapsed

    def agree(self, due: bool) -> bool:
        """Whether to checkpoint now: `due` here, or a stop asked for, on any process. Every process
        takes part (one small collective under torchrun), so all of them save and stop at the same
        step; a process that did not get the signal itself stops too."""
        flags = torch.tensor([int(due), int(self.stop.requested is not None)], device=self.device)
        due_any, stop_any = distributed.max_all(flags).tolist()
        if stop_any and self.stop.requested is None:
            self.stop.requested = signal.SIGTERM  # another process was told to stop
        return bool(due_any or stop_any)

    def save(self, paths: list[Path], state: dict[str, Any]) -> None:
        """Write a checkpoint; a failed write (a full disk) leaves the previous one whole and stops the
        run with a message that says so. Rank 0 alone writes."""
        problem = None
        if self.world.is_main:
            try:
                save_checkpoint(paths, state)
            except OSError as e:
                last = self.run_dir / "checkpoints" / "last.pt"
                kept = (
                    f"the previous checkpoint {last} is intact" if last.is_file() else "no checkpoint was written yet"
                )
                problem = (
                    f"cannot write checkpoint {paths[0]} ({e.strerror or e}); {kept}. Free space and resume with: "
                    f"python -m pipeline run --resume {self.run_dir}"
                )
        # every process learns whether rank 0's write failed (and waits for it to finish): they stop together
        failed = distributed.max_all(torch.tensor([int(problem is not None)], device=self.device)).item()
        if failed:
            raise UserError(problem or "rank 0 could not write a checkpoint (its message says why)")

    def train_epoch(
        self,
        k: int,
        epoch: int,
        stage: StageSpec,
        step: TrainStep,
        loader: Loader,
        optimizer,
        start: int = 0,
        partial: dict[str, float] | None = None,
        rng: dict[str, Any] | None = None,
        save_mid_epoch=None,
    ) -> tuple[float, int, float]:
        """One pass over the loader (from batch `start` when resumed mid-epoch); metrics are flushed
        every `log_every` steps (one sync each). Every `run.checkpoint_every` minutes, and when a stop
        is requested, `save_mid_epoch` checkpoints at an optimizer-step boundary."""
        log_every = self.cfg.run.log_every
        every = self.cfg.run.checkpoint_every * 60
        n = len(loader)
        bar = epoch_bar(n, f"stage {k} {stage.img_size}px epoch {epoch + 1}/{stage.epochs}", self.world.is_main)
        bar.update(start)
        pending: list[tuple[int, torch.Tensor, float, float | None]] = []
        partial = partial or {}
        loss_sum, steps = partial.get("loss_sum", 0.0), int(partial.get("steps", 0))
        images, before = int(partial.get("images", 0)), partial.get("seconds", 0.0)
        t0 = window_start = last_save = time.perf_counter()
        due = False  # a checkpoint at the next optimizer-step boundary (every process agrees on it)
        batches = iter(loader)  # creating the iterator may draw from torch's RNG:
        if rng is not None:  # a resumed epoch puts the RNGs back after it
            set_rng_state(rng)
        try:
            for i, (x, y) in enumerate(batches, start=start):
                lr, momentum = current_lr_momentum(optimizer)
                pending.append((i, step(x, y), lr, momentum))
                images += x.shape[0] * self.world.world_size
                if not self.world.distributed and save_mid_epoch is not None:  # one process: at any step
                    due = due or time.perf_counter() - last_save >= every or self.stop.requested is not None
                checkpoint = due and step.at_boundary and i < n - 1  # the epoch's end saves anyway
                if len(pending) == log_every or i == n - 1 or checkpoint:
                    # the global batch's loss: the mean over the processes (one collective per flush)
                    stacked = distributed.sum_all(torch.stack([p[1] for p in pending]).float())
                    losses = (stacked / self.world.world_size).tolist()
                    now = time.perf_counter()
                    rate = len(pending) * x.shape[0] * self.world.world_size / (now - window_start)
                    window_start = now
                    for (j, _, lr_j, mom_j), loss in zip(pending, losses):
                        if not math.isfinite(loss) and step.scaler is None:
                            raise UserError(
                                f"stage {k} epoch {epoch} step {j}: the loss is {loss}; training diverged. Lower "
                                f"the LR (stages.{k}.lr or train.optimizer.lr) and start a new run; the last good "
                                f"weights are in {self.run_dir / 'checkpoints' / 'last.pt'}"
                            )
                        self.metrics.write(
                            {
                                "kind": "step",
                                "stage": k,
                                "epoch": epoch,
                                "step": j,
                                "lr": lr_j,
                                "momentum": mom_j,
                                "loss": loss,
                                "images_per_s": round(rate, 1),
                            }
                        )
                    loss_sum += sum(losses)
                    steps += len(losses)
                    bar.update(len(pending))
                    postfix = {"loss": f"{losses[-1]:.3f}", "lr": f"{lr:.3g}", "img/s": f"{rate:.0f}"}
                    if self.device.type == "cuda":
                        postfix["mem"] = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}G"
                    bar.set_postfix(postfix)
                    pending = []
                    if self.world.distributed and not due and save_mid_epoch is not None and i < n - 1:
                        # under torchrun the processes decide together, at flushes (one collective)
                        due = self.agree(time.perf_counter() - last_save >= every)
                        checkpoint = due and step.at_boundary
                if checkpoint:
                    self.metrics.flush()
                    seconds = before + time.perf_counter() - t0
                    save_mid_epoch(i + 1, {"loss_sum": loss_sum, "steps": steps, "images": images, "seconds": seconds})
                    last_save, due = time.perf_counter(), False
                    if self.agree(False):  # a stop asked for, on any process: all stop here, after the save
                        raise self.stop.stopped(self.run_dir, f"stage {k}, epoch {epoch}, batch {i + 1} of {n}")
        finally:
            bar.close()  # clears the bar, so an error message starts on a line of its own
        return before + time.perf_counter() - t0, images, loss_sum / max(steps, 1)


def stage_range_test(
    model: torch.nn.Module,
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    stage: StageSpec,
    loader: Loader,
    device: torch.device,
    num_classes: int,
    seed: int,
    world: World = World(),
    **kwargs,
) -> RangeTest:
    """The LR range test with this stage's loader, AMP, Mixup and label smoothing; leaves no trace."""
    step = build_train_step(net, optimizer, None, stage.train, device, num_classes, accumulate=False)
    passes = iter(range(10**6))

    def batches():
        loader.set_epoch(10**6 + next(passes))  # passes of their own, apart from the run's epochs
        return loader

    def global_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # under torchrun: the mean loss of every process, so they all stop the test at the same step
        return distributed.sum_all(step(x, y).float().clone()) / world.world_size

    return find_lr(model, optimizer, global_step, batches, seed=derive_seed(seed, 2**31), **kwargs)


def save_range_test(result: RangeTest, prefix: Path, title: str) -> None:
    write_csv(result, prefix.with_suffix(".csv"))
    plot(result, prefix.with_suffix(".png"), f"LR range test, {title}")


def recommended_lr(result: RangeTest, field: str) -> float:
    if result.recommended is None:
        raise UserError(
            f"{field}: the LR range test found no usable LR ({result.stop_reason}, after {len(result.lrs)} steps); "
            "set an LR by hand or widen the range"
        )
    return result.recommended


def run_lr_find(cfg: Config, stage_index: int, out_dir: Path | None = None, **kwargs) -> tuple[RangeTest, Path]:
    """`python -m pipeline lr-find`: the range test on one stage's exact setup, from the initial weights."""
    if not 0 <= stage_index < len(cfg.stages):
        raise UserError(f"--stage {stage_index}: the file has stages 0 to {len(cfg.stages) - 1}")
    device, datasets, num_classes = prepare(cfg)
    stage = cfg.stages[stage_index]
    seed_everything(cfg.run.seed)
    model = build_model(cfg.model, num_classes).to(device)
    if stage.train.channels_last:
        model.to(memory_format=torch.channels_last)
    net = compile_model(model) if use_compile(stage, device) else model
    stage_seed = derive_seed(cfg.run.seed, stage_index)
    run_dir = new_run_dir(Path(out_dir or cfg.run.out_dir), f"{cfg.run.name}-lr-find")  # before: fail early
    loader = build_loader(
        stage.data,
        datasets.train,
        train=True,
        img_size=stage.img_size,
        batch_size=train_batch_size(stage),
        device=device,
        seed=stage_seed,
        channels_last=stage.train.channels_last,
    )
    placeholder = replace(stage.train.optimizer, lr=1.0)  # the test sets the LR; groups keep their ratios
    groups = param_groups(model)
    field = f"stages.{stage_index}"
    apply_freeze(model, stage.train, groups, field).train_mode(model)  # the stage's frozen groups stay frozen
    optimizer = build_optimizer(optimizer_param_groups(model, stage.train, groups, field), placeholder)
    try:
        result = stage_range_test(model, net, optimizer, stage, loader, device, num_classes, stage_seed, **kwargs)
    finally:
        loader.close()
    save_range_test(result, run_dir / "lr_find", f"stage {stage_index}: {stage.img_size}px, batch {stage.batch_size}")
    return result, run_dir


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
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top.eq(y[:, None])
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
