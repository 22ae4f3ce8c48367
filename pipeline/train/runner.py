"""The stage runner: one model through every stage; per stage new loaders, optimizer and OneCycleLR.

Each epoch trains, validates, and checkpoints (last.pt, best.pt; stageK.pt when a stage ends).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from pipeline.config import Config, StageSpec
from pipeline.data import Datasets, TV2Loader, build_loader, scan_datasets
from pipeline.errors import ConfigError, UserError
from pipeline.files import write_json, write_text
from pipeline.model import build_model
from pipeline.report import MetricsLog, epoch_bar, format_summary
from pipeline.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, seed_everything
from pipeline.train.schedule import build_optimizer, build_scheduler, current_lr_momentum
from pipeline.train.step import Precision, TrainStep, build_mixup, compile_model, resolve_precision


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


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device: cuda was asked for but no CUDA device is available (use auto or cpu)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def derive_seed(*parts: int) -> int:
    """An independent seed for each (run seed, stage, epoch)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def train_batch_size(stage: StageSpec) -> int:
    """Mixup/CutMix pair each sample with its mirror in the batch, so the batch must be even."""
    if stage.train.mixup is not None and stage.batch_size % 2:
        return stage.batch_size - 1
    return stage.batch_size


def check_stages(cfg: Config, datasets: Datasets) -> None:
    """Catch, before any training, a stage whose batch cannot be filled by the training set."""
    n = len(datasets.train)
    for i, stage in enumerate(cfg.stages):
        if train_batch_size(stage) > n or train_batch_size(stage) < 1:
            raise ConfigError(
                f"stages.{i}.batch_size: {stage.batch_size} is larger than the training set "
                f"({n} images in {datasets.train.root}); use at most {n}"
            )


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
    (run_dir / "checkpoints").mkdir(parents=True)
    return run_dir


def run_training(cfg: Config, out_dir: Path | None = None, resume: Path | None = None) -> Path:
    """Train through every stage; returns the run folder. `resume`: a run folder to continue."""
    device = resolve_device(cfg.run.device)
    datasets = scan_datasets(cfg.data)
    check_stages(cfg, datasets)
    num_classes = resolve_num_classes(cfg, datasets)
    checkpoint = None
    if resume is not None:
        run_dir = Path(resume)
        checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    else:
        run_dir = new_run_dir(Path(out_dir or cfg.run.out_dir), cfg.run.name)
        write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.raw, sort_keys=False))

    seed_everything(cfg.run.seed)
    model = build_model(cfg.model, num_classes).to(device)
    progress = Progress()
    if checkpoint is not None:
        model.load_state_dict(checkpoint["state_dict"])
        progress = Progress(**checkpoint["progress"])
        MetricsLog.keep_before(run_dir / "metrics.jsonl", progress.stage, progress.epoch)
        print(f"resuming {run_dir} at stage {progress.stage}, epoch {progress.epoch}")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    print(
        f"run folder {run_dir}\ndevice {device}; {len(datasets.train)} train / {len(datasets.val)} val images, "
        f"{num_classes} classes; model {cfg.model.arch}"
    )
    runner = StageRunner(cfg, run_dir, device, datasets, model, num_classes)
    try:
        runner.run(progress, checkpoint)
    finally:
        runner.metrics.close()
    return run_dir


class StageRunner:
    """Holds what lives for the whole run: the model, its compiled form, the metrics log."""

    def __init__(self, cfg: Config, run_dir: Path, device: torch.device, datasets: Datasets, model, num_classes: int):
        self.cfg, self.run_dir, self.device, self.datasets = cfg, run_dir, device, datasets
        self.model, self.num_classes = model, num_classes
        self.metrics = MetricsLog(run_dir / "metrics.jsonl")
        self._compiled: torch.nn.Module | None = None
        # Each stage compiles one training and one evaluation graph; keep them all cached.
        torch._dynamo.config.recompile_limit = max(8, 2 * len(cfg.stages) + 2)

    def network(self, stage: StageSpec) -> torch.nn.Module:
        """The module to call: compiled (one object for the whole run) or the plain model."""
        use = stage.train.compile == "on" or (stage.train.compile == "auto" and self.device.type == "cuda")
        if not use:
            return self.model
        if self._compiled is None:
            self._compiled = compile_model(self.model)
        return self._compiled

    def run(self, progress: Progress, checkpoint: dict[str, Any] | None) -> None:
        cfg = self.cfg
        run_start = time.perf_counter()
        for k in range(progress.stage, len(cfg.stages)):
            stage = cfg.stages[k]
            resume_state = checkpoint if (checkpoint is not None and progress.epoch > 0) else None
            self.run_stage(k, stage, progress, resume_state)
            checkpoint = None
        summary = {
            "stages": progress.stages,
            "final_val_top1": progress.stages[-1]["val_top1"] if progress.stages else 0.0,
            "best_val_top1": progress.best_val_top1,
            "seconds": round(progress.seconds, 2),
        }
        write_json(self.run_dir / "summary.json", summary)
        print(format_summary(summary))
        print(f"done in {time.perf_counter() - run_start:.1f} s; outputs in {self.run_dir}")

    def run_stage(self, k: int, stage: StageSpec, progress: Progress, resume_state: dict | None) -> None:
        cfg, device, tc = self.cfg, self.device, stage.train
        stage_seed = derive_seed(cfg.run.seed, k)
        loader_args = dict(img_size=stage.img_size, device=device, seed=stage_seed, channels_last=tc.channels_last)
        train_loader = build_loader(
            cfg.data, self.datasets.train, train=True, batch_size=train_batch_size(stage), **loader_args
        )
        val_loader = build_loader(cfg.data, self.datasets.val, train=False, batch_size=stage.batch_size, **loader_args)
        if tc.channels_last:
            self.model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(self.model, tc.optimizer)
        scheduler = build_scheduler(optimizer, tc.schedule, total_steps=len(train_loader) * stage.epochs)
        precision = resolve_precision(tc.amp, device)
        scaler = torch.amp.GradScaler(device.type) if precision.needs_scaler else None
        net = self.network(stage)
        mixup = build_mixup(tc.mixup, tc.label_smoothing, self.num_classes)
        step = TrainStep(net, optimizer, scheduler, precision, device, mixup, tc.label_smoothing, scaler)
        if resume_state is not None:
            optimizer.load_state_dict(resume_state["optimizer"])
            scheduler.load_state_dict(resume_state["scheduler"])
            if scaler is not None and resume_state.get("scaler"):
                scaler.load_state_dict(resume_state["scaler"])
        print(
            f"stage {k}: {stage.img_size}px, batch {train_loader.batch_size}, {stage.epochs} epochs x "
            f"{len(train_loader)} steps; amp {precision.name}, compile {'on' if net is not self.model else 'off'}, "
            f"mixup {'on' if mixup else 'off'}"
        )

        def state(kind: str) -> dict[str, Any]:
            return {
                "state_dict": self.model.state_dict(),
                "arch": cfg.model.arch,
                "num_classes": self.num_classes,
                "classes": self.datasets.classes,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "progress": asdict(progress),
                "rng": rng_state(),
                "config": cfg.raw,
                "kind": kind,
            }

        ckpt_dir = self.run_dir / "checkpoints"
        for epoch in range(progress.epoch, stage.epochs):
            seed_everything(derive_seed(stage_seed, epoch))  # Mixup draws; resumed epochs repeat exactly
            train_loader.set_epoch(epoch)
            seconds, images, train_loss = self.train_epoch(k, epoch, stage, step, train_loader, optimizer)
            val = evaluate(net, val_loader, precision, device)
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
            }
            self.metrics.write(record)
            self.metrics.flush()
            print(
                f"stage {k} epoch {epoch}: train loss {train_loss:.4f}, val loss {val['loss']:.4f}, "
                f"top-1 {val['top1']:.2f}%, top-5 {val['top5']:.2f}% ({seconds:.1f} s, {images / seconds:.0f} img/s)"
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
                    }
                )
                progress.seconds += progress.stage_seconds
            paths = [ckpt_dir / "last.pt"]
            if improved:
                paths.append(ckpt_dir / "best.pt")
            if progress.epoch == stage.epochs:
                paths.append(ckpt_dir / f"stage{k}.pt")
            save_checkpoint(paths, state("epoch"))
        train_loader.close()
        val_loader.close()
        progress.stage, progress.epoch = k + 1, 0
        progress.stage_seconds, progress.stage_images = 0.0, 0

    def train_epoch(self, k: int, epoch: int, stage: StageSpec, step: TrainStep, loader: TV2Loader, optimizer):
        """One pass over the loader; metrics are flushed every `log_every` steps (one sync each)."""
        log_every = self.cfg.run.log_every
        bar = epoch_bar(len(loader), f"stage {k} {stage.img_size}px epoch {epoch + 1}/{stage.epochs}")
        pending: list[tuple[int, torch.Tensor, float, float | None]] = []
        loss_sum, steps, images = 0.0, 0, 0
        start = window_start = time.perf_counter()
        for i, (x, y) in enumerate(loader):
            lr, momentum = current_lr_momentum(optimizer)
            pending.append((i, step(x, y), lr, momentum))
            images += x.shape[0]
            if len(pending) == log_every or i == len(loader) - 1:
                losses = torch.stack([p[1] for p in pending]).float().tolist()
                now = time.perf_counter()
                rate = len(pending) * x.shape[0] / (now - window_start)
                window_start = now
                for (j, _, lr_j, mom_j), loss in zip(pending, losses):
                    if not math.isfinite(loss) and step.scaler is None:
                        raise UserError(
                            f"stage {k} epoch {epoch} step {j}: the loss is {loss}; training diverged. Lower "
                            f"train.optimizer.lr and resume from {self.run_dir / 'checkpoints' / 'last.pt'}"
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
        bar.close()
        return time.perf_counter() - start, images, loss_sum / max(steps, 1)


@torch.no_grad()
def evaluate(net: torch.nn.Module, loader: TV2Loader, precision: Precision, device: torch.device) -> dict[str, float]:
    """Loss, top-1 and top-5 (percent) over every validation sample exactly once."""
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
    net.train()
    count = max(count, 1)
    return {
        "loss": round(loss_sum.item() / count, 5),
        "top1": round(100.0 * correct1.item() / count, 3),
        "top5": round(100.0 * correct5.item() / count, 3),
        "samples": count,
    }
