"""Shared fixtures: a tiny generated ImageFolder and tiny stages files (fast on 2 CPU cores)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import DataConfig
from pipeline.data import Loader, build_loader
from pipeline.data.demo import make_demo_dataset

torch.set_num_threads(2)

# `make test-fast` (PIPELINE_TESTS=fast): the tier for the edit loop. Every test runs until it would
# train, and a test that reaches training (a stage built, or a subprocess of the CLI or a benchmark) is
# skipped there, so the tier never trains by construction; `make test` runs everything.
FAST = os.environ.get("PIPELINE_TESTS") == "fast"
TRAINS = "trains: run by `make test`, not by `make test-fast`"


def pytest_configure(config):
    if not FAST:
        return
    import subprocess
    import sys

    import pipeline.train.stage as stage

    def no_training(*args, **kwargs):
        pytest.skip(TRAINS)

    for module in [m for name, m in sys.modules.items() if name.startswith("pipeline")]:
        if getattr(module, "build_stage", None) is stage.build_stage:
            module.build_stage = no_training
    stage.build_stage = no_training
    popen_init = subprocess.Popen.__init__

    def guarded(self, args, *rest, **kwargs):
        words = [str(a) for a in (args if isinstance(args, list | tuple) else [args])]
        if any(w in ("pipeline", "torch.distributed.run") or "benchmarks" in w for w in words):
            pytest.skip(TRAINS)
        popen_init(self, args, *rest, **kwargs)

    subprocess.Popen.__init__ = guarded


TINY_CONFIG = {
    "run": {"name": "t", "seed": 0, "device": "cpu", "log_every": 3},
    "data": {"workers": 0},
    "model": {"arch": "test_resnet"},
    "train": {
        "optimizer": {"name": "sgd", "lr": 0.05},
        "schedule": {"scope": "stage"},  # a OneCycle per stage: what most tests check; scope run has its own
        "amp": "off",
        "compile": "off",
        "mixup": {"mixup_alpha": 0.2, "cutmix_alpha": 1.0},
    },
    "stages": [
        {"img_size": 16, "batch_size": 8, "epochs": 2},
        {"img_size": 24, "batch_size": 6, "epochs": 1, "mixup": "off"},
    ],
}


def make_loader(
    index, train=True, size=16, batch=8, seed=0, rank=0, world_size=1, channels_last=True, **data
) -> Loader:
    """A CPU loader over `index`; `data` sets DataConfig keys (backend, workers, decode_on, ...)."""
    cfg = DataConfig(**{"workers": 0, **data})
    return build_loader(
        cfg,
        index,
        train=train,
        img_size=size,
        batch_size=batch,
        device=torch.device("cpu"),
        seed=seed,
        channels_last=channels_last,
        rank=rank,
        world_size=world_size,
    )


@pytest.fixture(scope="session", autouse=True)
def cache_home(tmp_path_factory):
    """Decoded caches (and anything else kept between runs) go to a temporary folder, not ~/.cache."""
    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("cache-home")
    mp.setenv("PIPELINE_CACHE", str(home))
    yield home
    mp.undo()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """10 classes, 40 train / 20 val JPEGs of 32x32."""
    return make_demo_dataset(tmp_path_factory.mktemp("data") / "tiny", n_train=40, n_val=20, size=32)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_data) -> Path:
    """One finished tiny run with EMA weights (TINY_CONFIG), shared by the eval, predict and export tests."""
    from pipeline.config import parse_config
    from pipeline.train.run import run_training

    cfg = copy.deepcopy(TINY_CONFIG)
    cfg["data"].update(train=str(tiny_data / "train"), val=str(tiny_data / "val"))
    cfg["train"]["ema"] = {"decay": 0.9}
    cfg["train"]["size_jumps"] = "off"  # eval checks best.pt at the last stage's size: best is found there
    return run_training(parse_config(cfg), out_dir=tmp_path_factory.mktemp("tiny-run") / "runs")


@pytest.fixture
def tiny_config(tiny_data) -> dict:
    cfg = copy.deepcopy(TINY_CONFIG)
    cfg["data"].update(train=str(tiny_data / "train"), val=str(tiny_data / "val"))
    return cfg


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """`reference_run(cfg)`: the folder of a finished, never-stopped run of `cfg`, trained once per
    configuration per session and shared (read only) by the bit-exact resume checks."""
    from pipeline.config import parse_config
    from pipeline.train.run import run_training

    runs: dict[str, Path] = {}

    def get(cfg: dict) -> Path:
        key = yaml.safe_dump(cfg, sort_keys=True)
        if key not in runs:
            out = tmp_path_factory.mktemp("reference")
            runs[key] = run_training(parse_config(copy.deepcopy(cfg)), out_dir=out)
        return runs[key]

    return get


@pytest.fixture
def write_yaml(tmp_path):
    def write(cfg: dict, name: str = "stages.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    return write


class Killed(Exception):
    """Stands for a crash: raised right after a checkpoint was written."""


def die_after_saves(n: int):
    """Hooks for `run_training` that make the run 'crash' right after its n-th checkpoint write."""
    from pipeline.train.run import RunHooks

    calls = []

    def die(paths):
        calls.append(paths)
        if len(calls) == n:
            raise Killed

    return RunHooks(after_save=die)
