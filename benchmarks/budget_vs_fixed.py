"""Budgeted training: `run --budget` against a run at the final size whose epochs fill the same budget.

For each budget: the speeds of the stages file's setup are measured once on this machine (what `plan`
does); the planned run (the ramp-then-settle policy) and the fixed run (the same policy with every
epoch at the final size) are each given the budget less the time the measuring took (the planned
run's start-size probe, where it ran, against the planned run alone), their epochs chosen from the
same speeds; then both are trained, back to back, each re-planned after every epoch
as `run --budget` does (`--no-replan`: as planned at the start). `--anchors ffcv,composer` adds runs of
those schedules' shapes (benchmarks/progressive_vs_fixed.py's), their epochs chosen the same way to fill
the same budget; `half` adds the fixed run with half its epochs (not a quarter) given the last stage's keys.
`--only planned,composer` trains only those (the others are still planned, as the same budget's). For
each: the epochs, the predicted and the actual wall seconds (measuring included) against the budget,
the re-plans, and the final top-1.

    python benchmarks/budget_vs_fixed.py [stages.yaml] [--data IMAGEFOLDER_ROOT] [--budgets 1m,2m,4m]
        [--seed 0] [--start-size N] [--no-replan] [--anchors ffcv,composer] [--only NAMES] [--set KEY=VALUE]
        [--out runs/budget-vs-fixed]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from progressive_vs_fixed import shape_stages  # noqa: E402

from pipeline.budget import choose_plan, plan_budget, policy_stages  # noqa: E402
from pipeline.commands.compare import load_run  # noqa: E402
from pipeline.config import load_config, parse_config  # noqa: E402
from pipeline.data import scan_datasets  # noqa: E402
from pipeline.errors import ConfigError  # noqa: E402
from pipeline.options import parse_duration  # noqa: E402
from pipeline.replan import Replanner, actual_seconds  # noqa: E402
from pipeline.train.plan import format_epochs  # noqa: E402
from pipeline.train.run import RunHooks, run_training  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def other_plans(raw: dict, speeds, seconds: float, final: int, images: tuple[int, int], anchors: list[str]):
    """The fixed run's plan and each anchor's (its shape over the run at the final size, any length),
    filled to `seconds`; a shape whose shortest run does not fit is left out, with the planner's reason,
    and the others still run."""
    runs, not_run = {}, {}
    for name in ["fixed", *anchors]:

        def shape(epochs: int, name: str = name) -> list[dict]:
            if name == "half":  # every epoch at the final size, half of them with the last stage's keys
                return policy_stages(raw, epochs, final, final, hold=True)
            return shape_stages(policy_stages(raw, max(epochs, 2), final, final), name)

        try:
            fill = None if name == "fixed" else shape
            runs[name] = choose_plan(raw, speeds, seconds, final, *images, final, shape=fill)
        except ConfigError as e:
            not_run[name] = str(e)
    return runs, not_run


def stage_lengths(raw: dict) -> list[tuple]:
    """(img_size as written, length in epochs: 2.4 for 3 epochs whose last trains 40%) per stage."""
    return [(s["img_size"], spec.length) for s, spec in zip(raw["stages"], parse_config(raw).stages)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", type=Path, default=ROOT / "stages.yaml")
    parser.add_argument("--data", type=Path, default=None, help="a folder with train/ and val/ (default: the file's)")
    parser.add_argument("--budgets", default="1m,2m,4m")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-size", type=int, default=None, help="the planned ramp's start (default: half)")
    parser.add_argument("--no-replan", action="store_true", help="keep each run's plan (no re-planning)")
    parser.add_argument(
        "--anchors", default="", help="schedule shapes also run at each budget: ffcv,composer (half: see above)"
    )
    parser.add_argument("--only", default="", help="run only these of planned, fixed and the anchors (default: all)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("runs/budget-vs-fixed"))
    args = parser.parse_args()

    data = [f"data.train={args.data / 'train'}", f"data.val={args.data / 'val'}"] if args.data else []
    cfg = load_config(args.file, [*args.overrides, *data, f"run.seed={args.seed}"])
    datasets = scan_datasets(cfg.data)
    final = max(stage.largest_size for stage in cfg.stages)
    anchors = [a.strip() for a in args.anchors.split(",") if a.strip()]
    for name in anchors:
        if name not in ("ffcv", "composer", "half"):
            parser.error(f"--anchors: unknown shape {name!r} (known: ffcv, composer, half)")  # exit 2
    only = {n.strip() for n in args.only.split(",") if n.strip()}
    unknown = only - {"planned", "fixed", *anchors}
    if unknown:
        parser.error(f"--only: not among planned, fixed and --anchors: {', '.join(sorted(unknown))}")  # exit 2
    rows, skipped, speeds = [], [], None
    for text in args.budgets.split(","):
        budget = parse_duration(text)
        begin = time.perf_counter()
        try:
            planned, speeds = plan_budget(cfg.raw, budget, start=args.start_size, measuring_counts=True)
        except ConfigError as e:  # a budget too short for one epoch here: the next budget may fit
            print(f"{text}: not run: {e}", flush=True)
            skipped.append({"budget": text, "run": "all", "why": str(e)})
            continue
        spent = time.perf_counter() - begin
        print("\n".join(planned.reasons))
        images = len(datasets.train), len(datasets.val)
        measured = spent - planned.probe_s  # the other runs are charged the measuring, not the planned run's probe
        runs, not_run = other_plans(cfg.raw, speeds, budget - measured, final, images, anchors)
        for name, why in not_run.items():
            print(f"{name} {text}: not run: {why}", flush=True)
            skipped.append({"budget": text, "run": name, "why": why})
        for name, plan in {"planned": planned, **runs}.items():
            if only and name not in only:
                continue
            plan.raw["run"]["name"] = f"{name}-{text}"
            charged = spent if name == "planned" else measured
            start = time.perf_counter()
            replanner = Replanner(speeds, budget, start - charged, len(datasets.train), len(datasets.val))
            hooks = RunHooks() if args.no_replan else replanner.hooks()
            run_dir = run_training(parse_config(plan.raw), out_dir=args.out, hooks=hooks)
            wall = charged + time.perf_counter() - start
            trained = yaml.safe_load((run_dir / "config.yaml").read_text())
            record = load_run(run_dir)
            rows.append(
                {
                    "budget": text,
                    "budget_s": budget,
                    "run": name,
                    "planned_stages": stage_lengths(plan.raw),
                    "reasons": list(plan.reasons),  # why the planner chose it (the planned run's)
                    "stages": stage_lengths(trained),
                    "replans": replanner.records,
                    "epochs": plan.length,
                    "predicted_s": round(charged + plan.seconds, 1),
                    "probe_s": round(planned.probe_s, 1) if name == "planned" else 0.0,
                    "wall_s": round(wall, 1),
                    "stage_s": {
                        "predicted": plan.stage_seconds,
                        "actual": actual_seconds(run_dir, len(plan.stage_seconds)),
                    },
                    "final_top1": record.final_top1,
                    "run_dir": str(run_dir),
                }
            )
            print(f"{name} {text}: {wall:.1f} s wall, final top-1 {record.final_top1:.2f}%", flush=True)
    print("\n| budget | run | planned (px x epochs) | trained | predicted s | wall s | wall / budget | final top-1 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        planned, trained = (
            " + ".join(f"{'-'.join(map(str, s)) if isinstance(s, list) else s} x {format_epochs(e)}" for s, e in r[key])
            for key in ("planned_stages", "stages")
        )
        print(
            f"| {r['budget']} | {r['run']} | {planned} | {trained} | {r['predicted_s']:.0f} | {r['wall_s']:.0f} | "
            f"{r['wall_s'] / r['budget_s']:.2f} | {r['final_top1']:.2f}% |"
        )
    for r in skipped:
        print(f"not run: {r['run']} at {r['budget']}: {r['why']}")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"seed": args.seed, "rows": rows, "not_run": skipped, "speeds": speeds and dataclasses.asdict(speeds)}
    report["machine"] = platform.platform()
    (args.out / "budget_vs_fixed.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out / 'budget_vs_fixed.json'}")
    if not rows:
        raise SystemExit(2)  # no budget fits one epoch here


if __name__ == "__main__":
    main()
