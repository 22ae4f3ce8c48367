"""The start-size probe of `plan --budget`: which size it keeps, how many images the budget lets it
train on, a real probe on tiny data, and the plan it leads to."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import pipeline.budget as budget
import pipeline.probe as probe
from pipeline.config import parse_config
from pipeline.data import scan_datasets
from pipeline.probe import ProbeResult, probe_images, probe_sizes
from pipeline.speeds import Speeds
from pipeline.train.plan import format_epochs
from tests.test_budget import raw_config

# speeds where a ramp pays in time: a step costs by the pixels, nothing else costs anything
FAST = Speeds(
    train={32: 800.0, 48: 400.0, 64: 200.0}, val={32: 1e5, 48: 1e5, 64: 1e5}, new_size_s=0.0, epoch_s=0.0, start_s=0.0
)


@pytest.mark.parametrize(
    "top1,start",
    [
        ({32: 98.2, 48: 95.2, 64: 93.7}, 32),  # short training favours small sizes: the smallest is kept
        ({32: 11.0, 48: 44.0, 64: 43.2}, 48),  # the classes are lost at 32 px, kept at 48
        ({32: 7.2, 48: 38.0, 64: 43.2}, 64),  # lost below the final size (the demo, seed 0): no ramp
        ({32: 77.9, 48: 78.0, 64: 80.0}, 48),  # 2.0 points under: kept; 2.1 under: not
    ],
)
def test_the_probe_keeps_the_smallest_size_within_two_points_of_the_final_size(top1, start):
    result = ProbeResult(top1, 1000, 12.0, 10)
    assert result.start(64) == start
    line = result.line(64)
    if start == 64:
        assert line.startswith("every epoch at 64 px: smaller sizes lose the classes here")
    else:
        assert line.startswith(f"a ramp from {start} px: the smallest size within 2 points of 64 px")
    assert "a short training on 1000 of the images (4 epochs at each size, 12 s)" in line
    assert all(f"{s} px {t:.1f}%" in line for s, t in top1.items())


def test_a_probe_that_learned_nothing_keeps_no_smaller_size():
    # the digits task, seed 0: all within 10 points of chance (10%), where one seed to the next moves 4
    result = ProbeResult({32: 10.8, 48: 15.0, 64: 14.6}, 1000, 30.0, 10)
    assert result.start(64) == 64
    assert result.line(64).startswith("every epoch at 64 px: the probe learned too little to tell")
    assert ProbeResult({32: 20.0, 48: 11.0, 64: 10.5}, 200, 3.0, 10).start(64) == 32


def test_the_probe_samples_what_its_share_of_the_budget_pays_for():
    # 1 ms an image at all sizes together, 4 epochs: 4 ms an image
    assert probe_images(10.0, 0.001, 5000) == 1000  # 2,500 affordable: capped at PROBE_IMAGES
    assert probe_images(2.0, 0.001, 5000) == 500
    assert probe_images(0.5, 0.001, 5000) == 0  # 125 images would say nothing
    assert probe_images(0.5, 0.001, 100) == 100  # ... unless that is the whole training set


def test_a_probe_on_tiny_data_trains_at_each_size_and_repeats(tiny_config):
    cfg = parse_config(tiny_config)
    datasets = scan_datasets(cfg.data)

    first = probe_sizes(cfg, datasets, 10, [16, 24], 24, 32, torch.device("cpu"))
    assert sorted(first.top1) == [16, 24] and first.images == 32 and first.seconds > 0
    assert all(0.0 <= t <= 100.0 for t in first.top1.values())
    again = probe_sizes(cfg, datasets, 10, [16, 24], 24, 32, torch.device("cpu"))
    assert again.top1 == first.top1  # seeded: the same sample, weights and order


@pytest.mark.parametrize(
    "top1,trained",
    [
        ({32: 80.0, 48: 79.0, 64: 79.5}, [64, 32]),  # 32 px keeps the classes: 48 px could not move the start
        ({32: 11.0, 48: 44.0, 64: 43.2}, [64, 32, 48]),  # lost at 32 px: 48 px is probed
        ({32: 7.2, 48: 38.0, 64: 43.2}, [64, 32, 48]),  # lost below the final size
        ({32: 12.0, 48: 25.0, 64: 11.0}, [64, 32, 48]),  # too near chance at 32 and 64 px to stop there
    ],
)
def test_the_probe_stops_at_the_smallest_size_that_keeps_the_classes(tiny_config, monkeypatch, top1, trained):
    cfg = parse_config(tiny_config)
    sizes = []

    def fake_top1(cfg, num_classes, data, size, device, seed=0):
        sizes.append(size)
        return top1[size]

    monkeypatch.setattr(probe, "_trained_top1", fake_top1)
    result = probe_sizes(cfg, scan_datasets(cfg.data), 10, [32, 48, 64], 64, 32, torch.device("cpu"))
    assert sizes == trained and sorted(result.top1) == sorted(trained)
    assert result.start(64) == ProbeResult(top1, 32, 1.0, 10).start(64)  # what probing every size keeps
    sizes.clear()
    every = probe_sizes(cfg, scan_datasets(cfg.data), 10, [32, 48, 64], 64, 32, torch.device("cpu"), every=True)
    assert sizes == [64, 32, 48] and every.top1 == top1  # benchmarks/size_probes.py's table: every size


def _plan(tiny_config, monkeypatch, budget_s: float, top1: dict[int, float] | None, start=None, speeds=FAST):
    monkeypatch.setattr(budget, "measure_speeds", lambda *args, **kwargs: speeds)
    calls = []

    def fake_probe(cfg, datasets, num_classes, sizes, final, images, device):
        calls.append((sorted(sizes), images))
        return ProbeResult(top1, images, 1.0, num_classes)

    monkeypatch.setattr(probe, "probe_sizes", fake_probe)
    plan, _ = budget.plan_budget(raw_config(tiny_config), budget_s, 64, start, log=lambda *args: None)
    return plan, calls


def test_where_the_ramp_pays_the_probe_chooses_its_start(tiny_config, monkeypatch):
    top1 = {32: 11.0, 48: 44.0, 64: 43.2}
    steep = Speeds({32: 3200.0, 48: 1600.0, 64: 200.0}, FAST.val, 0.0, 0.0, 0.0)  # 48 px pays too
    plan, calls = _plan(tiny_config, monkeypatch, 600.0, top1, speeds=steep)
    assert calls == [([32, 48, 64], 40)]  # the tiny set's 40 training images, at the measured sizes
    assert plan.raw["stages"][0]["img_size"] == [48, 64] and plan.raw["stages"][-1]["img_size"] == 64
    assert plan.reasons[0].startswith("a ramp from 48 px") and plan.probe_s > 0
    plan, _ = _plan(tiny_config, monkeypatch, 600.0, top1)  # here a ramp from 48 px buys too few epochs
    assert {s["img_size"] for s in plan.raw["stages"]} == {64} and plan.reasons[0].startswith("a ramp from 48 px")
    assert plan.reasons[1].startswith("every epoch at 64 px: a ramp from 48 px would fit")


def test_where_the_probe_says_small_sizes_lose_the_classes_every_epoch_is_at_the_final_size(tiny_config, monkeypatch):
    plan, calls = _plan(tiny_config, monkeypatch, 600.0, {32: 7.2, 48: 38.0, 64: 43.2})
    assert len(calls) == 1 and {s["img_size"] for s in plan.raw["stages"]} == {64}
    assert plan.reasons[0].startswith("every epoch at 64 px: smaller sizes lose the classes here")
    plan, _ = _plan(tiny_config, monkeypatch, 600.0, {32: 80.0, 48: 79.0, 64: 79.5})  # kept: both lines
    assert plan.raw["stages"][0]["img_size"] == [32, 64] and plan.reasons[0].startswith("a ramp from 32 px pays: ")
    assert plan.reasons[1].startswith("a ramp from 32 px: the smallest size within 2 points of 64 px")
    assert plan.reasons[2].startswith("a ramp from 32 px would fit") and plan.reasons[3].startswith(
        "the training images are about"
    )


def test_no_probe_for_a_given_start_nor_a_budget_too_short_for_it(tiny_config, monkeypatch):
    plan, calls = _plan(tiny_config, monkeypatch, 600.0, None, start=32)
    assert calls == [] and plan.raw["stages"][0]["img_size"] == [32, 64]  # --start-size: as given
    assert plan.probe_s == 0.0
    steep = Speeds({32: 3200.0, 48: 1600.0, 64: 200.0}, FAST.val, 0.0, 0.0, 0.0)  # 48 px pays too
    plan, calls = _plan(tiny_config, monkeypatch, 6.0, None, speeds=steep)  # 0.6 s for the probe: under 200
    assert calls == [] and plan.raw["stages"][0]["img_size"] == [48, 64]  # no training: a forward per size
    assert plan.reasons[0] == (
        "a ramp from 48 px: the budget is too short to probe whether smaller sizes keep the classes, so it "
        "starts at the smallest size where test_resnet's deepest feature map is 2x2 or wider (2x2; 1x1 at 32 px)"
    )


def test_a_budget_too_short_to_probe_starts_where_the_deepest_feature_map_is_2x2(tiny_config):
    cfg = parse_config(raw_config(tiny_config))
    assert probe.feature_sides(cfg, 3, [32, 48, 64, 128]) == {32: 1, 48: 2, 64: 2, 128: 4}  # a /32 network
    line, start = probe.unprobed_start(cfg, 3, [64, 96, 128])
    assert start == 64 and line.startswith("a ramp from 64 px: ") and line.endswith("(2x2)")
    line, start = probe.unprobed_start(cfg, 3, [16, 24, 32])  # 1x1 below 32 px: no smaller start
    assert start == 32 and line == (
        "every epoch at 32 px: the budget is too short to probe whether smaller sizes keep the classes"
    )
    vit = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, arch="vit_tiny_patch16_224"))
    assert probe.feature_sides(vit, 3, [64]) == {64: None}  # tokens, no map: nothing to read


def test_a_short_run_with_no_smaller_start_settles_half_at_the_final_size(tiny_config, monkeypatch):
    steep = Speeds({32: 3200.0, 48: 1600.0, 64: 200.0}, FAST.val, 0.0, 0.0, 0.0)  # a ramp pays in time
    monkeypatch.setattr(budget, "measure_speeds", lambda *args, **kwargs: steep)
    refused = "every epoch at 64 px: smaller sizes lose the classes here (made up)"
    lefts = []
    monkeypatch.setattr(probe, "probe_start", lambda *args: lefts.append(args[-1]) or (refused, 64))
    plan, _ = budget.plan_budget(raw_config(tiny_config), 1.1, 64, log=lambda *args: None)  # 5 epochs at 64 px
    stages = plan.raw["stages"]
    assert [s["img_size"] for s in stages] == [64, 64] and stages[-1]["mixup"] == "off"  # no size under 64 px
    assert 1 <= stages[0]["epochs"] <= stages[-1]["epochs"] and plan.length < budget.SHORT_EPOCHS
    assert plan.reasons[0] == "no ramp: smaller sizes lose the classes here (made up)"
    assert plan.reasons[1].startswith("a short run (") and plan.reasons[1].endswith(
        f": {stages[0]['epochs']} at 64 px, then the rest with the last stage's keys, "
        f"{format_epochs(plan.length)} epochs in all"
    )
    assert lefts == [0.0]  # a short run leaves the probe no time


def test_a_short_run_holds_the_size_where_the_feature_map_is_2x2_without_the_probe(tiny_config, monkeypatch):
    steep = Speeds({32: 3200.0, 48: 1600.0, 64: 200.0}, FAST.val, 0.0, 0.0, 0.0)  # a ramp pays in time
    monkeypatch.setattr(probe, "MIN_IMAGES", 1)  # a tenth of 1.1 s would pay for a probe on 4 images
    assert probe.probe_images(0.11, sum(1 / images_s for images_s in steep.train.values()), 40) == 4
    plan, calls = _plan(tiny_config, monkeypatch, 1.1, {32: 80.0, 48: 79.0, 64: 79.5}, speeds=steep)
    assert calls == []  # a short run (5.37 epochs fit at 64 px): no probe training
    stages = plan.raw["stages"]
    assert [s["img_size"] for s in stages] == [48, 64] and stages[0]["lr"] == 0.2 and stages[1]["mixup"] == "off"
    assert 1 <= stages[0]["epochs"] <= stages[1]["epochs"] and plan.seconds <= 1.1
    assert plan.reasons[0] == (
        "from 48 px: the budget is too short to probe whether smaller sizes keep the classes, so it "
        "starts at the smallest size where test_resnet's deepest feature map is 2x2 or wider (2x2; 1x1 at 32 px)"
    )
    assert plan.reasons[1] == (
        f"a short run (5.37 epochs fit at 64 px, under 8): {stages[0]['epochs']} at 48 px (8.00x the images/s of "
        f"64 px here), then the rest at 64 px with the last stage's keys, {format_epochs(plan.length)} epochs in all"
    )
