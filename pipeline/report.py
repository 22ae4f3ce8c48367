"""What a run tells the user: metrics.jsonl, progress bars, the summary table and summary.json.

Metrics are appended line by line; summaries are written atomically.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.files import write_text


class MetricsLog:
    """`metrics.jsonl`: one JSON object a line (`kind`: batch | epoch), appended and flushed; with a
    `TensorBoardLog`, the same records as TensorBoard scalars too."""

    def __init__(self, path: Path | None, tensorboard: TensorBoardLog | None = None):
        """`None`: a log that keeps nothing (the ranks other than 0 under torchrun)."""
        self.path, self.tensorboard = path, tensorboard
        self._file = open(path, "a", buffering=1) if path is not None else None

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.write(record)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self.tensorboard is not None:
            self.tensorboard.writer.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self.tensorboard is not None:
            self.tensorboard.writer.close()

    @staticmethod
    def keep_before(path: Path, stage: int, epoch: int, batch: int = 0) -> None:
        """On resume: drop the records of what will be trained again, from batch `batch` of epoch
        `epoch` of stage `stage` on (that epoch's own record included)."""
        if not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines() if _before(line, stage, epoch, batch)]
        write_text(path, "".join(line + "\n" for line in kept))


def _before(line: str, stage: int, epoch: int, batch: int) -> bool:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:  # a line torn by the crash being resumed from
        return False
    where = (record["stage"], record["epoch"])
    if record.get("kind") in BATCH_KINDS and where == (stage, epoch):
        return batch_index(record) < batch
    if record.get("kind") == "lr_find":  # not run again on resume
        return record["stage"] <= stage
    return where < (stage, epoch)


class TensorBoardLog:
    """`run.tensorboard`: the run's records as TensorBoard scalars in RUN_DIR/tensorboard, on one axis of
    training batches over the whole run (`position(stage, epoch, batch)`): per batch the loss, LR,
    momentum and images/s (`train/...`); per epoch the sizes and the validation loss, top-1 and top-5
    (`val/...`, `val_ema/...`). `purge_step`: on resume, the batch it resumes at; what the crashed run
    logged from there on is hidden, as metrics.jsonl drops it."""

    STEP = ("loss", "lr", "momentum", "images_per_s")
    EPOCH = {"train_loss": "train/epoch_loss", "train_images_per_s": "train/epoch_images_per_s",
             "img_size": "size/train", "val_size": "size/val"}  # fmt: skip

    def __init__(self, log_dir: Path, position, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter  # the tensorboard package: checked before the run

        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)
        self.position = position

    def write(self, record: dict[str, Any]) -> None:
        kind = record.get("kind")
        if kind == "batch":
            at = self.position(record["stage"], record["epoch"], record["batch"])
            for key in self.STEP:
                if record.get(key) is not None:
                    self.writer.add_scalar(f"train/{key}", record[key], at)
        elif kind == "epoch":
            at = self.position(record["stage"], record["epoch"] + 1, 0) - 1  # at the epoch's last batch
            for key, value in record.items():
                name, metric = self.EPOCH.get(key), key.rsplit("_", 1)[-1]
                if key.startswith("val_") and metric in ("loss", "top1", "top5"):  # val_top1, val_ema_top1, ...
                    name = ("val_ema/" if key.startswith("val_ema_") else "val/") + metric
                if name is not None and value is not None:
                    self.writer.add_scalar(name, value, at)


def epoch_bar(total: int, desc: str, enabled: bool = True) -> tqdm:
    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False, file=sys.stderr)


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run table: one row per stage, then the totals."""
    header = f"{'stage':>5} {'size':>7} {'batch':>6} {'epochs':>6} {'seconds':>8} {'img/s':>8} {'val top-1':>9}"
    rows = [header, "-" * len(header)]
    for i, s in enumerate(summary["stages"]):
        size = f"{s['start_size']}-{s['img_size']}" if "start_size" in s else str(s["img_size"])  # a ramp: from-to
        rows.append(
            f"{i:>5} {size:>7} {s['batch_size']:>6} {s['epochs']:>6} {s['seconds']:>8.1f} "
            f"{s['train_images_per_s']:>8.0f} {s['val_top1']:>8.2f}%"
        )
    rows.append("-" * len(header))
    rows.append(
        f"total {summary['seconds']:.1f} s; final val top-1 {summary['final_val_top1']:.2f}%, "
        f"best {summary['best_val_top1']:.2f}%"
    )
    return "\n".join(rows)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (a torn last line, from a crash, is left out), with the batch
    records of files written before they were named `batch` (`kind: step`, `step`) read as today's."""
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("kind") == "step":
            record["kind"], record["batch"] = "batch", record.pop("step")
        records.append(record)
    return records


BATCH_KINDS = ("batch", "step")  # `step`: the name of a batch record before it was `batch`


def batch_index(record: dict[str, Any]) -> int:
    """A batch record's index in its epoch, in either layout."""
    return record["batch"] if "batch" in record else record["step"]


def run_curves(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-batch and per-epoch series on one x axis: the batch records numbered in run order."""
    steps = [r for r in records if r.get("kind") == "batch"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    last = {(r["stage"], r["epoch"]): i for i, r in enumerate(steps)}  # steps are in run order: the last wins
    ends = []  # the step index each epoch ended at
    for r in epochs:
        end = last.get((r["stage"], r["epoch"]))
        ends.append(end + 1 if end is not None else (ends[-1] if ends else 0))
    stages = []  # (first step, last step, img_size) per stage
    for i, r in enumerate(steps):
        if not stages or stages[-1][2] != r["stage"]:
            stages.append([i, 0, r["stage"]])
        stages[-1][1] = i + 1
    sizes = {r["stage"]: r["img_size"] for r in epochs}
    return {
        "steps": steps,
        "epochs": epochs,
        "epoch_ends": ends,
        "stages": [(a, b, sizes.get(s, s)) for a, b, s in stages],
    }


class SmoothedLoss:
    """Exponential moving average with bias correction (what fastai and TensorBoard draw): the
    first points are not pulled towards 0."""

    def __init__(self, beta: float = 0.9):
        self.beta, self.average, self.count = beta, 0.0, 0

    def add(self, value: float) -> float:
        """Take one value; the smoothed value so far."""
        self.count += 1
        self.average = self.beta * self.average + (1 - self.beta) * value
        return self.average / (1 - self.beta**self.count)


def smooth(values: list[float], beta: float = 0.9) -> list[float]:
    """The smoothed curve of `values` (SmoothedLoss at every point)."""
    average = SmoothedLoss(beta)
    return [average.add(v) for v in values]


PLOTS = ("loss.png", "accuracy.png", "lr.png", "throughput.png")


def plot_run(run_dir: Path) -> list[Path]:
    """The run's pictures, in RUN_DIR/plots: loss (train raw and smoothed, val), val top-1/top-5,
    LR and momentum, images/s; every one against the optimizer step with the stages shaded and
    labelled by image size. Rewritten after every epoch, so they can be watched."""
    from pipeline.files import pyplot, write_png

    plt = pyplot()

    curves = run_curves(read_metrics(run_dir / "metrics.jsonl"))
    steps, epochs, ends = curves["steps"], curves["epochs"], curves["epoch_ends"]
    if not steps:
        return []
    x = list(range(len(steps)))
    out = run_dir / "plots"

    def figure(ylabel: str, title: str):
        fig, ax = plt.subplots(figsize=(8, 4.2))
        for i, (first, last, size) in enumerate(curves["stages"]):
            ax.axvspan(first, last, color="0.93" if i % 2 == 0 else "white", zorder=0)
            ax.text((first + last) / 2, 1.01, f"{size}px", transform=ax.get_xaxis_transform(), ha="center", fontsize=9)
        ax.set_xlabel("training step (batches since the start of the run)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, pad=16)
        ax.grid(alpha=0.3)
        return fig, ax

    loss = [r["loss"] for r in steps]
    fig, ax = figure("loss", "training and validation loss")
    ax.plot(x, loss, color="tab:blue", alpha=0.3, linewidth=0.8, label="train (each step)")
    ax.plot(x, smooth(loss), color="tab:blue", linewidth=1.6, label="train (smoothed)")
    if epochs:
        ax.plot(ends, [r["val_loss"] for r in epochs], "o-", color="tab:red", label="validation (each epoch)")
    ax.legend(loc="upper right")
    write_png(out / "loss.png", fig)

    fig, ax = figure("accuracy (%)", "validation accuracy")
    if epochs:
        ax.plot(ends, [r["val_top1"] for r in epochs], "o-", color="tab:green", label="top-1")
        ax.plot(ends, [r["val_top5"] for r in epochs], "s--", color="tab:olive", label="top-5")
        if "val_ema_top1" in epochs[-1]:
            ema = [(e, r["val_ema_top1"]) for e, r in zip(ends, epochs) if "val_ema_top1" in r]
            ax.plot(*zip(*ema), "^:", color="tab:purple", label="top-1, EMA weights")
        ax.set_ylim(0, 100)
        ax.legend(loc="lower right")
    write_png(out / "accuracy.png", fig)

    fig, ax = figure("learning rate", "learning rate (highest group) and momentum")
    ax.plot(x, [r["lr"] for r in steps], color="tab:orange", label="learning rate")
    ax.set_yscale("log")
    moms = [r.get("momentum") for r in steps]
    if any(m is not None for m in moms):
        ax2 = ax.twinx()
        ax2.plot(x, [m if m is not None else float("nan") for m in moms], color="tab:gray", label="momentum")
        ax2.set_ylabel("momentum (or Adam's beta1)")
        ax2.legend(loc="lower right")
    ax.legend(loc="upper right")
    write_png(out / "lr.png", fig)

    fig, ax = figure("images / s", "training throughput (the loader and the step)")
    ax.plot(x, [r["images_per_s"] for r in steps], color="tab:cyan", linewidth=1.0)
    ax.set_ylim(bottom=0)
    write_png(out / "throughput.png", fig)
    return [out / name for name in PLOTS]
