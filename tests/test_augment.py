"""The batched crop-and-resize of `decode_on: device` against the per-sample `augment`, and the device
decoder: which one (TorchCodec or torchvision), JPEGs it rejects or cannot take, the stream fence on CPU."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data import crops, describe_loader, jpeg, tv2
from pipeline.data.augment import AugmentPath, augment, augment_batch
from pipeline.data.crops import centre_box, draw_crops, gather_crops, roi_resize, stack_padded
from pipeline.data.index import scan_image_folder
from pipeline.data.spec import LoaderSpec

from conftest import make_loader

CPU = torch.device("cpu")


def smooth(h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """A photo-like uint8 image: random colours varying over ~8 pixels."""
    low = torch.rand(1, 3, max(2, h // 8), max(2, w // 8), generator=g) * 255
    return torch.nn.functional.interpolate(low, (h, w), mode="bicubic").clamp(0, 255).round().to(torch.uint8)[0]


def noise(h: int, w: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


def spec_for(size: int, train: bool) -> LoaderSpec:
    return LoaderSpec(img_size=size, batch_size=8, train=train, device=CPU, seed=0)


def sizes(rng: np.random.Generator, n: int, size: int) -> list[tuple[int, int]]:
    """Squares, very elongated images, tiny ones, and up to ~8x the output size."""
    out = [(int(rng.integers(2, 8 * size)), int(rng.integers(2, 8 * size))) for _ in range(n)]
    return out + [(1, 1), (2, 3), (3, 8 * size), (8 * size, 2), (size, size), (8 * size, 8 * size)]


def reference(images: list[torch.Tensor], boxes: np.ndarray | None, spec: LoaderSpec) -> torch.Tensor:
    if boxes is None:
        return torch.stack([augment(img, 0, spec) for img in images])
    return torch.stack([augment(img, 0, spec, tuple(b)) for img, b in zip(images, boxes.tolist())])


def compare(out: torch.Tensor, ref: torch.Tensor, ratio: np.ndarray, mean_bound: float, sample_bound: float):
    diff = (out.int() - ref.int()).abs()
    up = torch.from_numpy(ratio <= 1)
    if up.any():  # upscales and identity: bilinear at the same points, up to uint8 rounding
        assert diff[up].max() <= 1
    assert diff.float().mean() < mean_bound
    assert diff.float().mean(dim=(1, 2, 3)).max() < sample_bound


# Downscales approximate the antialiased (triangle) filter (crops.roi_resize): on photo-like images
# measured mean <= 0.85, per-sample mean <= 1.9; on white noise, the filters' worst case, mean <= 2.4
# and per-sample mean <= 11.7 (1 < ratio < 1.5). Bounds leave ~2x room; a wrong box is off by ~40-80.
BOUNDS = {smooth: (1.5, 4.0), noise: (4.0, 20.0)}


@pytest.mark.parametrize("make", [smooth, noise])
@pytest.mark.parametrize("size", [16, 40])
@pytest.mark.parametrize("train", [True, False])
def test_batched_crops_match_per_sample_augment_on_any_sizes(make, size, train):
    rng, g = np.random.default_rng(size), torch.Generator().manual_seed(size)
    images = [make(h, w, g) for h, w in sizes(rng, 40, size)]
    spec = spec_for(size, train)
    seeds = rng.integers(0, 2**62, len(images)).tolist()
    heights, widths = np.array([i.shape[1] for i in images]), np.array([i.shape[2] for i in images])
    if train:
        drawn = draw_crops(heights, widths, np.asarray(seeds), spec)
        ratio = drawn[:, 2:4].max(axis=1) / size
        ref = reference(images, drawn, spec)
    else:
        ratio = np.array([max(centre_box(h, w, spec)[2:]) for h, w in zip(heights, widths)]) / size
        ref = reference(images, None, spec)
    assert ratio.min() < 1 < 4 < ratio.max()
    out = augment_batch(images, seeds, spec)
    assert out.dtype == torch.uint8 and out.shape == (len(images), 3, size, size)
    compare(out, ref, ratio, *BOUNDS[make])


@pytest.mark.parametrize("make", [smooth, noise])
@pytest.mark.parametrize("side", [10, 16, 50, 130])
def test_batched_crops_of_a_cache_block_match_per_sample_augment(make, side):
    g, size = torch.Generator().manual_seed(side), 16
    block = torch.stack([make(side, side, g) for _ in range(24)])
    spec = spec_for(size, True)
    seeds = list(range(100, 124))
    drawn = draw_crops(np.full(24, side), np.full(24, side), np.asarray(seeds), spec)
    out = augment_batch(block.permute(0, 2, 3, 1), seeds, spec)
    compare(out, reference(list(block), drawn, spec), drawn[:, 2:4].max(axis=1) / size, *BOUNDS[make])
    val = spec_for(size, False)  # validation keeps the exact batched resize
    assert torch.equal(augment_batch(block.permute(0, 2, 3, 1), seeds, val), augment(block, 0, val))


def test_boxes_touching_every_border_and_tiny_boxes():
    g = torch.Generator().manual_seed(0)
    images = [noise(h, w, g) for h, w in [(30, 20), (30, 20), (30, 20), (30, 20), (7, 5), (9, 40), (40, 9)]]
    boxes = np.array(
        [[0, 0, 2, 1], [28, 18, 2, 2], [0, 19, 30, 1], [29, 0, 1, 20], [0, 0, 7, 5], [3, 0, 6, 40], [0, 2, 40, 7]]
    )
    for size in (8, 24):
        spec = spec_for(size, True)
        ref = reference(images, np.concatenate([boxes, np.zeros((7, 1), np.int64)], axis=1), spec)
        buf, moved = stack_padded(images, boxes, 0)
        compare(roi_resize(buf, moved, size), ref, boxes[:, 2:].max(axis=1) / size, *BOUNDS[noise])


def test_flips_and_order_are_exact():
    # left/right asymmetric ramps, a different one per sample: a wrong flip or order is far off
    n, size = 12, 16
    ramp = torch.arange(48).float() * 5
    images = [(ramp[None, None, :] + 7 * k).expand(3, 32, 48).clamp(0, 255).to(torch.uint8) for k in range(n)]
    flips = np.arange(n) % 3 == 0
    boxes = np.array([[k, 2 * k, 16, 16] for k in range(n)])  # identity-size crops: exact
    buf, moved = stack_padded(images, boxes, 0)
    out = roi_resize(buf, moved, size, flips)
    for k in range(n):
        crop = images[k][:, k : k + 16, 2 * k : 2 * k + 16]
        assert torch.equal(out[k], crop.flip(-1) if flips[k] else crop)


def test_gather_crops_repeats_edges():
    block = torch.arange(2 * 5 * 5 * 3, dtype=torch.uint8).view(2, 5, 5, 3)
    crops, moved = gather_crops(block, np.array([[1, 2, 2, 3], [3, 0, 2, 1]]))
    assert crops.shape == (2, 3, 3, 4) and moved[:, :2].tolist() == [[0, 0], [0, 0]]
    assert torch.equal(crops[0, :, :2, :3], block[0, 1:3, 2:5].permute(2, 0, 1))
    assert torch.equal(crops[0, :, 2], crops[0, :, 1]) and torch.equal(crops[0, :, :, 3], crops[0, :, :, 2])


@pytest.fixture
def jpegs(tmp_path):
    """Two classes of 8 JPEGs of different sizes each."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(8):
            h, w = 20 + 3 * i, 44 - 2 * i
            Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(tmp_path / c / f"{i}.jpg")
    return scan_image_folder(tmp_path, "data.train")


@pytest.mark.parametrize(
    "cache,decode_on,path,work",
    [
        (None, "workers", AugmentPath.FILES_IN_WORKERS, "_decoded_crops"),
        (None, "device", AugmentPath.FILES_ON_DEVICE, "_encoded_batch"),
        ("decoded", "workers", AugmentPath.CACHE_IN_WORKERS, "_cached_crops"),
        ("decoded", "device", AugmentPath.CACHE_ON_DEVICE, "_cached_block"),
    ],
)
def test_each_loader_names_the_one_path_its_batches_take(jpegs, cache, decode_on, path, work):
    """(data.cache, data.decode_on) choose one of four paths, once: the dataset (the workers' half) and
    the loader (the main process's half) agree, the stage line names it, and its batches come out."""
    loader = make_loader(jpegs, batch=8, decode_on=decode_on, **({"cache": cache} if cache else {}))
    dataset = loader._loader.dataset
    assert loader.path == dataset.path == path and dataset._work.__name__ == work
    assert (
        describe_loader(DataConfig(cache=cache, workers=0), loader.path)
        == f"tv2{' + decoded cache' if cache else ''}, 0 workers ({path})"
    )
    images, labels = next(iter(loader))
    assert images.shape == (8, 3, 16, 16) and images.dtype == torch.float32 and len(labels) == 8


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("cache", [None, "decoded"])
def test_device_mode_keeps_order_and_labels_and_is_close_to_workers(jpegs, train, cache):
    kind = {"cache": cache} if cache else {}
    a = list(make_loader(jpegs, train=train, batch=8, decode_on="workers", **kind))
    b = list(make_loader(jpegs, train=train, batch=8, decode_on="device", **kind))
    assert len(a) == len(b) == 2
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb)
        # normalised units (1 uint8 level ~ 0.017): random-noise JPEGs, the filters' worst case
        assert (xa - xb).abs().mean(dim=(1, 2, 3)).max() < 0.35


def test_a_jpeg_the_batched_decoder_rejects_is_decoded_alone_on_the_cpu(jpegs, monkeypatch, capsys):
    bad = jpegs.samples[5][0]
    bad_bytes = tv2.read_file(bad)
    calls, cpu = [], []
    real_decoder, real_read = jpeg.jpeg_decoder, tv2.read_image

    def decoder(items, **kw):
        calls.append(len(items))
        if any(torch.equal(d, bad_bytes) for d in items):
            raise RuntimeError("nvjpeg: unsupported")
        return real_decoder(items, **kw)

    def read_image(path):
        cpu.append(path)
        return real_read(path)

    expected = [(x, y) for _ in range(2) for x, y in make_loader(jpegs, batch=8, decode_on="device")]
    monkeypatch.setattr(jpeg, "jpeg_decoder", decoder)
    monkeypatch.setattr(tv2, "read_image", read_image)
    ld = make_loader(jpegs, batch=8, decode_on="device")
    got = []
    for epoch in range(2):
        ld.set_epoch(0)  # the same epoch twice: the outputs are comparable
        got += list(ld)
    assert cpu == [bad, bad]  # only that file, once an epoch
    assert calls[0] == 8 and len(calls) > 2  # bisected in the first epoch
    assert all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(got, expected))
    err = capsys.readouterr().err
    assert err.count(bad) == 1 and "decoded on the CPU" in err
    ld.close()


def test_cpu_decoding_never_touches_cuda(jpegs, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("torch.cuda used on the CPU")

    for name in ("Stream", "stream", "current_stream"):
        monkeypatch.setattr(torch.cuda, name, fail)
    ld = make_loader(jpegs, batch=8, decode_on="device")
    assert ld._loader.pin_memory is False
    assert sum(y.numel() for _, y in ld) == 16
    ld.close()


@pytest.mark.parametrize("train", [True, False])
def test_a_large_image_does_not_pad_the_whole_batch_to_its_size(monkeypatch, train):
    g, rng = torch.Generator().manual_seed(1), np.random.default_rng(1)
    images = [smooth(int(h), int(w), g) for h, w in rng.integers(8, 40, (20, 2))] + [smooth(300, 200, g)]
    spec, seeds = spec_for(16, train), list(range(len(images)))
    whole = augment_batch(images, seeds, spec)  # one group: the buffer is well under PAD_BYTES
    monkeypatch.setattr(crops, "PAD_BYTES", 3 * 4 * 41 * 41 * 4)  # four small regions at most; the photo alone
    sizes = np.array([img.shape[1:] for img in images])
    boxes = draw_crops(sizes[:, 0], sizes[:, 1], np.asarray(seeds), spec)[:, :4] if train else None
    if boxes is None:
        boxes = np.array([centre_box(h, w, spec) for h, w in sizes])
    groups = crops.padded_groups(sizes, boxes, 0 if train else 1)
    assert (
        len(groups) >= 3
        and groups[0].tolist() == [20]
        and sorted(np.concatenate(groups).tolist()) == list(range(len(images)))
    )
    for group in groups:
        buf, _ = stack_padded([images[i] for i in group], boxes[group], 0 if train else 1)
        assert len(group) == 1 or buf.numel() * 4 <= crops.PAD_BYTES
    assert torch.equal(augment_batch(images, seeds, spec), whole)  # each sample as in one group: exact


def test_torchcodec_decodes_the_device_path_where_installed_and_torchvision_otherwise(jpegs, monkeypatch):
    import importlib.metadata

    from torchvision.io import decode_jpeg as torchvision_decode_jpeg

    codec = pytest.importorskip("torchcodec.decoders")
    assert jpeg.batched_jpeg_decoder() is codec.decode_jpeg  # the [torchcodec] extra, 0.17 or newer
    real_version = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata, "version", lambda name: "0.16.0" if name == "torchcodec" else real_version(name)
    )
    assert jpeg.batched_jpeg_decoder() is torchvision_decode_jpeg  # 0.16 lacks the stream fix
    monkeypatch.undo()
    by_codec = list(make_loader(jpegs, batch=8, decode_on="device"))
    monkeypatch.setattr(jpeg, "jpeg_decoder", torchvision_decode_jpeg)
    by_torchvision = list(make_loader(jpegs, batch=8, decode_on="device"))
    for (xa, ya), (xb, yb) in zip(by_codec, by_torchvision, strict=True):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)  # both libjpeg-turbo on the CPU: the same pixels


def test_jpegs_nvjpeg_cannot_take_are_decoded_in_the_workers(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    pixels = (rng.random((24, 30, 3)) * 255).astype(np.uint8)
    for c, (mode, kw) in enumerate([("RGB", {}), ("L", {}), ("CMYK", {}), ("RGB", {"progressive": True})]):
        (tmp_path / str(c)).mkdir()
        for i in range(2):
            Image.fromarray(pixels).convert(mode).save(tmp_path / str(c) / f"{i}.jpg", quality=90, **kw)
    index = scan_image_folder(tmp_path, "data.train")
    data = [tv2.read_file(p).numpy().tobytes() for p, _ in index.samples]
    assert [jpeg.nvjpeg_can_decode(d) for d in data] == [True] * 4 + [False] * 2 + [True] * 2  # CMYK: 4 components
    frame = jpeg.jpeg_frame(data[-1])
    assert frame == (24, 30, 0xC2, 8, 3)  # progressive, 8-bit, 3 components
    decoded = []
    real = jpeg.jpeg_decoder
    monkeypatch.setattr(jpeg, "jpeg_decoder", lambda items, **kw: decoded.append(len(items)) or real(items, **kw))
    ld = make_loader(index, train=False, batch=8, decode_on="device")
    (x, y), workers = next(iter(ld)), make_loader(index, train=False, batch=8, decode_on="workers")
    assert decoded == [6]  # the two CMYK files came decoded from the workers
    (xw, yw) = next(iter(workers))
    assert torch.equal(y, yw) and (x - xw).abs().mean(dim=(1, 2, 3)).max() < 0.35
    ld.close()
    workers.close()


@pytest.mark.parametrize(("mode", "kw"), [("RGB", {}), ("RGB", {"progressive": True}), ("L", {}), ("CMYK", {})])
def test_torchcodec_and_torchvision_decode_the_same_pixels_on_the_cpu(mode, kw):
    codec = pytest.importorskip("torchcodec.decoders")
    pixels = (np.random.default_rng(0).random((24, 30, 3)) * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, "JPEG", quality=90, **kw)
    data = torch.frombuffer(bytearray(out.getvalue()), dtype=torch.uint8)
    assert torch.equal(codec.decode_jpeg(data, mode="RGB"), jpeg.decode_jpeg(data, mode="RGB"))


def test_a_device_error_while_decoding_is_not_blamed_on_the_files(jpegs, monkeypatch):
    def out_of_memory(items, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(jpeg, "jpeg_decoder", out_of_memory)
    ld = make_loader(jpegs, batch=8, decode_on="device")
    with pytest.raises(torch.OutOfMemoryError):
        next(iter(ld))
    assert not any(p in tv2.CPU_JPEGS for p, _ in jpegs.samples)  # none sent to the CPU for good
    ld.close()
