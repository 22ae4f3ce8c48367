"""Killed runs resume where they stopped, signals checkpoint and stop, failed writes lose nothing."""

from __future__ import annotations

import copy
import errno
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import pipeline.train.checkpoint as checkpoint_mod
from pipeline.cli import main
from pipeline.config import load_config, parse_config
from pipeline.files import atomic_write
from pipeline.report import MetricsLog
from pipeline.train.checkpoint import load_checkpoint
from pipeline.train.run import run_training

from conftest import Killed, die_after_saves

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = [
    "tv2",
    pytest.param("dali", marks=pytest.mark.skipif(not importlib.util.find_spec("nvidia.dali"), reason="no DALI")),
]


def step_losses(run_dir: Path) -> list[tuple[int, int, int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["stage"], r["epoch"], r["batch"], r["loss"]) for r in map(json.loads, lines) if r["kind"] == "batch"]


def assert_same_run(a: Path, b: Path) -> None:
    """Same final weights, bit for bit, and the same loss at every step."""
    wa = load_checkpoint(a / "checkpoints" / "last.pt")["state_dict"]
    wb = load_checkpoint(b / "checkpoints" / "last.pt")["state_dict"]
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert step_losses(a) == step_losses(b)


@pytest.fixture
def every_step_config(tiny_config) -> dict:
    """Checkpoints at every optimizer step, so a kill lands mid-epoch; Mixup on."""
    cfg = copy.deepcopy(tiny_config)
    cfg["run"].update(checkpoint_every=0, log_every=1)
    cfg["stages"][0]["epochs"] = 2
    return cfg


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("saves", [3, 7])  # mid-epoch in stage 0's first and second epoch
def test_resume_mid_epoch_is_bit_exact(every_step_config, tmp_path, backend, saves, reference_run):
    every_step_config["data"]["backend"] = backend
    reference = reference_run(every_step_config)
    with pytest.raises(Killed):
        run_training(parse_config(every_step_config), out_dir=tmp_path / "b", hooks=die_after_saves(saves))
    (run_dir,) = (tmp_path / "b").iterdir()
    progress = load_checkpoint(run_dir / "checkpoints" / "last.pt")["progress"]
    assert progress["batch"] > 0  # the checkpoint was taken mid-epoch
    run_training(parse_config(every_step_config), resume=run_dir)
    assert_same_run(reference, run_dir)


def write_config(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def start_run(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished_run(args: list[str], cwd: Path) -> Path:
    """A run never interrupted, in a process like the killed ones (the same thread count)."""
    proc = start_run(args, cwd)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    return Path(next(line for line in out.splitlines() if line.startswith("run folder ")).split(" ", 2)[2])


_FINISHED: dict[str, Path] = {}  # a stages file's text -> its finished run, shared by the tests of a session


def finished_reference(cfg_path: Path, cwd: Path) -> Path:
    """`finished_run` of the stages file `cfg_path`, once per session and file content (read only)."""
    key = cfg_path.read_text()
    if key not in _FINISHED:
        _FINISHED[key] = finished_run([str(cfg_path), "--out", str(cwd / "reference")], cwd)
    return _FINISHED[key]


def wait_for_steps(proc: subprocess.Popen, run_root: Path, steps: int, timeout: float = 120) -> Path:
    """Wait until the run has logged `steps` step records; returns its folder."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = list(run_root.glob("t-*")) if run_root.is_dir() else []
        metrics = runs[0] / "metrics.jsonl" if runs else None
        if metrics is not None and metrics.is_file() and metrics.read_text().count('"kind": "batch"') >= steps:
            return runs[0]
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {steps} steps: {proc.communicate()[1][-2000:]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("timed out waiting for the run")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_at_random_points_then_resume_matches(every_step_config, tmp_path):
    """SIGKILL at random points (three seeds), resume, compare with a run never killed."""
    every_step_config["run"]["log_every"] = 1  # every step reaches the metrics file at once
    cfg_path = write_config(every_step_config, tmp_path / "tiny.yaml")
    reference = finished_run([str(cfg_path), "--out", str(tmp_path / "reference")], tmp_path)  # same threads
    total = len(step_losses(reference))
    for seed in range(3):
        rng = random.Random(seed)
        out = tmp_path / f"killed{seed}"
        proc = start_run([str(cfg_path), "--out", str(out)], tmp_path)
        run_dir = wait_for_steps(proc, out, rng.randrange(2, total - 2))
        time.sleep(rng.uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        resumed = start_run(["--resume", str(run_dir)], tmp_path)
        _, err = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, err[-2000:]
        assert_same_run(reference, run_dir)


def test_a_resume_at_once_after_sigkill_is_not_refused(every_step_config, tmp_path, capsys):
    """Forked loader workers outlive a SIGKILLed trainer by seconds; they must not hold its lock."""
    every_step_config["data"]["workers"] = 2
    every_step_config["run"]["log_every"] = 1
    cfg_path = write_config(every_step_config, tmp_path / "tiny.yaml")
    proc = start_run([str(cfg_path), "--out", str(tmp_path / "runs")], tmp_path)
    run_dir = wait_for_steps(proc, tmp_path / "runs", 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)  # not communicate(): the workers hold its pipes until they notice
    assert main(["run", "--resume", str(run_dir)]) == 0  # in this process: the lock is tried at once
    proc.communicate(timeout=60)
    assert "another process" not in capsys.readouterr().err
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["progress"]["stage"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_checkpoint_and_say_how_to_resume(every_step_config, tmp_path, sig, code):
    every_step_config["run"]["log_every"] = 1
    every_step_config["run"]["checkpoint_every"] = 60  # only the signal makes it save mid-epoch
    every_step_config["data"]["workers"] = 1  # workers must leave the signal to the main process
    cfg_path = write_config(every_step_config, tmp_path / "tiny.yaml")
    proc = start_run([str(cfg_path), "--out", str(tmp_path / "runs")], tmp_path)
    run_dir = wait_for_steps(proc, tmp_path / "runs", 3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err
    name = signal.Signals(sig).name
    assert f"error: stopped by {name} at stage 0" in err
    assert f"Resume with: python -m pipeline run --resume {run_dir}" in err
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert ckpt["progress"]["batch"] > 0 or ckpt["progress"]["epoch"] > 0
    resumed = start_run(["--resume", str(run_dir)], tmp_path)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert_same_run(finished_reference(cfg_path, tmp_path), run_dir)


def test_a_write_failing_midway_leaves_the_old_file(tmp_path):
    path = tmp_path / "last.pt"
    atomic_write(path, lambda f: f.write(b"old checkpoint"))

    def half_then_fail(f):
        f.write(b"new che")
        raise OSError(errno.EIO, "I/O error")

    with pytest.raises(OSError):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_a_full_disk_stops_the_run_with_the_last_checkpoint_intact(tiny_config, write_yaml, monkeypatch, capsys):
    real = checkpoint_mod.atomic_write
    calls = []

    def disk_fills(path, write):
        calls.append(path)
        if len(calls) <= 2:  # stage 0, epoch 0: best.pt and last.pt
            return real(path, write)

        def partial(f):
            f.write(b"\0" * 1000)  # part of it fits, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return real(path, partial)

    monkeypatch.setattr(checkpoint_mod, "atomic_write", disk_fills)
    path = write_yaml(tiny_config)
    assert main(["run", str(path), "--out", str(path.parent / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    (run_dir,) = (path.parent / "runs").iterdir()
    last = run_dir / "checkpoints" / "last.pt"
    assert err.startswith("error: cannot write checkpoint") and "No space left on device" in err
    assert f"the previous checkpoint {last} is intact" in err and "Traceback" not in err
    assert load_checkpoint(last)["progress"]["epoch"] == 1  # stage 0's first epoch, whole
    assert not list((run_dir / "checkpoints").glob("*.tmp"))


def test_resume_auto_continues_the_newest_run_or_starts_one(tiny_config, write_yaml, capsys):
    path = write_yaml(tiny_config)
    out = path.parent / "runs"
    assert main(["run", str(path), "--out", str(out), "--resume", "auto"]) == 0  # none yet: a new run
    assert "starting a new one" in capsys.readouterr().out
    with pytest.raises(Killed):
        run_training(load_config(path), out_dir=out, hooks=die_after_saves(1))
    newest = max(out.iterdir(), key=lambda d: d.stat().st_mtime)
    assert main(["run", str(path), "--out", str(out), "--resume", "auto"]) == 0
    assert f"--resume auto: {newest}" in capsys.readouterr().out
    assert len(list(out.iterdir())) == 2
    assert len(load_checkpoint(newest / "checkpoints" / "last.pt")["progress"]["stages"]) == 2  # finished


@pytest.mark.parametrize("kind", ["batch", "step"])  # step: the batch records' name before 2026-12-06
def test_metrics_are_cut_back_to_the_checkpoint(tmp_path, kind):
    path = tmp_path / "metrics.jsonl"
    records = [
        {"kind": "lr_find", "stage": 1, "epoch": 0},
        {"kind": "step", "stage": 1, "epoch": 0, "step": 0},  # written by an earlier version, then resumed
        {"kind": "epoch", "stage": 1, "epoch": 0},
        {"kind": kind, "stage": 1, "epoch": 1, kind: 0},
        {"kind": kind, "stage": 1, "epoch": 1, kind: 1},
        {"kind": kind, "stage": 1, "epoch": 1, kind: 2},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "st')  # a torn last line
    MetricsLog.keep_before(path, stage=1, epoch=1, batch=2)
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert kept == records[:5]


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    every_step_config, write_yaml, monkeypatch, capsys
):
    import pipeline.train.step as step_mod

    real = step_mod.TrainStep.__call__
    calls = []

    def poisoned(self, images, labels):
        calls.append(1)
        if len(calls) == 8:  # epoch 1, batch 2 of stage 0
            images = images * float("nan")
        return real(self, images, labels)

    monkeypatch.setattr(step_mod.TrainStep, "__call__", poisoned)
    path = write_yaml(every_step_config)
    assert main(["run", str(path), "--out", str(path.parent / "runs")]) == 2
    err = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "stage 0 epoch 1 batch 2: the loss is nan; training diverged" in err and "last.pt" in err
    (run_dir,) = (path.parent / "runs").iterdir()
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert (ckpt["progress"]["epoch"], ckpt["progress"]["batch"]) == (1, 2)  # taken before the bad step
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


@pytest.mark.timeout(120)
def test_a_process_exits_even_with_a_loader_left_open(tiny_data, tmp_path):
    """Workers ignore SIGTERM (the main process checkpoints first), so an unclosed loader must not
    leave the interpreter waiting for them at exit."""
    script = tmp_path / "leave_open.py"
    script.write_text(
        "import sys\n"
        f"sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]\n"
        "from conftest import make_loader\n"
        "from pipeline.data.index import scan_image_folder\n"
        f"loader = make_loader(scan_image_folder({str(tiny_data / 'train')!r}, 'data.train'), workers=1)\n"
        "batches = iter(loader)\n"
        "next(batches)\n"
        "print('leaving without close()')\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "leaving" in proc.stdout, proc.stderr[-2000:]


HOLDER = """
import fcntl, os, sys
f = open(sys.argv[1], "a+")
fcntl.lockf(f, fcntl.LOCK_EX)
f.truncate(0)
f.write((sys.argv[2] if len(sys.argv) > 2 else str(os.getpid())) + "\\n")
f.flush()
print("held", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("written", [None, "999999999"], ids=["its-pid", "a-dead-pid"])
def test_a_second_process_on_a_running_runs_folder_stops_before_touching_it(tiny_config, capsys, tmp_path, written):
    run_dir = run_training(parse_config(tiny_config), out_dir=tmp_path)
    assert (run_dir / ".lock").read_text().strip() == str(os.getpid())  # the run held it
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    holder = subprocess.Popen(  # another process holds the lock (a POSIX lock is per process)
        [sys.executable, "-c", HOLDER, str(run_dir / ".lock"), *([written] if written else [])],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["run", "--resume", str(run_dir)]) == 2
        who = f"pid {holder.pid}" if written is None else "a process that has not written its pid"
        assert capsys.readouterr().err.strip().splitlines() == [
            f"error: {run_dir}: another process ({who}) is training in this run folder; "
            "wait for it to end or stop it, then resume"
        ]
        assert (run_dir / "metrics.jsonl").read_bytes() == metrics  # nothing cut back or written
    finally:
        holder.communicate("", timeout=30)
    assert main(["run", "--resume", str(run_dir)]) == 0  # the holder is gone: the lock with it
    assert "another process" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "content,why",
    [
        (bytes(range(256)) * 4, "not written by torch.save, or holding objects that a weights-only load refuses"),
        (b"", "an empty file"),
    ],
    ids=["random-bytes", "empty"],
)
def test_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path, capsys, content, why):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    assert main(["eval", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {path}: not a readable checkpoint ({why})"]
