"""Re-planning while a run trains (`run --budget`): the schedule stretched at the step it reached, the
re-planner's choices against a simulated clock, and a re-planned run that ends, checkpoints and
resumes with its new plan."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml

from pipeline.budget import choose_plan
from pipeline.config import ScheduleConfig, parse_config
from pipeline.replan import Replanner, with_stage_lengths
from pipeline.train.checkpoint import Checkpoint, Progress
from pipeline.train.plan import plan_run, with_last_stage_length
from pipeline.train.run import RunHooks, run_training
from pipeline.train.schedule import build_scheduler, respan_scheduler
from tests.conftest import Killed
from tests.test_budget import SPEEDS  # made-up speeds: a step costs by the pixels, a new size 2 s


def _optimizer() -> torch.optim.Optimizer:
    layer = torch.nn.Linear(2, 2)
    groups = [{"params": [layer.weight], "lr": 0.1}, {"params": [layer.bias], "lr": 0.02}]
    return torch.optim.SGD(groups, lr=0.1, momentum=0.9)


def _stepped(scheduler, optimizer, steps: int) -> None:
    for _ in range(steps):
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("name", ["onecycle", "cosine", "multistep"])
def test_a_respanned_schedule_is_the_new_curve_from_the_same_step(name):
    cfg = ScheduleConfig(name=name)
    old_opt, new_opt = _optimizer(), _optimizer()
    # a stage that starts at step 20 of a run-wide curve of 100 steps, 15 steps in; the run grows to 130
    old = build_scheduler(old_opt, cfg, 100, 10, 20)
    _stepped(old, old_opt, 15)
    respanned = respan_scheduler(old, old_opt, cfg, (130, 13, 20))
    fresh = build_scheduler(new_opt, cfg, 130, 13, 20)
    _stepped(fresh, new_opt, 15)
    for _ in range(3):  # the same LR and momentum per group now and at every step on
        for a, b in zip(old_opt.param_groups, new_opt.param_groups):
            assert a["lr"] == pytest.approx(b["lr"]) and a["momentum"] == pytest.approx(b["momentum"])
        _stepped(respanned, old_opt, 30)
        _stepped(fresh, new_opt, 30)


def test_a_onecycle_shortened_to_where_it_is_ends_there():
    cfg, optimizer = ScheduleConfig(name="onecycle"), _optimizer()
    scheduler = build_scheduler(optimizer, cfg, 100, 10)
    _stepped(scheduler, optimizer, 60)
    respan_scheduler(scheduler, optimizer, cfg, (61, 10, 0))  # one update left: the curve's last
    floor = 0.1 / cfg.div_factor / cfg.final_div_factor
    assert optimizer.param_groups[0]["lr"] == pytest.approx(floor)


def _simulated_run(
    tiny_config: dict, budget_s: float, slower: float, replan: bool, start: int = 32
) -> tuple[float, list[float]]:
    """A planned run on a clock where every epoch takes `slower` times its prediction: its wall at the
    end (planning and start included) and each stage's length in epochs (3.4: the last at 0.4)."""
    raw = copy.deepcopy(tiny_config)
    raw["stages"] = [
        {"img_size": 32, "batch_size": 10, "epochs": 3},
        {"img_size": 64, "batch_size": 10, "epochs": 1, "mixup": "off"},
    ]
    planning = 4.0
    plan = choose_plan(raw, SPEEDS, budget_s - planning, 64, 1000, 200, start)
    return _on_a_slower_clock(plan.raw, budget_s, slower, replan, planning)


def _on_a_slower_clock(
    raw: dict, budget_s: float, slower: float, replan: bool, planning: float = 4.0
) -> tuple[float, list[float]]:
    """`raw`'s stages trained on a clock where every epoch takes `slower` times its prediction, after
    `planning` s: the wall at the end and each stage's length in epochs (3.4: the last at 0.4)."""
    train_images, val_images = 1000, 200
    now = [0.0]
    replanner = Replanner(SPEEDS, budget_s, 0.0, train_images, val_images, clock=lambda: now[0])
    cfg = parse_config(raw)
    now[0] = planning + slower * SPEEDS.start_s
    run_plan, i, previous = plan_run(cfg.stages, train_images), 0, None
    while i < len(run_plan.epochs):
        epoch = run_plan.epochs[i]
        replanner.epoch_start(epoch.stage, epoch.epoch)
        now[0] += slower * SPEEDS.epoch_seconds(epoch, previous, val_images)
        previous, i = epoch, i + 1
        progress = Progress(stage=epoch.stage, epoch=epoch.epoch + 1)
        new = replanner(run_plan, raw, progress) if replan else None
        if new is not None:
            done = run_plan.epochs[:i]
            raw, run_plan = new, plan_run(parse_config(new).stages, train_images)
            assert run_plan.epochs[:i] == done  # only epochs not yet begun change
    return now[0], [stage.length for stage in parse_config(raw).stages]


@pytest.mark.parametrize("slower", [1.16, 1 / 1.16])
@pytest.mark.parametrize("budget_s", [120.0, 240.0, 600.0])
def test_a_run_whose_first_measurements_were_off_by_16_percent_lands_within_5_percent(tiny_config, budget_s, slower):
    unplanned, planned_epochs = _simulated_run(tiny_config, budget_s, slower, replan=False)
    wall, epochs = _simulated_run(tiny_config, budget_s, slower, replan=True)
    assert abs(unplanned / budget_s - 1) > 0.07  # off by the speed error without re-planning
    assert abs(wall / budget_s - 1) <= Replanner.SLACK + 0.005, (wall, epochs)
    assert epochs[0] == planned_epochs[0] and epochs[1] != planned_epochs[1]  # a ramp under way keeps its length
    assert epochs[1] >= Replanner.MIN_SHARE


@pytest.mark.parametrize("slower", [1.3, 1 / 1.3])
def test_a_shape_with_a_short_last_stage_lands_on_its_budget_and_keeps_its_shape(tiny_config, slower):
    """FFCV's shape: most epochs at 0.75x the final size, a short ramp, two epochs at the final size.
    On a clock 1.3x slow, cutting the last stage alone would leave the run 1.17x over its budget (the
    stages before it hold 9/10 of its time): every stage's epochs not yet begun scale down together."""
    raw = copy.deepcopy(tiny_config)
    raw["stages"] = [
        {"img_size": 48, "batch_size": 10, "epochs": 20},
        {"img_size": [48, 64], "batch_size": 10, "epochs": 4},
        {"img_size": 64, "batch_size": 10, "epochs": 2, "mixup": "off"},
    ]
    on_time, planned = _on_a_slower_clock(raw, 1000.0, 1.0, replan=False)
    budget_s = on_time  # the prediction, exactly
    unplanned, _ = _on_a_slower_clock(raw, budget_s, slower, replan=False)
    wall, epochs = _on_a_slower_clock(raw, budget_s, slower, replan=True)
    assert abs(unplanned / budget_s - 1) > 0.2
    assert abs(wall / budget_s - 1) <= Replanner.SLACK + 0.005, (wall / budget_s, epochs)
    moved = [e / p for e, p in zip(epochs, planned)]  # every stage, the way the clock asks
    assert all((m - 1) * (1 - slower) > 0 for m in moved), epochs
    assert epochs[2] >= 1  # the final size keeps at least one whole epoch (not the quarter it would alone)
    assert all(e % 1 == 0 or e % 1 >= Replanner.MIN_SHARE for e in epochs[:-1])  # no epoch of a few batches


def test_a_re_plan_never_squeezes_a_ramp_into_a_size_jump(tiny_config):
    """A 32 -> 64 px ramp of 6 epochs has 8-px steps; squeezed into 3 it would jump 32 -> 48 px, and a
    run with a jump mixes the final size into every epoch before it, the ones trained too. The re-plan
    keeps the ramp long enough to stay without one, and the run still lands near its budget."""
    raw = copy.deepcopy(tiny_config)
    raw["train"].pop("size_jumps", None)  # the default: on
    raw["stages"] = [
        {"img_size": 32, "batch_size": 10, "epochs": 6},
        {"img_size": [32, 64], "batch_size": 10, "epochs": 6},
        {"img_size": 64, "batch_size": 10, "epochs": 2},
    ]
    budget_s, planned = _on_a_slower_clock(raw, 1000.0, 1.0, replan=False)
    wall, epochs = _on_a_slower_clock(raw, budget_s, 1.6, replan=True)  # asserts the epochs trained stay
    trained = parse_config({**raw, "stages": with_stage_lengths(raw["stages"], epochs)})
    sizes = [e.img_size for e in plan_run(trained.stages, 1000).epochs]
    assert max(b / a for a, b in zip(sizes, sizes[1:])) < 1.4, sizes
    assert epochs[0] < planned[0] and epochs[1] < planned[1], epochs  # both moved
    assert wall / budget_s <= 1.1, (wall / budget_s, epochs)


def test_a_ramp_under_way_keeps_its_length(tiny_config):
    """A ramp's sizes follow its length: once it has begun, only the stages after it move."""
    raw = copy.deepcopy(tiny_config)
    raw["stages"] = [
        {"img_size": [32, 64], "batch_size": 10, "epochs": 6},
        {"img_size": 64, "batch_size": 10, "epochs": 2},
        {"img_size": 64, "batch_size": 10, "epochs": 2, "mixup": "off"},
    ]
    plan, now = plan_run(parse_config(raw).stages, 1000), [0.0]
    replanner = Replanner(SPEEDS, 1.0, 0.0, 1000, 200, clock=lambda: now[0])
    replanner.budget_s = replanner.predicted(plan.epochs)  # the plan's time, exactly
    replanner.epoch_start(0, 0)
    now[0] = 1.3 * replanner.predicted(plan.epochs[:1])  # one ramp epoch done, 1.3x slow
    new = replanner(plan, raw, Progress(stage=0, epoch=1))
    lengths = [stage.length for stage in parse_config(new).stages]
    assert lengths[0] == 6 and 0.25 <= lengths[1] < 2 and 0.25 <= lengths[2] < 2, lengths
    assert lengths[1] == pytest.approx(lengths[2], abs=0.01)  # the two stages after it, by one factor
    assert replanner.records[-1]["stage_epochs"] == [[6, 2, 2], [6, *lengths[1:]]]


@pytest.mark.parametrize("slower", [1.08, 1 / 1.08])
def test_a_budget_of_few_long_epochs_still_lands_within_its_slack(tiny_config, slower):
    """An epoch is about a sixth of this budget: whole epochs alone would miss it by up to that much;
    the last epoch trains the share of its batches that ends the run on the budget."""
    budget_s = 40.0  # about 6 s per epoch at 64 px, every epoch at the final size
    wall, epochs = _simulated_run(tiny_config, budget_s, slower, replan=True, start=64)
    assert abs(wall / budget_s - 1) <= Replanner.SLACK + 0.005, (wall, epochs)
    assert epochs[1] != int(epochs[1])  # a share of one epoch


def test_no_re_plan_within_the_slack_nor_after_the_last_epoch(tiny_config):
    wall, epochs = _simulated_run(tiny_config, 240.0, 1.0, replan=True)  # measured right: the plan stands
    assert wall <= 240.0
    unplanned, planned = _simulated_run(tiny_config, 240.0, 1.0, replan=False)
    assert (wall, epochs) == (unplanned, planned)
    replanner = Replanner(SPEEDS, 240.0, 0.0, 40, 200, clock=lambda: 500.0)
    replanner.epoch_start(0, 0)
    raw = copy.deepcopy(tiny_config)
    plan = plan_run(parse_config(raw).stages, 40)
    assert replanner(plan, raw, Progress(stage=1, epoch=1)) is None  # the run is over: nothing to add to


@pytest.mark.parametrize("share,length", [(0.076, 2), (0.4, 2.25)])
def test_a_run_behind_with_a_sliver_of_an_epoch_left_ends_at_the_epoch_it_trained(tiny_config, share, length):
    """Two epochs done, 1 s from the end of a 20 s budget, 1.4x slower than predicted: a quarter of one
    more epoch would end it about 2 s over. Where the plan had under a quarter left (its curve all but
    over) the run ends now; where it had more, it still trains the quarter its schedule needs."""
    raw = copy.deepcopy(tiny_config)
    raw["stages"] = [{"img_size": 64, "batch_size": 10, "epochs": 3, "last_epoch_share": share}]
    plan = plan_run(parse_config(raw).stages, 1000)
    now = [0.0]
    replanner = Replanner(SPEEDS, 20.0, 0.0, 1000, 200, clock=lambda: now[0])
    replanner.epoch_start(0, 0)
    now[0] = 19.0
    new = replanner(plan, raw, Progress(stage=0, epoch=2))
    assert parse_config(new).stages[-1].length == length
    assert replanner.records[-1]["last_stage_epochs"] == [2 + share, length]


@pytest.mark.slow
def test_a_re_plan_may_end_the_run_at_the_epoch_just_trained(tiny_config, tmp_path):
    tiny_config["train"]["size_jumps"] = "off"
    tiny_config["stages"][1].update(epochs=2, last_epoch_share=0.1)

    def end_now(plan, raw, progress):  # after the last stage's first epoch: no sliver of a second one
        if (progress.stage, progress.epoch) != (1, 1):
            return None
        return {**copy.deepcopy(raw), "stages": with_last_stage_length(raw["stages"], 1)}

    run = run_training(parse_config(tiny_config), out_dir=tmp_path, hooks=RunHooks(replan=end_now))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in records if r["kind"] == "epoch"] == [(0, 0), (0, 1), (1, 0)]
    assert len(json.loads((run / "summary.json").read_text())["stages"]) == 2  # the last stage ended and recorded
    assert yaml.safe_load((run / "config.yaml").read_text())["stages"][-1]["epochs"] == 1
    assert (run / "checkpoints" / "stage1.pt").is_file()


def _replan_after_first_epoch(raw_before: dict, progress: Progress) -> dict | None:
    """A scripted re-plan: after stage 0's first epoch, two epochs in the last stage (was one)."""
    if (progress.stage, progress.epoch) != (0, 1):
        return None
    raw = copy.deepcopy(raw_before)
    raw["stages"][-1]["epochs"] = 2
    return raw


@pytest.mark.slow
def test_a_re_planned_run_trains_its_new_plan_and_resumes_it_after_a_crash(tiny_config, tmp_path, capsys):
    tiny_config["train"]["schedule"] = {"scope": "run"}  # a re-plan in stage 0 moves stage 0's curve too
    tiny_config["train"]["size_jumps"] = "off"
    cfg = parse_config(tiny_config)
    hooks = RunHooks(replan=lambda plan, raw, progress: _replan_after_first_epoch(raw, progress))
    whole = run_training(cfg, out_dir=tmp_path / "whole", hooks=hooks)
    assert "epochs per stage [2, 1] -> [2, 2]" in capsys.readouterr().out
    records = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in records if r["kind"] == "epoch"] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert yaml.safe_load((whole / "config.yaml").read_text())["stages"][-1]["epochs"] == 2
    assert [e["stage"] for e in json.loads((whole / "plan.json").read_text())] == [0, 0, 1, 1]
    last = Checkpoint.read(whole / "checkpoints" / "last.pt")
    assert last.run_progress.replans == [{"stage": 0, "epoch": 1, "epochs": [2, 2]}]
    floor = cfg.train.optimizer.lr / cfg.train.schedule.div_factor / cfg.train.schedule.final_div_factor
    last_lr = [r["lr"] for r in records if r["kind"] == "batch"][-1]
    assert last_lr == pytest.approx(floor, rel=1e-3)  # the last update is the stretched curve's last step

    # the same run killed right after the re-planned epoch's checkpoint, before config.yaml was rewritten
    saves = []

    def die(paths):
        saves.append(paths)
        if len(saves) == 1:  # epoch 0's checkpoint: the first with the new plan
            raise Killed

    with pytest.raises(Killed):
        run_training(cfg, out_dir=tmp_path / "killed", hooks=RunHooks(after_save=die, replan=hooks.replan))
    (killed,) = (tmp_path / "killed").iterdir()
    assert yaml.safe_load((killed / "config.yaml").read_text())["stages"][-1]["epochs"] == 1  # not yet rewritten
    resumed = run_training(parse_config(yaml.safe_load((killed / "config.yaml").read_text())), resume=killed)
    a = Checkpoint.read(whole / "checkpoints" / "last.pt").state_dict
    b = Checkpoint.read(resumed / "checkpoints" / "last.pt").state_dict
    assert all(torch.equal(a[key], b[key]) for key in a)  # bit-exact: the resume trained the re-planned run
    assert yaml.safe_load((resumed / "config.yaml").read_text())["stages"][-1]["epochs"] == 2


@pytest.mark.slow
def test_a_shortened_last_epoch_trains_its_share_and_resumes_inside_it_bit_exact(tiny_config, tmp_path, capsys):
    """`last_epoch_share` (what `run --budget` sets): the stage's last epoch trains that share of its
    batches, its schedule ends on that epoch's last update, and a run killed inside it resumes exactly."""
    tiny_config["train"]["size_jumps"] = "off"
    tiny_config["run"].update(checkpoint_every=0, log_every=1)  # a checkpoint at every update
    tiny_config["stages"][1].update(epochs=2, last_epoch_share=0.5)  # 40 images, batch 6: 6 batches, then 3
    cfg = parse_config(tiny_config)
    whole = run_training(cfg, out_dir=tmp_path / "whole")
    assert "2 epochs x 6 steps (the last epoch 3)" in capsys.readouterr().out
    records = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    batches = [(r["stage"], r["epoch"]) for r in records if r["kind"] == "batch"]
    assert [batches.count((1, e)) for e in (0, 1)] == [6, 3]
    assert [e["batches"] for e in json.loads((whole / "plan.json").read_text())] == [5, 5, 6, 3]
    floor = cfg.train.optimizer.lr / cfg.train.schedule.div_factor / cfg.train.schedule.final_div_factor
    stage1_lr = [r["lr"] for r in records if r["kind"] == "batch" and r["stage"] == 1]
    assert stage1_lr[-1] == pytest.approx(floor, rel=1e-3)  # the stage's curve ends with its last update

    # killed at the second batch's checkpoint of the shortened epoch (one save per update)
    progress = _killed_then_resumed_bit_exact(cfg, tmp_path, whole, 5 + 5 + 6 + 2)
    assert (progress.stage, progress.epoch, progress.batch) == (1, 1, 2)


def _killed_then_resumed_bit_exact(cfg, tmp_path, whole, saves_before_kill: int) -> Progress:
    """`cfg` run again, killed at its `saves_before_kill`-th checkpoint and resumed: the resumed run's
    weights equal the whole run's (`whole`), bit for bit. Returns where the killed run stood."""
    saves = []

    def die(paths):
        saves.append(paths)
        if len(saves) == saves_before_kill:
            raise Killed

    with pytest.raises(Killed):
        run_training(cfg, out_dir=tmp_path / "killed", hooks=RunHooks(after_save=die))
    (killed,) = (tmp_path / "killed").iterdir()
    progress = Checkpoint.read(killed / "checkpoints" / "last.pt").run_progress
    resumed = run_training(cfg, resume=killed)
    a = Checkpoint.read(whole / "checkpoints" / "last.pt").state_dict
    b = Checkpoint.read(resumed / "checkpoints" / "last.pt").state_dict
    assert all(torch.equal(a[key], b[key]) for key in a)
    return progress


@pytest.mark.slow
def test_a_share_of_an_epoch_ends_an_earlier_stage_and_resumes_inside_it_bit_exact(tiny_config, tmp_path):
    """A re-plan that scales every stage gives an earlier stage a share of its last epoch too: that
    epoch trains its share, the next stage starts after it, and a run killed inside it resumes exactly."""
    tiny_config["train"]["size_jumps"] = "off"
    tiny_config["run"].update(checkpoint_every=0, log_every=1)  # a checkpoint at every update
    tiny_config["stages"][0].update(epochs=2, last_epoch_share=0.6)  # 40 images, batch 8: 5 batches, then 3
    cfg = parse_config(tiny_config)
    whole = run_training(cfg, out_dir=tmp_path / "whole")
    records = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    batches = [(r["stage"], r["epoch"]) for r in records if r["kind"] == "batch"]
    assert [batches.count(e) for e in [(0, 0), (0, 1), (1, 0)]] == [5, 3, 6]
    floor = cfg.train.optimizer.lr / cfg.train.schedule.div_factor / cfg.train.schedule.final_div_factor
    stage0_lr = [r["lr"] for r in records if r["kind"] == "batch" and r["stage"] == 0]
    assert stage0_lr[-1] == pytest.approx(floor, rel=1e-3)  # stage 0's curve ends with its share's last update

    progress = _killed_then_resumed_bit_exact(cfg, tmp_path, whole, 5 + 2)  # at stage 0's share, update 2
    assert (progress.stage, progress.epoch, progress.batch) == (0, 1, 2)


def _last_epoch_on_a_slower_clock(tiny_config: dict, slower: float, within: bool) -> tuple[float, int, int]:
    """A run planned at 64 px from the start whose epochs take their predicted time, but whose last
    epoch trains `slower` times its predicted pace (the machine slowed down late): its wall at the end,
    and the last epoch's batches as planned and as trained. `within`: the re-planner looks inside it
    every 2 batches, as the trainer asks at its flushes."""
    budget_s, images, val_images = 40.0, 1000, 200
    raw = copy.deepcopy(tiny_config)
    raw["stages"] = [{"img_size": 64, "batch_size": 10, "epochs": 2, "mixup": "off"}]
    raw = choose_plan(raw, SPEEDS, budget_s, 64, images, val_images, 64).raw
    now = [SPEEDS.start_s]
    replanner = Replanner(SPEEDS, budget_s, 0.0, images, val_images, clock=lambda: now[0])
    run_plan = plan_run(parse_config(raw).stages, images)
    previous = None
    for epoch in run_plan.epochs[:-1]:
        replanner.epoch_start(epoch.stage, epoch.epoch)
        now[0] += SPEEDS.epoch_seconds(epoch, previous, val_images)
        previous = epoch
    last = run_plan.epochs[-1]
    progress = Progress(stage=last.stage, epoch=last.epoch)
    per_batch = slower * SPEEDS.train_seconds(64, last.images) / last.batches
    n, b = last.batches, 0
    while b < n:
        b += 1
        now[0] += per_batch
        if within and b % 2 == 0 and b < n:
            new = replanner.within(run_plan, raw, progress, b, b * per_batch)
            if new is not None:
                raw, run_plan = new, plan_run(parse_config(new).stages, images)
                n = run_plan.epochs[-1].batches
                assert n > b and run_plan.epochs[:-1] == plan_run(parse_config(raw).stages, images).epochs[:-1]
    now[0] += SPEEDS.val_seconds(64, val_images) + SPEEDS.epoch_s
    return now[0] / budget_s, last.batches, n


def test_a_last_epoch_that_runs_slow_is_shortened_inside_it(tiny_config):
    wall, planned, _ = _last_epoch_on_a_slower_clock(tiny_config, 2.0, within=False)
    assert wall > 1.05  # the epoch-end re-planner has nothing left to act on
    wall, planned, trained = _last_epoch_on_a_slower_clock(tiny_config, 2.0, within=True)
    assert abs(wall - 1) <= Replanner.SLACK + 0.005 and trained < planned, (wall, planned, trained)


def test_a_last_epoch_that_runs_fast_grows_up_to_a_whole_epoch(tiny_config):
    unplanned, planned, _ = _last_epoch_on_a_slower_clock(tiny_config, 0.5, within=False)
    wall, planned, trained = _last_epoch_on_a_slower_clock(tiny_config, 0.5, within=True)
    assert unplanned < wall <= 1.0 and planned < trained <= 100  # 100 batches: the whole epoch


def test_no_re_plan_inside_the_last_epoch_on_pace_or_before_a_quarter_of_it(tiny_config):
    wall, planned, trained = _last_epoch_on_a_slower_clock(tiny_config, 1.0, within=True)
    assert trained == planned and abs(wall - 1) <= Replanner.SLACK
    replanner = Replanner(SPEEDS, 40.0, 0.0, 1000, 200, clock=lambda: 39.0)
    replanner.epoch_start(0, 0)
    raw = copy.deepcopy(tiny_config)
    raw["stages"] = [{"img_size": 64, "batch_size": 10, "epochs": 1}]
    plan = plan_run(parse_config(raw).stages, 1000)  # 100 batches: 39 s in after 20 is far over
    assert replanner.within(plan, raw, Progress(stage=0, epoch=0), 20, 30.0) is None  # under a quarter
    assert replanner.within(plan, raw, Progress(stage=0, epoch=0), 30, 30.0) is not None


def _cut_last_epoch(plan, raw: dict, progress: Progress, batches_done: int, seconds: float) -> dict | None:
    """A scripted re-plan inside the last epoch: after its 2nd batch, half of it (3 of 6 batches)."""
    if (progress.stage, progress.epoch, batches_done) != (1, 1, 2):
        return None
    raw = copy.deepcopy(raw)
    raw["stages"][-1]["last_epoch_share"] = 0.5
    return raw


@pytest.mark.slow
def test_a_last_epoch_re_planned_inside_it_ends_its_schedule_and_resumes_bit_exact(tiny_config, tmp_path, capsys):
    tiny_config["train"]["size_jumps"] = "off"
    tiny_config["run"].update(checkpoint_every=0, log_every=1)  # a checkpoint at every update
    tiny_config["stages"][1].update(epochs=2)  # 40 images, batch 6: 6 batches an epoch
    cfg = parse_config(tiny_config)
    whole = run_training(cfg, out_dir=tmp_path / "whole", hooks=RunHooks(replan_within=_cut_last_epoch))
    assert "re-planned in stage 1 epoch 1 at batch 2: epochs per stage [2, 2] -> [2, 1.5]" in capsys.readouterr().out
    records = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    batches = [(r["stage"], r["epoch"]) for r in records if r["kind"] == "batch"]
    assert [batches.count((1, e)) for e in (0, 1)] == [6, 3]
    assert [e["batches"] for e in json.loads((whole / "plan.json").read_text())] == [5, 5, 6, 3]
    assert yaml.safe_load((whole / "config.yaml").read_text())["stages"][-1]["last_epoch_share"] == 0.5
    floor = cfg.train.optimizer.lr / cfg.train.schedule.div_factor / cfg.train.schedule.final_div_factor
    stage1_lr = [r["lr"] for r in records if r["kind"] == "batch" and r["stage"] == 1]
    assert stage1_lr[-1] == pytest.approx(floor, rel=1e-3)  # the shortened curve ends with the last update
    last = Checkpoint.read(whole / "checkpoints" / "last.pt")
    assert last.run_progress.replans == [{"stage": 1, "epoch": 1, "batch": 2, "epochs": [2, 1.5]}]

    saves = []

    def die(paths):  # killed at the checkpoint right after the re-plan (its 2nd batch), config.yaml not rewritten
        saves.append(paths)
        if len(saves) == 5 + 5 + 6 + 2:
            raise Killed

    with pytest.raises(Killed):
        run_training(cfg, out_dir=tmp_path / "killed", hooks=RunHooks(after_save=die, replan_within=_cut_last_epoch))
    (killed,) = (tmp_path / "killed").iterdir()
    assert "last_epoch_share" not in yaml.safe_load((killed / "config.yaml").read_text())["stages"][-1]
    resumed = run_training(cfg, resume=killed)
    a = Checkpoint.read(whole / "checkpoints" / "last.pt").state_dict
    b = Checkpoint.read(resumed / "checkpoints" / "last.pt").state_dict
    assert all(torch.equal(a[key], b[key]) for key in a)  # the resume trained the epoch as re-planned
    assert yaml.safe_load((resumed / "config.yaml").read_text())["stages"][-1]["last_epoch_share"] == 0.5
