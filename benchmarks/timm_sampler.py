"""timm's scheduled progressive sampler against timm's own fixed run, on folders, seeds apart.

timm's `train.py` (from a source snapshot of its main branch: the pip package does not ship it; give
its path with `--train-py`) runs twice per dataset and seed, back to back:

  fixed     every batch at the final size
  sampler   `--train-img-sizes` from half the final size to it in 8-px steps, `--train-size-schedule
            progressive`: each batch's size is drawn from a window that moves from the first size to the
            last over the run (timm's defaults: spread 0.65 sizes, 10% drawn uniformly)

The recipe is the default stages.yaml's where timm has the key: ResNet-18 from scratch, batch 64, SGD
(lr 0.1, momentum 0.9, Nesterov, weight decay 5e-5), a quarter of the run warming up then cosine to
1e-5 stepped per update (timm's nearest to a OneCycle), label smoothing 0.1, Mixup 0.2 / CutMix 1.0 on
half the batches until the last quarter of the epochs, RandomResizedCrop over (0.35, 1) of the area,
validation at the final size. timm's other defaults stay (its colour jitter, bicubic resizing, its
validation crop). So compare `sampler` with timm's own `fixed`, not with the pipeline's runs.

    python benchmarks/timm_sampler.py --train-py PATH/train.py uci=DIR fashion=DIR [--seeds 0,1,2]
        [--epochs 12] [--final 64] [--out runs/timm-sampler]
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("fixed", "sampler")


def sizes(final: int) -> list[int]:
    """The sampler's sizes: multiples of 8 from half the final size up to it."""
    start = max(8, final // 2 // 8 * 8)
    return list(range(start, final, 8)) + [final]


def timm_command(
    train_py: Path, data: Path, classes: int, variant: str, seed: int, epochs: int, final: int, out: Path
) -> list[str]:
    """timm's train.py command line for one run (`variant` in VARIANTS)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} (known: {', '.join(VARIANTS)})")
    quarter = max(1, epochs // 4)  # the warm-up, and the last epochs without Mixup
    cmd = [sys.executable, str(train_py), str(data), "--train-split", "train", "--val-split", "val"]
    cmd += ["--num-classes", str(classes)]
    cmd += ["--model", "resnet18", "--img-size", str(final), "--batch-size", "64", "--device", "cpu"]
    cmd += ["--workers", "1", "--epochs", str(epochs), "--seed", str(seed), "--opt", "sgd", "--lr", "0.1"]
    cmd += ["--momentum", "0.9", "--weight-decay", "5e-5", "--sched", "cosine", "--sched-on-updates"]
    cmd += ["--warmup-epochs", str(quarter), "--warmup-lr", "0.004", "--min-lr", "1e-5", "--cooldown-epochs", "0"]
    cmd += ["--smoothing", "0.1", "--mixup", "0.2", "--cutmix", "1.0", "--mixup-prob", "0.5"]
    cmd += ["--mixup-switch-prob", "0.5", "--mixup-off-epoch", str(epochs - quarter)]
    cmd += ["--scale", "0.35", "1.0", "--output", str(out), "--experiment", f"{variant}-s{seed}"]
    if variant == "sampler":
        cmd += ["--train-img-sizes", *map(str, sizes(final)), "--train-size-schedule", "progressive"]
    return cmd


def final_top1(summary: Path) -> tuple[float, list[float]]:
    """The last epoch's validation top-1 and every epoch's, from timm's summary.csv."""
    with summary.open() as f:
        per_epoch = [float(row["eval_top1"]) for row in csv.DictReader(f)]
    if not per_epoch:
        raise ValueError(f"{summary}: no epoch recorded")
    return per_epoch[-1], per_epoch


def table(rows: list[dict], names: list[str]) -> list[str]:
    """The markdown table: per dataset and variant, the mean final top-1, each seed's, and the wall."""
    lines = ["| dataset | variant | final top-1 (each seed) | vs fixed | wall s (mean) |", "|---|---|---|---|---|"]
    for name in names:
        means = {}
        for variant in VARIANTS:
            mine = [r for r in rows if (r["dataset"], r["variant"]) == (name, variant)]
            if not mine:
                continue
            means[variant] = sum(r["final_top1"] for r in mine) / len(mine)
            each = " / ".join(f"{r['final_top1']:.1f}" for r in mine)
            vs = f"{means[variant] - means['fixed']:+.2f}" if variant != "fixed" and "fixed" in means else ""
            wall = sum(r["wall_s"] for r in mine) / len(mine)
            lines.append(f"| {name} | {variant} | {means[variant]:.2f}% ({each}) | {vs} | {wall:.0f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="+", help="NAME=DIR, each a folder with train/ and val/")
    parser.add_argument("--train-py", type=Path, required=True, help="timm's train.py, from a source snapshot")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--final", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("runs/timm-sampler"))
    args = parser.parse_args()
    if not args.train_py.is_file():
        parser.exit(2, f"--train-py: {args.train_py} is not a file (timm's train.py from a source snapshot)\n")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.exit(2, f"--seeds: {args.seeds!r} is not a comma-separated list of integers\n")
    if args.epochs < 1 or args.final < 16:
        parser.exit(2, f"--epochs must be at least 1 and --final at least 16 (got {args.epochs}, {args.final})\n")
    datasets = {}
    for spec in args.datasets:  # every folder checked before the first run
        name, _, path = spec.partition("=")
        data = Path(path)
        if not name or not (data / "train").is_dir() or not (data / "val").is_dir():
            parser.exit(2, f"{spec}: needs NAME=DIR with DIR/train and DIR/val\n")
        if name in datasets:
            parser.exit(2, f"{spec}: the name {name!r} is given twice\n")
        datasets[name] = data
    rows: list[dict] = []
    report_path = args.out / "timm_sampler.json"

    def write_report() -> None:  # after every run, so a failure later loses none of them
        args.out.mkdir(parents=True, exist_ok=True)
        report = {"rows": rows, "epochs": args.epochs, "sizes": sizes(args.final), "machine": platform.platform()}
        report_path.write_text(json.dumps(report, indent=2) + "\n")

    for name, data in datasets.items():
        n_classes = sum(1 for p in (data / "train").iterdir() if p.is_dir())
        for seed in seeds:
            for variant in VARIANTS:
                out = args.out / name
                shutil.rmtree(out / f"{variant}-s{seed}", ignore_errors=True)  # timm appends to a folder it finds
                cmd = timm_command(args.train_py, data, n_classes, variant, seed, args.epochs, args.final, out)
                start = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True)
                wall = time.perf_counter() - start
                log = out / f"{variant}-s{seed}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                log.write_text(proc.stdout + proc.stderr)
                if proc.returncode:
                    write_report()
                    parser.exit(2, f"{name} {variant} seed {seed}: timm's train.py failed, see {log}\n")
                top1, per_epoch = final_top1(out / f"{variant}-s{seed}" / "summary.csv")
                rows.append({"dataset": name, "variant": variant, "seed": seed, "final_top1": top1})
                rows[-1].update(per_epoch=per_epoch, wall_s=round(wall, 1))
                write_report()
                print(f"{name} {variant} seed {seed}: {top1:.2f}% in {wall:.0f} s", flush=True)
    print(f"\n{args.epochs} epochs, seeds {args.seeds}; means over the seeds")
    print("\n".join(table(rows, list(datasets))))
    print(f"wrote {report_path}")


if __name__ == "__main__":
    main()
