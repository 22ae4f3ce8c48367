"""Smooth size changes: ramps, a schedule over the whole run, BatchNorm re-estimation, validation size."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch.optim.lr_scheduler import OneCycleLR

import pipeline.train.step as step_mod
from pipeline.cli import main
from pipeline.config import ScheduleConfig, parse_config
from pipeline.report import format_summary
from pipeline.train.checkpoint import load_checkpoint, rng_state
from pipeline.train.loop import reestimate_bn
from pipeline.train.plan import plan_run
from pipeline.train.run import run_training
from pipeline.train.schedule import build_scheduler
from pipeline.train.step import Precision

from conftest import Killed, die_after_saves

CPU = torch.device("cpu")


def records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def with_stages(tiny_config: dict, stages: list[dict], **train) -> dict:
    cfg = copy.deepcopy(tiny_config)
    cfg["stages"] = stages
    cfg["train"].update(train)
    return cfg


@pytest.mark.parametrize(
    "size, epochs, sizes",
    [
        ([32, 64], 5, [32, 40, 48, 56, 64]),
        ([32, 64], 3, [32, 48, 64]),
        ([16, 24], 4, [16, 16, 24, 24]),  # 18.7 and 21.3 round to multiples of 8
        ([20, 30], 2, [20, 30]),  # the ends are kept as written
        (64, 3, [64, 64, 64]),
    ],
)
def test_a_ramp_steps_the_size_per_epoch(tiny_config, size, epochs, sizes):
    cfg = parse_config(with_stages(tiny_config, [{"img_size": size, "batch_size": 8, "epochs": epochs}]))
    assert [e.img_size for e in plan_run(cfg.stages, 40).epochs] == sizes


@pytest.mark.parametrize(
    "stage, message",
    [
        ({"img_size": [64, 32]}, "stages.0.img_size: a ramp grows: [start, end] with start < end, got [64, 32]"),
        ({"img_size": [16, 24, 32]}, "stages.0.img_size: a size, or [start, end] for a ramp"),
        ({"img_size": [16, 0]}, "stages.0.img_size.1: must be a positive integer, got 0"),
        ({"val_size": "big"}, "stages.0.val_size: must be an integer, got 'big'"),
        ({"schedule": {"scope": "run"}}, "stages.0.schedule.scope: set for the whole run, in train.schedule.scope"),
    ],
)
def test_bad_sizes_and_scopes_are_one_line(tiny_config, write_yaml, capsys, stage, message):
    cfg = copy.deepcopy(tiny_config)
    cfg["stages"][0].update(stage)
    assert main(["run", str(write_yaml(cfg))]) == 2
    assert capsys.readouterr().err.strip().startswith(f"error: {message}")


def test_a_run_wide_schedule_refuses_a_stage_schedule(tiny_config, write_yaml, capsys):
    cfg = copy.deepcopy(tiny_config)
    cfg["train"]["schedule"] = {"scope": "run"}
    cfg["stages"][1]["schedule"] = {"name": "cosine"}
    assert main(["run", str(write_yaml(cfg))]) == 2
    assert "stages.1.schedule: with train.schedule.scope: run one schedule spans every stage" in capsys.readouterr().err


def lrs_over(optimizer: torch.optim.Optimizer, scheduler, steps: int) -> list[float]:
    """The LR of each of `steps` optimizer steps, as the run logs it (before the step)."""
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def onecycle_curve(total: int, peak: float, pct_start: float = 0.25) -> list[float]:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak, momentum=0.9)
    scheduler = OneCycleLR(
        optimizer, max_lr=peak, total_steps=total, pct_start=pct_start, div_factor=25, final_div_factor=1e4
    )
    return lrs_over(optimizer, scheduler, total)


def test_a_run_wide_onecycle_spans_every_stage_whatever_its_batch(tiny_config, tmp_path):
    cfg = copy.deepcopy(tiny_config)
    cfg["train"]["schedule"] = {"scope": "run"}
    cfg["stages"][1]["accum_steps"] = 2  # stage 1: batches of 6, two per update
    run_dir = run_training(parse_config(cfg), out_dir=tmp_path)
    steps = records(run_dir, "batch")
    per_update = [r["lr"] for r in steps if r["stage"] == 0] + [r["lr"] for r in steps if r["stage"] == 1][::2]
    assert len(per_update) == 10 + 3  # 2 epochs x 5 updates, then 6 batches / 2
    assert per_update == pytest.approx(onecycle_curve(13, 0.05))  # one curve: no second warm-up at stage 1
    moms = [r["momentum"] for r in steps]
    assert moms[0] == pytest.approx(0.95) and moms[-1] == pytest.approx(0.95, abs=0.01)


def test_a_stage_schedule_starts_again_at_each_stage(tiny_config, tmp_path):
    run_dir = run_training(parse_config(tiny_config), out_dir=tmp_path)
    steps = records(run_dir, "batch")
    assert [r["lr"] for r in steps if r["stage"] == 0] == pytest.approx(onecycle_curve(10, 0.05))
    assert [r["lr"] for r in steps if r["stage"] == 1] == pytest.approx(onecycle_curve(6, 0.05, pct_start=2 / 6))


@pytest.mark.parametrize("name", ["cosine", "multistep"])
def test_a_run_wide_curve_continues_across_the_boundary(name):
    """A stage's part of a run-wide curve is the curve from its offset on."""
    model = torch.nn.Linear(2, 2)

    def lrs(total, offset, steps):
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scheduler = build_scheduler(optimizer, ScheduleConfig(name=name, warmup_epochs=1), total, 4, offset)
        return lrs_over(optimizer, scheduler, steps)

    whole = lrs(20, 0, 20)
    assert lrs(20, 0, 8) + lrs(20, 8, 12) == pytest.approx(whole)


@pytest.mark.parametrize("scope", ["run", "stage"])
def test_resume_mid_stage_is_exact_under_both_scopes(tiny_config, tmp_path, scope, reference_run):
    cfg = with_stages(
        tiny_config,
        [{"img_size": [16, 24], "batch_size": 8, "epochs": 3}, {"img_size": 24, "batch_size": 6, "epochs": 1}],
        schedule={"scope": scope, "name": "cosine", "warmup_epochs": 1},
        bn_reestimate=16,
    )
    cfg["run"].update(checkpoint_every=0, log_every=1)
    reference = reference_run(cfg)
    with pytest.raises(Killed):
        run_training(parse_config(cfg), out_dir=tmp_path / "b", hooks=die_after_saves(9))  # stage 0, epoch 1
    (run_dir,) = (tmp_path / "b").iterdir()
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["progress"]["batch"] > 0
    run_training(parse_config(cfg), resume=run_dir)
    a = load_checkpoint(reference / "checkpoints" / "last.pt")
    b = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    for name in a["state_dict"]:
        assert torch.equal(a["state_dict"][name], b["state_dict"][name]), name
    assert [(r["lr"], r["loss"]) for r in records(reference, "batch")] == [
        (r["lr"], r["loss"]) for r in records(run_dir, "batch")
    ]


def test_a_ramp_compiles_one_graph_per_size_and_no_more(tiny_config, tmp_path, monkeypatch):
    counter = CompileCounter()
    monkeypatch.setattr(step_mod, "COMPILE_BACKEND", counter)
    torch._dynamo.reset()
    cfg = with_stages(tiny_config, [{"img_size": [16, 32], "batch_size": 8, "epochs": 3}], compile="on")
    run_dir = run_training(parse_config(cfg), out_dir=tmp_path)
    torch._dynamo.reset()
    epochs = records(run_dir, "epoch")
    assert [r["img_size"] for r in epochs] == [16, 24, 32] and [r["val_size"] for r in epochs] == [16, 24, 32]
    plan = plan_run(parse_config(cfg).stages, 40)
    assert counter.frame_count == plan.compiled_shapes() == 6  # a training and an evaluation graph per size
    (row,) = json.loads((run_dir / "summary.json").read_text())["stages"]
    assert (row["start_size"], row["img_size"]) == (16, 32)
    assert format_summary({"stages": [row], "seconds": 1, "final_val_top1": 0, "best_val_top1": 0}).splitlines()[
        2
    ].split()[:2] == ["0", "16-32"]


def test_validation_can_run_larger_than_training(tiny_config, tmp_path):
    cfg = with_stages(tiny_config, [{"img_size": 16, "batch_size": 8, "epochs": 1, "val_size": 24}])
    run_dir = run_training(parse_config(cfg), out_dir=tmp_path)
    (epoch,) = records(run_dir, "epoch")
    assert (epoch["img_size"], epoch["val_size"], epoch["val_samples"]) == (16, 24, 20)
    assert json.loads((run_dir / "plan.json").read_text())[0]["val_size"] == 24


def bn_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3),
        torch.nn.BatchNorm2d(4),  # frozen below: keeps its statistics
    )


def test_bn_reestimation_changes_the_running_statistics_and_nothing_else():
    model = bn_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    optimizer.step()
    model[4].eval()  # a frozen BatchNorm layer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt_before = copy.deepcopy(optimizer.state_dict())
    rng = rng_state(CPU)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 12, 12, generator=g) * 3 + 1, None) for _ in range(5)]
    used = reestimate_bn(model, batches, 12, Precision(None), torch.device("cpu"))
    after = model.state_dict()
    assert used == 12  # three batches of four
    expected = torch.cat([model[0](x) for x, _ in batches[:3]]).mean(dim=(0, 2, 3))
    assert torch.allclose(after["1.running_mean"], expected.detach(), atol=1e-5)
    assert not torch.allclose(after["1.running_var"], before["1.running_var"])
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"1.running_mean", "1.running_var"}  # weights, the frozen layer, the batch counts kept
    assert model[1].momentum == 0.1 and model[1].training and not model[4].training
    for key, state in optimizer.state_dict()["state"].items():
        assert torch.equal(state["momentum_buffer"], opt_before["state"][key]["momentum_buffer"])
    now = rng_state(CPU)
    assert torch.equal(now["torch"], rng["torch"]) and now["python"] == rng["python"]


def test_a_run_reestimates_bn_where_the_size_changes(tiny_config, tmp_path):
    cfg = with_stages(
        tiny_config,
        [{"img_size": 16, "batch_size": 8, "epochs": 1}, {"img_size": 24, "batch_size": 8, "epochs": 1}],
        mixup="off",
    )
    plain = run_training(parse_config(cfg), out_dir=tmp_path / "a")
    cfg["train"]["bn_reestimate"] = 16
    reestimated = run_training(parse_config(cfg), out_dir=tmp_path / "b")
    a, b = records(plain, "batch"), records(reestimated, "batch")
    # training uses batch statistics: the same losses throughout; the running statistics differ
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    sa = load_checkpoint(plain / "checkpoints" / "stage0.pt")["state_dict"]
    sb = load_checkpoint(reestimated / "checkpoints" / "stage0.pt")["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # nothing happens before the first size change
    la = load_checkpoint(plain / "checkpoints" / "last.pt")["state_dict"]
    lb = load_checkpoint(reestimated / "checkpoints" / "last.pt")["state_dict"]
    differ = {k for k in la if not torch.equal(la[k], lb[k])}
    assert differ and all("running_" in k for k in differ)
