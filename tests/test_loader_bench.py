"""`python -m pipeline bench-loader`: rows, table, plot, verdicts and `--apply`, on a tiny dataset."""

from __future__ import annotations

import importlib.util
import json

import pytest
import yaml

from pipeline.cli import main
from pipeline.commands.bench_loader import apply_settings, verdicts
from pipeline.config import load_config

LOADER_KEYS = {"img_size", "batch_size", "backend", "workers", "images_per_s", "first_batch_s", "cpu_percent"}
BACKENDS = ["tv2", "cache", "classic"] + (["dali"] if importlib.util.find_spec("nvidia.dali") else [])


def test_cli_measures_every_stage_backend_and_worker_count(tiny_config, write_yaml, tmp_path, capsys):
    path = write_yaml(tiny_config)
    args = ["bench-loader", str(path), "--backends", ",".join(BACKENDS), "--workers", "0,1", "--batches", "2"]
    assert main([*args, "--out", str(tmp_path / "o"), "--json", str(tmp_path / "rows.json"), "--apply"]) == 0
    out = capsys.readouterr().out
    (folder,) = (tmp_path / "o").iterdir()
    rows = json.loads((folder / "bench_loader.json").read_text())
    assert rows == json.loads((tmp_path / "rows.json").read_text())
    assert (folder / "bench_loader.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    stages = [(16, 8), (24, 6)]
    for size, batch in stages:
        mine = [r for r in rows if (r["img_size"], r["batch_size"]) == (size, batch)]
        expected = {(b, w) for b in BACKENDS for w in ((1,) if b == "dali" else (0, 1))}  # DALI: >= 1 thread
        assert {(r["backend"], r["workers"]) for r in mine if r["backend"] != "step"} == expected
        for r in mine:
            if r["backend"] == "step":
                assert set(r) == {"img_size", "batch_size", "backend", "images_per_s"} and r["images_per_s"] > 0
            else:
                assert LOADER_KEYS <= set(r) and r["images_per_s"] > 0 and r["first_batch_s"] > 0
                assert r["cpu_percent"] >= 0
        assert sum(r["backend"] == "step" for r in mine) == 1
        # the table has a line for every row, with its figure
        for r in mine:
            line = [ln for ln in out.splitlines() if ln.split()[:3] == [str(size), str(batch), r["backend"]]]
            assert any(f"{r['images_per_s']:.1f}" in ln for ln in line), (size, r["backend"])
        assert f"{size}px: compute-bound" in out or f"{size}px: loader-bound" in out

    applied = load_config(path.with_name("stages.bench-loader.yaml"))
    for v, stage in zip(verdicts(rows), applied.stages):
        assert stage.data.workers == v.workers
        assert stage.data.backend == ("tv2" if v.backend == "cache" else v.backend)
        assert (stage.data.cache == "decoded") == (v.backend == "cache")


def rows_for(step: float, speeds: dict[tuple[int, str, int], float]) -> list[dict]:
    rows = []
    for (size, backend, workers), ips in speeds.items():
        rows.append({"img_size": size, "batch_size": 64, "backend": backend, "workers": workers, "images_per_s": ips})
    for size in sorted({k[0] for k in speeds}):
        rows.append({"img_size": size, "batch_size": 64, "backend": "step", "images_per_s": step})
    return rows


def test_verdicts_say_which_side_limits_and_by_how_much():
    rows = rows_for(1000, {(32, "tv2", 2): 500, (32, "classic", 2): 5000, (64, "tv2", 2): 400, (64, "cache", 0): 3000})
    v32, v64 = verdicts(rows)
    assert (v32.backend, v32.workers) == ("tv2", 2)  # classic is only the reference, never recommended
    assert v32.text == "loader-bound: the loader gives 50% of what the step takes"
    assert (v64.backend, v64.workers) == ("cache", 0) and v64.text == "compute-bound: the loader is 3.0x the step"


def test_verdicts_take_the_fastest_backend_with_the_fewest_workers_it_needs():
    speeds = {(32, "tv2", 0): 900, (32, "tv2", 2): 1500, (32, "dali", 1): 2500, (32, "dali", 2): 4000}
    (v,) = verdicts(rows_for(1000, speeds))
    assert (v.backend, v.workers) == ("dali", 1)  # DALI is faster; one thread already gives 2.5x the step
    (v,) = verdicts(rows_for(1500, speeds))
    assert (v.backend, v.workers) == ("dali", 2)  # one thread would give less than twice the step


def test_apply_writes_one_setting_globally_or_one_per_stage(tiny_config):
    raw = {**tiny_config, "data": dict(tiny_config["data"])}
    same = verdicts(rows_for(100, {(16, "dali", 2): 900, (16, "tv2", 0): 50, (24, "dali", 2): 800}))
    out = apply_settings(raw, same, [(16, 64), (24, 64)])
    assert out["data"]["backend"] == "dali" and out["data"]["workers"] == 2
    assert all("data" not in s for s in out["stages"])
    differ = verdicts(rows_for(100, {(16, "cache", 0): 900, (24, "tv2", 1): 800}))
    out = apply_settings(raw, differ, [(16, 64), (24, 64)])
    assert out["stages"][0]["data"] == {"backend": "tv2", "workers": 0, "cache": "decoded"}
    assert out["stages"][1]["data"] == {"backend": "tv2", "workers": 1, "cache": None}
    assert raw["data"] == tiny_config["data"]  # the input is left alone


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--backends", "tv2,ffcv"], "--backends: unknown backend 'ffcv'"),
        (["--workers", "a,b"], "--workers a,b: expected comma-separated integers"),
        (["--workers", "-1"], "--workers -1: need integers >= 0"),
        (["--sizes", "32", "--apply"], "--apply writes settings for the file's own stages"),
        (["--data", "/no/such/folder"], "data.train: folder '/no/such/folder' does not exist"),
    ],
)
def test_bad_arguments_are_one_line(tiny_config, write_yaml, capsys, extra, message):
    assert main(["bench-loader", str(write_yaml(tiny_config)), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {message}"), err


def test_stage_data_overrides_are_checked(tiny_config, write_yaml, capsys):
    tiny_config["stages"][0]["data"] = {"train": "/elsewhere"}
    assert main(["run", str(write_yaml(tiny_config))]) == 2
    assert (
        "stages.0.data.train: not a per-stage loader key; the dataset is the same for every stage"
        in capsys.readouterr().err
    )
    tiny_config["stages"][0]["data"] = {"backend": "dali", "cache": "decoded"}
    assert main(["run", str(write_yaml(tiny_config))]) == 2
    assert "stages.0.data.cache: the decoded cache feeds the tv2 loader" in capsys.readouterr().err
    tiny_config["stages"][0]["data"] = {"workers": 1, "cache": "decoded"}
    cfg = load_config(write_yaml(tiny_config))
    assert (cfg.stages[0].data.workers, cfg.stages[0].data.cache) == (1, "decoded")
    assert (cfg.stages[1].data.workers, cfg.stages[1].data.cache) == (0, None)
    # 24 px stages: the smallest crop (35% of the area) must not be upsampled: 24 / sqrt(0.35), to 8s
    assert cfg.stages[0].data.train == cfg.data.train and cfg.data.cache_size == 48
    assert yaml.safe_load(yaml.safe_dump(cfg.raw))["stages"][0]["data"] == {"workers": 1, "cache": "decoded"}


def test_sizes_replace_the_stages_and_the_cache_fits_the_largest(tiny_config, write_yaml, tmp_path):
    # the file's stages (16 and 24 px) size the cache for 24 px; --sizes 40 needs a larger one
    args = ["bench-loader", str(write_yaml(tiny_config)), "--sizes", "16,40", "--backends", "cache,tv2"]
    assert main([*args, "--workers", "0", "--batches", "1", "--out", str(tmp_path / "o")]) == 0
    (folder,) = (tmp_path / "o").iterdir()
    rows = json.loads((folder / "bench_loader.json").read_text())
    assert sorted({(r["img_size"], r["batch_size"]) for r in rows}) == [(16, 6), (40, 6)]  # the last stage's batch
