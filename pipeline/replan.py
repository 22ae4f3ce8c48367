"""`plan` and `run --budget` as they print and train: the plan against its budget, the re-planner
that keeps the run near its budget, and the seconds each stage took against the plan's prediction.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any

from pipeline.budget import MAX_EPOCHS, BudgetPlan
from pipeline.config import parse_config
from pipeline.speeds import Speeds
from pipeline.train.plan import (
    EpochPlan,
    format_duration,
    format_epochs,
    longest,
    plan_run,
    with_last_stage_length,
)


class Replanner:
    """`run --budget`'s re-planning (the trainer's `replan` hook): after each epoch, how long the epochs so
    far took against their prediction gives a factor for the rest (Ultralytics' `time=` re-derives its
    epochs each epoch too), and the last stage (at the final size) gets the length, in whole epochs and a
    share of one more (`last_epoch_share`), that ends the run on the budget. Nothing changes while the
    predicted end is within `SLACK` of the budget; the run never ends before `MIN_SHARE` of one more
    epoch (its schedule has to finish its curve), nor grows after its last planned epoch, except that a
    run behind its budget whose planned share of one more epoch was already under `MIN_SHARE` may end
    at the epoch just trained, where that lands nearer the budget. Inside that
    last epoch (`within`, from `MIN_SHARE` of its batches on), the pace of its own batches so far sets
    its length the same way, between `MIN_SHARE` and a whole epoch."""

    SLACK = 0.025  # of the budget: half the +-5% the plan is held to
    MIN_SHARE = 0.25  # of an epoch: the least a run over its budget still trains, to end its schedule

    def __init__(
        self,
        speeds: Speeds,
        budget_s: float,
        begin: float,
        train_images: int,
        val_images: int,
        clock=time.perf_counter,
    ):
        self.speeds, self.budget_s, self.begin, self.clock = speeds, budget_s, begin, clock
        self.train_images, self.val_images = train_images, val_images
        self.first: float | None = None  # when the first epoch began
        self.records: list[dict[str, Any]] = []

    def hooks(self):
        """The trainer's hooks that re-plan the run: after each epoch, and inside its last one."""
        from pipeline.train.run import RunHooks

        return RunHooks(epoch_start=self.epoch_start, replan=self, replan_within=self.within)

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
        if len(done) == len(plan.epochs) or self.first is None:
            return None  # the run's last epoch is over: its schedule has ended
        factor = (now - self.first) / max(self.predicted(done), 1e-9)
        lengths = [spec.length for spec in parse_config(raw).stages]
        last = len(lengths) - 1
        begun = progress.epoch if progress.stage == last else 0  # of the last stage, trained

        def end_at(stages: list[dict]) -> float:  # the predicted wall at the end of these stages
            epochs = plan_run(parse_config({**raw, "stages": stages}).stages, self.train_images).epochs
            return now - self.begin + factor * self.predicted(epochs[len(done) :], done[-1])

        earlier = lengths[:-1]
        current = lengths[-1]
        if abs(end_at(raw["stages"]) - self.budget_s) <= self.SLACK * self.budget_s:
            return None
        free = self._free(raw, done, progress)
        if free:  # the epochs not yet begun before the last stage scale with it: the run keeps its shape
            earlier = self._scaled_earlier(raw, lengths, free, begun, end_at, done)
        if not self._keeps(raw, with_stage_lengths(raw["stages"], earlier + [current]), done):
            earlier = lengths[:-1]  # (a change that would alter an epoch trained: the last stage alone moves)

        def end(length: float) -> float:  # the predicted wall at the end, with the last stage `length` epochs long
            return end_at(with_stage_lengths(raw["stages"], earlier + [length]))

        low = begun + self.MIN_SHARE
        length = math.floor(1000 * low) / 1000
        if end(low) < self.budget_s:  # the longest last stage that ends within the budget
            high = max(current, begun + 1.0)
            while end(high) < self.budget_s and high < MAX_EPOCHS:
                low, high = high, min(2 * high, MAX_EPOCHS)
            length = longest(lambda x: end(x) <= self.budget_s, low, high)
        elif begun >= 1 and current - begun < self.MIN_SHARE and self.budget_s - end(begun) < end(low) - self.budget_s:
            length = begun  # its curve was within a quarter epoch of its end: the run ends here, nearer the budget
        if abs(length - current) < 1e-3 and _same(earlier, lengths[:-1]):
            return None
        record = {"after": [done[-1].stage, done[-1].epoch], "factor": round(factor, 3)}
        moved = f"epochs per stage {_shown(lengths)} -> {_shown(earlier + [length])}"
        if not _same(earlier, lengths[:-1]):
            record["stage_epochs"] = [_shown(lengths), _shown(earlier + [length])]
        else:
            moved = f"{format_epochs(length)} epochs at the final size (was {format_epochs(current)})"
        why = f"the epochs so far took {factor:.2f}x their predicted time; {moved}"
        return self._replanned(record, why, raw, current, length, end(length), earlier)

    def _free(self, raw: dict, done: list[EpochPlan], progress) -> dict[int, int]:
        """The stages before the last whose epochs not yet begun may change in number, each with the epochs
        of it trained: those not begun, and the one under way where it trains one fixed size (a ramp's
        sizes follow its length: its epochs to come would meet sizes, and compiled graphs, it has not)."""
        free = {}
        for k, stage in enumerate(parse_config(raw).stages[:-1]):
            trained = sum(1 for e in done if e.stage == k)
            if k < progress.stage or trained >= stage.epochs:
                continue
            if trained and isinstance(raw["stages"][k]["img_size"], list):
                continue
            free[k] = trained
        return free

    def _keeps(self, raw: dict, stages: list[dict], done: list[EpochPlan]) -> bool:
        """Whether `raw` with `stages` plans the epochs `done` as they were trained."""
        epochs = plan_run(parse_config({**raw, "stages": stages}).stages, self.train_images).epochs
        return list(epochs[: len(done)]) == list(done)

    def _scaled_earlier(self, raw: dict, lengths: list[float], free: dict[int, int], begun: float, end_at, done):
        """The earlier stages' lengths when the epochs not yet begun in them and in the last stage all scale
        by the one factor that ends the run on its budget (each keeps at least `MIN_SHARE` of an epoch
        more; a stage before the last may end on a share of an epoch of at least `MIN_SHARE`, as the last
        stage may). A factor whose stages would change an epoch trained (a ramp squeezed into a size jump
        that mixes every epoch before it) is not taken: the nearest that keeps them is."""
        last = len(lengths) - 1

        def scaled(s: float) -> list[float]:
            out = list(lengths)
            for k, trained in [*free.items(), (last, begun)]:
                out[k] = trained + max(self.MIN_SHARE, s * (lengths[k] - trained))
                if k != last and out[k] > 1 and 0 < out[k] % 1 < self.MIN_SHARE:
                    out[k] = math.floor(out[k])  # no epoch of a few batches in the middle of the run
            return [round(x, 3) for x in out]

        def keeps(s: float) -> bool:
            return self._keeps(raw, with_stage_lengths(raw["stages"], scaled(s)), done)

        def fits(s: float) -> bool:
            return keeps(s) and end_at(with_stage_lengths(raw["stages"], scaled(s))) <= self.budget_s

        high = 1.0
        while fits(high) and high < MAX_EPOCHS / max(lengths):
            high *= 2
        if fits(0.0):
            return scaled(longest(fits, 0.0, high))[:-1]
        if keeps(0.0):  # over the budget even at the least: the least
            return scaled(0.0)[:-1]
        least = longest(lambda s: not keeps(s), 0.0, 1.0) + 1e-3  # the shortest that keeps them
        return scaled(least)[:-1] if keeps(least) else lengths[:-1]

    def _batch_seconds(self, epoch: EpochPlan) -> float:
        """A batch of `epoch`, as predicted."""
        shares = epoch.size_shares().items()
        return sum(share * self.speeds.train_seconds(size, epoch.images) for size, share in shares) / epoch.batches

    def within(self, plan, raw: dict, progress, batches_done: int, seconds: float) -> dict | None:
        """Inside the run's last epoch, after `batches_done` of its batches in `seconds`: a configuration
        whose last epoch ends the run on the budget at this pace, or None (within `SLACK`, or too early)."""
        now = self.clock()
        epoch = plan.epoch(progress.stage, progress.epoch)
        stages = raw["stages"]
        whole_last = with_last_stage_length(stages, stages[-1]["epochs"])  # the last epoch whole: its batches
        whole = plan_run(parse_config({**raw, "stages": whole_last}).stages, self.train_images).epochs[-1].batches
        if epoch != plan.epochs[-1] or self.first is None or not self.MIN_SHARE * whole <= batches_done < epoch.batches:
            return None  # not the run's last epoch, or too early in it to know its pace, or over
        done = [e for e in plan.epochs if (e.stage, e.epoch) < (progress.stage, progress.epoch)]
        factor = (now - seconds - self.first) / self.predicted(done) if done else 1.0
        tail = factor * (self.speeds.val_seconds(epoch.val_size, self.val_images) + self.speeds.epoch_s)

        def end(batches: int) -> float:  # the predicted wall at the end, with this epoch `batches` long
            return now - self.begin + (batches - batches_done) * seconds / batches_done + tail

        if abs(end(epoch.batches) - self.budget_s) <= self.SLACK * self.budget_s:
            return None
        low = max(batches_done + 1, math.ceil(self.MIN_SHARE * whole))
        fits = [b for b in range(low, whole + 1) if end(b) <= self.budget_s]
        batches = fits[-1] if fits else low
        if batches == epoch.batches:
            return None
        current = parse_config(raw).stages[-1].length
        length = stages[-1]["epochs"] - 1 + math.ceil(1000 * batches / whole) / 1000  # rounds to >= `batches`
        pace = seconds / batches_done
        record = {"after": [progress.stage, progress.epoch], "batch": batches_done}
        record["factor"] = round(pace / self._batch_seconds(epoch), 3)
        why = f"the last epoch trains {pace:.2f} s a batch; {batches} of its {whole} batches (was {epoch.batches})"
        return self._replanned(record, why, raw, current, length, end(batches))

    def _replanned(
        self, record: dict, why: str, raw: dict, current: float, length: float, end_s: float, earlier=None
    ) -> dict:
        """`raw` with its last stage `length` epochs long (was `current`), and the stages before it
        `earlier` long where given, recorded and said."""
        record.update(last_stage_epochs=[round(current, 3), length], predicted_end_s=round(end_s, 1))
        self.records.append(record)
        print(
            f"re-planning: {why} end the run in about {format_duration(end_s)} of the "
            f"{format_duration(self.budget_s)} budget"
        )
        lengths = (earlier if earlier is not None else [s.length for s in parse_config(raw).stages][:-1]) + [length]
        return {**copy.deepcopy(raw), "stages": with_stage_lengths(raw["stages"], lengths)}


def with_stage_lengths(stages: list[dict], lengths: list[float]) -> list[dict]:
    """`stages` with each `lengths` epochs long: whole epochs, then a share of one more
    (`last_epoch_share`, to a thousandth); a stage whose length is unchanged is left as written."""
    stages = copy.deepcopy(stages)
    for k, (stage, length) in enumerate(zip(stages, lengths)):
        if abs(stage["epochs"] - 1 + stage.get("last_epoch_share", 1.0) - length) > 5e-4:  # moved
            stages[k] = with_last_stage_length([stage], length)[0]
    return stages


def _same(a: list[float], b: list[float]) -> bool:
    """Stage lengths equal to a thousandth of an epoch."""
    return all(abs(x - y) < 5e-4 for x, y in zip(a, b))


def _shown(lengths: list[float]) -> list:
    """Stage lengths as a record shows them: 3, or 2.4 (its last epoch at a share)."""
    return [int(x) if abs(x - round(x)) < 5e-4 else round(x, 3) for x in lengths]


def actual_seconds(run_dir: Path, stages: int) -> list[float]:
    """Wall seconds per stage of a finished run (training, validation, checkpoints), from metrics.jsonl."""
    from pipeline.report import read_metrics

    ends = [0.0] * stages
    for record in read_metrics(run_dir / "metrics.jsonl"):
        if record.get("kind") == "epoch":
            ends[record["stage"]] = max(ends[record["stage"]], record["elapsed_s"])
    return [end - (ends[k - 1] if k else 0.0) for k, end in enumerate(ends)]


def format_plan(plan: BudgetPlan, budget_s: float) -> str:
    """The chosen stages with their predicted seconds, then the total against the budget."""
    rows = [*plan.reasons, f"{'stage':>5} {'size':>7} {'batch':>6} {'epochs':>6} {'predicted':>10}"]
    specs = parse_config(plan.raw).stages
    for k, (stage, spec, seconds) in enumerate(zip(plan.raw["stages"], specs, plan.stage_seconds)):
        size = stage["img_size"]
        size = f"{size[0]}-{size[1]}" if isinstance(size, list) else str(size)
        epochs = format_epochs(spec.length)
        rows.append(f"{k:>5} {size:>7} {stage['batch_size']:>6} {epochs:>6} {format_duration(seconds):>10}")
    rows.append(
        f"{format_epochs(plan.length)} epochs; predicted {format_duration(plan.seconds)}"
        + (f", {format_duration(plan.measuring_s + plan.seconds)} with the measuring," if plan.measuring_s else "")
        + f" of the {format_duration(budget_s)} budget"
    )
    return "\n".join(rows)


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
        where = (
            f"in stage {stage} epoch {epoch} at batch {r['batch']}"
            if "batch" in r
            else f"after stage {stage} epoch {epoch}"
        )
        moved = f"the last stage {format_epochs(first)} -> {format_epochs(then)} epochs"
        if "stage_epochs" in r:
            moved = f"epochs per stage {r['stage_epochs'][0]} -> {r['stage_epochs'][1]}"
        rows.append(f"re-planned {where}: {moved}")
    return "\n".join(rows)
