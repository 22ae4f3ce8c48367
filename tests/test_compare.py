"""Plots of a run, `compare`, and tools/split.py."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.config import parse_config
from pipeline.train.run import run_training

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def test_a_run_leaves_its_plots(tiny_config, tmp_path):
    run_dir = run_training(parse_config(tiny_config), out_dir=tmp_path / "runs")
    for name in ("loss.png", "accuracy.png", "lr.png", "throughput.png"):
        data = (run_dir / "plots" / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, name
        with Image.open(run_dir / "plots" / name) as im:
            assert im.size[0] >= 800  # readable, not a thumbnail
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"epoch",' in line]
    assert all("elapsed_s" in r for r in epochs)
    assert [r["elapsed_s"] for r in epochs] == sorted(r["elapsed_s"] for r in epochs)


def write_run(root: Path, name: str, tops: list[float], elapsed: list[float], sizes=(16, 24)) -> Path:
    """A run folder with hand-made metrics, so compare's numbers are known exactly."""
    run = root / name
    run.mkdir(parents=True)
    lines = [
        {"kind": "epoch", "stage": 0, "epoch": i, "val_top1": t, "elapsed_s": e, "img_size": sizes[0]}
        for i, (t, e) in enumerate(zip(tops, elapsed))
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    stages = [{"img_size": s, "train_images_per_s": 100.0 * (i + 1)} for i, s in enumerate(sizes)]
    (run / "summary.json").write_text(json.dumps({"stages": stages}))
    return run


def test_compare_prints_the_right_numbers(tmp_path, capsys):
    a = write_run(tmp_path, "fast", [40.0, 70.0, 80.0], [10.0, 20.0, 30.0])
    b = write_run(tmp_path, "slow", [30.0, 60.0, 75.0, 78.0], [20.0, 40.0, 60.0, 80.0])
    out = tmp_path / "cmp"
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    result = json.loads((out / "compare.json").read_text())
    assert result["target_top1"] == 78.0  # the lower final top-1
    fast, slow = result["runs"]
    assert (fast["final_top1"], fast["best_top1"], fast["wall_seconds"], fast["seconds_to_target"]) == (80, 80, 30, 30)
    assert (slow["seconds_to_target"], slow["epochs_to_target"], fast["epochs_to_target"]) == (80, 4, 3)
    assert fast["images_per_s"] == [100.0, 200.0] and fast["stage_sizes"] == [16, 24]
    assert "s to 78.0%" in text and "16px 100 / 24px 200" in text
    for name in ("compare_epochs.png", "compare_time.png"):
        assert (out / name).read_bytes().startswith(PNG)
    assert main(["compare", str(a), str(b), "--out", str(out), "--target", "75"]) == 0
    capsys.readouterr()
    assert json.loads((out / "compare.json").read_text())["runs"][1]["seconds_to_target"] == 60
    assert main(["compare", str(a), str(tmp_path / "nope")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def split(*args: str) -> subprocess.CompletedProcess:
    """tools/split.py's main in this process (a new interpreter would spend seconds importing torch);
    its `__main__` is `sys.exit(main())`, so the exit status is main's return value."""
    spec = importlib.util.spec_from_file_location("split_tool", ROOT / "tools" / "split.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = tool.main(list(args))
    return subprocess.CompletedProcess(["split.py", *args], code, out.getvalue(), err.getvalue())


def make_folder(root: Path, counts: dict[str, int]) -> Path:
    for label, n in counts.items():
        (root / label).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(root / label / f"{label}{i:03d}.png")
    return root


@pytest.mark.parametrize("mode", ["copy", "hardlink", "symlink"])
def test_split_is_stratified_seeded_and_never_overwrites(tmp_path, mode):
    src = make_folder(tmp_path / "src", {"cat": 50, "dog": 30, "rare": 3})
    proc = split(str(src), str(tmp_path / "a"), "--ratios", "0.8,0.1,0.1", "--mode", mode, "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    counts = {
        split_name: {c: len(list((tmp_path / "a" / split_name / c).glob("*"))) for c in ("cat", "dog", "rare")}
        for split_name in ("train", "val", "test")
    }
    assert counts["train"] == {"cat": 40, "dog": 24, "rare": 1} and counts["val"] == {"cat": 5, "dog": 3, "rare": 1}
    assert counts["test"] == {"cat": 5, "dog": 3, "rare": 1}
    assert "cat" in proc.stdout and "total" in proc.stdout and "40" in proc.stdout
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 83 and len({f.name for f in files}) == 83  # each image in exactly one split
    link = next((tmp_path / "a" / "train" / "cat").iterdir())
    assert link.is_symlink() == (mode == "symlink")
    assert (link.stat().st_nlink > 1) == (mode == "hardlink")
    assert split(str(src), str(tmp_path / "b"), "--ratios", "0.8,0.1,0.1", "--seed", "1").returncode == 0
    assert sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.png")) == files  # same seed
    assert split(str(src), str(tmp_path / "c"), "--ratios", "0.8,0.1,0.1", "--seed", "2").returncode == 0
    assert sorted(p.relative_to(tmp_path / "c") for p in (tmp_path / "c").rglob("*.png")) != files
    before = sorted((tmp_path / "a").rglob("*"))
    refused = split(str(src), str(tmp_path / "a"))
    assert refused.returncode == 2 and "already exists" in refused.stderr
    assert sorted((tmp_path / "a").rglob("*")) == before


def test_split_from_a_flat_folder_and_csv(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    rows = ["file,label"]
    for i in range(20):
        Image.new("RGB", (8, 8)).save(flat / f"img{i:02d}.jpg")
        rows.append(f"img{i:02d}.jpg,{'a' if i < 12 else 'b'}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    proc = split(str(flat), str(tmp_path / "out"), "--labels", str(tmp_path / "labels.csv"), "--ratios", "0.75,0.25")
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "out" / "train" / "a").iterdir())) == 9
    assert len(list((tmp_path / "out" / "val" / "b").iterdir())) == 2
    bad = split(str(flat), str(tmp_path / "x"), "--ratios", "0.7,0.7")
    assert bad.returncode == 2 and "sum to 1" in bad.stderr and not (tmp_path / "x").exists()


def test_compare_two_tiny_runs_reads_their_metrics(tiny_config, tmp_path, capsys):
    a = run_training(parse_config(tiny_config), out_dir=tmp_path / "runs")
    tiny_config["stages"][1]["img_size"] = 16  # a second run: every stage at one size
    b = run_training(parse_config(tiny_config), out_dir=tmp_path / "runs")
    capsys.readouterr()
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    text = capsys.readouterr().out
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    for run, row in zip((a, b), result["runs"]):
        epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"epoch",' in line]
        summary = json.loads((run / "summary.json").read_text())
        assert row["final_top1"] == epochs[-1]["val_top1"] == summary["final_val_top1"]
        assert row["best_top1"] == max(e["val_top1"] for e in epochs) == summary["best_val_top1"]
        assert row["wall_seconds"] == epochs[-1]["elapsed_s"]
        assert row["images_per_s"] == [s["train_images_per_s"] for s in summary["stages"]]
        assert f"{row['final_top1']:.2f}%" in text and run.name[:34] in text
    assert result["target_top1"] == min(r["final_top1"] for r in result["runs"])
