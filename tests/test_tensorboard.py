"""`run.tensorboard`: the run's records as TensorBoard scalars on one axis of batches, resumed runs
without duplicates, and one line when the package is missing."""

from __future__ import annotations

import importlib.util
import json

import pytest

from pipeline.cli import main
from pipeline.config import parse_config
from pipeline.train.run import run_training
from tests.conftest import Killed, die_after_saves

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def records(run_dir, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_a_run_writes_its_metrics_as_tensorboard_scalars(tiny_config, tmp_path):
    tiny_config["run"]["tensorboard"] = True
    run_dir = run_training(parse_config(tiny_config), out_dir=tmp_path)
    board, steps, epochs = scalars(run_dir), records(run_dir, "batch"), records(run_dir, "epoch")
    # stage 0: 2 epochs of 40 // 8 = 5 batches, stage 1: 1 epoch of 40 // 6 = 6 batches: one axis of 16
    assert [at for at, _ in board["train/loss"]] == list(range(16))
    assert [v for _, v in board["train/loss"]] == pytest.approx([r["loss"] for r in steps])
    assert [v for _, v in board["train/lr"]] == pytest.approx([r["lr"] for r in steps])
    assert [at for at, _ in board["val/top1"]] == [4, 9, 15]  # at each epoch's last batch
    assert [v for _, v in board["val/top1"]] == pytest.approx([r["val_top1"] for r in epochs])
    assert [v for _, v in board["size/train"]] == [16, 16, 24]
    assert {"val/loss", "val/top5", "train/images_per_s", "train/epoch_loss"} <= set(board)


def test_a_resumed_run_hides_what_the_crashed_one_logged_past_its_checkpoint(tiny_config, tmp_path):
    tiny_config["run"]["tensorboard"] = True
    cfg = parse_config(tiny_config)
    with pytest.raises(Killed):
        run_training(cfg, out_dir=tmp_path, hooks=die_after_saves(1))  # after epoch 0's checkpoint
    (run_dir,) = tmp_path.iterdir()
    run_training(cfg, resume=run_dir)
    board = scalars(run_dir)
    assert [at for at, _ in board["train/loss"]] == list(range(16))  # each batch once
    assert [at for at, _ in board["val/top1"]] == [4, 9, 15]


def test_tensorboard_asked_for_and_not_installed_is_one_line(tiny_config, write_yaml, capsys, monkeypatch):
    tiny_config["run"]["tensorboard"] = True
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else find_spec(name, *a)
    )
    assert main(["run", str(write_yaml(tiny_config))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: run.tensorboard: true needs the tensorboard package")
