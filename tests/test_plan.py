"""The run plan: sizes, batches and optimizer updates per epoch, what the run does with it, and resume."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest

from pipeline.cli import main
from pipeline.config import parse_config
from pipeline.data import scan_datasets
from pipeline.report import read_metrics, run_curves
from pipeline.train.checkpoint import load_checkpoint, save_checkpoint
from pipeline.train.plan import format_duration, plan_run
from pipeline.train.run import RunHooks, run_training

from conftest import Killed, die_after_saves, make_loader

BACKENDS = [
    "tv2",
    pytest.param("dali", marks=pytest.mark.skipif(not importlib.util.find_spec("nvidia.dali"), reason="no DALI")),
]


def stages_of(tiny_config: dict, stages: list[dict]):
    cfg = copy.deepcopy(tiny_config)
    cfg["stages"] = stages
    return parse_config(cfg)


def test_plan_lists_every_epoch_with_its_size_batches_and_updates(tiny_config):
    cfg = stages_of(
        tiny_config,
        [
            {"img_size": 16, "batch_size": 8, "epochs": 2},
            {"img_size": 24, "batch_size": 6, "epochs": 1, "accum_steps": 2},
            {"img_size": 32, "batch_size": 7, "epochs": 1},  # Mixup pairs samples: 6 per batch
            {"img_size": 32, "batch_size": 7, "epochs": 1, "mixup": "off"},
        ],
    )
    plan = plan_run(cfg.stages, train_size=40)
    rows = [(e.stage, e.epoch, e.img_size, e.val_size, e.batch_per_process, e.batches, e.updates) for e in plan.epochs]
    assert rows == [
        (0, 0, 16, 16, 8, 5, 5),
        (0, 1, 16, 16, 8, 5, 5),
        (1, 0, 24, 24, 6, 6, 3),  # 40 // 6 batches, two per update
        (2, 0, 32, 32, 6, 6, 6),
        (3, 0, 32, 32, 7, 5, 5),
    ]
    assert [plan.stage_updates(k) for k in range(4)] == [10, 3, 6, 5] and plan.total_updates == 24
    assert plan.epoch(1, 0).images == 36
    assert [r["batches"] for r in plan.records()] == [5, 5, 6, 6, 5]


def test_plan_splits_the_global_batch_over_processes(tiny_config):
    cfg = stages_of(tiny_config, [{"img_size": 16, "batch_size": 8, "epochs": 1, "accum_steps": 3}])
    (one,) = plan_run(cfg.stages, train_size=41).epochs
    (two,) = plan_run(cfg.stages, train_size=41, world_size=2).epochs
    assert (one.batch_per_process, one.batches, one.updates, one.images) == (8, 5, 2, 40)
    assert (two.batch_per_process, two.batches, two.updates, two.images) == (4, 5, 2, 40)  # 20 per process


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_batches_are_what_the_loaders_yield(tiny_config, backend):
    cfg = stages_of(
        tiny_config,
        [{"img_size": 16, "batch_size": 8, "epochs": 1}, {"img_size": 16, "batch_size": 7, "epochs": 1}],
    )
    train = scan_datasets(cfg.data).train
    for world_size in (1, 2):
        plan = plan_run(cfg.stages, len(train), world_size)
        for k, stage in enumerate(cfg.stages):
            (epoch,) = plan.of_stage(k)
            for rank in range(world_size):
                loader = make_loader(
                    train, size=16, batch=epoch.batch_per_process, rank=rank, world_size=world_size, backend=backend
                )
                try:
                    assert len(loader) == epoch.batches == sum(1 for _ in loader)
                finally:
                    loader.close()


def test_each_stage_schedule_spans_its_planned_updates(tiny_config, tmp_path):
    tiny_config["stages"][1]["accum_steps"] = 2
    seen = []
    hooks = RunHooks(stage_built=lambda parts: seen.append((parts.index, parts.scheduler.total_steps)))
    run_dir = run_training(parse_config(tiny_config), out_dir=tmp_path, hooks=hooks)
    planned = json.loads((run_dir / "plan.json").read_text())
    assert seen == [(0, 10), (1, 3)]  # 2 epochs x 5 batches; 6 batches of 6, two per update
    assert [(e["stage"], e["epoch"], e["updates"]) for e in planned] == [(0, 0, 5), (0, 1, 5), (1, 0, 3)]
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [(r["stage"], r["epoch"]) for r in steps if r["kind"] == "batch"]
    assert [trained.count((e["stage"], e["epoch"])) for e in planned] == [e["batches"] for e in planned]


def test_resume_finds_the_same_plan(tiny_config, tmp_path):
    with pytest.raises(Killed):
        run_training(parse_config(tiny_config), out_dir=tmp_path, hooks=die_after_saves(1))
    (run_dir,) = tmp_path.iterdir()
    before = (run_dir / "plan.json").read_text()
    saved = load_checkpoint(run_dir / "checkpoints" / "last.pt")["plan"]
    assert main(["run", "--resume", str(run_dir)]) == 0
    assert (run_dir / "plan.json").read_text() == before
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["plan"] == saved == json.loads(before)


def test_resume_refuses_a_stage_whose_plan_changed(tiny_config, tmp_path, capsys):
    with pytest.raises(Killed):
        run_training(parse_config(tiny_config), out_dir=tmp_path, hooks=die_after_saves(1))  # stage 0, epoch 1
    (run_dir,) = tmp_path.iterdir()
    last = run_dir / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    state["plan"][0]["updates"] = 4  # as if stage 0 had been planned with other batches
    save_checkpoint([last], state)
    capsys.readouterr()
    assert main(["run", "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --resume: stage 0 was planned as 9 optimizer updates and would now take 10"), err


def test_a_run_in_the_earlier_layout_still_resumes(tiny_config, tmp_path):
    """Files of earlier versions: checkpoints without a plan, whose progress (and metrics.jsonl's batch
    records, `kind: step`) name the batch `step`. Made here from a checkpoint this version wrote."""
    with pytest.raises(Killed):
        run_training(parse_config(tiny_config), out_dir=tmp_path, hooks=die_after_saves(1))
    (run_dir,) = tmp_path.iterdir()
    last = run_dir / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    assert "batch" in state["progress"] and "step" not in state["progress"]
    del state["plan"]
    state["progress"]["step"] = state["progress"].pop("batch")
    save_checkpoint([last], state)
    metrics = run_dir / "metrics.jsonl"
    old = [json.loads(line) for line in metrics.read_text().splitlines()]
    for r in old:
        if r["kind"] == "batch":
            r["kind"], r["step"] = "step", r.pop("batch")
    metrics.write_text("".join(json.dumps(r) + "\n" for r in old))
    assert main(["run", "--resume", str(run_dir)]) == 0
    progress = load_checkpoint(last)["progress"]
    assert len(progress["stages"]) == 2 and "batch" in progress and "step" not in progress
    records = read_metrics(metrics)
    assert {r["kind"] for r in records} == {"batch", "epoch"}  # the old records read as today's
    ends = run_curves(records)["epoch_ends"]  # every epoch's end placed on the batch axis
    assert len(ends) == 3 and 0 < ends[0] < ends[1] < ends[2] == len(run_curves(records)["steps"])


def test_fraction_done_follows_the_work_of_each_epoch(tiny_config):
    plain = copy.deepcopy(tiny_config)
    plain["train"]["size_jumps"] = "off"  # a plain switch: each epoch at one size (mixed: tests/test_loop.py)
    cfg = stages_of(
        plain,
        [{"img_size": 16, "batch_size": 8, "epochs": 1}, {"img_size": 32, "batch_size": 8, "epochs": 1}],
    )
    plan = plan_run(cfg.stages, train_size=40)
    assert plan.fraction_done(0, 0) == 0.0
    assert plan.fraction_done(1, 0) == pytest.approx(0.2)  # 32px costs 4x the pixels of 16px
    assert plan.fraction_done(1, 0, batches_done=5) == pytest.approx(1.0)
    assert plan.fraction_done(0, 0, 2) < plan.fraction_done(0, 0, 3) < plan.fraction_done(1, 0, 1)


def test_format_duration():
    assert [format_duration(s) for s in (0.4, 42, 185, 3725)] == ["0 s", "42 s", "3 min 05 s", "1 h 02 min"]


def test_a_run_checks_every_planned_size_before_training(tiny_config, write_yaml, capsys):
    tiny_config["model"]["arch"] = "test_vit"  # a fixed input size
    assert main(["run", str(write_yaml(tiny_config))]) == 2
    assert "stages.1.img_size: model.arch 'test_vit' cannot take 24px" in capsys.readouterr().err  # 16 divides
