"""`python -m pipeline predict`: agreement with eval, output files, odd and unreadable images, errors."""

from __future__ import annotations

import copy
import csv
import importlib.util
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.cli import main
from pipeline.config import parse_config
from pipeline.train.run import run_training

from conftest import TINY_CONFIG


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize(
    "extra",
    [[], ["--tta", "flip", "--img-size", "32"], ["--ema", "--tta", "flip+crops"]],
    ids=["defaults", "flip-32px", "ema-crops"],
)
def test_predict_over_the_validation_folder_agrees_with_eval(tiny_run, tiny_data, tmp_path, extra):
    assert main(["eval", str(tiny_run), "--out", str(tmp_path / "eval"), *extra]) == 0
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())
    out = tmp_path / "predictions.csv"
    assert main(["predict", str(tiny_run), str(tiny_data / "val"), "--out", str(out), *extra]) == 0
    rows = read_csv(out)
    classes = list(evaluated["per_class"])
    assert len(rows) == evaluated["samples"] == 20
    # the confusion matrix rebuilt from the rows (true class: the folder) is eval's, cell by cell
    confusion = [[0] * len(classes) for _ in classes]
    for row in rows:
        confusion[classes.index(Path(row["path"]).parent.name)][classes.index(row["class_1"])] += 1
    assert confusion == evaluated["confusion"]
    top1 = 100.0 * sum(Path(r["path"]).parent.name == r["class_1"] for r in rows) / len(rows)
    assert top1 == pytest.approx(evaluated["top1"])


def test_predict_writes_csv_jsonl_or_stdout(tiny_run, tiny_data, tmp_path, capsys):
    folder = tiny_data / "val" / "ring_vstripes"
    images = sorted(str(p) for p in folder.iterdir())
    assert main(["predict", str(tiny_run), str(folder), "--topk", "3", "--out", str(tmp_path / "p.csv")]) == 0
    out = capsys.readouterr().out
    assert f"predicted {len(images)} of {len(images)} image(s)" in out and f"wrote {tmp_path / 'p.csv'}" in out
    rows = read_csv(tmp_path / "p.csv")
    assert list(rows[0]) == ["path", "class_1", "prob_1", "class_2", "prob_2", "class_3", "prob_3"]
    assert [r["path"] for r in rows] == images
    for r in rows:
        probs = [float(r[f"prob_{i}"]) for i in (1, 2, 3)]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-5
        assert len({r["class_1"], r["class_2"], r["class_3"]}) == 3
    # --topk above the number of classes: every class, once
    assert main(["predict", str(tiny_run), images[0], "--topk", "50", "--out", str(tmp_path / "p.jsonl")]) == 0
    (line,) = (tmp_path / "p.jsonl").read_text().splitlines()
    record = json.loads(line)
    assert record["path"] == images[0] and len(record["classes"]) == len(set(record["classes"])) == 10
    assert sum(record["probs"]) == pytest.approx(1.0, abs=1e-5)
    assert record["classes"][:3] == [rows[0][f"class_{i}"] for i in (1, 2, 3)]
    assert record["probs"][0] == pytest.approx(float(rows[0]["prob_1"]), abs=1e-6)
    capsys.readouterr()
    # no --out: the CSV on stdout, the summary on stderr
    assert main(["predict", str(tiny_run), images[0], images[1], "--topk", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        "path,class_1,prob_1",
        f"{images[0]},{rows[0]['class_1']},{rows[0]['prob_1']}",
        f"{images[1]},{rows[1]['class_1']},{rows[1]['prob_1']}",
    ]
    assert "predicted 2 of 2 image(s)" in captured.err


def odd_images(folder: Path, good: Path) -> dict[str, list[str]]:
    """Decodable odd images and unreadable files, named so that a batch of 2 holds only bad ones."""
    folder.mkdir()
    rgb = Image.open(good).convert("RGB")
    rgb.convert("L").save(folder / "a_gray.jpg")
    rgb.convert("CMYK").save(folder / "b_cmyk.jpg")
    body = os.urandom(400)
    (folder / "c_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + body)  # a JPEG header, then noise
    (folder / "d_truncated.png").write_bytes(png_bytes(rgb)[:120])  # a PNG cut off in its first chunk
    rgb.convert("RGBA").save(folder / "e_alpha.png")
    rgb.convert("P").save(folder / "f_palette.gif")
    Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).save(folder / "g_16bit.png")
    (folder / "h_empty.jpg").write_bytes(b"")
    (folder / "i_text.png").write_text("not an image")
    shutil.copy(good, folder / "j_good.jpg")
    good_names = ["a_gray.jpg", "b_cmyk.jpg", "e_alpha.png", "f_palette.gif", "g_16bit.png", "j_good.jpg"]
    bad_names = ["c_corrupt.jpg", "d_truncated.png", "h_empty.jpg", "i_text.png"]
    return {"good": [str(folder / n) for n in good_names], "bad": [str(folder / n) for n in bad_names]}


def png_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("batch", [2, 64])
def test_unreadable_files_are_skipped_named_and_listed(tiny_run, tiny_data, tmp_path, capsys, batch):
    files = odd_images(tmp_path / "odd", next((tiny_data / "val").rglob("*.jpg")))
    out = tmp_path / "p.jsonl"
    assert main(["predict", str(tiny_run), str(tmp_path / "odd"), "--batch-size", str(batch), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in rows] == files["good"]  # grayscale, CMYK, alpha, palette, 16-bit: all predicted
    captured = capsys.readouterr()
    warned = [line for line in captured.err.splitlines() if line.startswith("warning: skipping ")]
    named = sorted(line.removeprefix("warning: skipping ").split(": ")[0] for line in warned)
    assert named == files["bad"]  # each named once, with its reason
    assert any("zero bytes" in line for line in warned)
    summary = captured.out.splitlines()
    assert summary[0].startswith("predicted 6 of 10 image(s) with ")
    start = summary.index("skipped 4 file(s) that could not be read:")
    assert summary[start + 1 : start + 5] == [f"  {f}" for f in files["bad"]]


def test_a_first_batch_of_unreadable_files_does_not_stop_the_rest(tiny_run, tiny_data, tmp_path, capsys):
    good = next((tiny_data / "val").rglob("*.jpg"))
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / name).write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(300))
    shutil.copy(good, tmp_path / "c.jpg")
    paths = [str(tmp_path / n) for n in ("a.jpg", "b.jpg", "c.jpg")]
    assert main(["predict", str(tiny_run), *paths, "--batch-size", "2", "--out", str(tmp_path / "p.csv")]) == 0
    assert [r["path"] for r in read_csv(tmp_path / "p.csv")] == paths[2:]
    assert "skipped 2 file(s) that could not be read:" in capsys.readouterr().out


def test_no_readable_image_exits_2_and_writes_nothing(tiny_run, tmp_path, capsys):
    for name in ("x.jpg", "y.png"):
        (tmp_path / name).write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(200))
    out = tmp_path / "p.csv"
    assert main(["predict", str(tiny_run), str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: none of the 2 image(s) could be read (each is named above)"
    assert sum(line.startswith("warning: skipping ") for line in err) == 2
    assert not out.exists()


def test_predict_errors_are_one_line(tiny_run, tiny_data, tmp_path, capsys):
    image = str(next((tiny_data / "val").rglob("*.jpg")))
    not_ours = tmp_path / "weights.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, not_ours)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    cases = [
        (["nowhere", image], "nowhere: no such run folder or checkpoint"),
        (
            [str(not_ours), image],
            f"{not_ours}: not a checkpoint of this pipeline (no state_dict, arch, num_classes, classes, config)",
        ),
        ([str(tiny_run), "missing.jpg"], "missing.jpg: no such file or folder"),
        (
            [str(tiny_run), image, "--topk", "0"],
            "argument --topk: must be 1 or more, got 0 (see python -m pipeline predict --help)",
        ),
        ([str(tiny_run), image, "--tta", "mirror"], "--tta mirror: expected one of none, flip, flip+crops"),
        ([str(tiny_run), image, "--img-size", "4"], "--img-size 4: need at least 8"),
        (
            [str(tiny_run), image, "--img-size", "auto"],
            "--img-size auto: predict takes one size; eval --img-size auto finds the best",
        ),
        ([str(tiny_run), image, "--out", "p.txt"], "--out p.txt: expected a .csv or .jsonl file"),
    ]
    for args, message in cases:
        assert main(["predict", *args]) == 2, args
        assert capsys.readouterr().err.strip() == f"error: {message}"
    assert main(["predict", str(tiny_run), str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: {tmp_path / 'empty'}: no image files there (by extension: .jpg")


@pytest.mark.skipif(not importlib.util.find_spec("nvidia.dali"), reason="no DALI")
def test_a_dali_run_predicts_through_dali_and_agrees_with_eval(tiny_data, tmp_path, capsys):
    cfg = copy.deepcopy(TINY_CONFIG)
    cfg["data"].update(train=str(tiny_data / "train"), val=str(tiny_data / "val"), backend="dali")
    run = run_training(parse_config(cfg), out_dir=tmp_path / "runs")
    assert main(["eval", str(run), "--out", str(tmp_path / "eval")]) == 0
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())
    out = tmp_path / "p.csv"
    assert main(["predict", str(run), str(tiny_data / "val"), "--out", str(out)]) == 0
    rows = read_csv(out)
    top1 = 100.0 * sum(Path(r["path"]).parent.name == r["class_1"] for r in rows) / len(rows)
    assert len(rows) == 20 and top1 == pytest.approx(evaluated["top1"])
    files = odd_images(tmp_path / "odd", next((tiny_data / "val").rglob("*.jpg")))
    capsys.readouterr()
    assert main(["predict", str(run), str(tmp_path / "odd"), "--out", str(tmp_path / "odd.jsonl")]) == 0
    predicted = [json.loads(line)["path"] for line in (tmp_path / "odd.jsonl").read_text().splitlines()]
    err = capsys.readouterr().err
    assert "f_palette.gif: DALI cannot decode GIF" in err  # named, as tv2 names a file it cannot read
    assert set(predicted) <= set(files["good"]) and str(tmp_path / "odd" / "j_good.jpg") in predicted
    for bad in files["bad"]:
        assert bad not in predicted and f"warning: skipping {bad}" in err
