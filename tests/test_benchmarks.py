"""Every script in benchmarks/ runs end to end with tiny arguments, so none of them rots unnoticed."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"

pytestmark = pytest.mark.slow


def run_script(name: str, *args: str, timeout: int = 240) -> str:
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_every_benchmark_script_has_a_smoke_test():
    called = set(re.findall(r'run_script\(\s*"(\w+\.py)"', Path(__file__).read_text()))  # the tests below
    assert called == {p.name for p in BENCHMARKS.glob("*.py")}


def test_step_overhead(tiny_config, write_yaml, tmp_path):
    out = tmp_path / "overhead.json"
    text = run_script("step_overhead.py", write_yaml(tiny_config), "--batches", "2", "--repeats", "1", "--json", out)
    rows = json.loads(out.read_text())
    assert [r["img_size"] for r in rows] == [16, 24] and "ratio" in text
    assert all(r["pipeline_images_per_s"] > 0 and r["minimal_images_per_s"] > 0 for r in rows)


def test_loader_backends(tiny_config, tiny_data, write_yaml, tmp_path):
    out = tmp_path / "loaders.json"
    args = ["--data", tiny_data / "train", "--sizes", "16", "--workers", "0", "--repeats", "1", "--batches", "2"]
    args += ["--backends", "tv2,classic", "--out", tmp_path, "--json", out]
    run_script("loader_backends.py", write_yaml(tiny_config), *args)
    rows = json.loads(out.read_text())
    assert {r["backend"] for r in rows} == {"tv2", "classic", "step"}
    assert all(r["img_size"] == 16 and r["images_per_s"] > 0 for r in rows)


def test_progressive_vs_fixed(tiny_config, write_yaml, tmp_path):
    tiny_config["stages"][0]["img_size"] = [16, 24]  # a ramp, so every variant differs
    out = tmp_path / "pvf"
    text = run_script("progressive_vs_fixed.py", write_yaml(tiny_config), "--seeds", "0,1", "--out", out)
    report = json.loads((out / "progressive_vs_fixed.json").read_text())
    rows = report["variants"]
    assert list(rows) == ["fixed", "progressive", "steps", "scope-flip", "bn-flip"]
    assert rows["fixed"]["stage_sizes"] == [24, 24] and rows["steps"]["stage_sizes"] == [16, 24, 24]
    assert all(len(r["final_top1"]) == 2 for r in rows.values())  # one run per seed
    assert report["target_top1"] == pytest.approx(sum(rows["fixed"]["final_top1"]) / 2 - 0.5)
    assert [s[:2] for s in rows["progressive"]["switches"][0]] == [[16, 24]]  # 16 -> 24 inside the ramp
    assert "| fixed |" in text and (out / "compare_time.png").is_file()


def test_suite(tiny_config, tiny_data, write_yaml, tmp_path):
    out = tmp_path / "suite"
    args = ["--datasets", f"tiny={tiny_data}@24", "--variants", "fixed,step,step-plain,ffcv,composer,progressive"]
    text = run_script("suite.py", write_yaml(tiny_config), *args, "--seeds", "0", "--epochs", "6", "--out", out)
    rows = json.loads((out / "suite.json").read_text())["datasets"]["tiny"]["variants"]
    assert list(rows) == ["fixed", "step", "step-plain", "ffcv", "composer", "progressive"]
    assert rows["fixed"]["stage_sizes"] == [24, 24]
    assert rows["step"]["stage_sizes"] == [8, 16, 24] == rows["step-plain"]["stage_sizes"]  # 3/8, 5/8, 1 of 24, to 8 px
    assert [s[:2] for s in rows["step"]["switches"][0]] == [[8, 16], [16, 24]]
    assert all(len(r["final_top1"]) == 1 and r["wall_seconds"][0] > 0 for r in rows.values())
    assert "| tiny | step |" in text and "worst drop" in text


def test_finetune_compare(tiny_config, write_yaml, tmp_path):
    weights = tmp_path / "pretrained.pth"
    torch.save(timm.create_model("test_resnet", num_classes=10).state_dict(), weights)
    example = copy.deepcopy(tiny_config)
    example["train"].update(mixup="off", ema={"decay": 0.9})
    example["stages"] = [
        {"img_size": 16, "batch_size": 8, "epochs": 1, "freeze": "all_but_head"},
        {"img_size": 16, "batch_size": 8, "epochs": 1, "freeze": "all_but_last_2"},
        {"img_size": 16, "batch_size": 8, "epochs": 1},
    ]
    path = tmp_path / "example.yaml"
    path.write_text(yaml.safe_dump(example))
    args = ["--train", "20", "--val", "10", "--pretrained", weights, "--example", path, "--out", tmp_path / "ft"]
    text = run_script("finetune_compare.py", *args)
    rows = json.loads((tmp_path / "ft" / "finetune_compare.json").read_text())
    assert len(rows) == 4 and all(len(r["stage_top1"]) == 3 for r in rows)
    assert "| progressive unfreezing | 0 |" in text


@pytest.mark.skipif(not importlib.util.find_spec("nvidia.dali"), reason="no DALI")
def test_dali_epoch_setup():
    text = run_script("dali_epoch_setup.py", "--files", "200", "--repeats", "1")  # more files than a batch
    assert "| 200 |" in text


def test_budget_vs_fixed(tiny_config, write_yaml, tmp_path):
    out = tmp_path / "bvf"
    text = run_script(
        "budget_vs_fixed.py", write_yaml(tiny_config), "--budgets", "1s,10s", "--anchors", "ffcv", "--out", out
    )
    report = json.loads((out / "budget_vs_fixed.json").read_text())
    rows = report["rows"]
    assert "1s: not run: --budget: too short for one epoch at 24 px here" in text  # one line, then the next budget
    assert [(r["budget"], r["run"]) for r in report["not_run"]] == [("1s", "all")]
    assert [r["run"] for r in rows] == ["planned", "fixed", "ffcv"]
    planned, fixed, ffcv = rows
    assert ffcv["planned_stages"][0][0] == 16 and ffcv["planned_stages"][-1][0] == 24  # 0.83x the final size, then it
    assert planned["stages"][-1][0] == fixed["stages"][-1][0] == 24 and {s[0] for s in fixed["stages"]} == {24}
    assert all(r["predicted_s"] <= 10 and r["wall_s"] > 0 and r["epochs"] >= 1 for r in rows)
    assert "| 10s | planned |" in text
    assert planned["reasons"] and planned["reasons"][0] in text  # why the planner chose it, said and kept
    assert planned["probe_s"] >= 0 and fixed["probe_s"] == ffcv["probe_s"] == 0  # a probe is the plan's own cost
    run_script("budget_vs_fixed.py", write_yaml(tiny_config), "--budgets", "5s", "--only", "fixed", "--out", out)
    assert [r["run"] for r in json.loads((out / "budget_vs_fixed.json").read_text())["rows"]] == ["fixed"]


def test_predict_speed(tiny_config, tmp_path):
    from pipeline.config import parse_config
    from pipeline.train.run import run_training

    tiny_config["stages"] = [{"img_size": 16, "batch_size": 8, "epochs": 1}]
    run = run_training(parse_config(tiny_config), out_dir=tmp_path / "runs")
    out = tmp_path / "speed.json"
    text = run_script("predict_speed.py", run, "--repeats", "2", "--json", out)
    row = json.loads(out.read_text())
    assert row["images"] == 20 and row["img_size"] == 16 and len(row["ratios"]) == 2
    assert row["eval_images_per_s"] > 0 and row["predict_images_per_s"] > 0
    assert "| 20 | 16 | 8 |" in text


def test_cpu_decoders():
    text = run_script("cpu_decoders.py", "--sizes", "64x48", "--stage", "8,32", "--repeats", "2")
    rows = [line for line in text.splitlines() if line.startswith("| 64x48")]
    assert [row.split(" | ")[1:3] for row in rows] == [["8", "1/4"], ["32", "1/1"]]  # the loader's DCT rule
    assert "PIL, reduced DCT" in text and all(float(v) > 0 for v in rows[0].strip("| ").split(" | ")[3:])


def test_size_probes(tiny_data, tmp_path):
    """The two probes on the tiny set (32 px images, 16 -> 32 px): detail kept rises to 1 at the final size."""
    out = tmp_path / "probes.json"
    stdout = run_script("size_probes.py", f"tiny={tiny_data}@32", "--images", "40", "--json", out)
    report = json.loads(out.read_text())["tiny"]
    assert list(report) == ["16", "24", "32"] and "tiny (detail kept / feature top-1)" in stdout
    detail = [report[s]["detail"] for s in report]
    assert detail[-1] == pytest.approx(1.0) and detail == sorted(detail) and detail[0] < 0.9
    assert all(len(report[s]["features"]) == 2 and 0 <= min(report[s]["features"]) for s in report)


def test_size_probes_trained(tiny_data, tiny_config, tmp_path):
    """The probe `plan --budget` runs, on the tiny set with the tiny file's model: a top-1 per measured size."""
    tiny_config["data"] = {"workers": 0}
    stages, out = tmp_path / "tiny.yaml", tmp_path / "probes.json"
    stages.write_text(yaml.safe_dump(tiny_config))
    args = ["--probes", "trained", "--stages", stages, "--images", "40", "--json", out]
    stdout = run_script("size_probes.py", f"tiny={tiny_data}@24", *args)
    report = json.loads(out.read_text())["tiny"]
    assert list(report["top1"]) == ["16", "24"] and report["images"] == 40 and report["start"] in (16, 24)
    assert all(0 <= t <= 100 for t in report["top1"].values()) and f"tiny: {report['line']}" in stdout
    assert report["trained"] == [16, 24] and report["every_start"] == report["start"]  # two sizes: both trained
    assert report["every_seconds"] > 0 and "every size" in stdout


def test_scan_scale(tmp_path):
    """The scan and worker-memory parts on 600 files (the starts run processes: the full benchmark only)."""
    out = tmp_path / "scale.json"
    args = ["--files", "600", "--classes", "6", "--root", tmp_path / "data", "--procs", "", "--json", out]
    stdout = run_script("scan_scale.py", *args)
    (row,) = json.loads(out.read_text())
    assert row["files"] == 600 and all(row[k] > 0 for k in ("scan_before_s", "scan_first_s", "scan_second_s"))
    made = tmp_path / "data" / "n600"
    assert (made / "c0005").is_dir() and len(list(made.rglob("*.jpg"))) == 600
    for layout in ("workers_arrays", "workers_list"):
        assert row[layout]["rss_start_mib"] > 0 and "rss_growth_pct" in row[layout]
    assert "| 600 |" in stdout and "first scan (s)" in stdout


STAND_IN = '''"""A stand-in for timm's train.py: records its arguments, writes a summary.csv as timm's does."""
import json, sys
from pathlib import Path

argv = sys.argv[1:]
out = Path(argv[argv.index("--output") + 1]) / argv[argv.index("--experiment") + 1]
out.mkdir(parents=True)
(out / "argv.json").write_text(json.dumps(argv))
top1 = 70.0 if "--train-img-sizes" in argv else 80.0
rows = ["epoch,train_loss,eval_loss,eval_top1,eval_top5,lr", f"0,2.0,1.9,{top1 - 20},90.0,0.1"]
(out / "summary.csv").write_text("\\n".join([*rows, f"1,1.0,0.9,{top1},99.0,0.01"]) + "\\n")
'''


def test_timm_sampler(tiny_data, tmp_path):
    """The runs, table and report, with a stand-in for timm's train.py (which the pip package lacks)."""
    train_py = tmp_path / "train.py"
    train_py.write_text(STAND_IN)
    out = tmp_path / "out"
    stdout = run_script("timm_sampler.py", f"tiny={tiny_data}", "--train-py", train_py, "--seeds", "0,1", "--out", out)
    rows = json.loads((out / "timm_sampler.json").read_text())["rows"]
    assert [(r["variant"], r["seed"], r["final_top1"]) for r in rows] == [
        ("fixed", 0, 80.0), ("sampler", 0, 70.0), ("fixed", 1, 80.0), ("sampler", 1, 70.0)
    ]  # fmt: skip
    assert rows[1]["per_epoch"] == [50.0, 70.0]
    sampler = json.loads((out / "tiny" / "sampler-s1" / "argv.json").read_text())
    fixed = json.loads((out / "tiny" / "fixed-s1" / "argv.json").read_text())
    at = sampler.index("--train-img-sizes")
    assert sampler[at + 1 : at + 6] == ["32", "40", "48", "56", "64"] and sampler[at + 6 :][:2] == [
        "--train-size-schedule", "progressive"
    ]  # fmt: skip
    assert "--train-img-sizes" not in fixed and fixed[fixed.index("--num-classes") + 1] == "10"
    assert fixed[fixed.index("--mixup-off-epoch") + 1] == "9" and fixed[fixed.index("--seed") + 1] == "1"
    assert "| tiny | sampler | 70.00% (70.0 / 70.0) | -10.00 |" in stdout


def test_timm_sampler_again_into_the_same_out_replaces_its_runs(tiny_data, tmp_path):
    train_py = tmp_path / "train.py"
    train_py.write_text(STAND_IN)
    out = tmp_path / "out"
    for _ in range(2):  # timm appends to an experiment folder it finds: each run starts from none
        run_script("timm_sampler.py", f"tiny={tiny_data}", "--train-py", train_py, "--seeds", "0", "--out", out)
    rows = json.loads((out / "timm_sampler.json").read_text())["rows"]
    assert [(r["variant"], r["per_epoch"]) for r in rows] == [("fixed", [60.0, 80.0]), ("sampler", [50.0, 70.0])]


def timm_sampler_refused(*args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(BENCHMARKS / "timm_sampler.py"), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_timm_sampler_bad_input_is_one_line_and_exit_2(tiny_data, tmp_path):
    train_py = tmp_path / "train.py"
    train_py.write_text(STAND_IN)
    assert "no.py" in timm_sampler_refused(f"tiny={tiny_data}", "--train-py", tmp_path / "no.py").stderr
    bad = timm_sampler_refused(f"tiny={tiny_data}", "--train-py", train_py, "--seeds", "0,a", "--out", tmp_path)
    assert "--seeds" in bad.stderr
    # a second folder that is not there is refused before the first one's runs start
    none = tmp_path / "none"
    missing = timm_sampler_refused(f"a={tiny_data}", f"b={none}", "--train-py", train_py, "--out", tmp_path)
    assert "b=" in missing.stderr and not (tmp_path / "a").exists()
    twice = timm_sampler_refused(f"a={tiny_data}", f"a={tiny_data}", "--train-py", train_py, "--out", tmp_path)
    assert "twice" in twice.stderr


def test_timm_sampler_keeps_the_finished_runs_when_one_fails(tiny_data, tmp_path):
    train_py = tmp_path / "train.py"
    train_py.write_text(STAND_IN + 'if "--train-img-sizes" in argv:\n    sys.exit(1)\n')
    out = tmp_path / "out"
    proc = timm_sampler_refused(f"tiny={tiny_data}", "--train-py", train_py, "--seeds", "0", "--out", out)
    assert "tiny sampler seed 0: timm's train.py failed" in proc.stderr
    rows = json.loads((out / "timm_sampler.json").read_text())["rows"]
    assert [(r["variant"], r["final_top1"]) for r in rows] == [("fixed", 80.0)]


def test_budget_vs_fixed_runs_the_shapes_that_fit_and_says_which_do_not(tiny_config):
    """An anchor's shortest run is 2 epochs: in a budget of one epoch it is left out with the planner's
    reason, and the fixed run is still planned."""
    from test_budget import SPEEDS, raw_config

    spec = importlib.util.spec_from_file_location("budget_vs_fixed", BENCHMARKS / "budget_vs_fixed.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    raw = raw_config(tiny_config)
    runs, not_run = script.other_plans(raw, SPEEDS, 15.0, 64, (1000, 200), ["ffcv", "composer"])
    assert list(runs) == ["fixed"] and runs["fixed"].epochs == 1
    assert sorted(not_run) == ["composer", "ffcv"] and all(
        why.startswith("--budget: too short") for why in not_run.values()
    )
    runs, not_run = script.other_plans(raw, SPEEDS, 25.0, 64, (1000, 200), ["ffcv", "composer"])
    assert list(runs) == ["fixed", "composer"] and list(not_run) == ["ffcv"] and runs["composer"].epochs == 3
    runs, _ = script.other_plans(raw, SPEEDS, 25.0, 64, (1000, 200), ["half"])  # half of them settle
    half = runs["half"].raw["stages"]
    assert [s["img_size"] for s in half] == [64, 64] and half[-1]["mixup"] == "off"
    assert half[0]["epochs"] == runs["half"].epochs // 2 >= 1  # the last stage: half, rounded up, and the share


def test_budget_vs_fixed_refuses_an_unknown_anchor(tiny_config, write_yaml):
    cmd = [sys.executable, str(BENCHMARKS / "budget_vs_fixed.py"), str(write_yaml(tiny_config)), "--anchors", "fastai"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--anchors: unknown shape 'fastai'" in proc.stderr
    cmd[-2:] = ["--anchors", "ffcv", "--only", "planned,composer"]  # composer is not among the runs
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--only: not among planned, fixed and --anchors: composer" in proc.stderr
