"""The stages that fill a time budget on this machine (`plan FILE --budget 20m`, `run FILE --budget`).

Measures FILE's setup at a few sizes between half and all of the final size (`pipeline.speeds`), then
fills the budget: one ramp from half the final size up to it, then a quarter of the epochs at it with
FILE's last stage's keys (e.g. `mixup: off`), one batch size, one schedule over the run. The ramp is
planned only where the start size trains at least `RAMP_PAYS` times as fast as the final size here
and the ramp fits `RAMP_EPOCHS` times the epochs of the final size alone (in a run of under
`SHORT_EPOCHS`: more at all); else every epoch is at the final size. A short training probe
(`pipeline.probe`) chooses a ramp's start: the smallest size that keeps the classes. A short run
holds a size for about half its epochs, then trains the rest at the final size with the last stage's
keys: where smaller sizes buy epochs, the smallest at which the model's deepest feature map is 2x2
(no probe: too short for it), else `HOLD_RATIO` of the final size. The plan says why it chose what it
chose, and how large the images are (docs/plan.md).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from pipeline.config import STAGE_SIZE_KEYS, Config, parse_config
from pipeline.errors import ConfigError
from pipeline.speeds import (
    Speeds,
    check_sizes,
    measure_speeds,
    measurement_config,
    native_note,
    native_size,
    per_image,
    round_size,
)
from pipeline.train.plan import RAMP_MULTIPLE, format_duration, format_epochs, longest, plan_run, with_last_stage_length

START_RATIO = 0.5  # the ramp starts at this share of the final size
RAMP_PAYS = 1.3  # a ramp is planned only when its start trains at least this much faster than the final size
RAMP_EPOCHS = 1.35  # ... and when it fits at least this many times the epochs of the final size alone,
SHORT_EPOCHS = 8  # or, in a run that fits fewer epochs than this at the final size (a short one), more at all
SETTLE_SHARE = 0.25  # the share of the epochs trained at the final size, after the ramp
HOLD_RATIO = 0.83  # a short run whose smaller sizes buy no epochs first trains this share of the final size (FFCV's)
HOLD_SETTLE_SHARE = 0.5  # ... and this share of its epochs at the final size, with the last stage's keys
MAX_EPOCHS = 10_000


def start_size(final: int, start: int | None = None) -> int:
    """Where the ramp starts: `start`, else `START_RATIO` of the final size (a multiple of 8)."""
    return min(final, start if start is not None else round_size(final * START_RATIO))


def choose_start(speeds: Speeds, final: int, start: int | None = None) -> tuple[int, str]:
    """Where the plan starts, and why: the given `start`; else half the final size where that trains at
    least `RAMP_PAYS` times as fast here; else the final size (no ramp: smaller sizes do not pay)."""
    first = start_size(final, start)
    if start is not None:
        return first, f"the ramp starts at {first} px (--start-size)"
    fast, slow = 1 / per_image(speeds.train, first), 1 / per_image(speeds.train, final)
    measured = f"{fast:.0f} img/s at {first} px against {slow:.0f} at {final} px here ({fast / slow:.2f}x)"
    if first < final and fast / slow >= RAMP_PAYS:
        return first, f"a ramp from {first} px pays: {measured}"
    return final, f"every epoch at {final} px: smaller sizes do not pay here ({measured}, under {RAMP_PAYS}x)"


def candidate_sizes(final: int, start: int | None = None) -> list[int]:
    """The sizes measured: the start, halfway, and the final size (multiples of 8)."""
    first = start_size(final, start)
    return sorted({first, round_size((first + final) / 2), final})


def _stage_keys(stage: dict) -> dict:
    """A stage's overrides (lr, mixup, data, ...): everything but its sizes and length."""
    return {k: copy.deepcopy(v) for k, v in stage.items() if k not in (*STAGE_SIZE_KEYS, "val_size")}


def policy_stages(raw: dict, epochs: int, final: int, start: int | None = None, hold: bool = False) -> list[dict]:
    """The stages of a run of `epochs` epochs ending at `final` px: a ramp from `start` (default: half
    the final size), then `SETTLE_SHARE` of the epochs at the final size (at least one from 2 on).
    With `hold`, the short run's shape: `start` px held (no ramp), then `HOLD_SETTLE_SHARE` of the
    epochs (rounded up, at least one) at the final size. The batch is the first stage's; the ramp (or
    hold) keeps the first stage's other keys, the last stage its."""
    first, last = raw["stages"][0], raw["stages"][-1]
    if hold:
        settle = max(1, math.ceil(epochs * HOLD_SETTLE_SHARE))
    else:
        settle = max(1, round(epochs * SETTLE_SHARE)) if epochs >= 2 else 0
    ramp = epochs - settle
    start = start_size(final, start)
    stages = []
    if ramp:
        size: Any = start if hold else [start, final] if start < final and ramp > 1 else final
        stages.append({"img_size": size, "batch_size": first["batch_size"], "epochs": ramp, **_stage_keys(first)})
    if settle:
        stage = {"img_size": final, "batch_size": first["batch_size"], "epochs": settle, **_stage_keys(last)}
        if last.get("val_size") is not None:
            stage["val_size"] = last["val_size"]
        stages.append(stage)
    return stages


@dataclass(frozen=True)
class BudgetPlan:
    raw: dict  # FILE's configuration with the chosen stages
    epochs: int  # of the shape the plan fills (its last stage may have a share of one more: `extra`)
    stage_seconds: list[float]  # predicted, per stage
    start_s: float
    measuring_s: float = 0.0  # the measuring (and the probe), where it counts against the budget (`run --budget`)
    probe_s: float = 0.0  # the start-size probe's share of it (`pipeline.probe`)
    reasons: tuple[str, ...] = ()  # why the plan starts where it does, what the data's size says
    val_images: int = 0
    train_images: int = 0
    extra: float = 0.0  # the share of one more epoch at the final size that fills the rest of the budget

    @property
    def seconds(self) -> float:
        return self.start_s + sum(self.stage_seconds)

    @property
    def length(self) -> float:
        """Its epochs, the last counted by the share of it trained."""
        return self.epochs + self.extra


def choose_ramp(ramp: BudgetPlan, fixed: BudgetPlan, first: int, final: int) -> tuple[BudgetPlan, str]:
    """The ramp, or the final size alone where the ramp does not buy `RAMP_EPOCHS` times its epochs in
    the same budget (in a run of under `SHORT_EPOCHS`: any more epochs, and `plan_budget` holds its start
    instead), with the reason; the figures behind both bars are in docs/plan.md."""
    ratio, short = ramp.length / fixed.length, fixed.length < SHORT_EPOCHS
    fits = (  # the ratio shown rounded down, so that one under a bar never reads as the bar
        f"a ramp from {first} px would fit {format_epochs(ramp.length)} epochs in this budget against "
        f"{format_epochs(fixed.length)} at {final} px ({math.floor(ratio * 100) / 100:.2f}x"
    )
    if ratio >= RAMP_EPOCHS or (short and ratio > 1):
        return ramp, f"{fits})"
    if short:
        return fixed, f"every epoch at {final} px: {fits}): no more epochs for its smaller sizes"
    too_few = "too few more to make up for its smaller sizes"
    return fixed, f"every epoch at {final} px: {fits}, under {RAMP_EPOCHS}x), {too_few}"


def hold_reason(hold: BudgetPlan, fixed: BudgetPlan, speeds: Speeds, size: int, final: int) -> str:
    """Why a short run holds `size` px first (the final size where no smaller one has a 2x2 map), and
    then trains half its epochs with the last stage's keys: the epochs that fit each way, and the speed."""
    short = f"a short run ({format_epochs(fixed.length)} epochs fit at {final} px, under {SHORT_EPOCHS}): "
    end = f" with the last stage's keys, {format_epochs(hold.length)} epochs in all"
    held = sum(s["epochs"] for s in hold.raw["stages"][:-1])
    if not held:  # one epoch: the last stage's
        return f"{short}every epoch at {final} px{end}"
    if size == final:
        return f"{short}{held} at {final} px, then the rest{end}"
    faster = per_image(speeds.train, final) / per_image(speeds.train, size)
    return (
        f"{short}{held} at {size} px ({faster:.2f}x the images/s of {final} px here), then the rest at {final} px{end}"
    )


def predict(cfg: Config, speeds: Speeds, train_images: int, val_images: int) -> list[float]:
    """Predicted seconds per stage of `cfg` on the measured machine."""
    plan = plan_run(cfg.stages, train_images)
    seconds = [0.0] * len(cfg.stages)
    previous = None
    for epoch in plan.epochs:
        seconds[epoch.stage] += speeds.epoch_seconds(epoch, previous, val_images)
        previous = epoch
    return seconds


def choose_plan(
    raw: dict,
    speeds: Speeds,
    budget_s: float,
    final: int,
    train_images: int,
    val_images: int,
    start: int | None = None,
    shape: Callable[[int], list[dict]] | None = None,
) -> BudgetPlan:
    """The most epochs, by the policy (or `shape(epochs)`: another schedule's stages), whose predicted
    time fits `budget_s`; what is left of the budget goes to a share of one more epoch at the final size
    (the last stage's `last_epoch_share`), so the run ends on its budget, not up to an epoch before it."""

    def candidate(epochs: int, extra: float = 0.0) -> BudgetPlan:
        planned = copy.deepcopy(raw)
        planned["stages"] = shape(epochs) if shape is not None else policy_stages(raw, epochs, final, start)
        if extra:  # the shapes' stages are whole epochs
            planned["stages"] = with_last_stage_length(planned["stages"], planned["stages"][-1]["epochs"] + extra)
        seconds = predict(parse_config(planned), speeds, train_images, val_images)
        return BudgetPlan(
            planned, epochs, seconds, speeds.start_s, val_images=val_images, train_images=train_images, extra=extra
        )

    best = candidate(1)
    if best.seconds > budget_s:
        raise ConfigError(
            f"--budget: too short for one epoch at {final} px here: that takes about {format_duration(best.seconds)} "
            f"with the start, and the budget leaves {format_duration(budget_s)}; give a longer budget or a smaller "
            "--final-size"
        )
    lo, hi = 1, 2  # the predicted time grows with the epochs: double, then bisect
    while hi <= MAX_EPOCHS and candidate(hi).seconds <= budget_s:
        lo, hi = hi, hi * 2
    hi = min(hi, MAX_EPOCHS + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if candidate(mid).seconds <= budget_s else (lo, mid)
    extra = longest(lambda share: candidate(lo, share).seconds <= budget_s, 0.0, 1.0)  # of one more epoch
    return candidate(lo, extra)


def within(plan: BudgetPlan, speeds: Speeds, budget_s: float) -> BudgetPlan:
    """`plan`, its last stage shortened (to a thousandth of an epoch, never to nothing) until its
    predicted time fits `budget_s`; as it is where it already fits."""
    if plan.seconds <= budget_s:
        return plan
    stages, last = plan.raw["stages"], parse_config(plan.raw).stages[-1].length

    def shortened(length: float) -> BudgetPlan:
        raw = {**copy.deepcopy(plan.raw), "stages": with_last_stage_length(stages, length)}
        total = round(plan.length - last + length, 3)
        seconds = predict(parse_config(raw), speeds, plan.train_images, plan.val_images)
        extra = round(total - math.floor(total), 3)
        return dataclasses.replace(plan, raw=raw, stage_seconds=seconds, epochs=math.floor(total), extra=extra)

    return shortened(longest(lambda length: shortened(length).seconds <= budget_s, 1e-3, last))


def plan_budget(
    raw: dict,
    budget_s: float,
    final_size: int | None = None,
    start: int | None = None,
    *,
    measuring_counts: bool = False,
    log=print,
) -> tuple[BudgetPlan, Speeds]:
    """Measure FILE's setup (`raw`: its resolved configuration) on this machine and choose the stages
    that fill `budget_s`; with `measuring_counts` (`run --budget`), less the time the measuring and the
    choosing took."""
    from pipeline.model import build_model
    from pipeline.train.preflight import prepare

    begin = time.perf_counter()
    cfg = parse_config(raw)
    final = final_size if final_size is not None else max(stage.largest_size for stage in cfg.stages)
    if final < 2 * RAMP_MULTIPLE:
        raise ConfigError(f"--final-size {final}: must be at least {2 * RAMP_MULTIPLE} px")
    if start is not None and not RAMP_MULTIPLE <= start <= final:
        raise ConfigError(f"--start-size {start}: must be between {RAMP_MULTIPLE} and the final size ({final} px)")
    measured = measurement_config(raw, final)
    device, datasets, num_classes = prepare(measured)
    sizes = candidate_sizes(final, start)
    check_sizes(build_model(dataclasses.replace(measured.model, pretrained=None), num_classes), sizes, device)
    log(f"measuring {measured.model.arch} on {device} at {', '.join(map(str, sizes))} px ...")
    speeds = measure_speeds(measured, sizes, log=log)
    first, why = choose_start(speeds, final, start)
    images = len(datasets.train), len(datasets.val)

    def choose(first: int) -> tuple[BudgetPlan, bool, str | None, float, BudgetPlan]:  # from `first`: ramped, why
        measuring = time.perf_counter() - begin if measuring_counts else 0.0
        plan = choose_plan(raw, speeds, budget_s - measuring, final, *images, first)
        if start is not None or first == final:  # the user's --start-size is planned as given
            return plan, first < final, None, measuring, plan
        fixed = choose_plan(raw, speeds, budget_s - measuring, final, *images, final)
        chosen, fits = choose_ramp(plan, fixed, first, final)
        return chosen, chosen is plan, fits, measuring, fixed

    plan, ramped, fits, measuring, fixed = choose(first)
    short = start is None and fixed.length < SHORT_EPOCHS
    lines, probe_s, kept = [why, fits] if ramped else [fits or why], 0.0, None
    if start is None and ramped:  # the ramp pays in time: do its sizes keep the classes?
        from pipeline.probe import probe_start

        t0 = time.perf_counter()
        left = 0.0 if short else budget_s - measuring  # a short run cannot spare the probe's tenth: the map decides
        probed, kept = probe_start(measured, datasets, num_classes, device, speeds, sizes, left)
        probe_s = time.perf_counter() - t0
        if short:  # it holds that start
            lines = [probed.replace("a ramp from ", "from ", 1)]
        else:
            plan, ramped, fits, measuring, fixed = choose(kept)
            lines = [why, probed, fits] if kept == first else [probed, fits]  # why it pays, when from the same start
    if short:  # hold the start where smaller sizes buy epochs (else `HOLD_RATIO`), then settle half
        size = kept if kept is not None else round_size(final * HOLD_RATIO)  # the final size where no map is 2x2
        shape = partial(policy_stages, raw, final=final, start=size, hold=True)  # of `epochs` epochs
        held = choose_plan(raw, speeds, budget_s - measuring, final, *images, shape=shape)
        no_ramp = [line.replace(f"every epoch at {final} px: ", "no ramp: ", 1) for line in lines if line]
        plan, lines = held, [*no_ramp, hold_reason(held, fixed, speeds, size, final)]
    reasons = tuple(r for r in (*lines, native_note(native_size(datasets.train.samples), final)) if r)
    if measuring_counts:  # the choosing took time too: the plan gives it back (twice it: the trim's time as well)
        choosing = time.perf_counter() - begin - measuring
        plan = within(plan, speeds, budget_s - measuring - 2 * choosing)
    return dataclasses.replace(plan, measuring_s=measuring, probe_s=probe_s, reasons=reasons), speeds
