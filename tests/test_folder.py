"""One definition of a class folder's images (the scan, check-data, tools/split.py) and one atomic
writer (the decoded cache goes through pipeline.files like every other file)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from pipeline.commands.check_data import IGNORED, check_dataset, list_files
from pipeline.data.cache import bad_list, central_square, open_cache, smaller_cache, write_array
from pipeline.data.index import scan_image_folder
from pipeline.files import atomic_path, atomic_write

from conftest import make_loader

SPLIT = Path(__file__).resolve().parents[1] / "tools" / "split.py"
IMAGES = {("a", "1.jpg"), ("a", "2.jpg"), ("a", "3.png"), ("b", "1.jpg"), ("b", "2.jpg")}


@pytest.fixture
def messy(tmp_path) -> Path:
    """Two classes of tiny images, each folder also holding what a copy from a Mac or a notes file adds."""
    root = tmp_path / "src"
    for cls, name in IMAGES:
        folder = root / cls / ("sub" if name.endswith(".png") else "")  # one image a level down
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (40, 90, 200)).save(folder / name)
    for cls in ("a", "b"):
        (root / cls / "._1.jpg").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # an AppleDouble resource fork
        (root / cls / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(24))
        (root / cls / "notes.txt").write_text("not an image\n")
    return root


def test_the_scan_check_data_and_split_see_the_same_images(messy, tmp_path):
    index = scan_image_folder(messy, "data.train")  # a hidden ._1.jpg read as an image would fail the scan
    assert {(index.classes[label], Path(p).name) for p, label in index.samples} == IMAGES

    assert {(label, Path(p).name) for p, label, why in list_files(messy) if p and why != IGNORED} == IMAGES
    (split,) = check_dataset(messy, workers=1)["splits"].values()
    assert split["images"] == len(IMAGES) and split["bad_files"] == [] and split["empty_classes"] == []
    assert sorted(Path(p).relative_to(messy).as_posix() for p in split["ignored_files"]) == [
        "a/notes.txt",
        "b/notes.txt",
    ]  # hidden files are neither checked nor reported

    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(SPLIT), str(messy), str(out), "--ratios", "0.5,0.5", "--seed", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    written = [p for p in out.rglob("*") if p.is_file()]
    assert {(p.parent.name, p.name) for p in written} == IMAGES and len(written) == len(IMAGES)
    assert {p.parent.parent.name for p in written} == {"train", "val"}


@pytest.fixture
def folder(tmp_path, tiny_data) -> Path:
    shutil.copytree(tiny_data / "val", tmp_path / "val")
    return tmp_path / "val"


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_the_cache_is_written_whole_with_no_temp_file_left(folder):
    index = scan_image_folder(folder, "data.val")
    cache = open_cache(index, 24, 0, "data.val")
    assert temp_files(cache.path.parent) == []
    stored = np.load(cache.path)
    expected = np.stack([central_square(p, 24) for p, _ in index.samples])  # what each sample decodes to
    assert stored.dtype == np.uint8 and stored.shape == (len(index), 24, 24, 3)
    assert np.array_equal(stored, expected)
    assert bad_list(cache.path).read_text().strip() == "[]"
    usual = folder.parent / "usual"
    usual.write_bytes(b"")
    assert cache.path.stat().st_mode & 0o777 == usual.stat().st_mode & 0o777  # not mkstemp's 0600

    small = smaller_cache(cache, 16)
    assert small.path != cache.path and temp_files(cache.path.parent) == []
    resized = F.resize(torch.from_numpy(expected).permute(0, 3, 1, 2), [16, 16], antialias=True)
    assert np.array_equal(np.load(small.path), resized.permute(0, 2, 3, 1).numpy())

    x, _ = next(iter(make_loader(index, train=False, size=16, batch=8, cache="decoded", cache_size=24)))
    assert x.shape == (8, 3, 16, 16)  # the loader reads the written cache


def test_a_failed_write_leaves_neither_file_nor_temp(tmp_path):
    path = tmp_path / "x.npy"

    def fail(out: np.ndarray) -> None:
        out[:1] = 7
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_array(path, (4, 2, 2, 3), fail)
    assert list(tmp_path.iterdir()) == []

    atomic_write(tmp_path / "y", lambda f: f.write(b"old"))
    with pytest.raises(ValueError), atomic_path(tmp_path / "y") as tmp:
        tmp.write_bytes(b"new, half")
        raise ValueError
    assert [p.name for p in tmp_path.iterdir()] == ["y"] and (tmp_path / "y").read_bytes() == b"old"


def test_a_killed_builds_old_temp_file_is_cleared(folder):
    index = scan_image_folder(folder, "data.val")
    root = open_cache(index, 24, 0, "data.val").path.parent
    before, names = set(temp_files(root)), []
    probe = root / "probe.npy"
    write_array(probe, (1, 1, 1, 3), lambda out: None, before_rename=lambda: names.extend(temp_files(root)))
    probe.unlink()
    (name,) = set(names) - before  # the name a build's temp file has while it is written
    old, recent = root / name, root / name.replace(".tmp", "x.tmp")
    old.write_bytes(b"left by a killed build")
    recent.write_bytes(b"a build still running")
    two_days_ago = time.time() - 2 * 86400
    os.utime(old, (two_days_ago, two_days_ago))

    Image.new("RGB", (32, 32), (250, 10, 10)).save(index.samples[0][0])  # the data changed: a new build
    open_cache(scan_image_folder(folder, "data.val"), 24, 0, "data.val")
    assert not old.exists() and recent.exists()
    recent.unlink()
