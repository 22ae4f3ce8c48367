"""The run's state as it is written and as it changes: the checkpoint of the run as it stands,
config.yaml and plan.json, and a re-plan while it trains (`run --budget`: new lengths for the epochs
not yet begun).

The trainer asks `RunHooks.replan` after each epoch; a new configuration it returns becomes the plan, the
stage's length and its schedule's span (from the step the schedule has reached). The checkpoint then
carries the new stages, and a resume reads them from it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from pipeline import distributed
from pipeline.config import Config, parse_config
from pipeline.files import write_json, write_text
from pipeline.train.checkpoint import Checkpoint, Progress, rng_state
from pipeline.train.plan import RunPlan, plan_run
from pipeline.train.schedule import respan_scheduler
from pipeline.train.stage import RunContext, StageParts, schedule_span


def run_checkpoint(ctx: RunContext, parts: StageParts, progress: Progress, plan: RunPlan) -> Checkpoint:
    """The run as it stands, in the one checkpoint schema."""
    ema, scaler = ctx.ema, parts.train_step.scaler
    return Checkpoint(
        state_dict=ctx.model.state_dict(),
        arch=ctx.cfg.model.arch,
        num_classes=ctx.num_classes,
        classes=ctx.datasets.classes,
        config=ctx.cfg.raw,
        train_size=len(ctx.datasets.train),
        world_size=ctx.world.world_size,
        optimizer=parts.optimizer.state_dict(),
        scheduler=parts.scheduler.state_dict(),
        scaler=scaler.state_dict() if scaler is not None else None,
        state_dict_ema=ema.state_dict() if ema is not None else None,
        ema_updates=ema.updates if ema is not None else 0,
        progress=progress.state_dict(),
        rng=distributed.gather_all(rng_state(ctx.device)),  # each rank draws its own
        plan=plan.records(),
    )


def take_plan(
    ctx: RunContext, parts: StageParts, progress: Progress, old: RunPlan, raw: dict, batch: int | None = None
) -> RunPlan:
    """Make `raw` the run's configuration mid-stage (`parts`): returns its plan, with `ctx.cfg`, the
    stage and its schedule brought to it, and the change recorded in `progress.replans`. `batch`: made
    inside epoch `progress.epoch` after that many of its batches (which it may shorten, not below them)."""
    k, old_cfg = parts.index, ctx.cfg
    ctx.cfg = parse_config(raw)
    plan = plan_run(ctx.cfg.stages, len(ctx.datasets.train), ctx.world.world_size)
    done = [e for e in old.epochs if (e.stage, e.epoch) < (progress.stage, progress.epoch)]
    if list(plan.epochs[: len(done)]) != done:
        raise ValueError("a re-plan may only change epochs not yet begun")
    parts.stage = ctx.cfg.stages[k]
    # a ramp not yet begun, re-planned, meets sizes the first plan had not: room for their graphs too
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, old.compiled_shapes() + plan.compiled_shapes() + 2)
    if parts.scheduler is not None:
        span = schedule_span(plan, k, parts.train_cfg.schedule.scope)
        parts.scheduler = respan_scheduler(parts.scheduler, parts.optimizer, parts.train_cfg.schedule, span)
        parts.train_step.scheduler = parts.scheduler
    before, after = ([_length(s.length) for s in c.stages] for c in (old_cfg, ctx.cfg))
    if batch is None:
        progress.replans.append({"stage": k, "epoch": progress.epoch, "epochs": after})
        print(f"re-planned after stage {k} epoch {progress.epoch - 1}: epochs per stage {before} -> {after}")
    else:
        progress.replans.append({"stage": k, "epoch": progress.epoch, "batch": batch, "epochs": after})
        print(f"re-planned in stage {k} epoch {progress.epoch} at batch {batch}: epochs per stage {before} -> {after}")
    return plan


def _length(epochs: float) -> int | float:
    """A stage's length as the record shows it: 3, or 2.4 (its last epoch at a share)."""
    return int(epochs) if epochs == int(epochs) else round(epochs, 3)


def replanned_config(cfg: Config, saved: dict, train_size: int, world_size: int) -> tuple[Config, RunPlan]:
    """A resumed re-planned run: `cfg` with the checkpoint's (`saved`) stages, and their plan."""
    cfg = parse_config({**cfg.raw, "stages": saved["stages"]})
    return cfg, plan_run(cfg.stages, train_size, world_size)


def write_plan(run_dir: Path, cfg: Config, plan: RunPlan) -> None:
    """The run's configuration and plan as they now are: config.yaml and plan.json."""
    write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.raw, sort_keys=False))
    write_json(run_dir / "plan.json", plan.records())
