"""From scratch vs frozen backbone vs full fine-tuning vs progressive unfreezing, same budget.

The comparison fine-tuning tutorials run. The "pretrained" weights are the default run's
(`stages.yaml`: resnet18 on the 10-class demo task); the fine-tuning task is a different labelling
of new generated images (5 shapes, the stripe texture left to chance), small as real ones are.
Every variant runs the stages of `examples/finetune.yaml` (sizes, batches, epochs, optimizer,
schedule, layer decay, EMA); only `model.pretrained` and the per-stage `freeze` differ.

    python benchmarks/finetune_compare.py [--train N] [--val N] [--seeds 0,1] [--pretrained CKPT] [--set KEY=VALUE]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from pipeline.config import apply_override, load_config, parse_config  # noqa: E402
from pipeline.data.demo import demo_cache_dir, make_demo_dataset  # noqa: E402
from pipeline.train.run import run_training  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# variant -> (use the pretrained weights, freeze per stage: None keeps the example's)
VARIANTS = {
    "from scratch": (False, ["none", "none", "none"]),
    "frozen backbone (head only)": (True, ["all_but_head"] * 3),
    "full fine-tuning": (True, ["none", "none", "none"]),
    "progressive unfreezing": (True, None),
}


def finetune_data(n_train: int, n_val: int) -> Path:
    root = demo_cache_dir() / f"shapes-v1-{n_train}-{n_val}-96"
    if not (root / "train").is_dir():
        make_demo_dataset(root, n_train=n_train, n_val=n_val, size=96, seed=1, task="shapes")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=300, help="fine-tuning training images (default 300)")
    parser.add_argument("--val", type=int, default=1000, help="validation images (default 1000)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--pretrained", type=Path, default=None, help="weights to start from (default: train them)")
    parser.add_argument("--out", type=Path, default=Path("runs/finetune-compare"))
    parser.add_argument("--example", type=Path, default=ROOT / "examples" / "finetune.yaml", help="the stages run")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a key of it"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    pretrained = args.pretrained
    if pretrained is None:
        start = time.perf_counter()
        run_dir = run_training(load_config(ROOT / "stages.yaml"), out_dir=args.out)
        pretrained = run_dir / "checkpoints" / "last.pt"
        print(f"pretrained weights: {pretrained} ({time.perf_counter() - start:.0f} s)")
    data = finetune_data(args.train, args.val)
    example = yaml.safe_load(args.example.read_text())
    for item in args.overrides:
        apply_override(example, item)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name, (use_weights, freezes) in VARIANTS.items():
            raw = copy.deepcopy(example)
            raw["run"].update(name=name.split()[0], seed=seed)
            raw["data"].update(train=str(data / "train"), val=str(data / "val"))
            raw["model"]["pretrained"] = str(pretrained) if use_weights else None
            if freezes is not None:
                for stage, freeze in zip(raw["stages"], freezes):
                    stage["freeze"] = freeze
            start = time.perf_counter()
            run_dir = run_training(parse_config(raw), out_dir=args.out)
            seconds = time.perf_counter() - start
            summary = json.loads((run_dir / "summary.json").read_text())
            last = summary["stages"][-1]
            rows.append(
                {
                    "variant": name,
                    "seed": seed,
                    "stage_top1": [s["val_top1"] for s in summary["stages"]],
                    "final_top1": last["val_top1"],
                    "final_ema_top1": last.get("val_ema_top1"),
                    "best_top1": summary["best_val_top1"],
                    "seconds": round(seconds, 1),
                }
            )
    (args.out / "finetune_compare.json").write_text(json.dumps(rows, indent=2) + "\n")
    print()
    print(f"fine-tuning set: {args.train} train / {args.val} val images, 5 classes; {platform.processor() or ''}")
    print("| variant | seed | top-1 after each stage | final top-1 | final EMA top-1 | best top-1 | seconds |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        stages = " / ".join(f"{t:.1f}" for t in r["stage_top1"])
        ema = "-" if r["final_ema_top1"] is None else f"{r['final_ema_top1']:.1f}%"
        print(
            f"| {r['variant']} | {r['seed']} | {stages} | {r['final_top1']:.1f}% | {ema} | "
            f"{r['best_top1']:.1f}% | {r['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
