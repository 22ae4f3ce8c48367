"""`torchrun --nproc_per_node=2 -m pipeline run` on CPU (gloo): the same training as one process,
one writer, resume from one checkpoint. Slow: every run starts two Python processes."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.train.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def env() -> dict:
    # one thread per process in both set-ups, so the arithmetic differs only where DDP changes it
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def launch(cmd: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out


def steps(run_dir: Path) -> list[tuple]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["stage"], r["epoch"], r["batch"], r["loss"]) for r in map(json.loads, lines) if r["kind"] == "batch"]


@pytest.fixture
def ddp_config(tiny_config, tmp_path) -> Path:
    """BatchNorm-free (GroupNorm) and no Mixup: two processes with half the batch each then compute
    the same gradient as one process with all of it."""
    cfg = copy.deepcopy(tiny_config)
    cfg["model"]["arch"] = "test_efficientnet_gn"
    cfg["train"].update(mixup="off", optimizer={"name": "sgd", "lr": 0.02}, ema={"decay": 0.9})
    cfg["run"].update(log_every=1, checkpoint_every=0)
    cfg["stages"][1]["accum_steps"] = 2  # DDP averages gradients once per window (no_sync before)
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_two_processes_train_like_one(ddp_config, tmp_path):
    one = launch([sys.executable, "-m", "pipeline", "run", str(ddp_config), "--out", str(tmp_path / "one")], tmp_path)
    two = launch([*TORCHRUN, "-m", "pipeline", "run", str(ddp_config), "--out", str(tmp_path / "two")], tmp_path)
    finish(one)
    out = finish(two)
    (single,) = (tmp_path / "one").iterdir()
    (ddp,) = (tmp_path / "two").iterdir()  # one run folder: rank 1 made none
    assert "x 2 processes (torchrun)" in out and "batch 8 (4 per process)" in out
    a, b = steps(single), steps(ddp)
    assert [s[:3] for s in a] == [s[:3] for s in b]  # each step logged once (rank 0), none missing
    assert b[0][3] == pytest.approx(a[0][3], abs=1e-5)  # the same weights and global batch
    # later steps drift only by float summation order (all-reduce of two half-batch means against
    # one mean), amplified by training: well under 1% of the loss
    assert max(abs(x[3] - y[3]) / x[3] for x, y in zip(a, b)) < 0.01
    wa, wb = (load_checkpoint(d / "checkpoints" / "last.pt") for d in (single, ddp))
    for key in ("state_dict", "state_dict_ema"):  # the final weights and their EMA agree too
        for name, v in wa[key].items():
            if v.is_floating_point():
                assert torch.allclose(v, wb[key][name], rtol=1e-2, atol=1e-3), (key, name)
    assert wa["ema_updates"] == wb["ema_updates"] == 5 * 2 + 3  # 40 images / 8 a step; accum 2 in stage 1
    sb = json.loads((ddp / "summary.json").read_text())
    assert (
        sb["stages"][-1]["val_top1"]
        == load_checkpoint(ddp / "checkpoints" / "stage1.pt")["progress"]["stages"][-1]["val_top1"]
    )
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["best.pt", "last.pt", "stage0.pt", "stage1.pt"]


def test_sigterm_then_resume_under_torchrun(ddp_config, tmp_path):
    reference = launch([*TORCHRUN, "-m", "pipeline", "run", str(ddp_config), "--out", str(tmp_path / "ref")], tmp_path)
    finish(reference)
    (ref_dir,) = (tmp_path / "ref").iterdir()
    proc = launch([*TORCHRUN, "-m", "pipeline", "run", str(ddp_config), "--out", str(tmp_path / "runs")], tmp_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        metrics = list((tmp_path / "runs").glob("*/metrics.jsonl"))
        if metrics and metrics[0].read_text().count('"kind": "batch"') >= 3:
            break
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it to both processes
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert "stopped by SIGTERM" in err and f"--resume {run_dir}" in err
    progress = load_checkpoint(run_dir / "checkpoints" / "last.pt")["progress"]
    assert progress["batch"] > 0 or progress["epoch"] > 0
    finish(launch([*TORCHRUN, "-m", "pipeline", "run", "--resume", str(run_dir)], tmp_path))
    a = load_checkpoint(ref_dir / "checkpoints" / "last.pt")["state_dict"]
    b = load_checkpoint(run_dir / "checkpoints" / "last.pt")["state_dict"]
    for k in a:
        assert torch.equal(a[k], b[k]), k  # every rank resumed from the one checkpoint, bit for bit
    assert steps(ref_dir) == steps(run_dir)


def test_a_batch_that_does_not_split_is_one_line(ddp_config, tmp_path):
    cfg = yaml.safe_load(ddp_config.read_text())
    cfg["stages"][0]["batch_size"] = 7
    ddp_config.write_text(yaml.safe_dump(cfg))
    proc = launch([*TORCHRUN, "-m", "pipeline", "run", str(ddp_config)], tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "error: stages.0.batch_size: 7 is the global batch and does not divide by the 2 processes" in err
    assert err.count("error:") == 1  # rank 0 speaks for both
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)


def test_an_error_on_one_rank_brings_the_job_down_with_its_message(ddp_config, tmp_path, tiny_data):
    cfg = yaml.safe_load(ddp_config.read_text())
    train = tmp_path / "train"
    shutil.copytree(tiny_data / "train", train)
    bad = train / "circle_hstripes" / "zz.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)  # passes the scan, fails to decode
    cfg["data"]["train"] = str(train)
    ddp_config.write_text(yaml.safe_dump(cfg))
    proc = launch([*TORCHRUN, "-m", "pipeline", "run", str(ddp_config), "--out", str(tmp_path / "runs")], tmp_path)
    _, err = proc.communicate(timeout=300)  # no hang: the other rank's collective fails at once
    assert proc.returncode != 0
    assert f"{bad}: cannot decode image" in err  # said by whichever rank read the file
    assert "[rank0]: Traceback" not in err and "[rank1]: Traceback" not in err


DRAWS = """
import json, os, sys
import torch
from pipeline.config import load_config
from pipeline.train.run import RunHooks, run_training

parts = {}
draws = []

def epoch_start(stage, epoch):  # what the step's Mixup and dropout would draw first this epoch
    lam, cutmix = parts["step"].mixup._params_per_batch()
    draws.append([stage, epoch, float(lam), bool(cutmix), torch.rand(4).tolist()])

hooks = RunHooks(stage_built=lambda p: parts.update(step=p.train_step), epoch_start=epoch_start)
run_training(load_config(sys.argv[1]), out_dir=sys.argv[2], hooks=hooks)
with open(os.path.join(sys.argv[3], f"draws-{os.environ['RANK']}.json"), "w") as f:
    json.dump(draws, f)
"""


def test_each_process_draws_its_own_mixup_and_dropout(ddp_config, tmp_path):
    cfg = yaml.safe_load(ddp_config.read_text())
    cfg["train"]["mixup"] = {"mixup_alpha": 0.2, "cutmix_alpha": 1.0}  # drawn per batch: lambda, box, which
    cfg["stages"] = cfg["stages"][:1]
    ddp_config.write_text(yaml.safe_dump(cfg))
    script = tmp_path / "draws.py"
    script.write_text(DRAWS)
    finish(launch([*TORCHRUN, str(script), str(ddp_config), str(tmp_path / "runs"), str(tmp_path)], tmp_path))
    rank0, rank1 = (json.loads((tmp_path / f"draws-{r}.json").read_text()) for r in (0, 1))
    assert len(rank0) == len(rank1) == cfg["stages"][0]["epochs"]
    for a, b in zip(rank0, rank1):
        assert a[:2] == b[:2] and a[2:] != b[2:]  # the same epoch, different draws
        assert a[4] != b[4]  # torch's generator too (dropout, drop-path)
