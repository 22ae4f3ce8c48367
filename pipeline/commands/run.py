"""`python -m pipeline run FILE`: train through the stages of a stages file, resume a run, or fill a
time budget (`--budget`: plan from speeds measured here, run the plan re-planning as it goes, then
predicted against actual seconds)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pipeline.errors import UserError
from pipeline.options import add_budget, add_set, write_or_fail

HELP = "train through the stages of a stages file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "file", type=Path, nargs="?", help="the stages file, e.g. stages.yaml (not needed with --resume)"
    )
    add_set(parser)
    parser.add_argument(
        "--out", type=Path, default=None, help="folder the run folder is made in (default: run.out_dir)"
    )
    parser.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from checkpoints/last.pt (its config.yaml is used); auto: the newest "
        "run of FILE's run.name in its out_dir, or a new run if there is none",
    )
    add_budget(parser)
    parser.add_argument(
        "--no-replan",
        action="store_true",
        help="with --budget: keep the plan made at the start (by default the epochs at the final size are "
        "re-planned after each epoch from the times measured, so the run ends near the budget)",
    )


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.train.run import run_training

    if args.budget is not None:
        return run_budget(args)
    options = (
        ("--final-size", args.final_size),
        ("--start-size", args.start_size),
        ("--no-replan", args.no_replan or None),
    )
    for option, value in options:
        if value is not None:
            raise UserError(f"{option}: only with --budget")
    if args.resume == Path("auto"):
        if args.file is None:
            raise UserError("--resume auto: give the stages file too (its run.name and out_dir find the run)")
        from pipeline.train.rundir import newest_run

        cfg = load_config(args.file, args.overrides)
        args.resume = newest_run(Path(args.out or cfg.run.out_dir), cfg.run.name)
        if args.resume is None:
            print(f"--resume auto: no run named {cfg.run.name!r} with a checkpoint yet; starting a new one")
            run_training(cfg, out_dir=args.out)
            return 0
        print(f"--resume auto: {args.resume}")
    if args.resume is not None:
        config_path = args.resume / "config.yaml"
        if not config_path.is_file():
            raise UserError(f"--resume {args.resume}: not a run folder (no config.yaml in it)")
    elif args.file is None:
        raise UserError("run: give a stages file (python -m pipeline run stages.yaml) or --resume RUN_DIR")
    else:
        config_path = args.file
    cfg = load_config(config_path, args.overrides)
    run_training(cfg, out_dir=args.out, resume=args.resume)
    return 0


def run_budget(args: argparse.Namespace) -> int:
    """`run FILE --budget D`: plan (the measuring and the choosing count against the budget), run the plan, then
    predicted against actual seconds."""
    import dataclasses
    import time

    from pipeline.budget import plan_budget
    from pipeline.config import load_config, parse_config
    from pipeline.files import write_json
    from pipeline.options import parse_duration
    from pipeline.replan import Replanner, actual_seconds, format_outcome, format_plan
    from pipeline.train.run import RunHooks, run_training

    begin = time.perf_counter()
    budget = parse_duration(args.budget)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise UserError(
            "--budget under torchrun: each process would measure and plan on its own; plan first "
            "(python -m pipeline plan FILE --budget D), then torchrun ... run FILE.plan.yaml"
        )
    if args.resume is not None:
        raise UserError("--budget plans a new run; continue a run with --resume alone")
    if args.file is None:
        raise UserError("run --budget: give the stages file (python -m pipeline run stages.yaml --budget 20m)")
    cfg = load_config(args.file, args.overrides)
    plan, speeds = plan_budget(cfg.raw, budget, args.final_size, args.start_size, measuring_counts=True)
    print(format_plan(plan, budget))
    spent = time.perf_counter() - begin
    replanner = Replanner(speeds, budget, begin, plan.train_images, plan.val_images)
    hooks = RunHooks() if args.no_replan else replanner.hooks()
    run_dir = run_training(parse_config(plan.raw), out_dir=args.out, hooks=hooks)
    total = time.perf_counter() - begin
    actual = actual_seconds(run_dir, len(plan.stage_seconds))
    start = total - spent - sum(actual)  # the run's own start and end
    print(format_outcome(plan, actual, start, spent, budget, replanner.records))
    report = {
        "budget_s": budget,
        "planning_s": round(spent, 2),
        "predicted_s": {"start": round(plan.start_s, 2), "stages": [round(s, 2) for s in plan.stage_seconds]},
        "actual_s": {"start": round(start, 2), "stages": [round(s, 2) for s in actual]},
        "total_s": round(total, 2),
        "replans": replanner.records,
        "speeds": dataclasses.asdict(speeds),
    }
    write_or_fail(f"cannot write {run_dir / 'budget.json'}", lambda: write_json(run_dir / "budget.json", report))
    return 0
