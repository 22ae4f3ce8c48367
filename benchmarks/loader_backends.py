"""Training-loader throughput of the DALI and tv2 backends, per stage size of a stages file.

For every stage (its image size and batch size) and every worker/thread count, builds each
backend's training loader on the file's data and device, and measures images/s over `--batches`
batches after a warm-up, epoch after epoch; backends alternate, `--repeats` times, in one process.
Prints a table with the median of each and their ratio.

    python benchmarks/loader_backends.py [stages.yaml] [--workers 1,2] [--batches 60] [--repeats 3]
                                         [--json OUT]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_config  # noqa: E402
from pipeline.data import build_loader, scan_datasets  # noqa: E402
from pipeline.loader_bench import measure_loader  # noqa: E402
from pipeline.train.runner import resolve_device  # noqa: E402

BACKENDS = ("tv2", "dali")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", nargs="?", default="stages.yaml")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker (tv2) / thread (dali) counts")
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    cfg = load_config(args.config)
    device = resolve_device(cfg.run.device)
    datasets = scan_datasets(cfg.data)
    workers = [int(w) for w in args.workers.split(",")]
    print(f"{len(datasets.train)} training images in {cfg.data.train}; device {device}; torch {torch.__version__}")
    rows = []
    for stage in cfg.stages:
        for w in workers:
            speeds: dict[str, list[float]] = {b: [] for b in BACKENDS}
            firsts: dict[str, list[float]] = {b: [] for b in BACKENDS}
            for _ in range(args.repeats):
                for backend in BACKENDS:
                    data = dataclasses.replace(cfg.data, backend=backend, workers=w)
                    loader = build_loader(
                        data,
                        datasets.train,
                        train=True,
                        img_size=stage.img_size,
                        batch_size=stage.batch_size,
                        device=device,
                        seed=cfg.run.seed,
                    )
                    speed = measure_loader(loader, args.batches)
                    loader.close()
                    speeds[backend].append(speed.images_per_s)
                    firsts[backend].append(speed.first_batch_s)
            med = {b: statistics.median(v) for b, v in speeds.items()}
            rows.append(
                {
                    "img_size": stage.img_size,
                    "batch_size": stage.batch_size,
                    "workers": w,
                    **{f"{b}_images_per_s": round(med[b], 1) for b in BACKENDS},
                    **{f"{b}_first_batch_s": round(statistics.median(firsts[b]), 3) for b in BACKENDS},
                    "ratio": round(med["dali"] / med["tv2"], 2),
                    "passes": {b: [round(v, 1) for v in speeds[b]] for b in BACKENDS},
                }
            )
            r = rows[-1]
            print(
                f"{stage.img_size:>4}px batch {stage.batch_size:<4} workers {w}: "
                f"tv2 {r['tv2_images_per_s']:>8.1f} img/s  dali {r['dali_images_per_s']:>8.1f} img/s  "
                f"dali/tv2 {r['ratio']:.2f}",
                flush=True,
            )
    print("\n| size | batch | workers/threads | tv2 img/s | DALI img/s | DALI / tv2 | first batch tv2 / DALI (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['img_size']} | {r['batch_size']} | {r['workers']} | {r['tv2_images_per_s']:.0f} "
            f"| {r['dali_images_per_s']:.0f} | {r['ratio']:.2f} "
            f"| {r['tv2_first_batch_s']:.2f} / {r['dali_first_batch_s']:.2f} |"
        )
    if args.json:
        meta = {
            "command": " ".join(sys.argv),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {device}",
            "date": time.strftime("%Y-%m-%d"),
        }
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
