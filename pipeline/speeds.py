"""What this machine does with a stages file's setup, measured: training and validation images/s
per size (loader and step together, as a run builds them) and what a new size, a new epoch and the
start cost; and the training images' own size, from their headers. The budget planner
(`pipeline.budget`) predicts a plan's seconds from them.
"""

from __future__ import annotations

import copy
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import Config, parse_config
from pipeline.train.plan import RAMP_MULTIPLE, EpochPlan


@dataclass(frozen=True)
class Speeds:
    """What this machine does with FILE's setup, as measured by `measure_speeds`."""

    train: dict[int, float]  # training images/s by size: loader and step together, as a run sees them
    val: dict[int, float]  # validation images/s by size
    new_size_s: float  # once per change of size: new loaders, the first batches (a compile on GPU)
    epoch_s: float  # once per epoch: new passes over the loaders, the checkpoint writes, the plots
    start_s: float  # once per run: reading the data, building the model and the first loaders

    def train_seconds(self, size: int, images: int) -> float:
        return images * per_image(self.train, size)

    def val_seconds(self, size: int, images: int) -> float:
        return images * per_image(self.val, size)

    def epoch_seconds(self, epoch: EpochPlan, previous: EpochPlan | None, val_images: int) -> float:
        """One epoch of a plan: training (each size for its share of the batches, `train.size_jumps`),
        validation, its checkpoints, and new loaders' cost where the loaded sizes change."""
        changed = previous is None or (previous.load_size, previous.val_size) != (epoch.load_size, epoch.val_size)
        shares = epoch.size_shares()
        return (
            sum(share * self.train_seconds(size, epoch.images) for size, share in shares.items())
            + self.val_seconds(epoch.val_size, val_images)
            + self.epoch_s
            + (self.new_size_s if changed else 0.0)
        )


def per_image(table: dict[int, float], size: int) -> float:
    """Seconds per image at `size`: straight lines between the measured sizes; beyond them, in
    proportion to the pixels from the nearest one."""
    sizes = sorted(table)
    if size <= sizes[0]:
        return (size / sizes[0]) ** 2 / table[sizes[0]]
    if size >= sizes[-1]:
        return (size / sizes[-1]) ** 2 / table[sizes[-1]]
    for lo, hi in zip(sizes, sizes[1:]):
        if lo <= size <= hi:
            t = (size - lo) / (hi - lo)
            return (1 - t) / table[lo] + t / table[hi]
    raise AssertionError(size)


def measurement_config(raw: dict, final: int) -> Config:
    """FILE's setup as one stage (its first stage's keys and batch) at the final size: what is measured."""
    one = copy.deepcopy(raw)
    one["stages"] = [{**copy.deepcopy(raw["stages"][0]), "img_size": final, "epochs": 1}]
    one["stages"][0].pop("val_size", None)
    return parse_config(one)


def measure_speeds(cfg: Config, sizes: list[int], batches: int = 12, warmup: int = 5, log=print) -> Speeds:
    """Time stage 0 of `cfg` as a run builds it, at each of `sizes`: `batches` training batches after
    `warmup` (more than the loader prefetches; loader and step together) and as many validation
    batches; what a new pass over the loaders costs (every epoch) and what a new size costs (new
    loaders, a compile on GPU); a checkpoint write and the plots (every epoch); and the start (data
    scan, model, loaders)."""
    from pipeline.train.checkpoint import save_checkpoint
    from pipeline.train.preflight import prepare
    from pipeline.train.stage import RunContext, build_stage
    from pipeline.train.step import keep_modes

    begin = time.perf_counter()
    device, datasets, num_classes = prepare(cfg)
    ctx = RunContext.fresh(cfg, device, num_classes, datasets)
    model = ctx.model
    train, val, new_size, new_pass = {}, {}, [], []
    with build_stage(ctx, 0, choose_lr=lambda parts: 0.01) as parts:  # a usable LR; no schedule
        start_s = time.perf_counter() - begin
        precision = parts.train_step.precision

        def infer(x: torch.Tensor, _: torch.Tensor) -> None:
            with torch.no_grad(), precision.autocast(device):
                parts.net(x)

        for size in sizes:
            t0 = time.perf_counter()
            parts.fit_sizes(ctx, size, size)
            rebuild = time.perf_counter() - t0
            t = _timed(parts.train_loader, parts.train_step, device, batches, warmup)
            again = _timed(parts.train_loader, parts.train_step, device, 0, 0, epoch=1).first_s
            with keep_modes(parts.net):
                parts.net.eval()
                v = _timed(parts.val_loader, infer, device, batches, 1)
                val_again = _timed(parts.val_loader, infer, device, 0, 0, epoch=1).first_s
            train[size], val[size] = t.images_per_s, v.images_per_s
            new_pass.append(max(0.0, again - t.per_batch_s) + max(0.0, val_again - v.per_batch_s))
            new_size.append(rebuild + max(0.0, t.first_s - again) + max(0.0, v.first_s - val_again))
            log(f"  {size:>4} px: train {train[size]:7.1f} img/s, validation {val[size]:7.1f} img/s")
        state = {"model": model.state_dict(), "optimizer": parts.optimizer.state_dict()}
        with tempfile.TemporaryDirectory(dir=cfg.run.out_dir if Path(cfg.run.out_dir).is_dir() else None) as tmp:
            t0 = time.perf_counter()
            save_checkpoint([Path(tmp) / "last.pt", Path(tmp) / "best.pt"], state)
            epoch_s = time.perf_counter() - t0 + plot_seconds(Path(tmp), sizes)
    mean = statistics.fmean
    return Speeds(train, val, mean(new_size), epoch_s + mean(new_pass), start_s)


def _timed(loader, run, device: torch.device, batches: int, warmup: int, epoch: int = 0):
    """A new pass over `loader` from `epoch`, each batch given to `run(x, y)` (`loader_bench.timed`)."""
    from pipeline.loader_bench import endless, timed

    return timed(endless(loader, epoch), lambda batch: run(*batch), batches, warmup, device)


def plot_seconds(run_dir: Path, sizes: list[int], epochs: int = 8, records_per_epoch: int = 20) -> float:
    """What redrawing a run's plots costs (a run does it after every epoch), on made-up metrics."""
    from pipeline.files import write_text
    from pipeline.report import plot_run

    lines = []
    for epoch in range(epochs):
        size = sizes[min(epoch * len(sizes) // epochs, len(sizes) - 1)]
        for step in range(records_per_epoch):
            lines.append(
                {
                    "kind": "batch",
                    "stage": 0,
                    "epoch": epoch,
                    "batch": step,
                    "lr": 0.1,
                    "momentum": 0.9,
                    "loss": 2.0 - step / 100,
                    "images_per_s": 100.0,
                }
            )
        lines.append(
            {
                "kind": "epoch",
                "stage": 0,
                "epoch": epoch,
                "img_size": size,
                "val_loss": 1.0,
                "val_top1": 50.0,
                "val_top5": 90.0,
            }
        )
    write_text(run_dir / "metrics.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    plot_run(run_dir)  # the first call imports matplotlib, once per run
    t0 = time.perf_counter()
    plot_run(run_dir)
    return time.perf_counter() - t0


def native_size(samples: list[tuple[str, int]], most: int = 64) -> int | None:
    """The training images' typical size: the median shorter side of up to `most` of them, spread over
    the set, from their headers. None when none can be read."""
    from PIL import Image

    step = max(1, len(samples) // most)
    sides = []
    for path, _ in samples[::step][:most]:
        try:
            with Image.open(path) as image:
                sides.append(min(image.size))
        except Exception:  # noqa: BLE001 - a bad file is the loader's to report
            continue
    return int(statistics.median(sides)) if sides else None


def round_size(size: float) -> int:
    """`size` to the nearest multiple of `RAMP_MULTIPLE` (at least one)."""
    return max(RAMP_MULTIPLE, RAMP_MULTIPLE * round(size / RAMP_MULTIPLE))


def native_note(native: int | None, final: int) -> str | None:
    """A line for images natively smaller than the final size: what the larger sizes buy."""
    if native is None or native >= final:
        return None
    return (
        f"the training images are about {native} px (median shorter side): sizes above that add no detail, "
        f"only scale; a run with --final-size {round_size(native)} may cost little accuracy for far less time"
    )


def check_sizes(model: torch.nn.Module, sizes: list[int], device: torch.device) -> None:
    """A forward at every size the plan may use: a model with a fixed input size fails here, in one line."""
    from pipeline.errors import ConfigError
    from pipeline.model import input_problem

    for size in sizes:
        problem = input_problem(model.to(device), size, device)
        if problem:
            raise ConfigError(
                f"--final-size {max(sizes)}: the model cannot take {size} px input, "
                f"a size the plan would use ({problem})"
            )
