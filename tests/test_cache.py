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
from pipeline.data.crops import draw_crop, draw_crops
from pipeline.data.index import scan_image_folder
from pipeline.data.spec import LoaderSpec

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


def jpeg_bytes(img: Image.Image, **save) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, "JPEG", **save)
    return buf.getvalue()


def test_jpeg_size_reads_the_frame_header():
    from pipeline.data.jpeg import jpeg_size

    rgb = Image.new("RGB", (501, 375), (10, 200, 30))
    assert jpeg_size(jpeg_bytes(rgb)) == (375, 501)
    assert jpeg_size(jpeg_bytes(rgb, progressive=True)) == (375, 501)
    exif = Image.Exif()
    exif[0x010E] = "a description long enough to make a real APP1 segment" * 20
    assert jpeg_size(jpeg_bytes(rgb, exif=exif)) == (375, 501)
    assert jpeg_size(jpeg_bytes(rgb.convert("L"))) == (375, 501)
    assert jpeg_size(jpeg_bytes(rgb.convert("CMYK"))) == (375, 501)
    assert jpeg_size(jpeg_bytes(rgb)[:20]) is None  # cut before the frame header
    assert jpeg_size(b"\x89PNG\r\n\x1a\n" + bytes(40)) is None


@pytest.mark.parametrize("size, scale", [(200, 1), (120, 2), (60, 4), (30, 8)])
def test_reduced_decoding_takes_the_scale_it_can(size, scale):
    # 501 x 375: sides not multiples of the scale (PIL's draft then needs the floor of the size)
    import io

    from pipeline.data.augment import augment
    from pipeline.data.folder import dct_scale, jpeg_region

    g = np.random.default_rng(0)
    smooth = torch.nn.functional.interpolate(torch.tensor(g.random((1, 3, 24, 32)), dtype=torch.float32), (375, 501))
    src = Image.fromarray((smooth[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    data = jpeg_bytes(src, quality=95)
    box = (40, 10, 375, 360)  # left, top, w, h
    assert dct_scale(min(box[2:]), size) == scale
    with Image.open(io.BytesIO(data)) as im:
        ours = jpeg_region(im, box, size)
        decoded = im.size
    assert decoded[0] == -(-501 // scale)  # the scale asked for is the one taken
    whole = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    spec = LoaderSpec(size, 1, True, torch.device("cpu"), 0)
    crop = read_image_bytes(whole)[:, 10:370, 40:415]
    reference = augment(crop, 0, spec, (0, 0, 360, 375, 0))
    assert ours.shape == (size, size, 3)
    # mean |difference| in grey levels: measured <= 3.7; the box 8 px off (one pixel at 1/8) gives >= 26
    assert np.abs(ours.astype(float) - reference.permute(1, 2, 0).numpy()).mean() < 6


def read_image_bytes(data: torch.Tensor) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(data, mode=ImageReadMode.RGB)


def test_folders_with_similar_names_keep_their_own_caches(tmp_path):
    roots = []
    for name in ("a_b", "a.b"):
        for c in ("x", "y"):
            (tmp_path / name / c).mkdir(parents=True)
            Image.new("RGB", (16, 16), (100 if name == "a_b" else 200, 0, 0)).save(tmp_path / name / c / "0.jpg")
        roots.append(scan_image_folder(tmp_path / name, "data.train"))
    first = open_cache(roots[0], 16, 0, "data.train")
    second = open_cache(roots[1], 16, 0, "data.train")
    assert first.path != second.path and first.path.exists() and second.path.exists()
    assert first.array()[0, ..., 0].mean() < 150 < second.array()[0, ..., 0].mean()


def test_cache_size_fits_every_stage(tiny_config, write_yaml):
    from pipeline.config import load_config
    from pipeline.errors import ConfigError

    tiny_config["data"]["cache"] = "decoded"
    tiny_config["stages"][0]["data"] = {"crop_pct": 0.25}  # a 16 px stage that validates from 64 px
    assert load_config(write_yaml(tiny_config)).data.cache_size == 64
    tiny_config["data"]["cache_size"] = 40
    with pytest.raises(ConfigError, match=r"data.cache_size: 40 is too small for stage 0 \(16px.*resizes to 64\)"):
        load_config(write_yaml(tiny_config))
