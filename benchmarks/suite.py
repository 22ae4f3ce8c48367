"""The progressive-resizing suite: every schedule shape on every dataset, seeds apart, one table.

For each dataset, the default file's setup (stages.yaml: model, optimizer, OneCycle over the run,
Mixup off for the last quarter) at the dataset's final size over `--epochs` epochs, and the variants
of benchmarks/progressive_vs_fixed.py: `fixed` (every epoch at the final size), `progressive` (the
default file's shape: a ramp from half the final size, then a quarter of the epochs at it), `step` (a
step file, 3/8 -> 5/8 -> 1 of the final size, with `train.size_jumps` on), `step-plain` (the same with
plain switches), `ffcv` and `composer` (their schedules' shapes). Per dataset and variant: the final
top-1 (mean over the seeds, and each), the wall seconds, the seconds to the fixed run's target (its mean
final top-1 less 0.5 points), and the worst drop of top-1 at a size switch (the epoch before against the
first epoch after, over every switch and seed).

Datasets (`--datasets`, comma-separated; each made once under `--work` and reused):
  demo        the built-in demo (shape x texture, 96 px), final size 64
  digits      the demo generator's `digits` task (96 px), final size 64
  fashion     Fashion-MNIST's real product photographs (28 px), from Debian's `dataset-fashion-mnist`
              IDX files (`--fashion-src`), `--fashion-per-class` training and a fifth as many validation
              images per class, final size 64
  big160      the demo generator at 160 px, final size 128 (a 64 -> 128 px ramp)
  uci         UCI's optical digits (1,797 real 8x8 scans, as scikit-learn ships them, needs it installed),
              upscaled to 64 px, a seeded 80/20 split, final size 64
  NAME=PATH   any folder with train/ and val/, final size 64 (NAME=PATH@SIZE for another)

    python benchmarks/suite.py [--datasets demo,digits,fashion,big160] [--variants fixed,step,...]
        [--seeds 0,1,2] [--epochs 12] [--work runs/suite-data] [--out runs/suite] [--set KEY=VALUE]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import yaml  # noqa: E402
from progressive_vs_fixed import mean, stage_keys, summarise, variant  # noqa: E402

from pipeline.config import apply_override, parse_config  # noqa: E402
from pipeline.data.demo import make_demo_dataset  # noqa: E402
from pipeline.train.run import run_training  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("fixed", "progressive", "step", "step-plain", "ffcv", "composer")
BUILT = {  # name: (final size, how to make it under a folder)
    "demo": (64, lambda out, a: make_demo_dataset(out, n_train=5000, n_val=1000, size=96, seed=0)),
    "digits": (64, lambda out, a: make_demo_dataset(out, n_train=5000, n_val=1000, size=96, seed=0, task="digits")),
    "big160": (128, lambda out, a: make_demo_dataset(out, n_train=3000, n_val=1000, size=160, seed=0)),
    "fashion": (64, lambda out, a: fashion(out, a)),
    "uci": (64, lambda out, a: uci_digits(out)),
}


def uci_digits(out: Path) -> None:
    """UCI's optical digits (scikit-learn's copy: no download), 8x8 scans upscaled to 64 px, 80/20 split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("uci: needs scikit-learn (pip install scikit-learn), which ships the digits") from None
    import numpy as np
    from PIL import Image

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    cut = int(0.8 * len(order))
    partial = out.with_name(f".{out.name}.partial")
    for split, picked in (("train", order[:cut]), ("val", order[cut:])):
        for i in picked:
            folder = partial / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[i] * 255 / 16).astype(np.uint8)
            Image.fromarray(pixels).resize((64, 64), Image.BILINEAR).save(folder / f"{i:05d}.png")
    partial.rename(out)


def fashion(out: Path, args: argparse.Namespace) -> None:
    n = args.fashion_per_class
    tool = [sys.executable, str(ROOT / "tools" / "idx_to_folder.py"), str(args.fashion_src), str(out)]
    tool += ["--per-class-train", str(n), "--per-class-val", str(max(1, n // 5)), "--names", "fashion"]
    proc = subprocess.run(tool, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(
            f"fashion: {proc.stderr.strip()} (install Debian's dataset-fashion-mnist or give --fashion-src)"
        )


def dataset(spec: str, args: argparse.Namespace) -> tuple[str, Path, int]:
    """(name, folder with train/ and val/, final size) of one `--datasets` entry, made if needed."""
    if "=" in spec:
        name, path = spec.split("=", 1)
        path, _, size = path.partition("@")
        return name, Path(path), int(size or 64)
    if spec not in BUILT:
        raise SystemExit(f"--datasets: unknown {spec!r} (known: {', '.join(BUILT)}, or NAME=PATH)")
    final, make = BUILT[spec]
    folder = args.work / (f"{spec}-{args.fashion_per_class}" if spec == "fashion" else spec)
    if not folder.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        make(folder, args)
    return spec, folder, final


def base_config(raw: dict, folder: Path, final: int, epochs: int) -> dict:
    """The file's setup on `folder`: the default shape (ramp from half, a quarter at the final size, its
    last stage's keys) over `epochs` epochs at `final` px."""
    raw = copy.deepcopy(raw)
    raw.setdefault("data", {}).update(train=str(folder / "train"), val=str(folder / "val"))
    first, last = raw["stages"][0], raw["stages"][-1]
    settle = max(1, epochs // 4)
    raw["stages"] = [
        {**stage_keys(first), "img_size": [max(8, final // 2), final], "epochs": epochs - settle},
        {**stage_keys(last), "img_size": final, "epochs": settle},
    ]
    return raw


def worst_drop(switches: list[list]) -> float | None:
    """The largest top-1 loss from the epoch before a size switch to the one after, over every seed."""
    drops = [before - after for seed in switches for _, _, before, after in seed]
    return max(drops) if drops else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", type=Path, default=ROOT / "stages.yaml")
    parser.add_argument("--datasets", default="demo,digits,fashion,big160")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--fashion-src", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--fashion-per-class", type=int, default=1000)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--work", type=Path, default=Path("runs/suite-data"))
    parser.add_argument("--out", type=Path, default=Path("runs/suite"))
    args = parser.parse_args()

    raw = yaml.safe_load(args.file.read_text())
    for item in args.overrides:
        apply_override(raw, item)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    report: dict = {"seeds": seeds, "epochs": args.epochs, "machine": platform.platform(), "datasets": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    for spec in (d.strip() for d in args.datasets.split(",") if d.strip()):
        name, folder, final = dataset(spec, args)
        base = base_config(raw, folder, final, args.epochs)
        runs: dict[str, list[Path]] = {v: [] for v in names}
        for seed in seeds:  # seeds outermost: a slow moment of the machine spreads over every variant
            for v in names:
                cfg = variant(base, v)
                cfg.setdefault("run", {}).update(seed=seed, name=f"{name}-{v}-s{seed}")
                start = time.perf_counter()
                runs[v].append(run_training(parse_config(cfg, base_dir=args.file.parent), out_dir=args.out / name))
                print(f"{name} {v} seed {seed}: {time.perf_counter() - start:.1f} s wall", flush=True)
        fixed = mean(summarise({"fixed": runs["fixed"]}, 0.0)["fixed"]["final_top1"]) if "fixed" in runs else None
        target = fixed - 0.5 if fixed is not None else 0.0
        rows = summarise(runs, target)
        report["datasets"][name] = {"folder": str(folder), "final_size": final, "target_top1": target, "variants": rows}
        (args.out / "suite.json").write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"wrote {args.out / 'suite.json'}")


def print_table(report: dict) -> None:
    print(f"\n{report['epochs']} epochs, seeds {', '.join(map(str, report['seeds']))}; means over the seeds")
    header = "dataset | variant | final top-1 (each seed) | vs fixed | wall s | s to fixed - 0.5"
    print(f"| {header} | worst drop at a switch (points) |")
    print("|---|---|---|---|---|---|---|")
    for name, d in report["datasets"].items():
        base = d["variants"].get("fixed")
        for v, r in d["variants"].items():
            final, wall, to = mean(r["final_top1"]), mean(r["wall_seconds"]), mean(r["seconds_to_target"])
            delta = f"{final - mean(base['final_top1']):+.2f}" if base else "-"
            reach = "not reached" if to is None else f"{to:.0f}"
            if to is not None and base is not None and mean(base["seconds_to_target"]):
                reach += f" ({to / mean(base['seconds_to_target']):.2f}x)"
            drop = worst_drop(r["switches"])
            seeds = " / ".join(f"{v:.1f}" for v in r["final_top1"])
            print(
                f"| {name} | {v} | {final:.2f}% ({seeds}) | {delta} | {wall:.0f} | {reach} | "
                f"{'-' if drop is None else f'{drop:.1f}'} |"
            )


if __name__ == "__main__":
    main()
