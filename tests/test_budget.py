"""`plan --budget` and `run --budget`: durations, the planner's choices on made-up speeds, the
predictions, bad input, and a tiny budgeted run end to end."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time

import pytest
import yaml

import pipeline.budget as budget
from pipeline.budget import (
    BudgetPlan,
    choose_plan,
    choose_ramp,
    choose_start,
    policy_stages,
    predict,
    within,
)
from pipeline.cli import main
from pipeline.config import parse_config
from pipeline.errors import ConfigError
from pipeline.options import parse_duration
from pipeline.replan import format_plan
from pipeline.speeds import Speeds, native_note, native_size, per_image
from pipeline.train.plan import format_epochs, plan_run


@pytest.mark.parametrize(
    "text,seconds",
    [("20m", 1200), ("1h30m", 5400), ("900s", 900), ("900", 900), ("1.5h", 5400), ("2m30s", 150), ("45min", 2700)],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["20x", "", "m", "h30", "-5m", "0", "0s", "1m1h", "nan"])
def test_bad_durations_are_refused(text):
    with pytest.raises(ConfigError, match=r"--budget"):
        parse_duration(text)


# Made-up speeds: a step's cost grows with the pixels, a new size costs 2 s, an epoch's checkpoints 0.5 s.
SPEEDS = Speeds(
    train={32: 800.0, 48: 400.0, 64: 200.0},
    val={32: 2400.0, 48: 1200.0, 64: 600.0},
    new_size_s=2.0,
    epoch_s=0.5,
    start_s=5.0,
)


def raw_config(tiny_config: dict) -> dict:
    raw = copy.deepcopy(tiny_config)
    raw["stages"] = [
        {"img_size": 32, "batch_size": 10, "epochs": 3, "lr": 0.2},
        {"img_size": 64, "batch_size": 10, "epochs": 1, "mixup": "off", "val_size": 72},
    ]
    return raw


def test_seconds_per_image_between_and_beyond_the_measured_sizes():
    assert per_image(SPEEDS.train, 48) == pytest.approx(1 / 400)
    assert per_image(SPEEDS.train, 40) == pytest.approx((1 / 800 + 1 / 400) / 2)
    assert per_image(SPEEDS.train, 128) == pytest.approx(4 / 200)  # 4x the pixels of 64 px
    assert per_image(SPEEDS.train, 16) == pytest.approx(1 / 4 / 800)


def test_the_start_is_half_the_final_size_only_where_that_pays(tiny_config):
    assert choose_start(SPEEDS, 64) == (
        32,
        "a ramp from 32 px pays: 800 img/s at 32 px against 200 at 64 px here (4.00x)",
    )
    assert choose_start(SPEEDS, 64, start=48)[0] == 48  # the user's --start-size wins
    flat = Speeds(train={32: 250.0, 64: 200.0}, val=SPEEDS.val, new_size_s=2.0, epoch_s=0.5, start_s=5.0)
    start, why = choose_start(flat, 64)  # a loader-bound machine: 1.25x is not worth the size changes
    assert start == 64 and why.startswith("every epoch at 64 px: smaller sizes do not pay here") and "1.25x" in why
    plan = choose_plan(raw_config(tiny_config), flat, 60.0, 64, 100, 30, start)
    assert {s["img_size"] for s in plan.raw["stages"]} == {64}  # no ramp planned
    assert format_plan(BudgetPlan(plan.raw, plan.epochs, plan.stage_seconds, 5.0, reasons=(why,)), 60.0).startswith(why)


def test_another_schedule_shape_fills_the_same_budget(tiny_config):
    raw = raw_config(tiny_config)
    fixed = choose_plan(raw, SPEEDS, 200.0, 64, 1000, 200, 64)

    def small_first(epochs):  # a stage at 32 px, then the rest at 64 px
        return [{"img_size": 32, "batch_size": 10, "epochs": 1}, {"img_size": 64, "batch_size": 10, "epochs": epochs}]

    shaped = choose_plan(raw, SPEEDS, 200.0, 64, 1000, 200, shape=small_first)
    assert [s["img_size"] for s in shaped.raw["stages"]] == [32, 64]
    assert shaped.raw["stages"][1]["epochs"] == shaped.epochs  # the shape's own length, from the search
    assert shaped.seconds <= 200.0
    longer = copy.deepcopy(shaped.raw)
    longer["stages"][1]["epochs"] += 1
    assert sum(predict(parse_config(longer), SPEEDS, 1000, 200)) + SPEEDS.start_s > 200.0  # the most that fits
    assert fixed.epochs - 1 <= shaped.epochs <= fixed.epochs  # one epoch at 32 px in place of one at 64 px


def shown(ramp, fixed) -> str:
    """The ratio of their epochs as the plan's line shows it: rounded down to hundredths."""
    return f"{math.floor(100 * ramp.length / fixed.length) / 100:.2f}x"


def test_a_ramp_is_planned_only_where_it_buys_enough_more_epochs(tiny_config):
    raw = raw_config(tiny_config)
    ramp, fixed = (choose_plan(raw, SPEEDS, 200.0, 64, 1000, 200, start) for start in (32, 64))
    assert ramp.epochs >= budget.RAMP_EPOCHS * fixed.epochs  # 32 px at 4x the images/s of 64 px: the ramp buys epochs
    assert choose_ramp(ramp, fixed, 32, 64) == (
        ramp,
        f"a ramp from 32 px would fit {format_epochs(ramp.length)} epochs in this budget against "
        f"{format_epochs(fixed.length)} at 64 px ({shown(ramp, fixed)})",
    )
    # 32 px at 1.4x (past RAMP_PAYS) but an epoch's fixed costs dominate: the ramp buys too few epochs
    costly = Speeds(train={32: 280.0, 64: 200.0}, val=SPEEDS.val, new_size_s=2.0, epoch_s=6.0, start_s=5.0)
    assert choose_start(costly, 64)[0] == 32
    ramp, fixed = (choose_plan(raw, costly, 200.0, 64, 1000, 200, start) for start in (32, 64))
    assert fixed.length <= ramp.length < budget.RAMP_EPOCHS * fixed.length
    chosen, why = choose_ramp(ramp, fixed, 32, 64)
    assert chosen is fixed and {s["img_size"] for s in chosen.raw["stages"]} == {64}
    assert why == (
        f"every epoch at 64 px: a ramp from 32 px would fit {format_epochs(ramp.length)} epochs in this budget "
        f"against {format_epochs(fixed.length)} at 64 px ({shown(ramp, fixed)}, under 1.35x), too few "
        "more to make up for its smaller sizes"
    )


def test_a_short_run_takes_any_start_that_fits_more_epochs(tiny_config):
    raw = raw_config(tiny_config)
    plan = choose_plan(raw, SPEEDS, 200.0, 64, 1000, 200, 32)

    def of(length):  # a plan of that many epochs (the bar reads only the lengths)
        return dataclasses.replace(plan, epochs=int(length), extra=round(length % 1, 3))

    fixed = of(5.0)  # under SHORT_EPOCHS at the final size (plan_budget then holds the start: below)
    for length, shown_as in [(6.5, "1.30x"), (5.5, "1.10x"), (5.02, "1.00x")]:  # any more epochs
        chosen, why = choose_ramp(of(length), fixed, 32, 64)
        assert chosen.length == length and why == (
            f"a ramp from 32 px would fit {format_epochs(length)} epochs in this budget against 5 at 64 px ({shown_as})"
        )
    chosen, why = choose_ramp(of(5.0), fixed, 32, 64)  # as many: the ramp's epochs were all at the final size
    assert chosen is fixed and why == (
        "every epoch at 64 px: a ramp from 32 px would fit 5 epochs in this budget against 5 at 64 px (1.00x): no "
        "more epochs for its smaller sizes"
    )
    chosen, why = choose_ramp(of(10.4), of(8.0), 32, 64)  # 1.3x of 8 epochs: not a short run
    assert chosen.length == 8.0 and "(1.30x, under 1.35x), too few more" in why


def test_the_plan_reads_the_training_images_size(tiny_data):
    from pipeline.data.index import scan_image_folder

    samples = scan_image_folder(tiny_data / "train", "data.train").samples
    assert native_size(samples) == 32 and native_size(samples[:3], most=2) == 32
    assert native_size([("/no/such.png", 0)]) is None
    assert "about 32 px" in native_note(32, 64) and "--final-size 32" in native_note(32, 64)
    assert native_note(32, 32) is None and native_note(None, 64) is None


def test_the_policy_ramps_then_settles_and_keeps_the_files_keys(tiny_config):
    raw = raw_config(tiny_config)
    stages = policy_stages(raw, 8, 64)
    assert stages == [
        {"img_size": [32, 64], "batch_size": 10, "epochs": 6, "lr": 0.2},
        {"img_size": 64, "batch_size": 10, "epochs": 2, "mixup": "off", "val_size": 72},
    ]
    assert policy_stages(raw, 1, 64) == [{"img_size": 64, "batch_size": 10, "epochs": 1, "lr": 0.2}]
    assert [s["epochs"] for s in policy_stages(raw, 2, 64)] == [1, 1]
    assert [s["epochs"] for s in policy_stages(raw, 20, 64)] == [15, 5]
    assert policy_stages(raw, 4, 64, start=64)[0]["img_size"] == 64  # the fixed-size baseline
    assert policy_stages(raw, 4, 64, start=48)[0]["img_size"] == [48, 64]
    sizes = [e.img_size for e in plan_run(parse_config({**raw, "stages": stages}).stages, 100).epochs]
    assert sizes == [32, 40, 48, 48, 56, 64, 64, 64]


def test_a_short_run_s_shape_holds_a_size_then_settles_half_its_epochs(tiny_config):
    raw = raw_config(tiny_config)
    assert policy_stages(raw, 4, 64, 56, hold=True) == [
        {"img_size": 56, "batch_size": 10, "epochs": 2, "lr": 0.2},
        {"img_size": 64, "batch_size": 10, "epochs": 2, "mixup": "off", "val_size": 72},
    ]
    assert [s["epochs"] for s in policy_stages(raw, 5, 64, 56, hold=True)] == [2, 3]  # half, rounded up, settles
    assert [s["epochs"] for s in policy_stages(raw, 2, 64, 56, hold=True)] == [1, 1]
    assert policy_stages(raw, 1, 64, 56, hold=True) == [  # one epoch: at the final size, the last stage's keys
        {"img_size": 64, "batch_size": 10, "epochs": 1, "mixup": "off", "val_size": 72}
    ]
    assert [s["img_size"] for s in policy_stages(raw, 4, 64, 64, hold=True)] == [64, 64]  # the `half` anchor


def test_a_short_run_with_no_ramp_holds_0_83_of_the_final_size_then_settles_half(tiny_config, monkeypatch):
    import pipeline.probe as probe

    flat = Speeds({32: 230.0, 48: 215.0, 64: 200.0}, {32: 1e5, 48: 1e5, 64: 1e5}, 0.0, 1.0, 0.0)  # 32 px: 1.15x
    monkeypatch.setattr(budget, "measure_speeds", lambda *args, **kwargs: flat)
    monkeypatch.setattr(probe, "probe_sizes", no_measuring)  # no ramp: nothing to probe
    raw, log = raw_config(tiny_config), lambda *args: None
    plan, _ = budget.plan_budget(raw, 6.0, 64, log=log)  # 40 images: about 1.2 s an epoch, 5 fit at 64 px
    stages = plan.raw["stages"]
    assert [s["img_size"] for s in stages] == [56, 64] and stages[0]["lr"] == 0.2 and stages[1]["mixup"] == "off"
    lengths = [s.length for s in parse_config(plan.raw).stages]
    assert lengths[0] == stages[0]["epochs"] <= lengths[1] and plan.length == pytest.approx(sum(lengths))
    assert plan.seconds <= 6.0 and plan.length < budget.SHORT_EPOCHS
    assert plan.reasons[0].startswith("no ramp: smaller sizes do not pay here (230 img/s at 32 px")
    assert plan.reasons[1].startswith("a short run (") and plan.reasons[1].endswith(
        f" at 64 px, under 8): {stages[0]['epochs']} at 56 px (1.04x the images/s of 64 px here), then the rest at "
        f"64 px with the last stage's keys, {format_epochs(plan.length)} epochs in all"
    )
    longer, _ = budget.plan_budget(raw, 60.0, 64, log=log)  # about 50 epochs: not a short run
    assert {s["img_size"] for s in longer.raw["stages"]} == {64} and longer.reasons[0].startswith("every epoch at 64")
    given, _ = budget.plan_budget(raw, 6.0, 64, 64, log=log)  # --start-size: as given
    assert {s["img_size"] for s in given.raw["stages"]} == {64} and not any(
        r.startswith("a short run") for r in given.reasons
    )


def test_the_prediction_adds_up(tiny_config):
    raw = raw_config(tiny_config)
    raw["stages"] = policy_stages(raw, 4, 64)  # 32, 64 | 64 | 64 ... : ramp of 3 (32, 48, 64), 1 settling
    cfg = parse_config(raw)
    seconds = predict(cfg, SPEEDS, train_images=100, val_images=30)
    # ramp: 100 images per epoch at 32, 48, 64 px, validation at the same sizes, three new sizes; the 32 -> 48
    # jump (train.size_jumps) puts a quarter of the batches below 64 px at 64, and the epoch before it
    # rises to 48 px on half of the rest
    train = [(0.375 / 800 + 0.375 / 400 + 0.25 / 200), (0.75 / 400 + 0.25 / 200), 1 / 200]
    ramp = 100 * sum(train) + 30 / 2400 + 30 / 1200 + 30 / 600 + 3 * (0.5 + 2.0)
    settle = 100 / 200 + 30 * (72 / 64) ** 2 / 600 + 0.5 + 2.0  # validation moves to 72 px: a new size
    assert seconds == pytest.approx([ramp, settle])
    plan = choose_plan(raw, SPEEDS, 60.0, 64, 100, 30)
    assert plan.seconds == pytest.approx(plan.start_s + sum(plan.stage_seconds))
    assert plan.stage_seconds == pytest.approx(predict(parse_config(plan.raw), SPEEDS, 100, 30))


def test_more_budget_never_means_fewer_epochs_and_the_final_size_is_always_reached(tiny_config):
    raw = raw_config(tiny_config)
    epochs = []
    # a plan leaves less of its budget than a partial epoch's fixed costs and one batch: a share of one
    # more epoch at the final size (`last_epoch_share`) takes the rest
    gap = SPEEDS.epoch_s + SPEEDS.val_seconds(72, 200) + SPEEDS.train_seconds(64, 10)
    for budget_s in range(15, 400, 7):
        plan = choose_plan(raw, SPEEDS, float(budget_s), 64, 1000, 200)
        epochs.append(plan.epochs)
        assert budget_s - gap < plan.seconds <= budget_s
        assert plan.length == pytest.approx(sum(stage.length for stage in parse_config(plan.raw).stages))
        assert parse_config(plan.raw).stages[-1].img_size == 64
        one_more = copy.deepcopy(raw)
        one_more["stages"] = policy_stages(raw, plan.epochs + 1, 64)
        assert (
            budget.BudgetPlan(one_more, 0, predict(parse_config(one_more), SPEEDS, 1000, 200), 5.0).seconds > budget_s
        )
    assert epochs == sorted(epochs) and epochs[0] >= 1 and epochs[-1] > epochs[0]


def test_a_plan_shortened_to_fit_loses_only_its_last_stage_s_tail(tiny_config):
    raw = raw_config(tiny_config)
    plan = choose_plan(raw, SPEEDS, 200.0, 64, 1000, 200)
    assert within(plan, SPEEDS, 200.0) is plan  # it fits: as it is
    gap = SPEEDS.epoch_s + SPEEDS.val_seconds(72, 200) + SPEEDS.train_seconds(64, 10)
    for cut in (0.5, plan.stage_seconds[-1] / 3):  # inside the last epoch's share, then across epochs
        shorter = within(plan, SPEEDS, plan.seconds - cut)
        assert plan.seconds - cut - gap < shorter.seconds <= plan.seconds - cut
        stages = parse_config(shorter.raw).stages
        assert shorter.length < plan.length and shorter.length == pytest.approx(sum(s.length for s in stages))
        assert shorter.raw["stages"][:-1] == plan.raw["stages"][:-1] and stages[-1].img_size == 64
        assert shorter.stage_seconds == pytest.approx(predict(parse_config(shorter.raw), SPEEDS, 1000, 200))


def test_run_budget_counts_the_time_its_choosing_took(tiny_config, monkeypatch):
    chosen = budget.choose_plan

    def slow_choice(*args, **kwargs):
        time.sleep(0.3)
        return chosen(*args, **kwargs)

    monkeypatch.setattr(budget, "measure_speeds", lambda *args, **kwargs: SPEEDS)
    monkeypatch.setattr(budget, "choose_plan", slow_choice)
    raw, log = raw_config(tiny_config), lambda *args: None
    begin = time.perf_counter()
    counted, _ = budget.plan_budget(raw, 60.0, 64, 64, measuring_counts=True, log=log)
    assert time.perf_counter() - begin + counted.seconds <= 60.0
    planned, _ = budget.plan_budget(raw, 60.0, 64, 64, log=log)  # `plan --budget`: nothing counts
    assert counted.seconds < planned.seconds - 2 * 0.3 <= 60.0  # twice the choosing: the trim's time too


def test_a_budget_shorter_than_one_epoch_is_refused(tiny_config):
    with pytest.raises(
        ConfigError,
        match=r"--budget: too short for one epoch at 64 px here: that takes about 13 s with the start, and the "
        r"budget leaves 6 s",
    ):
        choose_plan(raw_config(tiny_config), SPEEDS, 6.0, 64, 1000, 200)


def no_measuring(*args, **kwargs):
    raise AssertionError("measured before the input was checked")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--budget", "20x"], "error: --budget 20x: not a duration"),
        (["--budget", "0m"], "error: --budget 0m: must be a positive duration"),
        (["--budget", "5m", "--final-size", "8"], "error: --final-size 8: must be at least 16 px"),
        (
            ["--budget", "5m", "--start-size", "40"],
            "error: --start-size 40: must be between 8 and the final size (24 px)",
        ),
    ],
)
def test_bad_budget_input_is_one_line_before_measuring(tiny_config, write_yaml, capsys, monkeypatch, args, message):
    monkeypatch.setattr(budget, "measure_speeds", no_measuring)
    for command in ("plan", "run"):
        assert main([command, str(write_yaml(tiny_config)), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [err[0]] and err[0].startswith(message)


def test_a_final_size_the_model_cannot_take_is_one_line(tiny_config, write_yaml, capsys, monkeypatch):
    monkeypatch.setattr(budget, "measure_speeds", no_measuring)
    tiny_config["model"]["arch"] = "test_vit"  # fixed input size
    assert main(["plan", str(write_yaml(tiny_config)), "--budget", "5m", "--final-size", "24"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --final-size 24: the model cannot take")


def test_budget_options_need_a_budget_or_a_new_run(tiny_config, write_yaml, capsys, tmp_path, monkeypatch):
    file = str(write_yaml(tiny_config))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["run", file, "--budget", "1m"]) == 2
    assert "--budget under torchrun: each process would measure and plan on its own" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    assert main(["run", file, "--final-size", "32"]) == 2
    assert "--final-size: only with --budget" in capsys.readouterr().err
    assert main(["run", file, "--start-size", "16"]) == 2
    assert "--start-size: only with --budget" in capsys.readouterr().err
    assert main(["run", file, "--no-replan"]) == 2
    assert "--no-replan: only with --budget" in capsys.readouterr().err
    assert main(["run", file, "--budget", "1m", "--resume", str(tmp_path)]) == 2
    assert "--budget plans a new run" in capsys.readouterr().err


def test_plan_writes_the_plan_beside_the_file_and_leaves_the_file_alone(tiny_config, write_yaml, capsys):
    file = write_yaml(tiny_config)
    before = file.read_text()
    assert main(["plan", str(file), "--budget", "10m", "--final-size", "32"]) == 0
    out = capsys.readouterr().out
    assert file.read_text() == before
    planned = yaml.safe_load((file.parent / "stages.plan.yaml").read_text())
    stages = parse_config(planned).stages
    assert stages[-1].img_size == 32 and stages[0].start_size in (16, None)
    assert planned["model"]["arch"] == "test_resnet" and planned["train"]["optimizer"]["lr"] == 0.05
    assert "of the 10 min 00 s budget" in out and "measuring test_resnet on cpu at 16, 24, 32 px" in out
    # the plan says why, either way: no ramp where 16 px is not fast enough, or where the ramp's epochs
    # are too few more than the final size's (timing decides which; both reasons name 32 px)
    if stages[0].start_size == 16:
        assert "a ramp from 16 px pays" in out and "every epoch at 32 px" not in out
    else:
        assert "every epoch at 32 px: " in out
        assert "smaller sizes do not pay here" in out or "too few more to make up" in out
    assert main(["plan", str(file), "--budget", "10m", "--out", str(file)]) == 2  # never FILE itself


@pytest.mark.slow
def test_run_with_a_budget_plans_runs_and_reports_predicted_against_actual(tiny_config, write_yaml, capsys, tmp_path):
    file = write_yaml(tiny_config)
    assert main(["run", str(file), "--budget", "12s", "--out", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    (run_dir,) = (tmp_path / "runs").iterdir()
    report = json.loads((run_dir / "budget.json").read_text())
    stages = yaml.safe_load((run_dir / "config.yaml").read_text())["stages"]
    assert len(report["predicted_s"]["stages"]) == len(report["actual_s"]["stages"]) == len(stages)
    assert stages[-1]["img_size"] == 24 and all(s > 0 for s in report["actual_s"]["stages"])
    assert isinstance(report["replans"], list)  # each: after which epoch, the factor, the last stage's epochs
    assert report["total_s"] <= 12 * 2.5  # loose: a loaded machine slows tiny epochs by whole seconds
    assert "predicted" in out and "% of the 12 s budget" in out
