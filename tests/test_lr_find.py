"""The LR range test: divergence where theory puts it, suggestions below it, state left untouched."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import yaml
from torch._dynamo.testing import CompileCounter

import pipeline.train.step as step_mod
from pipeline.cli import main
from pipeline.commands.lr_find import run_lr_find
from pipeline.config import load_config, parse_config
from pipeline.train.range_test import find_lr, lr_at, range_test
from pipeline.train.run import run_training


def quadratic_problem(scale: float = 1.0):
    """Least squares: loss(w) = mean((Xw - y)^2) has Hessian 2 X^T X / n; SGD diverges above 2 / L."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g) * torch.linspace(0.2, 3.0, 8) * scale  # spread the curvatures
    y = x @ torch.randn(8, 1, generator=g) + 0.1 * scale * torch.randn(256, 1, generator=g)
    curvature = torch.linalg.eigvalsh(2 * x.T @ x / len(x)).max().item()
    model = torch.nn.Linear(8, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.0)

    def step(xb, yb):
        loss = torch.mean((model(xb) - yb) ** 2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.detach()

    return model, optimizer, step, [(x, y)], 2 / curvature


def range_test_on(scale: float):
    model, optimizer, step, batches, critical = quadratic_problem(scale)
    return range_test(step, optimizer, lambda: batches, start=1e-5, end=100.0, steps=200), critical


def test_quadratic_blows_up_where_theory_says():
    result, critical = range_test_on(1.0)
    assert "passed 4x" in result.stop_reason
    stop = result.lrs[-1]
    # Nothing diverges below 2/L: the loss only falls to its noise floor there.
    below = [loss for lr, loss in zip(result.lrs, result.losses) if lr < critical]
    assert all(b <= a * 1.001 for a, b in zip(below, below[1:]))
    # Above 2/L the top eigen-direction grows by (lr*L - 1) a step from a tiny residual; it needs about
    # 16 e-folds to show in the EMA, which the LR (rising 8.5% a step) reaches within 8x of 2/L.
    assert critical < stop < 8 * critical, (stop, critical)
    # The stop tracks the curvature: 4x the curvature (inputs x2) stops at a quarter of the LR, to a step.
    quarter, critical4 = range_test_on(2.0)
    assert critical4 == pytest.approx(critical / 4, rel=1e-4)
    assert quarter.lrs[-1] == pytest.approx(stop / 4, rel=0.1)
    assert result.recommendation == "valley"  # the loss fell clearly, so fastai's valley is the pick
    for name in ("valley", "steepest", "minimum"):
        assert result.suggestions[name] < critical, name  # below the divergence LR
    assert result.recommended == result.suggestions["valley"]
    assert all(math.isfinite(v) for v in result.losses + result.smoothed)


def test_smoothing_is_bias_corrected():
    losses = iter([5.0, 5.0, 5.0, 1.0] + [1.0] * 20)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    result = range_test(lambda x, y: torch.tensor(next(losses)), optimizer, lambda: [(None, None)], steps=10)
    assert result.smoothed[:3] == pytest.approx([5.0, 5.0, 5.0])  # an uncorrected EMA would start near 0.1
    beta, average = 0.98, 0.0
    for loss in (5.0, 5.0, 5.0, 1.0):
        average = beta * average + (1 - beta) * loss
    assert result.smoothed[3] == pytest.approx(average / (1 - beta**4))


def test_a_nan_loss_stops_the_test_and_is_not_recorded():
    values = iter([2.0, 1.9, 1.8, float("nan"), 1.0])
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    result = range_test(lambda x, y: torch.tensor(next(values)), optimizer, lambda: [(None, None)], steps=5)
    assert result.losses == pytest.approx([2.0, 1.9, 1.8]) and "nan" in result.stop_reason


def test_lr_schedules_hit_both_ends():
    assert lr_at(0, 11, 1e-6, 1.0, "exp") == pytest.approx(1e-6)
    assert lr_at(5, 11, 1e-6, 1.0, "exp") == pytest.approx(1e-3)
    assert lr_at(10, 11, 1e-6, 1.0, "exp") == pytest.approx(1.0)
    assert lr_at(5, 11, 0.0, 1.0, "linear") == pytest.approx(0.5)


def test_find_lr_leaves_model_optimizer_and_rng_bit_identical():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))

    def step(xb, yb):
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.detach()

    for _ in range(3):
        step(x, y)  # momentum buffers and BN statistics that must survive
    model_before = copy.deepcopy(model.state_dict())
    optim_before = copy.deepcopy(optimizer.state_dict())
    torch.manual_seed(123)
    result = find_lr(model, optimizer, step, lambda: [(x, y)], start=1e-4, end=10, steps=20)
    assert len(result.lrs) > 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, model_before[k]), k
    after = optimizer.state_dict()
    assert after["param_groups"] == optim_before["param_groups"]
    for k, state in optim_before["state"].items():
        assert torch.equal(after["state"][k]["momentum_buffer"], state["momentum_buffer"])
    rand = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(rand, torch.rand(3))  # the RNG is where it was before the test


def test_cli_writes_csv_png_and_applied_copy(tiny_config, write_yaml, tmp_path, capsys):
    path = write_yaml(tiny_config)
    original = path.read_bytes()
    args = ["lr-find", str(path), "--steps", "30", "--start", "1e-4", "--end", "100", "--out", str(tmp_path / "o")]
    assert main([*args, "--apply"]) == 0
    out = capsys.readouterr().out
    (folder,) = (tmp_path / "o").iterdir()
    rows = (folder / "lr_find.csv").read_text().splitlines()
    assert rows[0] == "step,lr,loss,smoothed_loss" and 5 < len(rows) <= 31
    assert (folder / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.read_bytes() == original  # the user's file is never rewritten
    applied = path.with_name("stages.lr-find.yaml")
    lr = float(out.split("recommended (")[1].split("lr ")[1].split(";")[0])
    cfg = load_config(applied)
    assert cfg.stages[0].train.optimizer.lr == pytest.approx(lr, rel=1e-2)
    assert cfg.stages[1].train.optimizer.lr == 0.05  # other stages keep theirs
    assert yaml.safe_load(applied.read_text())["stages"][0]["lr"] == pytest.approx(lr, rel=1e-2)


def test_apply_replaces_either_spelling_and_repeats_exactly(tiny_config, write_yaml, tmp_path, capsys):
    cfg = copy.deepcopy(tiny_config)
    cfg["stages"][0]["optimizer"] = {"lr": 0.2}
    path = write_yaml(cfg)
    args = ["lr-find", str(path), "--steps", "30", "--start", "1e-4", "--end", "100", "--apply"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    lr = float(out.split("recommended (")[1].split("lr ")[1].split(";")[0])
    assert load_config(path.with_name("stages.lr-find.yaml")).stages[0].train.optimizer.lr == pytest.approx(
        lr, rel=1e-2
    )
    assert main([*args, "--out", str(tmp_path / "b")]) == 0  # seeded: a second test draws the same batches
    (a,), (b,) = (tmp_path / "a").iterdir(), (tmp_path / "b").iterdir()
    assert (a / "lr_find.csv").read_text() == (b / "lr_find.csv").read_text()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--stage", "5"], "error: --stage 5: the file has stages 0 to 1"),
        (["--start", "1", "--end", "0.1"], "error: --start 1 / --end 0.1: need 0 < start < end <= 1e4"),
        (["--steps", "2"], "error: --steps 2: need at least 5"),
    ],
)
def test_cli_bad_arguments(tiny_config, write_yaml, capsys, args, message):
    assert main(["lr-find", str(write_yaml(tiny_config)), *args]) == 2
    assert capsys.readouterr().err.strip() == message


@pytest.mark.parametrize("amp,compile_", [("fp16", "off"), ("bf16", "off"), ("off", "on")])
def test_range_test_runs_with_amp_and_compile(tiny_config, tmp_path, monkeypatch, amp, compile_):
    counter = CompileCounter()
    monkeypatch.setattr(step_mod, "COMPILE_BACKEND", counter)
    torch._dynamo.reset()
    cfg = copy.deepcopy(tiny_config)
    cfg["train"].update(amp=amp, compile=compile_)
    cfg["stages"][0]["img_size"] = 32  # CPU bf16 convolution backward is NaN on 1x1 maps (torch quirk)
    result, _ = run_lr_find(parse_config(cfg), 0, tmp_path, start=1e-4, end=1.0, steps=8)
    torch._dynamo.reset()
    assert len(result.lrs) == 8 and all(math.isfinite(v) for v in result.losses)
    assert (counter.frame_count > 0) == (compile_ == "on")


def test_run_with_lr_find_uses_the_found_lr_per_stage(tiny_config, tmp_path):
    cfg = copy.deepcopy(tiny_config)
    cfg["train"]["optimizer"]["lr"] = "find"
    cfg["stages"][1]["lr"] = 0.02  # a stage may still set its own
    run_dir = run_training(parse_config(cfg), out_dir=tmp_path)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    found = [r for r in records if r["kind"] == "lr_find"]
    assert [r["stage"] for r in found] == [0]
    assert (run_dir / "lr_find_stage0.csv").is_file() and (run_dir / "lr_find_stage0.png").is_file()
    peak0 = max(r["lr"] for r in records if r["kind"] == "batch" and r["stage"] == 0)
    peak1 = max(r["lr"] for r in records if r["kind"] == "batch" and r["stage"] == 1)
    assert peak0 == pytest.approx(found[0]["lr"], rel=0.05) and peak1 == pytest.approx(0.02, rel=0.05)
