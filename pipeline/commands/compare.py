"""`python -m pipeline compare RUN_DIR RUN_DIR ...`: runs side by side.

One table (final and best top-1, wall time, time to a target accuracy, images/s per stage) and
the validation curves overlaid, against epochs and against wall-clock seconds.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.files import pyplot, write_json, write_png
from pipeline.options import percent
from pipeline.report import read_metrics

HELP = "runs side by side: a table and overlaid validation curves"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR", help="two or more run folders")
    parser.add_argument("--out", type=Path, default=Path("compare"), help="output folder (default ./compare)")
    parser.add_argument(
        "--target", type=percent, default=None, help="top-1 (%%) for 'time to target' (default: the lowest final top-1)"
    )


def cmd_compare(args: argparse.Namespace) -> int:
    if args.target is not None and not 0 < args.target <= 100:
        raise UserError(f"--target {args.target}: a top-1 accuracy in percent, in (0, 100]")
    result, files = run_compare(args.runs, args.out, args.target)
    print(format_table(result))
    print(f"wrote {', '.join(str(f) for f in files)}")
    return 0


@dataclass
class RunRecord:
    """What compare reads from one run folder."""

    path: Path
    epochs: list[dict[str, Any]]  # the metrics' epoch records, in order
    stages: list[dict[str, Any]]  # summary.json's stages (finished runs), else []

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def final_top1(self) -> float:
        return self.epochs[-1]["val_top1"]

    @property
    def best_top1(self) -> float:
        return max(r["val_top1"] for r in self.epochs)

    @property
    def wall_seconds(self) -> float | None:
        return self.epochs[-1].get("elapsed_s")

    def reaching(self, target: float) -> int | None:
        """Index of the first epoch whose val top-1 reached `target` (None: never)."""
        return next((i for i, r in enumerate(self.epochs) if r["val_top1"] >= target), None)


def load_run(path: Path) -> RunRecord:
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{path}: not a run folder (no metrics.jsonl)")
    epochs = [r for r in read_metrics(metrics) if r.get("kind") == "epoch"]
    if not epochs:
        raise UserError(f"{path}: no finished epoch to compare yet")
    summary = path / "summary.json"
    stages = json.loads(summary.read_text())["stages"] if summary.is_file() else []
    return RunRecord(path, epochs, stages)


def compare(paths: list[Path], target: float | None = None) -> dict[str, Any]:
    """The comparison of the runs in `paths`; `target` defaults to the lowest final top-1 among
    them (the accuracy every run reaches), so "time to target" says which got there first."""
    if len(paths) < 2:
        raise UserError("compare: give at least two run folders")
    runs = [load_run(p) for p in paths]
    target = min(r.final_top1 for r in runs) if target is None else target
    rows = []
    for r in runs:
        first = r.reaching(target)
        rows.append(
            {
                "run": str(r.path),
                "final_top1": r.final_top1,
                "best_top1": r.best_top1,
                "epochs": len(r.epochs),
                "wall_seconds": r.wall_seconds,
                "seconds_to_target": None if first is None else r.epochs[first].get("elapsed_s"),
                "epochs_to_target": None if first is None else first + 1,
                "images_per_s": [s["train_images_per_s"] for s in r.stages],
                "stage_sizes": [s["img_size"] for s in r.stages],
            }
        )
    return {"target_top1": target, "runs": rows, "_records": runs}


def format_table(result: dict[str, Any]) -> str:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    to_target = f"s to {result['target_top1']:.1f}%"
    header = f"{'run':<34} {'final':>7} {'best':>7} {'wall s':>8} {to_target:>11}  img/s per stage"
    lines = [header, "-" * len(header)]
    for row in result["runs"]:
        speed = " / ".join(f"{s}px {v:.0f}" for s, v in zip(row["stage_sizes"], row["images_per_s"])) or "-"
        lines.append(
            f"{Path(row['run']).name[:34]:<34} {row['final_top1']:>6.2f}% {row['best_top1']:>6.2f}% "
            f"{num(row['wall_seconds'], '8.1f'):>8} {num(row['seconds_to_target'], '11.1f'):>11}  {speed}"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], out: Path) -> list[Path]:
    """Validation top-1 of every run against epochs and against wall-clock seconds."""
    plt = pyplot()

    runs: list[RunRecord] = result["_records"]
    written = []
    for name, xlabel in (("compare_epochs.png", "epoch"), ("compare_time.png", "wall-clock seconds")):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for r in runs:
            ys = [e["val_top1"] for e in r.epochs]
            xs = list(range(1, len(ys) + 1)) if name == "compare_epochs.png" else [e.get("elapsed_s") for e in r.epochs]
            if None in xs:
                continue  # a run from before elapsed_s was logged: epochs only
            ax.plot(xs, ys, "o-", markersize=3, label=r.name)
        ax.axhline(result["target_top1"], color="0.5", linestyle=":", label=f"target {result['target_top1']:.1f}%")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation top-1 (%)")
        ax.set_title(f"validation top-1 against {xlabel}")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        write_png(out / name, fig)
        written.append(out / name)
    return written


def run_compare(paths: list[Path], out: Path, target: float | None = None) -> tuple[dict[str, Any], list[Path]]:
    result = compare(paths, target)
    files = plot(result, out)
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    write_json(out / "compare.json", public)
    return public, [out / "compare.json", *files]
