"""Overhead of the pipeline's training loop against a minimal hand-written PyTorch loop.

Both train the same model from the same weights on the same batches held in memory, per stage
size of a stages file, alternating runs; prints images/s of each and their ratio.

    python benchmarks/step_overhead.py [stages.yaml] [--batches 12] [--repeats 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_config  # noqa: E402
from pipeline.distributed import World, resolve_device  # noqa: E402
from pipeline.model import build_model, param_groups  # noqa: E402
from pipeline.report import MetricsLog  # noqa: E402
from pipeline.train.loop import LoopSettings, train_epoch  # noqa: E402
from pipeline.train.plan import plan_run, train_batch_size  # noqa: E402
from pipeline.train.signals import StopSignals  # noqa: E402
from pipeline.train.stage import RunContext, build_stage, use_compile  # noqa: E402
from pipeline.train.step import resolve_precision, synchronize  # noqa: E402


class InMemoryLoader:
    """Stands in for a TV2Loader: the same batches every pass, already on the device."""

    def __init__(self, batches):
        self.batches = batches
        self.batch_size = batches[0][0].shape[0]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def minimal_loop(model, optimizer, batches, precision, device) -> None:
    for x, y in batches:
        with precision.autocast(device):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", default="stages.yaml")
    parser.add_argument("--batches", type=int, default=12, help="batches per timed pass")
    parser.add_argument("--repeats", type=int, default=3, help="alternating timed passes of each loop")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    cfg = load_config(args.file)
    device = resolve_device(cfg.run.device)
    num_classes = 10
    rows = []
    # a training set that gives every stage's schedule room for the warm-up and the timed batches
    plan = plan_run(cfg.stages, max(train_batch_size(s) for s in cfg.stages) * (args.batches + 2))
    loop = LoopSettings(
        run_dir=Path(tempfile.mkdtemp(prefix="bench-")),
        device=device,
        world=World(),
        metrics=MetricsLog(None),
        stop=StopSignals(),
        log_every=cfg.run.log_every,
        checkpoint_every=math.inf,
    )
    cpu = platform.processor() or platform.machine()
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}")
    for k, stage in enumerate(cfg.stages):
        tc = stage.train
        bs = train_batch_size(stage)
        g = torch.Generator().manual_seed(k)
        batches = []
        for _ in range(args.batches):
            x = torch.randn(bs, 3, stage.img_size, stage.img_size, generator=g).to(device)
            x = x.contiguous(memory_format=torch.channels_last) if tc.channels_last else x
            batches.append((x, torch.randint(0, num_classes, (bs,), generator=g).to(device)))
        torch.manual_seed(0)
        base = build_model(cfg.model, num_classes).to(device)
        if tc.channels_last:
            base.to(memory_format=torch.channels_last)
        precision = resolve_precision(tc.amp, device)

        def run_pipeline() -> float:
            model = copy.deepcopy(base)
            ctx = RunContext(cfg, device, model, param_groups(model), num_classes)
            with build_stage(ctx, k, plan) as parts:
                for x, y in batches[:2]:  # warm-up (and compilation, when on)
                    parts.train_step(x, y)
                synchronize(device)
                start = time.perf_counter()
                train_epoch(
                    loop, parts.train_step, InMemoryLoader(batches), parts.optimizer, stage=k, epoch=0, label="pipeline"
                )
                synchronize(device)
            return time.perf_counter() - start

        def run_minimal() -> float:
            model = copy.deepcopy(base)
            net = torch.compile(model) if use_compile(stage, device) else model
            optimizer = torch.optim.SGD(
                model.parameters(),
                lr=tc.optimizer.lr / 25,
                momentum=tc.optimizer.momentum,
                weight_decay=tc.optimizer.weight_decay,
                nesterov=tc.optimizer.nesterov,
            )
            minimal_loop(net, optimizer, batches[:2], precision, device)
            synchronize(device)
            start = time.perf_counter()
            minimal_loop(net, optimizer, batches, precision, device)
            synchronize(device)
            return time.perf_counter() - start

        images = bs * args.batches
        pipe, mini = [], []
        for _ in range(args.repeats):
            pipe.append(images / run_pipeline())
            mini.append(images / run_minimal())
        ratios = [p / m for p, m in zip(pipe, mini)]
        row = {
            "img_size": stage.img_size,
            "batch_size": bs,
            "pipeline_images_per_s": round(statistics.median(pipe), 1),
            "minimal_images_per_s": round(statistics.median(mini), 1),
            "ratio": round(statistics.median(ratios), 4),
            "overhead_percent": round(100 * (1 - statistics.median(ratios)), 2),
            "best_of_ratio": round(max(pipe) / max(mini), 4),  # fastest pass of each: least disturbed
            "ratios": [round(r, 4) for r in ratios],
        }
        rows.append(row)
        print(
            f"{stage.img_size:>4}px batch {bs:>4}: pipeline {row['pipeline_images_per_s']:>8.1f} img/s, "
            f"minimal {row['minimal_images_per_s']:>8.1f} img/s, ratio {row['ratio']:.3f} "
            f"(overhead {row['overhead_percent']:+.1f}%; best-of ratio {row['best_of_ratio']:.3f}; "
            f"ratios {', '.join(f'{r:.3f}' for r in ratios)})"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
