"""Progressive resizing against training at the final size only: the tool's own headline.

The same model, data, optimizer, schedule and epochs, back to back: (a) the default stages.yaml
(32 -> 48 -> 64 px) and (b) the same stages with every image size set to the last one (64 px),
so that only the sizes differ. Reports wall time, final top-1 and the wall time each run needs to
reach the lower of the two final accuracies.

    python benchmarks/progressive_vs_fixed.py [stages.yaml] [--seed 0] [--out runs/progressive-vs-fixed]
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

from pipeline.compare import compare  # noqa: E402
from pipeline.config import load_config, parse_config  # noqa: E402
from pipeline.train.run import run_training  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", type=Path, default=ROOT / "stages.yaml")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/progressive-vs-fixed"))
    args = parser.parse_args()

    progressive = load_config(args.file, [f"run.seed={args.seed}", "run.name=progressive"])
    raw = copy.deepcopy(progressive.raw)
    final = raw["stages"][-1]["img_size"]
    for stage in raw["stages"]:
        stage["img_size"] = final
    raw["run"]["name"] = f"fixed{final}"
    fixed = parse_config(raw)

    runs = {}
    for name, cfg in (("progressive", progressive), (f"fixed {final}px", fixed)):
        start = time.perf_counter()
        runs[name] = run_training(cfg, out_dir=args.out)
        print(f"{name}: {time.perf_counter() - start:.1f} s wall")

    result = compare(list(runs.values()))
    rows = {name: row for name, row in zip(runs, result["runs"])}
    p, f = rows["progressive"], rows[f"fixed {final}px"]
    speedup = f["seconds_to_target"] / p["seconds_to_target"] if p["seconds_to_target"] else None
    report = {
        "target_top1": result["target_top1"],
        "runs": rows,
        "speedup_to_target": speedup,
        "final_top1_difference": p["final_top1"] - f["final_top1"],
        "machine": platform.platform(),
    }
    (args.out / "progressive_vs_fixed.json").write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(f"target: {result['target_top1']:.1f}% top-1 (the lower final accuracy)")
    print("| run | stages (px) | final top-1 | best top-1 | wall s | s to target | epochs to target |")
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        sizes = "/".join(str(s) for s in row["stage_sizes"])
        print(
            f"| {name} | {sizes} | {row['final_top1']:.1f}% | {row['best_top1']:.1f}% | {row['wall_seconds']:.0f} | "
            f"{row['seconds_to_target']:.0f} | {row['epochs_to_target']} |"
        )
    if speedup is not None:
        diff = report["final_top1_difference"]
        print(f"progressive reaches the target {speedup:.2f}x sooner; final top-1 {diff:+.1f} points")


if __name__ == "__main__":
    main()
