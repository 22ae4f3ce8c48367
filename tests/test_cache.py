"""The decode-once cache and the crop draws it shares with the tv2 loader."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

import pipeline.data.cache as cache_mod
from pipeline.data.cache import open_cache
from pipeline.data.folder import scan_image_folder
from pipeline.data.spec import LoaderSpec
from pipeline.data.tv2 import draw_crop, draw_crops

from conftest import make_loader


@pytest.fixture
def folder(tmp_path, tiny_data):
    shutil.copytree(tiny_data / "val", tmp_path / "val")
    return tmp_path / "val"


def test_cached_validation_matches_decoding(folder):
    # the same samples in the same order with the same labels; the square demo images are whole in
    # the cache, so only the extra resample (32 px source -> 24 px cache -> 16 px) differs
    index = scan_image_folder(folder, "data.val")
    plain = list(make_loader(index, train=False, size=16, batch=8))
    cached = list(make_loader(index, train=False, size=16, batch=8, cache="decoded"))
    assert len(plain) == len(cached) == 3
    for (xa, ya), (xb, yb) in zip(plain, cached):
        assert torch.equal(ya, yb)
        assert (xa - xb).abs().mean(dim=(1, 2, 3)).max() < 0.3  # measured <= 0.16; another image: >= 0.52


def test_cache_is_built_once_and_rebuilt_when_the_data_changes(folder, monkeypatch):
    builds = []
    real = cache_mod.build_cache
    monkeypatch.setattr(cache_mod, "build_cache", lambda *a: (builds.append(a[3]), real(*a)))
    index = scan_image_folder(folder, "data.val")
    first = open_cache(index, 24, 0, "data.val")
    assert open_cache(index, 24, 0, "data.val") == first and len(builds) == 1  # reused
    before = first.array()[0].copy()

    path = index.samples[0][0]
    Image.new("RGB", (32, 32), (250, 10, 10)).save(path)  # same name, new content
    os.utime(path, ns=(1, 1))  # even with an old timestamp: the size changed
    changed = open_cache(scan_image_folder(folder, "data.val"), 24, 0, "data.val")
    assert len(builds) == 2 and changed.path != first.path and not first.path.exists()  # the stale one goes
    after = changed.array()[0]
    assert not np.array_equal(before, after) and after[..., 0].mean() > 200  # the new red image

    extra = folder / "circle_hstripes" / "new.jpg"
    Image.new("RGB", (32, 32)).save(extra)
    grown = open_cache(scan_image_folder(folder, "data.val"), 24, 0, "data.val")
    assert len(builds) == 3 and grown.size == changed.size + 1


def test_stages_share_one_decode(folder, monkeypatch):
    builds = []
    real = cache_mod.build_cache
    monkeypatch.setattr(cache_mod, "build_cache", lambda *a: (builds.append(a[1]), real(*a)))
    index = scan_image_folder(folder, "data.val")
    shapes = []
    for size in (16, 24, 32):  # a run's stages: the cache is decoded at the largest, smaller ones derived
        ld = make_loader(index, size=size, cache="decoded", cache_size=40)
        x, _ = next(iter(ld))
        shapes.append((tuple(x.shape[-2:]), ld.cache.side))
    assert len(builds) == 1 and builds[0] == 40
    # each stage reads a square large enough for its smallest crop (16 px: 32), up to the decoded 40
    assert shapes == [((16, 16), 32), ((24, 24), 40), ((32, 32), 40)]


def test_cache_too_small_for_a_stage_is_refused(folder):
    from pipeline.errors import DataError

    index = scan_image_folder(folder, "data.val")
    with pytest.raises(DataError, match=r"data.cache_size: 16 is too small for 32px stages"):
        make_loader(index, size=32, cache="decoded", cache_size=16)


def test_crop_draws_follow_torchvision_and_agree_one_by_one():
    spec = LoaderSpec(32, 8, True, torch.device("cpu"), 0)
    seeds = np.random.default_rng(0).integers(0, 2**62, 4000)
    ours = draw_crops(np.full(4000, 120), np.full(4000, 90), seeds, spec)
    assert all(
        tuple(ours[i]) == (*draw_crop(120, 90, int(s), spec)[:4], int(draw_crop(120, 90, int(s), spec)[4]))
        for i, s in enumerate(seeds[:500])
    )
    torch.manual_seed(0)
    theirs = np.array(
        [RandomResizedCrop.get_params(torch.empty(1, 120, 90), [0.35, 1.0], [3 / 4, 4 / 3]) for _ in range(4000)]
    )
    for name, a, b in [
        ("area", ours[:, 2] * ours[:, 3] / (120 * 90), theirs[:, 2] * theirs[:, 3] / (120 * 90)),
        ("aspect", np.log(ours[:, 3] / ours[:, 2]), np.log(theirs[:, 3] / theirs[:, 2])),
        ("top", ours[:, 0] / 120, theirs[:, 0] / 120),
    ]:
        for q in (0.1, 0.5, 0.9):  # the same distribution: quantiles within sampling noise
            assert abs(np.quantile(a, q) - np.quantile(b, q)) < 0.05, (name, q)
    assert 0.45 < ours[:, 4].mean() < 0.55  # flips
