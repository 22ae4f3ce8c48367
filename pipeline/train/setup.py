"""Start-up in one pass: everything a run needs before its first batch, checked, or one error.

`prepare` (train/preflight.py) resolves the device, scans the data and checks the stages; `set_up`
then plans the run, reads the checkpoint it resumes from (and the stages a re-planned run trained
with), builds the model and checks it (input sizes, groups, memory per stage), and makes or locks the
run folder. What it returns is all the trainer (train/run.py) needs: the trainer only trains.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from timm.layers import convert_sync_batchnorm

from pipeline import distributed
from pipeline.config import Config
from pipeline.data import Datasets
from pipeline.distributed import World
from pipeline.model import ParamGroups, build_model, param_groups
from pipeline.report import MetricsLog
from pipeline.train.checkpoint import Checkpoint, Progress, seed_everything
from pipeline.train.memory import check_memory
from pipeline.train.plan import RunPlan, plan_run
from pipeline.train.preflight import check_groups, check_input_sizes, check_resume
from pipeline.train.rundir import hold_run_dir, new_run_dir
from pipeline.train.runstate import replanned_config, write_plan


@dataclass
class RunSetup:
    cfg: Config  # as it trains: a re-planned run's stages when it resumes one
    world: World
    device: torch.device
    datasets: Datasets
    num_classes: int
    plan: RunPlan
    model: torch.nn.Module  # with the checkpoint's weights on resume; SyncBatchNorm under torchrun if asked
    groups: ParamGroups
    memory: dict[int, int]  # stage -> peak bytes of its probe (CUDA)
    run_dir: Path  # made (rank 0) or resumed, and locked for as long as `held` lasts
    progress: Progress
    checkpoint: Checkpoint | None  # the one resumed from


def set_up(
    cfg: Config,
    out_dir: Path | None,
    resume: Path | None,
    world: World,
    device: torch.device,
    datasets: Datasets,
    num_classes: int,
    held: contextlib.ExitStack,  # the run folder's lock (rank 0) is entered here, released when the run ends
) -> RunSetup:
    """Plan, resume, build and check, in that order; every problem a user can cause is raised here."""
    seed_everything(cfg.run.seed)
    plan = plan_run(cfg.stages, len(datasets.train), world.world_size)
    checkpoint, progress = None, Progress()
    if resume is not None:
        run_dir = Path(resume)
        held.enter_context(hold_run_dir(run_dir, world.is_main))
        checkpoint = Checkpoint.read(run_dir / "checkpoints" / "last.pt")
        progress = checkpoint.run_progress
        if progress.replans:  # re-planned while it ran (`run --budget`): the checkpoint has the plan
            cfg, plan = replanned_config(cfg, checkpoint.config, len(datasets.train), world.world_size)
        check_resume(checkpoint, cfg, datasets, plan, progress, world)
        model = build_model(replace(cfg.model, pretrained=None), num_classes).to(device)  # weights: below
        model.load_state_dict(checkpoint.state_dict)
        distributed.barrier()  # every rank has read the checkpoint before rank 0 cuts the metrics back
        if world.is_main:
            MetricsLog.keep_before(run_dir / "metrics.jsonl", progress.stage, progress.epoch, progress.batch)
        where = f", batch {progress.batch}" if progress.batch else ""
        print(f"resuming {run_dir} at stage {progress.stage}, epoch {progress.epoch}{where}")
    else:
        model = build_model(cfg.model, num_classes).to(device)
        check_input_sizes(model, cfg, plan, device)
    groups = param_groups(model)
    check_groups(model, cfg, groups)
    probe = device.type == "cuda"  # each stage's memory, before SyncBatchNorm (whose forward is collective)
    memory = check_memory(model, cfg, plan, groups, device, progress.stage, world.world_size) if probe else {}
    if cfg.train.sync_bn and world.distributed:
        model = convert_sync_batchnorm(model)  # timm's: keeps BatchNormAct2d's activation
    if resume is None:
        run_dir = distributed.from_main(
            new_run_dir(Path(out_dir or cfg.run.out_dir), cfg.run.name) if world.is_main else None
        )
        held.enter_context(hold_run_dir(run_dir, world.is_main))
    if world.is_main:
        write_plan(run_dir, cfg, plan)
    processes = f" x {world.world_size} processes (torchrun)" if world.distributed else ""
    print(
        f"run folder {run_dir}\ndevice {device}{processes}; {len(datasets.train)} train / {len(datasets.val)} val "
        f"images, {num_classes} classes; model {cfg.model.arch} (groups {groups.describe()})"
    )
    return RunSetup(
        cfg, world, device, datasets, num_classes, plan, model, groups, memory, run_dir, progress, checkpoint
    )
