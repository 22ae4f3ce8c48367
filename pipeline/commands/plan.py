"""`python -m pipeline plan FILE --budget 20m`: the stages that fill a time budget on this machine,
measured (the planner is `pipeline.budget`), written as a stages file to train with."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.options import add_budget, add_set, write_applied

HELP = "the stages that fill a time budget on this machine, measured"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="the stages file (its model, data and keys; its stages are replaced)")
    add_budget(parser, required=True)
    parser.add_argument("--out", type=Path, default=None, help="where to write the plan (default FILE.plan.yaml)")
    add_set(parser)


def cmd_plan(args: argparse.Namespace) -> int:
    from pipeline.budget import plan_budget
    from pipeline.config import load_config
    from pipeline.options import parse_duration
    from pipeline.replan import format_plan

    budget = parse_duration(args.budget)
    cfg = load_config(args.file, args.overrides)
    plan, _ = plan_budget(cfg.raw, budget, args.final_size, args.start_size)
    print(format_plan(plan, budget))
    command = f"python -m pipeline plan {args.file} --budget {args.budget}"
    target = write_applied(plan.raw, args.file, "plan", out=args.out, comment=command)
    print(f"wrote {target}; train with: python -m pipeline run {target}")
    return 0
