"""The LR range test (Leslie Smith; fastai's `lr_find`): raise the LR every step, watch the loss.

`find_lr` leaves the model and optimizer exactly as it found them; `stage_range_test` runs it on a stage.
"""

from __future__ import annotations

import copy
import csv
import io
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline import distributed
from pipeline.errors import UserError
from pipeline.files import atomic_write, pyplot, write_png
from pipeline.report import MetricsLog, SmoothedLoss
from pipeline.train.checkpoint import derive_seed, rng_state, seed_everything, set_rng_state
from pipeline.train.stage import RunContext, StageParts
from pipeline.train.step import build_train_step, keep_modes

DESCENT = 0.05  # a fall of the smoothed loss by 5% of its start counts as a real descent


@dataclass
class RangeTest:
    """The record of one range test; `lrs[i]` is the LR step i trained with, `losses[i]` its loss."""

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    stop_reason: str = "reached the end LR"
    suggestions: dict[str, float] = field(default_factory=dict)

    @property
    def recommendation(self) -> str | None:
        """`valley` when the loss clearly fell during the test, else `edge` (from where it blew up)."""
        lo, hi = trimmed(len(self.smoothed))
        if hi - lo < 5:
            return None
        curve = self.smoothed[lo:hi]
        fell = curve[0] - min(curve) >= DESCENT * abs(curve[0])
        for name in ("valley",) if fell else ("edge", "valley"):  # valley if the loss never blew up
            if name in self.suggestions:
                return name
        return None

    @property
    def recommended(self) -> float | None:
        return self.suggestions.get(self.recommendation) if self.recommendation else None


def lr_at(step: int, steps: int, start: float, end: float, mode: str) -> float:
    """The LR of step `step` of `steps`: exponential (even on a log axis) or linear from start to end."""
    t = step / max(steps - 1, 1)
    if mode == "exp":
        return start * (end / start) ** t
    return start + (end - start) * t


def range_test(
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    start: float = 1e-7,
    end: float = 10.0,
    steps: int = 100,
    mode: str = "exp",
    beta: float = 0.98,
    diverge: float = 4.0,
) -> RangeTest:
    """Train `steps` steps with a rising LR; stop once the smoothed loss passes `diverge` x its best.

    `step(x, y)` trains one batch and returns its loss; `batches()` starts a new pass over the
    data (called again when a pass is shorter than `steps`). The LR swept is the base LR: each group
    runs at it times its `lr_scale` (layer decay, `lr_mult`), or keeps its ratio to
    the first group's (layer-wise LRs stay layer-wise).
    """
    first = optimizer.param_groups[0]["lr"]
    ratios = [g.get("lr_scale", g["lr"] / first) for g in optimizer.param_groups]
    result = RangeTest()
    average, best = SmoothedLoss(beta), math.inf
    data = _cycle(batches)
    for i in range(steps):
        lr = lr_at(i, steps, start, end, mode)
        for group, ratio in zip(optimizer.param_groups, ratios):
            group["lr"] = lr * ratio
        x, y = next(data)
        loss = float(step(x, y))
        if not math.isfinite(loss):
            result.stop_reason = f"the loss became {loss} at lr {lr:.3g}"
            break
        smoothed = average.add(loss)
        result.lrs.append(lr)
        result.losses.append(loss)
        result.smoothed.append(smoothed)
        best = min(best, smoothed)
        if smoothed > diverge * best:
            result.stop_reason = f"the smoothed loss passed {diverge:g}x its minimum at lr {lr:.3g}"
            break
    result.suggestions = suggest(result.lrs, result.smoothed)
    return result


def _cycle(batches: Callable[[], Iterable]) -> Iterator:
    while True:
        empty = True
        for item in batches():
            empty = False
            yield item
        if empty:
            raise ValueError("the loader yielded no batch")


def trimmed(n: int) -> tuple[int, int]:
    """fastai's window for suggestions: skip the first tenth (smoothing warm-up, noise) and the last
    five points (the blow-up) when there are enough of them."""
    return n // 10, n - 5 if n >= 20 else n


def suggest(lrs: list[float], losses: list[float]) -> dict[str, float]:
    """Named LR suggestions from a (smoothed) loss curve; empty when the curve is too short."""
    lo, hi = trimmed(len(losses))
    if hi - lo < 5:
        return {}
    window = losses[lo:hi]
    # The points after the minimum are the divergence: leave them out of slopes and valleys.
    stop = lo + min(range(len(window)), key=window.__getitem__)
    xs = [math.log10(lr) for lr in lrs]
    out = {"minimum": lrs[stop] / 10}  # fastai's "minimum": a tenth of the LR at the lowest loss
    if stop - lo >= 2:
        slopes = {i: (losses[i + 1] - losses[i - 1]) / (xs[i + 1] - xs[i - 1]) for i in range(lo + 1, stop)}
        out["steepest"] = lrs[min(slopes, key=slopes.__getitem__)]
    out["valley"] = lrs[lo + _valley(losses[lo : stop + 1])]
    # "edge": a third of the LR where the loss climbs 10% over its minimum (where it blows up, so the
    # whole tail counts), the usable OneCycle peak when the test is too short to show a descent
    rising = [i for i in range(stop, len(losses)) if losses[i] > 1.1 * losses[stop]]
    if rising:
        out["edge"] = lrs[rising[0]] / 3
    return out


def _valley(losses: list[float]) -> int:
    """fastai's `valley`: the longest stretch of decreasing loss, then a point 1/2 of the way down it."""
    n = len(losses)
    run_length = [1] * n
    best_start, best_end = 0, 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and run_length[i] < run_length[j] + 1:
                run_length[i] = run_length[j] + 1
        if run_length[i] > run_length[best_end]:
            best_end = i
            best_start = i - run_length[i]
    third = (best_end - best_start) / 3
    return min(n - 1, max(0, best_start + int(third) + int(third / 2)))


def find_lr(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    seed: int | None = None,
    **kwargs,
) -> RangeTest:
    """`range_test`, then the model (weights, BN statistics), optimizer and RNGs put back as they were.

    With `seed`, the test's own draws (Mixup, dropout) are seeded, so it repeats exactly on resume."""
    model_state = copy.deepcopy(model.state_dict())
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    device = next(model.parameters()).device
    rng = rng_state(device)
    try:
        with keep_modes(model):
            if seed is not None:
                seed_everything(seed)
            if not model.training:  # a model in train mode keeps its own (frozen BatchNorm stays in eval)
                model.train()
            return range_test(step, optimizer, batches, **kwargs)
    finally:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        set_rng_state(rng, device)


def write_csv(result: RangeTest, path: Path) -> None:
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["step", "lr", "loss", "smoothed_loss"])
    for i, (lr, loss, smooth) in enumerate(zip(result.lrs, result.losses, result.smoothed)):
        writer.writerow([i, f"{lr:.6g}", f"{loss:.6g}", f"{smooth:.6g}"])
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def plot(result: RangeTest, path: Path, title: str) -> None:
    """Loss against LR on a log axis, raw and smoothed, with each suggestion marked."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(result.lrs, result.losses, color="0.75", lw=1, label="loss")
    ax.plot(result.lrs, result.smoothed, color="C0", lw=2, label="smoothed loss")
    markers = {"valley": ("C3", "o"), "steepest": ("C2", "^"), "minimum": ("C1", "s"), "edge": ("C4", "D")}
    for name, lr in result.suggestions.items():
        i = min(range(len(result.lrs)), key=lambda k: abs(math.log(result.lrs[k] / lr)))
        color, marker = markers[name]
        chosen = " (recommended)" if name == result.recommendation else ""
        ax.plot([lr], [result.smoothed[i]], marker, color=color, ms=8, label=f"{name}: {lr:.2g}{chosen}", zorder=3)
    if result.recommended:
        ax.axvline(result.recommended, color=markers[result.recommendation][0], ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    low = min(result.smoothed) if result.smoothed else 0
    high = result.smoothed[0] if result.smoothed else 1
    ax.set_ylim(low - 0.1 * abs(high - low), high + 0.6 * abs(high - low) + 1e-6)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    write_png(path, fig)


def stage_range_test(parts: StageParts, ctx: RunContext, **kwargs) -> RangeTest:
    """The LR range test on a built stage: its loader, AMP, Mixup and label smoothing, and its
    frozen groups; leaves no trace. Under torchrun every process steps on the mean loss."""
    train_step = build_train_step(
        parts.train_net, parts.optimizer, None, parts.train_cfg, ctx.device, ctx.num_classes, accumulate=False
    )
    loader, world = parts.train_loader, ctx.world
    passes = iter(range(10**6))

    def batches():
        loader.set_epoch(10**6 + next(passes))  # passes of their own, apart from the run's epochs
        return loader

    def global_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # under torchrun: the mean loss of every process, so they all stop the test at the same step
        return distributed.sum_all(train_step(x, y).float().clone()) / world.world_size

    seed = derive_seed(parts.seed, 2**31) + world.rank  # each rank its own Mixup and dropout draws
    return find_lr(ctx.model, parts.optimizer, global_step, batches, seed=seed, **kwargs)


def save_range_test(result: RangeTest, prefix: Path, title: str) -> None:
    """`<prefix>.csv` and `<prefix>.png`."""
    write_csv(result, prefix.with_suffix(".csv"))
    plot(result, prefix.with_suffix(".png"), f"LR range test, {title}")


def recommended_lr(result: RangeTest, field: str) -> float:
    if result.recommended is None:
        raise UserError(
            f"{field}: the LR range test found no usable LR ({result.stop_reason}, after {len(result.lrs)} steps); "
            "set an LR by hand or widen the range"
        )
    return result.recommended


def lr_for_run(parts: StageParts, ctx: RunContext, run_dir: Path, metrics: MetricsLog) -> float:
    """`lr: find` in a run: the range test on this stage, its plot in the run folder, a metrics
    record, and rank 0's LR for every process."""
    k = parts.index
    result = stage_range_test(parts, ctx)
    if ctx.world.is_main:
        save_range_test(result, run_dir / f"lr_find_stage{k}", f"stage {k}: {parts.stage.img_size}px")
    lr = distributed.from_main(recommended_lr(result, f"stages.{k}.lr"))  # every rank trains with rank 0's
    metrics.write({"kind": "lr_find", "stage": k, "epoch": 0, "lr": lr, **result.suggestions})
    print(f"stage {k}: lr find suggests {lr:.3g} ({result.recommendation}); {result.stop_reason}")
    return lr
