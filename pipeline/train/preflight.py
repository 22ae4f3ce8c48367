"""Checks before any training: device, datasets, stage batches, optimizers, input sizes, groups, resume.

Every problem a user can cause surfaces here as one ConfigError or DataError naming the field.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from typing import Any

import torch

from pipeline.config import Config
from pipeline.data import Datasets, require_backend, scan_datasets
from pipeline.distributed import World, resolve_device
from pipeline.errors import ConfigError, DataError
from pipeline.model import ParamGroups, apply_freeze, input_problem, optimizer_param_groups
from pipeline.train.checkpoint import Checkpoint, Progress
from pipeline.train.plan import RunPlan, train_batch_size
from pipeline.train.schedule import build_optimizer

# On resume these may change; so may stages not yet started. Anything else would make the
# checkpoint's optimizer, scheduler or weights disagree with the configuration.
RESUME_MUTABLE = ("run.", "data.workers", "data.decode_on", "data.on_error", "model.pretrained")


def prepare(cfg: Config, world: World = World()) -> tuple[torch.device, Datasets, int]:
    """Device, scanned datasets and class count; every user error surfaces here, before training."""
    device = resolve_device(cfg.run.device, world)
    if cfg.run.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "run.tensorboard: true needs the tensorboard package: pip install tensorboard (or the project's "
            "tensorboard extra), or set run.tensorboard: false"
        )
    if cfg.train.sync_bn and world.distributed and device.type != "cuda":
        raise ConfigError(
            "train.sync_bn: SyncBatchNorm needs CUDA (NCCL); on CPU each process keeps its own statistics"
        )
    for stage in cfg.stages:  # a stage may choose its own loader
        require_backend(stage.data.backend)
    datasets = scan_datasets(cfg.data)
    check_stages(cfg, datasets, world)
    check_optimizers(cfg, device)
    return device, datasets, resolve_num_classes(cfg, datasets)


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


def check_input_sizes(model: torch.nn.Module, cfg: Config, plan: RunPlan, device: torch.device) -> None:
    """A forward pass at every size the plan trains or validates at: fixed-size models (ViT at 224)
    fail here, not at hour 2."""
    for i in range(len(cfg.stages)):
        for size in sorted({s for e in plan.of_stage(i) for s in (e.img_size, e.val_size)}):
            problem = input_problem(model, size, device)
            if problem:
                arch = cfg.model.arch
                raise ConfigError(f"stages.{i}.img_size: model.arch {arch!r} cannot take {size}px input ({problem})")


def check_groups(model: torch.nn.Module, cfg: Config, groups: ParamGroups) -> None:
    """Every stage's `freeze` and `lr_mult` name groups this model has, before any training."""
    try:
        for i, stage in enumerate(cfg.stages):
            apply_freeze(model, stage.train, groups, f"stages.{i}")
            optimizer_param_groups(model, stage.train, groups, f"stages.{i}")
    finally:
        for p in model.parameters():
            p.requires_grad_(True)


def check_resume(
    checkpoint: Checkpoint, cfg: Config, datasets: Datasets, plan: RunPlan, progress: Progress, world: World
) -> None:
    """What a resumed run may differ in: run settings, stages not begun, the process count at an
    epoch's end. Nothing that the checkpoint's weights, optimizer or schedule were made with."""
    check_resume_changes(checkpoint.config, cfg.raw, progress)
    check_resume_data(checkpoint, datasets, progress)
    if progress.batch > 0 and checkpoint.world_size != world.world_size:  # shards, and so batches done, differ
        raise ConfigError(
            f"--resume: the checkpoint was taken mid-epoch by {checkpoint.world_size} process(es); resume it with "
            f"{checkpoint.world_size} (at an epoch's end any number may go on)"
        )
    check_resume_plan(checkpoint, plan, progress)


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


def check_resume_data(checkpoint: Checkpoint, datasets: Datasets, progress: Progress) -> None:
    """The class folders, and mid-stage the training-set size, must be what the run trained on."""
    if checkpoint.classes != datasets.classes:
        raise DataError(
            f"data.train: the class folders of {datasets.train.root} changed since the checkpoint "
            "(classes added, removed or renamed); resume needs the same classes, or start a new run"
        )
    trained_on = checkpoint.train_size if checkpoint.train_size is not None else len(datasets.train)
    if progress.started and trained_on != len(datasets.train):
        raise DataError(
            f"data.train: {datasets.train.root} now has {len(datasets.train)} images, the run trained on "
            f"{trained_on}; resume mid-stage needs the same set (or start a new run)"
        )


def check_resume_plan(checkpoint: Checkpoint, plan: RunPlan, progress: Progress) -> None:
    """A stage resumed part-way must keep its plan: its schedule's length was fixed by it."""
    if checkpoint.plan is None or not progress.started:
        return
    saved = [e["updates"] for e in checkpoint.plan if e["stage"] == progress.stage]
    if saved != [e.updates for e in plan.of_stage(progress.stage)]:
        raise ConfigError(
            f"--resume: stage {progress.stage} was planned as {sum(saved)} optimizer updates and would now take "
            f"{plan.stage_updates(progress.stage)} (the process count or the data changed); resume it as it "
            "was planned, or start a new run"
        )


def _differences(old: Any, new: Any, path: str = ""):
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            yield from _differences(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            yield from _differences(a, b, f"{path}.{i}")
    elif old != new:
        yield path, old, new
