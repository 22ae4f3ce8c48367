"""`pipeline.train.run` end to end on tiny data: outputs, schedules, carried weights, resume, AMP, compile."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch._dynamo.testing import CompileCounter

import pipeline.train.step as step_mod
from pipeline.cli import main
from pipeline.config import load_config, parse_config
from pipeline.train.checkpoint import load_checkpoint
from pipeline.train.plan import plan_run
from pipeline.train.run import RunHooks, run_training

from conftest import Killed, die_after_saves

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = [
    "tv2",
    pytest.param("dali", marks=pytest.mark.skipif(not importlib.util.find_spec("nvidia.dali"), reason="no DALI")),
]


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def train(cfg: dict, tmp_path: Path, resume: Path | None = None, hooks: RunHooks | None = None) -> Path:
    return run_training(parse_config(cfg), out_dir=tmp_path / "runs", resume=resume, hooks=hooks)


def test_run_writes_the_run_folder(tiny_config, tmp_path):
    run_dir = train(tiny_config, tmp_path)
    assert run_dir.parent == tmp_path / "runs" and run_dir.name.startswith("t-")
    ckpts = {p.name for p in (run_dir / "checkpoints").iterdir()}
    assert {"last.pt", "best.pt", "stage0.pt", "stage1.pt"} <= ckpts
    assert not [p for p in ckpts if p.endswith(".tmp")]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [(s["img_size"], s["batch_size"], s["epochs"]) for s in summary["stages"]] == [(16, 8, 2), (24, 6, 1)]
    for s in summary["stages"]:
        assert s["seconds"] > 0 and s["train_images_per_s"] > 0 and 0 <= s["val_top1"] <= 100
    assert summary["final_val_top1"] == summary["stages"][-1]["val_top1"]
    assert summary["best_val_top1"] == max(r["val_top1"] for r in records(run_dir, "epoch"))
    epochs = records(run_dir, "epoch")
    assert [(r["stage"], r["epoch"]) for r in epochs] == [(0, 0), (0, 1), (1, 0)]
    assert all(r["val_samples"] == 20 for r in epochs)  # every validation image counted once
    step = records(run_dir, "batch")[0]
    assert {"lr", "momentum", "loss", "images_per_s"} <= set(step)
    config = (run_dir / "config.yaml").read_text()
    assert "test_resnet" in config and "img_size: 24" in config


def test_checkpoint_loads_with_plain_timm(tiny_config, tmp_path):
    run_dir = train(tiny_config, tmp_path)
    path = run_dir / "checkpoints" / "last.pt"
    model = timm.create_model("test_resnet", num_classes=10, checkpoint_path=str(path))
    saved = load_checkpoint(path)
    assert saved["progress"]["stage"] == 1 and saved["progress"]["epoch"] == 1
    assert {"optimizer", "scheduler", "scaler", "rng", "state_dict"} <= set(saved)
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved["state_dict"][k]), k


def test_scheduler_runs_exactly_its_steps_for_any_batch_size(tiny_config, tmp_path):
    cfg = copy.deepcopy(tiny_config)
    # 40 images: 7 with Mixup becomes 6 (even) -> 6 steps; 9 without Mixup -> 4 steps (last batch dropped)
    cfg["stages"] = [
        {"img_size": 16, "batch_size": 7, "epochs": 2},
        {"img_size": 16, "batch_size": 9, "epochs": 3, "mixup": "off"},
    ]
    run_dir = train(cfg, tmp_path)
    steps = records(run_dir, "batch")
    for stage, per_epoch, epochs in ((0, 6, 2), (1, 4, 3)):
        lrs = [r["lr"] for r in steps if r["stage"] == stage]
        assert len(lrs) == per_epoch * epochs
        peak = 0.05
        assert lrs[0] == pytest.approx(peak / 25)  # OneCycle starts at max_lr / div_factor
        assert max(lrs) == pytest.approx(peak, rel=0.05)
        # the last step's lr sits at the end of the cycle, not part-way
        assert lrs[-1] < peak / 25
    moms = [r["momentum"] for r in steps if r["stage"] == 0]
    assert moms[0] == pytest.approx(0.95) and min(moms) == pytest.approx(0.85, abs=0.01)


def test_weights_are_carried_across_stages(tiny_config, tmp_path):
    starts = []

    def spy(parts):  # once per stage, before its first step
        starts.append({k: v.clone() for k, v in parts.train_net.state_dict().items()})

    run_dir = train(tiny_config, tmp_path, hooks=RunHooks(stage_built=spy))
    assert len(starts) == 2
    end_of_stage0 = load_checkpoint(run_dir / "checkpoints" / "stage0.pt")["state_dict"]
    for k, v in end_of_stage0.items():
        assert torch.equal(starts[1][k], v), k  # stage 1 begins with stage 0's weights and BN stats
    assert any(not torch.equal(starts[0][k], v) for k, v in end_of_stage0.items())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("saves_before_kill", [1, 2])  # mid-stage (stage 0, epoch 1) and at a stage boundary
def test_resume_continues_where_it_stopped(tiny_config, tmp_path, saves_before_kill, backend):
    tiny_config["data"]["backend"] = backend
    reference = train(tiny_config, tmp_path / "a")
    final = load_checkpoint(reference / "checkpoints" / "last.pt")["state_dict"]

    with pytest.raises(Killed):
        train(tiny_config, tmp_path / "b", hooks=die_after_saves(saves_before_kill))
    (run_dir,) = (tmp_path / "b" / "runs").iterdir()
    stopped = load_checkpoint(run_dir / "checkpoints" / "last.pt")["progress"]
    assert (stopped["stage"], stopped["epoch"]) == ((0, 1) if saves_before_kill == 1 else (0, 2))

    started = []
    hooks = RunHooks(epoch_start=lambda k, epoch: started.append((k, epoch)))
    run_training(load_config(run_dir / "config.yaml"), resume=run_dir, hooks=hooks)  # as `run --resume` does
    assert started[0] == ((0, 1) if saves_before_kill == 1 else (1, 0))
    resumed = load_checkpoint(run_dir / "checkpoints" / "last.pt")["state_dict"]
    for k, v in final.items():
        assert torch.equal(resumed[k], v), k  # bit-exact with the uninterrupted run on CPU
    assert [r["val_top1"] for r in records(run_dir, "epoch")] == [r["val_top1"] for r in records(reference, "epoch")]
    assert len(records(run_dir, "batch")) == len(records(reference, "batch"))


def test_resume_refuses_changes_to_what_was_trained(tiny_config, tmp_path, capsys):
    run_dir = train(tiny_config, tmp_path)
    capsys.readouterr()  # drop the progress bars of the first run
    for setting, field in [
        ("stages.0.epochs=5", "stages.0.epochs"),
        ("train.optimizer.lr=0.01", "train.optimizer.lr"),
        ("model.arch=resnet18", "model.arch"),
    ]:
        assert main(["run", "--resume", str(run_dir), "--set", setting]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {field}: cannot change on resume"), err
    # run settings and stages not begun yet may change: here, one more stage is added to a finished run
    extra = "stages=" + json.dumps([*tiny_config["stages"], {"img_size": 16, "batch_size": 8, "epochs": 1}])
    assert main(["run", "--resume", str(run_dir), "--set", "run.log_every=7", "--set", extra]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary["stages"]) == 3 and (run_dir / "checkpoints" / "stage2.pt").is_file()


def test_last_checkpoint_is_written_after_best_and_stage(tiny_config, tmp_path):
    calls = []
    train(tiny_config, tmp_path, hooks=RunHooks(after_save=lambda paths: calls.append([p.name for p in paths])))
    assert len(calls) == 3 and all(names[-1] == "last.pt" for names in calls)
    assert "stage0.pt" in calls[1] and "stage1.pt" in calls[2]


def test_torn_metrics_line_is_dropped_on_resume(tmp_path):
    from pipeline.report import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "epoch", "stage": 0, "epoch": 0}\n{"kind": "epoch", "stage": 0, "epoch": 1}\n{"kin')
    MetricsLog.keep_before(path, 0, 1)
    assert path.read_text() == '{"kind": "epoch", "stage": 0, "epoch": 0}\n'


def test_unwritable_out_dir_is_a_config_error(tiny_config, write_yaml, capsys):
    blocker = write_yaml(tiny_config).parent / "a_file"
    blocker.write_text("")
    assert main(["run", str(write_yaml(tiny_config)), "--out", str(blocker / "runs")]) == 2
    assert capsys.readouterr().err.startswith("error: run.out_dir: cannot create")


@pytest.mark.parametrize("amp,scaler", [("bf16", False), ("fp16", True), ("off", False)])
def test_amp_uses_a_scaler_only_for_fp16(tiny_config, tmp_path, amp, scaler):
    cfg = copy.deepcopy(tiny_config)
    cfg["train"]["amp"] = amp
    # 32px: at 16px the last stage is 1x1, where CPU bf16 convolution backward returns NaN (a torch quirk)
    cfg["stages"] = [{"img_size": 32, "batch_size": 8, "epochs": 1}]
    run_dir = train(cfg, tmp_path)
    saved = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert (saved["scaler"] is not None) == scaler
    assert step_mod.resolve_precision(amp, torch.device("cpu")).needs_scaler == scaler
    assert step_mod.resolve_precision("auto", torch.device("cpu")).dtype is None


def test_compile_adds_one_graph_per_shape(tiny_config, tmp_path, monkeypatch):
    counter = CompileCounter()
    monkeypatch.setattr(step_mod, "COMPILE_BACKEND", counter)
    torch._dynamo.reset()
    cfg = copy.deepcopy(tiny_config)
    cfg["train"]["compile"] = "on"
    # 20 val images in batches of 8 and 6: the last val batch is partial in both stages
    run_dir = train(cfg, tmp_path)
    torch._dynamo.reset()
    # per stage one training and one evaluation graph, and one more: 16 -> 24 px is a size jump, so stage 0
    # trains a share of its batches at 24 px; the plan counts every one of them
    planned = plan_run(parse_config(cfg).stages, train_size=40)
    assert counter.frame_count == 5 == planned.compiled_shapes() and run_dir.is_dir()


def test_cli_bad_input_is_one_line_and_exit_2(tiny_config, write_yaml):
    cfg = copy.deepcopy(tiny_config)
    cfg["stages"][1]["batch_size"] = 64
    path = write_yaml(cfg)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(path), "--set", "run.out_dir=" + str(path.parent / "runs")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: stages.1.batch_size: 64 is larger than the training set "
        f"(40 images in {cfg['data']['train']}); use at most 40"
    ]
    assert not (path.parent / "runs").exists() or not any((path.parent / "runs").iterdir())


@pytest.mark.parametrize(
    "args,message",
    [
        (["run", "nope.yaml"], "error: nope.yaml: no such file"),
        (["run", "X", "--set", "train.optimizer.lr=-1"], "error: train.optimizer.lr: must be > 0"),
        (["run", "X", "--set", "run.device=cuda"], "error: run.device: cuda was asked for"),
        (["run", "X", "--resume", "/no/run"], "error: --resume /no/run: not a run folder"),
        (["run"], "error: run: give a stages file"),
    ],
)
def test_cli_errors(tiny_config, write_yaml, capsys, args, message):
    if torch.cuda.is_available() and "run.device=cuda" in args:
        pytest.skip("CUDA is present")
    path = write_yaml(tiny_config)
    args = [str(path) if a == "X" else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err


@pytest.mark.slow
def test_inductor_compiled_run_matches_eager_closely(tiny_config, tmp_path):
    cfg = copy.deepcopy(tiny_config)
    cfg["stages"] = [{"img_size": 16, "batch_size": 8, "epochs": 1, "mixup": "off"}]
    eager = train(cfg, tmp_path / "eager")
    cfg["train"]["compile"] = "on"
    torch._dynamo.reset()
    compiled = train(cfg, tmp_path / "compiled")
    torch._dynamo.reset()
    a, b = records(eager, "batch"), records(compiled, "batch")
    assert len(a) == len(b)
    # same weights and batches: compiled kernels reorder float sums, so losses agree to rounding only
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-3, abs=1e-4)


def test_checks_before_training_name_the_field(tiny_config, write_yaml, capsys):
    cfg = copy.deepcopy(tiny_config)
    cfg["model"]["arch"] = "vit_tiny_patch16_224"  # a fixed 224px input
    assert main(["run", str(write_yaml(cfg))]) == 2
    assert capsys.readouterr().err.startswith("error: stages.0.img_size: model.arch 'vit_tiny_patch16_224' cannot")
    cfg = copy.deepcopy(tiny_config)
    cfg["train"]["optimizer"]["name"] = "bnbsgd"  # needs bitsandbytes and CUDA
    assert main(["run", str(write_yaml(cfg))]) == 2
    assert capsys.readouterr().err.startswith("error: train.optimizer.name: 'bnbsgd' cannot be used here")


def test_resume_refuses_a_changed_dataset(tiny_config, tiny_data, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    cfg = copy.deepcopy(tiny_config)
    cfg["data"].update(train=str(data / "train"), val=str(data / "val"))
    run_dir = train(cfg, tmp_path)
    capsys.readouterr()
    for split in ("train", "val"):
        shutil.copytree(data / split / "ring_vstripes", data / split / "star_vstripes")
    assert main(["run", "--resume", str(run_dir)]) == 2
    assert "error: data.train: the class folders of" in capsys.readouterr().err
