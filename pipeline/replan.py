"""`run --budget` as it trains and after: the re-planner that keeps the run near its budget, and
the seconds each stage took against the plan's prediction.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

from pipeline.budget import MAX_EPOCHS, BudgetPlan
from pipeline.speeds import Speeds
from pipeline.train.plan import EpochPlan, format_duration


class Replanner:
    """`run --budget`'s re-planning (the trainer's `replan` hook): after each epoch, how long the epochs so
    far took against their prediction gives a factor for the rest (Ultralytics' `time=` re-derives its
    epochs each epoch too), and the last stage (at the final size) gets the number of epochs that ends
    the run nearest the budget. Nothing changes while the predicted end is within `SLACK` of the budget;
    the run never ends before one more epoch (its schedule has to finish its curve), nor grows after
    its last planned epoch."""

    SLACK = 0.025  # of the budget: half the +-5% the plan is held to

    def __init__(self, speeds: Speeds, budget_s: float, begin: float, val_images: int, clock=time.perf_counter):
        self.speeds, self.budget_s, self.begin, self.val_images, self.clock = speeds, budget_s, begin, val_images, clock
        self.first: float | None = None  # when the first epoch began
        self.records: list[dict[str, Any]] = []

    def epoch_start(self, stage: int, epoch: int) -> None:
        if self.first is None:
            self.first = self.clock()

    def predicted(self, epochs, previous: EpochPlan | None = None) -> float:
        seconds = 0.0
        for epoch in epochs:
            seconds += self.speeds.epoch_seconds(epoch, previous, self.val_images)
            previous = epoch
        return seconds

    def __call__(self, plan, raw: dict, progress) -> dict | None:
        now = self.clock()
        where = (progress.stage, progress.epoch)
        done = [e for e in plan.epochs if (e.stage, e.epoch) < where]
        left = plan.epochs[len(done) :]
        if not left or self.first is None:
            return None  # the run's last epoch is over: its schedule has ended
        factor = (now - self.first) / max(self.predicted(done), 1e-9)
        last = len(raw["stages"]) - 1
        begun = progress.epoch if progress.stage == last else 0  # epochs of the last stage already trained
        before_last = [e for e in left if e.stage < last]
        per_epoch = [e for e in left if e.stage == last]  # the last stage: one size, every epoch alike
        first_last = self.predicted(per_epoch[:1], done[-1] if not before_last else before_last[-1])
        rest = self.predicted(per_epoch[1:2], per_epoch[0]) if len(per_epoch) > 1 else first_last
        fixed = now - self.begin + factor * self.predicted(before_last, done[-1])

        def end(n: int) -> float:  # the predicted wall at the end, with `n` (> `begun`) epochs in the last stage
            return fixed + factor * (first_last + (n - begun - 1) * rest)

        current = raw["stages"][-1]["epochs"]
        if abs(end(current) - self.budget_s) <= self.SLACK * self.budget_s:
            return None
        spare = (self.budget_s - fixed) / factor - first_last  # predicted seconds for the last stage's other epochs
        n = max(begun + 1, min(MAX_EPOCHS, begun + 1 + round(spare / max(rest, 1e-9))))
        if n == current:
            return None
        self.records.append(
            {
                "after": [done[-1].stage, done[-1].epoch],
                "factor": round(factor, 3),
                "last_stage_epochs": [current, n],
                "predicted_end_s": round(end(n), 1),
            }
        )
        print(
            f"re-planning: the epochs so far took {factor:.2f}x their predicted time; {n} epochs at the final "
            f"size (was {current}) end the run in about {format_duration(end(n))} of the "
            f"{format_duration(self.budget_s)} budget"
        )
        planned = copy.deepcopy(raw)
        planned["stages"][-1]["epochs"] = n
        return planned


def actual_seconds(run_dir: Path, stages: int) -> list[float]:
    """Wall seconds per stage of a finished run (training, validation, checkpoints), from metrics.jsonl."""
    from pipeline.report import read_metrics

    ends = [0.0] * stages
    for record in read_metrics(run_dir / "metrics.jsonl"):
        if record.get("kind") == "epoch":
            ends[record["stage"]] = max(ends[record["stage"]], record["elapsed_s"])
    return [end - (ends[k - 1] if k else 0.0) for k, end in enumerate(ends)]


def format_outcome(
    plan: BudgetPlan, actual: list[float], start_s: float, spent_s: float, budget_s: float, replans=()
) -> str:
    """Predicted (at the start) against actual seconds, per stage and in all (`spent_s`: the planning),
    and the re-plans made on the way (`Replanner.records`)."""
    rows = [f"{'':>14} {'predicted':>10} {'actual':>10}"]
    rows.append(f"{'planning':>14} {'':>10} {format_duration(spent_s):>10}")
    rows.append(f"{'start and end':>14} {format_duration(plan.start_s):>10} {format_duration(start_s):>10}")
    for k, (p, a) in enumerate(zip(plan.stage_seconds, actual)):
        rows.append(f"{f'stage {k}':>14} {format_duration(p):>10} {format_duration(a):>10}")
    total = spent_s + start_s + sum(actual)
    rows.append(
        f"{'total':>14} {format_duration(spent_s + plan.seconds):>10} {format_duration(total):>10}  "
        f"({100 * total / budget_s:.0f}% of the {format_duration(budget_s)} budget)"
    )
    for r in replans:
        stage, epoch = r["after"]
        first, then = r["last_stage_epochs"]
        rows.append(f"re-planned after stage {stage} epoch {epoch}: the last stage {first} -> {then} epochs")
    return "\n".join(rows)
