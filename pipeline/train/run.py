"""The run: plan it, start or resume it, and take one model through every stage and epoch in order.

Each epoch trains, validates, and checkpoints (last.pt, best.pt; stageK.pt when a stage ends).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import distributed
from pipeline.config import Config, EmaConfig
from pipeline.files import write_json
from pipeline.report import MetricsLog, TensorBoardLog, format_summary, plot_run
from pipeline.train.checkpoint import Checkpoint, Checkpointer, Progress, derive_seed, seed_everything
from pipeline.train.loop import EpochResult, LoopSettings, evaluate, train_epoch
from pipeline.train.memory import out_of_memory
from pipeline.train.plan import RunPlan, describe_jumps
from pipeline.train.preflight import prepare
from pipeline.train.range_test import lr_for_run
from pipeline.train.runstate import run_checkpoint, take_plan, write_plan
from pipeline.train.setup import RunSetup, set_up
from pipeline.train.signals import StopSignals
from pipeline.train.stage import RunContext, StageParts, build_stage
from pipeline.train.step import WeightEma


@dataclass
class RunHooks:
    """Where a test or a tool can watch a run without reaching into it."""

    after_save: Callable[[list[Path]], None] | None = None  # after each checkpoint write, with its paths
    stage_built: Callable[[StageParts], None] | None = None  # a stage's parts, before its first batch
    epoch_start: Callable[[int, int], None] | None = None  # (stage, epoch), before its first batch
    # after each epoch's validation (`run --budget`): given the plan, the configuration and the progress,
    # a configuration with new lengths for the epochs not yet begun, or None to go on as planned
    replan: Callable[[RunPlan, dict, Progress], dict | None] | None = None
    # inside the run's last epoch, at update boundaries: the same with the batches done and the epoch's
    # seconds so far, a configuration whose last epoch is shorter or longer (never under the batches done)
    replan_within: Callable[[RunPlan, dict, Progress, int, float], dict | None] | None = None


def run_training(
    cfg: Config, out_dir: Path | None = None, resume: Path | None = None, hooks: RunHooks | None = None
) -> Path:
    """Train through every stage; returns the run folder. `resume`: a run folder to continue.
    Under torchrun every process runs this; rank 0 alone writes and prints."""
    world = distributed.from_environment()
    device, datasets, num_classes = prepare(cfg, world)
    distributed.init(world, device.type == "cuda")
    try:
        with open(os.devnull, "w") as devnull, contextlib.ExitStack() as held:
            with contextlib.redirect_stdout(devnull) if not world.is_main else contextlib.nullcontext():
                run_dir = _train(
                    set_up(cfg, out_dir, resume, world, device, datasets, num_classes, held), hooks or RunHooks()
                )
        distributed.barrier()  # every process done before any tears the group down (not after an error)
        return run_dir
    finally:
        distributed.shutdown()


def _train(s: RunSetup, hooks: RunHooks) -> Path:
    cfg, plan, run_dir, progress, checkpoint, model = s.cfg, s.plan, s.run_dir, s.progress, s.checkpoint, s.model
    world, device = s.world, s.device
    ctx = RunContext(cfg, device, model, s.groups, s.num_classes, s.datasets, world, memory=s.memory)
    if checkpoint is not None and checkpoint.state_dict_ema is not None:
        ctx.ema = WeightEma(model, cfg.stages[progress.stage].train.ema or cfg.train.ema or EmaConfig())
        ctx.ema.load_state_dict(checkpoint.state_dict_ema, checkpoint.ema_updates)
    at = plan.batches_before(progress.stage, progress.epoch) + progress.batch if checkpoint is not None else None
    board = TensorBoardLog(run_dir / "tensorboard", None, at) if cfg.run.tensorboard and world.is_main else None
    metrics = MetricsLog(run_dir / "metrics.jsonl", board) if world.is_main else MetricsLog(None)
    try:
        with StopSignals() as stop:
            loop = LoopSettings(run_dir, device, world, metrics, stop, cfg.run.log_every, cfg.run.checkpoint_every * 60)
            checkpoints = Checkpointer(run_dir, device, world, hooks.after_save)
            trainer = Trainer(ctx, plan, loop, checkpoints, hooks)
            if board is not None:  # the run's axis of batches, as the plan (re-planned or not) has it
                board.position = lambda k, epoch, batch: trainer.plan.batches_before(k, epoch) + batch
            trainer.run(progress, checkpoint)
    finally:
        metrics.close()
    return run_dir


class Trainer:
    """Takes the run's one model through the planned stages and epochs, from where `progress` stands."""

    def __init__(self, ctx: RunContext, plan: RunPlan, loop: LoopSettings, checkpoints: Checkpointer, hooks: RunHooks):
        self.ctx, self.plan, self.loop, self.checkpoints, self.hooks = ctx, plan, loop, checkpoints, hooks
        self.cfg, self.run_dir, self._mark = ctx.cfg, loop.run_dir, time.perf_counter()
        self.replanned_within = False
        # one compiled graph per input shape the plan has: keep them all (past the limit: eager)
        torch._dynamo.config.recompile_limit = max(8, plan.compiled_shapes() + 2)

    def run(self, progress: Progress, checkpoint: Checkpoint | None) -> None:
        run_start = self._mark = time.perf_counter()
        for k in range(progress.stage, len(self.cfg.stages)):
            resume = checkpoint if (checkpoint is not None and progress.started) else None
            try:
                self.run_stage(k, progress, resume)
            except torch.cuda.OutOfMemoryError:  # past the memory probe (compiled graphs, optimizer state)
                raise out_of_memory(k, self.run_dir, progress.epoch > 0 or progress.batch > 0) from None
            checkpoint = None
        summary = {
            "stages": progress.stages,
            "final_val_top1": progress.stages[-1]["val_top1"] if progress.stages else 0.0,
            "best_val_top1": progress.best_val_top1,
            "seconds": round(progress.seconds, 2),
            "wall_seconds": round(self.tick(progress), 2),
        }
        if self.ctx.world.is_main:
            write_json(self.run_dir / "summary.json", summary)
        print(format_summary(summary))
        print(f"done in {time.perf_counter() - run_start:.1f} s; outputs in {self.run_dir}")

    def run_stage(self, k: int, progress: Progress, resume: Checkpoint | None) -> None:
        """Stage `k` from its epoch `progress.epoch` (and batch `progress.batch`); `resume`: the
        checkpoint this stage was interrupted in, whose optimizer, schedule and RNGs go on."""

        def choose_lr(parts: StageParts) -> float:  # `lr: find`; a resumed stage has its LRs in its optimizer
            return lr_for_run(parts, self.ctx, self.run_dir, self.loop.metrics)

        with build_stage(self.ctx, k, self.plan, choose_lr=None if resume is not None else choose_lr) as parts:
            if resume is not None:
                resume.restore_training(parts.optimizer, parts.scheduler, parts.train_step.scaler)
            line, jumps = parts.describe(self.ctx.world, self.ctx.memory.get(k)), describe_jumps(self.plan, k)
            print(f"{line}\n{jumps}" if jumps else line)
            if self.hooks.stage_built is not None:
                self.hooks.stage_built(parts)
            epoch = progress.epoch
            while epoch < parts.stage.epochs:  # a re-plan may change the stage's length
                result = self.train_one_epoch(parts, progress, epoch, resume)
                self.end_epoch(parts, progress, epoch, result)
                epoch += 1
        progress.stage, progress.epoch = k + 1, 0
        progress.stage_seconds, progress.stage_images = 0.0, 0

    def train_one_epoch(self, parts: StageParts, progress: Progress, epoch: int, resume: Checkpoint | None):
        k, start, rng = parts.index, progress.batch, None
        planned = self.plan.epoch(k, epoch)
        parts.fit_sizes(self.ctx, planned.load_size, planned.val_size)
        if start == 0:
            parts.reestimate_bn(self.ctx, self.plan, planned)
            # Mixup and dropout draws, each rank its own (timm: seed + rank); resumed epochs repeat exactly
            seed_everything(derive_seed(parts.seed, epoch) + self.ctx.world.rank)
        else:  # resumed mid-epoch: the RNGs as they were when the checkpoint was taken
            rng = resume.rng_of(self.ctx.world.rank)
        if self.hooks.epoch_start is not None:
            self.hooks.epoch_start(k, epoch)
        loader, train_step = parts.train_loader, parts.train_step
        loader.set_epoch(epoch, start_batch=start)
        train_step.start_epoch(planned.batches, start)
        updates_before = train_step.optimizer_steps

        def retarget(batches_done: int, seconds: float) -> int | None:  # the run's last epoch, re-planned
            raw = self.hooks.replan_within(self.plan, self.cfg.raw, progress, batches_done, seconds)
            if raw is None:
                return None
            self.plan = take_plan(self.ctx, parts, progress, self.plan, raw, batch=batches_done)
            self.cfg, batches = self.ctx.cfg, self.plan.epoch(k, epoch).batches
            if batches <= batches_done:
                raise ValueError(f"a re-plan inside an epoch must leave batches to train ({batches} <= {batches_done})")
            train_step.retarget(batches)
            self.replanned_within = True  # config.yaml and plan.json follow the epoch's checkpoint
            return batches

        last_epoch = (k, epoch) == (self.plan.epochs[-1].stage, self.plan.epochs[-1].epoch)
        within = self.hooks.replan_within is not None and last_epoch

        def save_mid_epoch(batches_done: int, partial: dict[str, float]) -> None:
            progress.batch, progress.partial = batches_done, partial
            self.tick(progress)
            self.checkpoints.save(["last.pt"], run_checkpoint(self.ctx, parts, progress, self.plan))

        result = train_epoch(
            self.loop,
            train_step,
            loader,
            parts.optimizer,
            stage=k,
            epoch=epoch,
            label=f"stage {k} {planned.img_size}px epoch {epoch + 1}/{parts.stage.epochs}",
            start=start,
            partial=progress.partial,
            rng=rng,
            save_mid_epoch=save_mid_epoch,
            run_status=lambda done: self.plan.status(k, epoch, done, self.tick(progress)),
            batch_px=(lambda b: planned.batch_px(self.ctx.cfg.run.seed, b)) if len(planned.train_sizes) > 1 else None,
            batches=planned.batches,
            retarget=retarget if within else None,
        )
        planned = self.plan.epoch(k, epoch)  # as re-planned inside it, if it was
        expected = planned.updates - start // parts.train_cfg.accum_steps
        updates = train_step.optimizer_steps - updates_before
        if updates != expected:  # the schedule's length came from the plan: a mismatch is a bug
            raise RuntimeError(f"stage {k} epoch {epoch}: {updates} optimizer updates, the plan has {expected}")
        progress.batch, progress.partial = 0, {}
        return result

    def end_epoch(self, parts: StageParts, progress: Progress, epoch: int, result: EpochResult) -> None:
        """Validate, record, report and checkpoint a finished epoch; stop here if asked to."""
        k, ema, device = parts.index, parts.ema, self.ctx.device
        distributed.same_buffers(self.ctx.model, ema.module if ema is not None else None)
        precision = parts.train_step.precision
        val = evaluate(parts.net, parts.val_loader, precision, device)
        val_ema = evaluate(ema.module, parts.val_loader, precision, device) if ema is not None else None
        progress.epoch = epoch + 1
        progress.stage_seconds += result.seconds
        progress.stage_images += result.images
        improved = val["top1"] > progress.best_val_top1
        progress.best_val_top1 = max(progress.best_val_top1, val["top1"])
        self.report_epoch(parts, progress, epoch, result, val, val_ema)
        raw = self.hooks.replan(self.plan, self.cfg.raw, progress) if self.hooks.replan is not None else None
        if raw is not None:  # new lengths for the epochs not yet begun (`run --budget`)
            self.plan = take_plan(self.ctx, parts, progress, self.plan, raw)
            self.cfg = self.ctx.cfg
        stage = parts.stage  # as re-planned: a re-plan may end it at this epoch
        stage_done = progress.epoch == stage.epochs
        if stage_done:  # record it before saving
            progress.finish_stage(stage, val["top1"], val_ema["top1"] if val_ema else None)
        names = ["best.pt"] * improved + [f"stage{k}.pt"] * stage_done + ["last.pt"]
        self.checkpoints.save(names, run_checkpoint(self.ctx, parts, progress, self.plan))
        if (raw is not None or self.replanned_within) and self.ctx.world.is_main:  # after the checkpoint,
            write_plan(self.run_dir, self.cfg, self.plan)  # which a resume reads the plan from
        self.replanned_within = False
        finished = k == len(self.cfg.stages) - 1 and stage_done
        if self.loop.stop.agree(False, device) and not finished:  # a stop asked for; the run's last epoch just ends
            raise self.loop.stop.stopped(self.run_dir, f"stage {k}, after epoch {epoch}")

    def report_epoch(self, parts: StageParts, progress: Progress, epoch: int, result: EpochResult, val, val_ema):
        """The epoch's metrics record, the refreshed plots and the epoch line."""
        planned = self.plan.epoch(parts.index, epoch)
        record = {
            "kind": "epoch",
            "stage": parts.index,
            "epoch": epoch,
            "img_size": planned.img_size,
            "val_size": planned.val_size,
            "train_loss": result.loss,
            "train_seconds": round(result.seconds, 3),
            "train_images_per_s": round(result.images / result.seconds, 1),
            **{f"val_{key}": v for key, v in val.items()},
            **{f"val_ema_{key}": v for key, v in (val_ema or {}).items() if key != "samples"},
        }
        record["elapsed_s"] = round(self.tick(progress), 2)
        self.loop.metrics.write(record)
        self.loop.metrics.flush()
        if self.ctx.world.is_main:
            try:
                plot_run(self.run_dir)  # refreshed every epoch, to be watched
            except OSError as e:
                print(f"warning: plots not written ({e.strerror or e})", file=sys.stderr)
        print(
            f"stage {parts.index} epoch {epoch}: train loss {result.loss:.4f}, val loss {val['loss']:.4f}, "
            f"top-1 {val['top1']:.2f}%, top-5 {val['top5']:.2f}%"
            + (f", EMA top-1 {val_ema['top1']:.2f}%" if val_ema else "")
            + f" ({result.seconds:.1f} s, {result.images / result.seconds:.0f} img/s)"
        )

    def tick(self, progress: Progress) -> float:
        """Add the wall time since the last call to `progress.elapsed` (which checkpoints carry)."""
        now = time.perf_counter()
        progress.elapsed += now - self._mark
        self._mark = now
        return progress.elapsed
