"""Progressive resizing against training at the final size only: time-to-accuracy over several seeds.

Every variant trains the same model, data, optimizer and epochs, back to back; only what its name
says differs from the stages file (default: stages.yaml on the demo data):

  fixed          every stage at the final size (ramps too): the baseline
  progressive    the stages file as it is
  steps          each ramp `[a, b]` replaced by a at the first half of its epochs and b after
  scope-flip     `train.schedule.scope` run <-> stage
  bn-flip        `train.bn_reestimate` on (256 images) <-> off
  step           a step file as users write one: 3/8, 5/8 and all of the final size for 1/2, 1/3 and
                 1/6 of the epochs (24 / 40 / 64 px for 6 / 4 / 2 of 12), each stage 1.6x the last,
                 the first stage's keys and the last stage's (e.g. `mixup: off`); `train.size_jumps`
                 as the file sets it (default on)
  step-plain     the same with `train.size_jumps: off` (each jump a plain switch)
  ffcv           FFCV's shape: 0.83x of the final size, ramped to it between 74 % and 86 % of the epochs
  composer       Composer's shape: a ramp from 0.5x over the first 80 % of the epochs, the last 20 % at
                 the final size

For each variant: final and best top-1 (mean and each seed), wall seconds, and the seconds to the
target (the fixed runs' mean final top-1 minus 0.5 points; `--target` sets it), and the top-1 of
the epochs just before and after every size switch. `compare` plots of seed 0 go beside the JSON.

    python benchmarks/progressive_vs_fixed.py [stages.yaml] [--data IMAGEFOLDER_ROOT] [--seeds 0,1,2]
        [--variants fixed,progressive,...] [--set KEY=VALUE] [--out runs/progressive-vs-fixed]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from pipeline.commands.compare import compare, load_run, plot  # noqa: E402
from pipeline.config import apply_override, parse_config  # noqa: E402
from pipeline.train.run import run_training  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("fixed", "progressive", "steps", "scope-flip", "bn-flip")
SHAPES = ("step", "step-plain", "ffcv", "composer")  # whole-run shapes, from the final size and the epochs


def size8(size: float) -> int:
    return max(8, 8 * round(size / 8))


def stage_keys(stage: dict) -> dict:
    """A stage's overrides (batch, lr, mixup, ...): everything but its sizes and length."""
    return {k: copy.deepcopy(v) for k, v in stage.items() if k not in ("img_size", "epochs", "val_size")}


def shape_stages(stages: list[dict], name: str) -> list[dict]:
    """The stages of shape `name` over the same epochs and final size as `stages`."""
    final = stages[-1]["img_size"]
    final = final[-1] if isinstance(final, list) else final
    total = sum(s["epochs"] for s in stages)
    first, last = stage_keys(stages[0]), stage_keys(stages[-1])
    if name in ("step", "step-plain"):
        lengths = [max(1, round(total / 2)), max(1, round(total / 3))]
        lengths.append(max(1, total - sum(lengths)))
        sizes = [size8(final * 3 / 8), size8(final * 5 / 8), final]
        return [
            {**(last if i == 2 else first), "img_size": z, "epochs": n} for i, (z, n) in enumerate(zip(sizes, lengths))
        ]
    if name == "ffcv":  # 0.83x until 74 % of the epochs, a ramp to 86 %, then the final size
        hold, ramp = max(1, round(0.74 * total)), max(1, round(0.86 * total) - round(0.74 * total))
        tail = max(1, total - hold - ramp)
        start = size8(0.83 * final)
        out = [{**first, "img_size": start, "epochs": hold}]
        if ramp > 1 and start < final:
            out.append({**first, "img_size": [start, final], "epochs": ramp})
        else:
            tail += ramp
        return out + [{**last, "img_size": final, "epochs": tail}]
    if name == "composer":  # from 0.5x, linearly, the last 20 % at the final size
        tail = max(1, round(0.2 * total))
        return [
            {**first, "img_size": [size8(final / 2), final], "epochs": total - tail},
            {**last, "img_size": final, "epochs": tail},
        ]
    raise AssertionError(name)


def variant(raw: dict, name: str) -> dict:
    """The raw configuration of variant `name` of the stages file `raw`."""
    raw = copy.deepcopy(raw)
    stages, train = raw["stages"], raw.setdefault("train", {})
    if name == "fixed":
        final = stages[-1]["img_size"]
        final = final[-1] if isinstance(final, list) else final
        for stage in stages:
            stage["img_size"] = final
            stage.pop("val_size", None)
    elif name == "steps":
        raw["stages"] = []
        for stage in stages:
            if isinstance(stage["img_size"], list) and stage["epochs"] > 1:
                first = math.ceil(stage["epochs"] / 2)
                start, end = stage["img_size"]
                raw["stages"] += [{**stage, "img_size": start, "epochs": first}]
                raw["stages"] += [{**stage, "img_size": end, "epochs": stage["epochs"] - first}]
            else:
                raw["stages"].append(stage)
    elif name == "scope-flip":
        schedule = train.setdefault("schedule", {})
        schedule["scope"] = "stage" if schedule.get("scope", "stage") == "run" else "run"
    elif name == "bn-flip":
        train["bn_reestimate"] = 0 if train.get("bn_reestimate") else 256
    elif name in SHAPES:
        raw["stages"] = shape_stages(stages, name)
        if name == "step-plain":
            train["size_jumps"] = "off"
    elif name != "progressive":
        raise SystemExit(f"--variants: unknown variant {name!r} (known: {', '.join(VARIANTS + SHAPES)})")
    return raw


def switches(run_dir: Path) -> list[tuple[int, int, float, float]]:
    """(size before, size after, top-1 just before, top-1 just after) at every training-size change."""
    epochs = load_run(run_dir).epochs
    return [
        (a["img_size"], b["img_size"], a["val_top1"], b["val_top1"])
        for a, b in zip(epochs, epochs[1:])
        if a["img_size"] != b["img_size"]
    ]


def summarise(runs: dict[str, list[Path]], target: float) -> dict[str, dict]:
    rows = {}
    for name, dirs in runs.items():
        records = [load_run(d) for d in dirs]
        reached = [r.reaching(target) for r in records]
        to_target = [None if i is None else r.epochs[i].get("elapsed_s") for r, i in zip(records, reached)]
        rows[name] = {
            "final_top1": [r.final_top1 for r in records],
            "best_top1": [r.best_top1 for r in records],
            "wall_seconds": [r.wall_seconds for r in records],
            "seconds_to_target": to_target,
            "switches": [switches(d) for d in dirs],
            "stage_sizes": [s["img_size"] for s in records[0].stages],
        }
    return rows


def mean(values: list[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else statistics.fmean(values)


def print_table(rows: dict[str, dict], target: float) -> None:
    base = rows.get("fixed")
    print(f"\ntarget: {target:.2f}% top-1 (fixed mean final - 0.5 unless --target)")
    print("| variant | final top-1 (mean; each seed) | best | wall s | s to target | time to target vs fixed |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        final, to = mean(r["final_top1"]), mean(r["seconds_to_target"])
        ratio = "-"
        if base is not None and to is not None and mean(base["seconds_to_target"]):
            ratio = f"{to / mean(base['seconds_to_target']):.2f}x"
        seeds = " / ".join(f"{v:.1f}" for v in r["final_top1"])
        reach = "not reached" if to is None else f"{to:.0f}"
        print(
            f"| {name} | {final:.2f}% ({seeds}) | {mean(r['best_top1']):.2f}% | {mean(r['wall_seconds']):.0f} | "
            f"{reach} | {ratio} |"
        )
    print("\nsize switches (top-1 before -> after), each seed:")
    for name, r in rows.items():
        for seed_switches in r["switches"]:
            if seed_switches:
                text = ", ".join(f"{a}->{b}px: {ta:.1f} -> {tb:.1f}" for a, b, ta, tb in seed_switches)
                print(f"  {name}: {text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", type=Path, default=ROOT / "stages.yaml")
    parser.add_argument("--data", type=Path, default=None, help="a folder with train/ and val/ (default: the file's)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--target", type=float, default=None, help="top-1 %% for time to target")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("runs/progressive-vs-fixed"))
    args = parser.parse_args()

    raw = yaml.safe_load(args.file.read_text())
    for item in args.overrides:
        apply_override(raw, item)
    if args.data is not None:
        raw.setdefault("data", {}).update(train=str(args.data / "train"), val=str(args.data / "val"))
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    runs: dict[str, list[Path]] = {name: [] for name in names}
    for seed in seeds:  # seeds outermost: a slow moment of the machine spreads over every variant
        for name in names:
            cfg = variant(raw, name)
            cfg.setdefault("run", {}).update(seed=seed, name=f"{name}-s{seed}")
            start = time.perf_counter()
            runs[name].append(run_training(parse_config(cfg, base_dir=args.file.parent), out_dir=args.out))
            print(f"{name} seed {seed}: {time.perf_counter() - start:.1f} s wall", flush=True)
    finals = summarise(runs, 0.0)
    fixed = mean(finals["fixed"]["final_top1"]) if "fixed" in finals else None
    target = args.target if args.target is not None else (fixed - 0.5 if fixed is not None else 0.0)
    rows = summarise(runs, target)
    print_table(rows, target)
    report = {"target_top1": target, "seeds": seeds, "variants": rows, "machine": platform.platform()}
    (args.out / "progressive_vs_fixed.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(compare([dirs[0] for dirs in runs.values()], target), args.out)
    print(f"wrote {args.out / 'progressive_vs_fixed.json'} and the compare plots in {args.out}")


if __name__ == "__main__":
    main()
