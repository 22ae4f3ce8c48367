"""The bad-input zoo, made here: every case through both loaders, with `on_error: fail` (one line
naming the file, exit 2) and `skip` (a warning naming it, training goes on); `check-data` too."""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline.cli import main

BACKENDS = [
    "tv2",
    pytest.param("dali", marks=pytest.mark.skipif(not importlib.util.find_spec("nvidia.dali"), reason="no DALI")),
]


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_bad(kind: str, folder: Path) -> Path:
    """One bad file (or folder) of `kind` in class folder `folder`; returns its path."""
    if kind == "empty class":
        path = folder.parent / "zz_empty"
        path.mkdir()
        return path
    path = folder / {"truncated png": "bad.png"}.get(kind, "bad.jpg")
    if kind == "zero bytes":
        path.write_bytes(b"")
    elif kind == "not an image":
        path.write_text("this is a text file with a .jpg name\n")
    elif kind == "unreadable":
        path.symlink_to("/proc/self/mem")  # reading it fails with EIO, even as root
    elif kind == "corrupt jpeg":
        path.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8)  # a JPEG header, then garbage
    elif kind == "truncated png":
        path.write_bytes(png_bytes()[:60])
    return path


# kind -> (found when: scan | decode, words the message must have)
ZOO = {
    "zero bytes": ("scan", "zero bytes"),
    "not an image": ("scan", "not an image"),
    "unreadable": ("scan", "cannot be read"),
    "empty class": ("scan", "class folder(s) with no images"),
    "corrupt jpeg": ("decode", "decode"),
    "truncated png": ("decode", "decode"),
}


@pytest.fixture
def zoo_config(tiny_config, tiny_data, tmp_path):
    train = tmp_path / "train"
    shutil.copytree(tiny_data / "train", train)
    cfg = copy.deepcopy(tiny_config)
    cfg["data"]["train"] = str(train)
    cfg["run"]["out_dir"] = str(tmp_path / "runs")
    cfg["stages"] = [{"img_size": 16, "batch_size": 8, "epochs": 1}]
    return cfg


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(ZOO))
def test_bad_input_fails_in_one_line_naming_the_file(zoo_config, write_yaml, capsys, kind, backend):
    zoo_config["data"]["backend"] = backend
    bad = make_bad(kind, Path(zoo_config["data"]["train"]) / "circle_hstripes")
    assert main(["run", str(write_yaml(zoo_config))]) == 2
    err = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]  # after a cleared progress bar
    when, words = ZOO[kind]
    assert err.startswith("error: "), err
    assert "Traceback" not in err and words in err
    assert (bad.name if kind == "empty class" else str(bad)) in err
    if when == "scan":  # caught before any training: no run folder with checkpoints
        assert not list(Path(zoo_config["run"]["out_dir"]).rglob("*.pt"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", [k for k in ZOO if k != "empty class"])
def test_on_error_skip_names_the_file_and_trains_on(zoo_config, write_yaml, capsys, kind, backend):
    zoo_config["data"].update(backend=backend, on_error="skip")
    bad = make_bad(kind, Path(zoo_config["data"]["train"]) / "circle_hstripes")
    assert main(["run", str(write_yaml(zoo_config))]) == 0
    err = capsys.readouterr().err
    assert f"warning: skipping {bad}" in err and "Traceback" not in err
    (run_dir,) = Path(zoo_config["run"]["out_dir"]).iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary["stages"]) == 1


@pytest.mark.timeout(120)
def test_skip_with_the_decoded_cache(zoo_config, write_yaml, capsys):
    zoo_config["data"].update(cache="decoded", on_error="skip")
    bad = make_bad("corrupt jpeg", Path(zoo_config["data"]["train"]) / "circle_hstripes")
    assert main(["run", str(write_yaml(zoo_config))]) == 0
    assert f"warning: skipping {bad}" in capsys.readouterr().err
    zoo_config["data"]["on_error"] = "fail"  # the same cache, now refused: it holds a bad file
    assert main(["run", str(write_yaml(zoo_config))]) == 2
    assert str(bad) in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_check_data_reports_the_zoo(tiny_data, tmp_path, capsys):
    root = tmp_path / "ds"
    shutil.copytree(tiny_data, root)
    cls = root / "train" / "circle_hstripes"
    bad = [make_bad(kind, cls) for kind in ("corrupt jpeg",)] + [
        make_bad("not an image", root / "val" / "ring_vstripes")
    ]
    Image.new("L", (40, 30)).save(cls / "gray.png")
    Image.new("CMYK", (40, 30)).save(cls / "cmyk.jpg")
    Image.new("RGBA", (40, 30)).save(cls / "alpha.png")
    Image.new("I;16", (40, 30)).save(cls / "deep.png")
    shutil.copy(next((root / "train" / "square_vstripes").iterdir()), root / "val" / "square_vstripes" / "dup.jpg")
    out = tmp_path / "report.json"
    assert main(["check-data", str(root), "--json", str(out), "--workers", "2"]) == 1
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    train, val = report["splits"]["train"], report["splits"]["val"]
    assert train["images"] == 40 + 5 and train["classes"]["circle_hstripes"] == 4 + 5
    assert [b["path"] for b in train["bad_files"]] == [str(bad[0])]
    assert [b["path"] for b in val["bad_files"]] == [str(bad[1])]
    assert {"L", "CMYK", "RGBA"} <= set(train["odd_modes"]) and any(m.startswith("I") for m in train["odd_modes"])
    assert train["size"]["width"]["min"] == 32 and train["size"]["width"]["max"] == 40
    assert len(report["duplicates_across"]) == 1 and report["duplicates_across"][0][1].endswith("dup.jpg")
    assert "bad file: " + str(bad[0]) in text and "the same file in two splits: 1" in text
    assert main(["check-data", str(tiny_data)]) == 0
    assert "no problems found" in capsys.readouterr().out
    assert main(["check-data", str(tmp_path / "nowhere")]) == 2


def corrupt_jpeg(path: Path) -> Path:
    path.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8)  # passes the scan, fails to decode
    return path


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_in_validation_leaves_the_file_out_and_in_training_keeps_the_epoch(tiny_data, tmp_path, capsys, backend):
    from pipeline.data.index import scan_image_folder

    from conftest import make_loader

    root = tmp_path / "val"
    shutil.copytree(tiny_data / "val", root)
    bad = [corrupt_jpeg(root / "circle_hstripes" / "bad1.jpg"), corrupt_jpeg(root / "ring_vstripes" / "bad2.jpg")]
    index = scan_image_folder(root, "data.val")
    assert len(index) == 22
    seen = sum(len(y) for _, y in make_loader(index, train=False, batch=4, backend=backend, on_error="skip"))
    assert seen == 20  # every good image once, the two bad ones not at all
    train = make_loader(index, train=True, batch=4, backend=backend, on_error="skip")
    for epoch in range(2):
        train.set_epoch(epoch)
        assert sum(1 for _ in train) == len(train) == 5  # the epoch keeps its length
    err = capsys.readouterr().err
    assert all(err.count(f"warning: skipping {p}") == 1 for p in bad)  # named once each


def test_a_tv2_epoch_takes_its_seed_when_iterated(tiny_data):
    """Creating the iterator draws the DataLoader's base seed at once, so a run resumed mid-epoch can
    restore the RNGs after it and continue as if never stopped."""
    from pipeline.data.index import scan_image_folder

    from conftest import make_loader

    loader = make_loader(scan_image_folder(tiny_data / "val", "data.val"), train=True, batch=4)
    before = torch.get_rng_state()
    batches = iter(loader)
    assert not torch.equal(before, torch.get_rng_state())
    after = torch.get_rng_state()
    next(batches)
    assert torch.equal(after, torch.get_rng_state())
