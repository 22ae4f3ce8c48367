"""`python -m pipeline lr-find`: the LR range test on one stage's exact setup, from the initial weights.

The algorithm and its plot live in `pipeline.train.range_test`; this is the command around them.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import UserError
from pipeline.options import add_set, positive, whole, write_applied

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.train.range_test import RangeTest

HELP = "LR range test on one stage's exact training setup"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="the stages file")
    parser.add_argument(
        "--stage", type=whole(0), default=0, help="which stage's size, batch, AMP and Mixup (default 0)"
    )
    parser.add_argument("--start", type=positive, default=1e-7, help="first LR (default 1e-7)")
    parser.add_argument("--end", type=positive, default=10.0, help="last LR (default 10)")
    parser.add_argument("--steps", type=whole(), default=100, help="training steps (default 100)")
    parser.add_argument("--mode", choices=["exp", "linear"], default="exp", help="how the LR rises (default exp)")
    parser.add_argument("--out", type=Path, default=None, help="folder the output folder is made in")
    parser.add_argument("--apply", action="store_true", help="write FILE.lr-find.yaml with the stage's lr set")
    add_set(parser)


def cmd_lr_find(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.train.range_test import recommended_lr

    if not 0 < args.start < args.end <= 1e4:
        raise UserError(f"--start {args.start:g} / --end {args.end:g}: need 0 < start < end <= 1e4")
    if args.steps < 5:
        raise UserError(f"--steps {args.steps}: need at least 5")
    cfg = load_config(args.file, args.overrides)
    result, out_dir = run_lr_find(
        cfg, args.stage, args.out, start=args.start, end=args.end, steps=args.steps, mode=args.mode
    )
    print(f"{len(result.lrs)} steps; stopped: {result.stop_reason}")
    for name, lr in result.suggestions.items():
        print(f"  {name:>8}: {lr:.3g}")
    lr = recommended_lr(result, f"stages.{args.stage}.lr")
    print(f"recommended ({result.recommendation}): lr {lr:.3g}; set it with --set stages.{args.stage}.lr={lr:.3g}")
    print(f"wrote {out_dir / 'lr_find.csv'} and {out_dir / 'lr_find.png'}")
    if args.apply:
        raw = cfg.raw
        stage = raw["stages"][args.stage]
        if isinstance(stage.get("optimizer"), dict):
            stage["optimizer"].pop("lr", None)  # one spelling only, so the shortcut is what counts
        stage["lr"] = float(f"{lr:.3g}")
        target = write_applied(raw, args.file, "lr-find")
        print(f"wrote {target} (stages.{args.stage}.lr: {lr:.3g}); train with: python -m pipeline run {target}")
    return 0


def run_lr_find(cfg: Config, stage_index: int, out_dir: Path | None = None, **kwargs) -> tuple[RangeTest, Path]:
    """The range test on stage `stage_index` (its loader, freezing, AMP, compile, Mixup); writes
    `lr_find.csv` and `lr_find.png` in a new folder and returns the result and that folder."""
    from pipeline.train.checkpoint import seed_everything
    from pipeline.train.preflight import prepare
    from pipeline.train.range_test import save_range_test, stage_range_test
    from pipeline.train.rundir import new_run_dir
    from pipeline.train.stage import RunContext, build_stage

    if not 0 <= stage_index < len(cfg.stages):
        raise UserError(f"--stage {stage_index}: the file has stages 0 to {len(cfg.stages) - 1}")
    device, datasets, num_classes = prepare(cfg)
    stage = cfg.stages[stage_index]
    seed_everything(cfg.run.seed)
    ctx = RunContext.fresh(cfg, device, num_classes, datasets)
    run_dir = new_run_dir(Path(out_dir or cfg.run.out_dir), f"{cfg.run.name}-lr-find")  # before: fail early
    with build_stage(ctx, stage_index, validation=False) as parts:
        result = stage_range_test(parts, ctx, **kwargs)
    save_range_test(result, run_dir / "lr_find", f"stage {stage_index}: {stage.img_size}px, batch {stage.batch_size}")
    return result, run_dir
