"""The torchvision-v2 loader: per-sample seeded crops and flips, uint8 until the device.

Decoding runs in DataLoader workers (CPU) or, with `decode_on: device`, in batch on the training
device (nvJPEG on CUDA), where each batch is cropped and resized at once (pipeline.data.crops);
`augment` is the per-sample reference, for CPU and CUDA tensors.
"""

from __future__ import annotations

import atexit
import importlib.metadata
import io
import math
import sys
import weakref
from collections.abc import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.transforms.v2 import functional as F

from pipeline.data.cache import DecodedCache
from pipeline.data.crops import gather_crops, padded_groups, roi_resize, stack_padded, to_device
from pipeline.data.folder import ImageFolderIndex, dct_scale, jpeg_region, read_image, warn_skipped
from pipeline.data.spec import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LoaderSpec,
    ignore_stop_signals,
    sample_seeds,
    shard_bounds,
)
from pipeline.errors import DataError


class EpochSampler(Sampler):
    """Yields (index, augmentation seed); training shuffles per epoch, validation keeps order.

    Seeds depend only on (seed, epoch, position), so a resumed epoch sees the same crops
    whatever the number of workers.
    """

    def __init__(self, n: int, spec: LoaderSpec):
        self.n, self.spec, self.epoch = n, spec, 0
        self.skip = 0  # samples of the epoch already trained (a run resumed mid-epoch)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _positions(self) -> torch.Tensor:
        # Training: every rank takes an equal share (the remainder is dropped, as DistributedSampler
        # with drop_last); validation: contiguous shards, each sample on exactly one rank.
        spec = self.spec
        if spec.train:
            per_rank = self.n // spec.world_size
            return torch.arange(spec.rank, per_rank * spec.world_size, spec.world_size)
        return torch.arange(*shard_bounds(self.n, spec.rank, spec.world_size))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order, seeds = sample_seeds(self.spec.seed, self.epoch, self.n)
        positions = self._positions()
        indices = order[positions] if self.spec.train else positions
        return iter(zip(indices[self.skip :].tolist(), seeds[positions][self.skip :].tolist()))

    def full_length(self) -> int:
        return len(self._positions())

    def __len__(self) -> int:
        return max(0, self.full_length() - self.skip)


ATTEMPTS = 10  # as torchvision's RandomResizedCrop
_STEP, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # splitmix64


def uniforms(seeds: np.ndarray, count: int) -> np.ndarray:
    """`count` uniform [0, 1) numbers per seed (splitmix64 of seed and position): per-sample
    randomness drawn for a whole batch at once, independent of batch composition and workers."""
    with np.errstate(over="ignore"):
        z = seeds.astype(np.uint64)[:, None] + np.uint64(_STEP) * np.arange(1, count + 1, dtype=np.uint64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def draw_crops(heights: np.ndarray, widths: np.ndarray, seeds: np.ndarray, spec: LoaderSpec) -> np.ndarray:
    """RandomResizedCrop boxes and flips for a batch, one row per sample: top, left, h, w, flip.

    torchvision's rule (up to 10 tries at a random area and log-uniform aspect, else the centre
    crop at the nearest allowed aspect), each sample from its own seed.
    """
    heights, widths = np.asarray(heights, dtype=np.int64), np.asarray(widths, dtype=np.int64)
    u = uniforms(np.asarray(seeds, dtype=np.int64), 4 * ATTEMPTS + 1)
    area = (heights * widths)[:, None] * (spec.scale[0] + (spec.scale[1] - spec.scale[0]) * u[:, :ATTEMPTS])
    lo, hi = math.log(spec.ratio[0]), math.log(spec.ratio[1])
    aspect = np.exp(lo + (hi - lo) * u[:, ATTEMPTS : 2 * ATTEMPTS])
    w = np.rint(np.sqrt(area * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(area / aspect)).astype(np.int64)
    fits = (w > 0) & (h > 0) & (w <= widths[:, None]) & (h <= heights[:, None])
    first = fits.argmax(axis=1)
    rows = np.arange(len(heights))
    ok = fits[rows, first]
    w, h = np.where(ok, w[rows, first], 0), np.where(ok, h[rows, first], 0)
    top = np.floor(u[rows, 2 * ATTEMPTS + first] * (heights - h + 1)).astype(np.int64)
    left = np.floor(u[rows, 3 * ATTEMPTS + first] * (widths - w + 1)).astype(np.int64)
    # no try fitted: the centre crop, its aspect clamped to the allowed range
    in_ratio = widths / heights
    fw = np.where(in_ratio > spec.ratio[1], np.rint(heights * spec.ratio[1]), widths).astype(np.int64)
    fh = np.where(in_ratio < spec.ratio[0], np.rint(widths / spec.ratio[0]), heights).astype(np.int64)
    top, left = np.where(ok, top, (heights - fh) // 2), np.where(ok, left, (widths - fw) // 2)
    h, w = np.where(ok, h, fh), np.where(ok, w, fw)
    flip = (u[:, -1] < spec.hflip).astype(np.int64)
    return np.stack([top, left, h, w, flip], axis=1)


_MASK = (1 << 64) - 1


def _uniform(seed: int, k: int) -> float:
    """`uniforms(seeds, ...)[:, k - 1]` for one seed, in Python integers."""
    z = (seed + _STEP * k) & _MASK
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK
    return ((z ^ (z >> 31)) >> 11) * 2.0**-53


def draw_crop(height: int, width: int, seed: int, spec: LoaderSpec) -> tuple[int, int, int, int, bool]:
    """One sample's box (top, left, h, w) and flip: `draw_crops` for a batch of one, without numpy's
    per-call cost (a worker draws one per decoded image)."""
    s0, s1 = spec.scale
    lo, hi = math.log(spec.ratio[0]), math.log(spec.ratio[1])
    flip = _uniform(seed, 4 * ATTEMPTS + 1) < spec.hflip
    for i in range(ATTEMPTS):
        area = height * width * (s0 + (s1 - s0) * _uniform(seed, i + 1))
        aspect = math.exp(lo + (hi - lo) * _uniform(seed, ATTEMPTS + i + 1))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = math.floor(_uniform(seed, 2 * ATTEMPTS + i + 1) * (height - h + 1))
            left = math.floor(_uniform(seed, 3 * ATTEMPTS + i + 1) * (width - w + 1))
            return top, left, h, w, flip
    in_ratio = width / height
    w = round(height * spec.ratio[1]) if in_ratio > spec.ratio[1] else width
    h = round(width / spec.ratio[0]) if in_ratio < spec.ratio[0] else height
    return (height - h) // 2, (width - w) // 2, h, w, flip


def centre_box(height: int, width: int, spec: LoaderSpec) -> tuple[float, float, float, float]:
    """Validation (timm's crop_pct): the region (top, left, h, w), in the image's own pixels, that
    resizing the shorter side to size / crop_pct and taking the central size x size keeps; rounded
    as torchvision's resize and center_crop round, so one resample gives the same pixels as two."""
    size, short = spec.img_size, math.floor(spec.img_size / spec.crop_pct)
    if height <= width:
        h2, w2 = short, int(short * width / height)
    else:
        h2, w2 = int(short * height / width), short
    sy, sx = height / h2, width / w2
    return int(round((h2 - size) / 2)) * sy, int(round((w2 - size) / 2)) * sx, size * sy, size * sx


def augment(img: torch.Tensor, seed: int, spec: LoaderSpec, box: tuple[int, ...] | None = None) -> torch.Tensor:
    """One uint8 3xHxW image (CPU or CUDA) -> uint8 3xSxS: random crop+flip (its `box` from
    `draw_crops`, or drawn here from `seed`), or resize+centre crop."""
    size = [spec.img_size, spec.img_size]
    on_cpu = img.device.type == "cpu" and img.dtype == torch.uint8
    if spec.train:
        top, left, h, w, flip = box if box is not None else draw_crop(img.shape[-2], img.shape[-1], seed, spec)
        crop = img[None, :, top : top + h, left : left + w]
        if on_cpu:  # torch's vectorised uint8 resize wants channels_last (HWC) memory: twice as fast
            crop = crop.contiguous(memory_format=torch.channels_last)
            img = torch.nn.functional.interpolate(crop, size, mode="bilinear", antialias=True)[0]
        else:
            img = F.resize(crop, size, antialias=True)[0]
        return img.flip(-1) if flip else img
    # timm's crop_pct: resize the shorter side to size / crop_pct, then take the centre (of one
    # image, or of a batch of equal-sized ones)
    x = img if img.ndim == 4 else img[None]
    x = x.contiguous(memory_format=torch.channels_last) if on_cpu else x
    x = F.center_crop(F.resize(x, [math.floor(spec.img_size / spec.crop_pct)], antialias=True), size)
    return x if img.ndim == 4 else x[0]


def augment_block(block: torch.Tensor, seeds: list[int], spec: LoaderSpec) -> torch.Tensor:
    """B x 3 x side x side uint8 (CPU or CUDA) -> B x 3 x S x S: every sample's own crop and flip."""
    if not spec.train:
        return augment(block, 0, spec)  # one resize + centre crop for the whole batch
    n, side = len(block), block.shape[-1]
    boxes = draw_crops(np.full(n, side), np.full(n, side), np.asarray(seeds), spec).tolist()
    return torch.stack([augment(img, 0, spec, tuple(box)) for img, box in zip(block, boxes)])


def augment_batch(images: torch.Tensor | list[torch.Tensor], seeds: list[int], spec: LoaderSpec) -> torch.Tensor:
    """`augment` for a batch on the training device, in a few batched kernels: a B x H x W x 3 block
    of equal squares (the cache) or a list of 3 x H x W images -> uint8 B x 3 x S x S."""
    block = isinstance(images, torch.Tensor)
    if block and not spec.train:
        return augment(images.permute(0, 3, 1, 2), 0, spec)  # already one resize + centre crop, exact
    if block:
        heights = widths = np.full(len(images), images.shape[1])
    else:
        heights, widths = (np.array([img.shape[k] for img in images]) for k in (1, 2))
    if spec.train:
        drawn = draw_crops(heights, widths, np.asarray(seeds), spec)
        boxes, flips = drawn[:, :4], drawn[:, 4]
    else:
        boxes, flips = np.array([centre_box(h, w, spec) for h, w in zip(heights, widths)]), None
    if block:
        crops, boxes = gather_crops(images, boxes)
        return roi_resize(crops, boxes, spec.img_size, flips)
    margin = 0 if spec.train else 1  # training resizes the crop alone, validation the whole image
    out = torch.empty(len(images), 3, spec.img_size, spec.img_size, dtype=torch.uint8, device=images[0].device)
    for group in padded_groups(np.stack([heights, widths], axis=1), boxes, margin):
        crops, moved_boxes = stack_padded([images[i] for i in group], boxes[group], margin)
        index = to_device(group, out.device)
        out[index] = roi_resize(crops, moved_boxes, spec.img_size, None if flips is None else flips[group])
    return out


def batched_jpeg_decoder() -> Callable[..., list[torch.Tensor]]:
    """TorchCodec's decode_jpeg where it is installed (0.17 on: batched nvJPEG, its decode ordered with
    the stream it is called on, meta-pytorch/torchcodec#1634); else torchvision's, deprecated since
    0.29 and not fixed (pytorch/vision#9606). Both take (list of bytes, mode="RGB", device=)."""
    try:
        from torchcodec.decoders import decode_jpeg as codec_decode_jpeg

        if tuple(int(p) for p in importlib.metadata.version("torchcodec").split(".")[:2]) >= (0, 17):
            return codec_decode_jpeg
    except Exception:  # noqa: BLE001 - not installed, or a build for another torch or CUDA
        pass
    return decode_jpeg


jpeg_decoder = batched_jpeg_decoder()  # `decode_jpegs`'s decoder (tests put a failing one here)


def decode_jpegs(
    items: list[torch.Tensor], device: torch.device, stream: torch.cuda.Stream | None = None
) -> list[torch.Tensor]:
    """JPEG bytes -> 3 x H x W uint8 images on `device`, in one call; on CUDA under `stream`, a side
    stream of the caller's. Its outputs then come from that stream's pool, never from blocks the
    training stream freed while kernels queued there may still read them (torchvision's decoder writes
    into such blocks from a stream of its own: pytorch/vision#9606), and TorchCodec's host wait before
    decoding waits for this idle stream, not for the whole training queue."""
    if stream is None:
        return jpeg_decoder(items, mode="RGB", device=device)
    with torch.cuda.stream(stream):
        images = jpeg_decoder(items, mode="RGB", device=device)
    current = torch.cuda.current_stream(device)
    current.wait_stream(stream)
    for img in images:
        img.record_stream(current)  # freed blocks return to the side stream's pool only after this use
    return images


SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # frame headers: they carry the size


NVJPEG_FRAMES = (0xC0, 0xC1, 0xC2)  # Huffman baseline, extended and progressive: what nvJPEG decodes


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's frame header, walking the marker segments; None if not a JPEG."""
    frame = jpeg_frame(data)
    return frame[:2] if frame is not None else None


def nvjpeg_can_decode(data: bytes) -> bool:
    """8-bit Huffman JPEGs of 1 or 3 components: nvJPEG (and TorchCodec on it) fails on 12-bit,
    arithmetic-coded and lossless ones, and CMYK / YCCK may come out in wrong colours (torchvision
    skips them in its own CUDA tests), so those decode on the CPU."""
    frame = jpeg_frame(data)
    return frame is not None and frame[2] in NVJPEG_FRAMES and frame[3] == 8 and frame[4] in (1, 3)


def jpeg_frame(data: bytes) -> tuple[int, int, int, int, int] | None:
    """(height, width, frame marker, bits per sample, components) from a JPEG's frame header, walking
    the marker segments; None if not a JPEG."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        elif marker in SOF_MARKERS:
            height, width = (data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8]
            return (height, width, marker, data[i + 4], data[i + 9]) if height and width else None
        elif marker == 0xDA:  # scan data before any frame header
            return None
        else:
            i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None


def load_jpeg_cropped(path: str, seed: int, spec: LoaderSpec) -> torch.Tensor | np.ndarray | None:
    """A JPEG straight to its crop (3xSxS tensor or SxSx3 array, uint8). When the crop is at least
    twice `img_size` across, PIL decodes at a reduced DCT scale (1/2, 1/4, 1/8) and resizes; else
    libjpeg-turbo decodes it whole, in C, and torch crops and resizes. None for other formats or on
    any error (the caller then decodes it fully and reports what fails)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        size = jpeg_size(data)
        if size is None:
            return None
        height, width = size
        box = draw_crop(height, width, seed, spec) if spec.train else None
        top, left, h, w = box[:4] if box else centre_box(height, width, spec)
        if dct_scale(min(h, w), spec.img_size) == 1:  # decoded whole: libjpeg-turbo in C, torch resizes
            img = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            return augment(img, seed, spec, box) if img.shape[-2:] == (height, width) else None
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as im:
            if im.mode not in ("RGB", "L"):
                return None  # CMYK and others: the full decoder converts them
            out = jpeg_region(im, (left, top, w, h), spec.img_size)
            return out[:, ::-1] if box and box[4] else out
    except Exception:  # noqa: BLE001 - decoded again by the full path, which names the problem
        return None


_STATS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def normalize(images: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """uint8 NCHW -> float, normalised with the ImageNet statistics, on the images' device: one
    fused multiply-add, (x - mean) / std = x * (1 / std) - mean / std."""
    if images.device not in _STATS:
        mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1) * 255
        _STATS[images.device] = 1 / std, -mean / std
    scale, shift = _STATS[images.device]
    x = torch.addcmul(shift, images, scale)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


class FolderDataset(Dataset):
    """Items are whole batches: a list of (index, seed) -> (images, labels, indices, seeds).

    Workers mode: images is one BxCxSxS batch in channels_last memory, uint8 for a GPU (normalised
    there) or already normalised float for CPU training.
    Device mode: the encoded JPEGs (and other formats decoded), packed in one flat tensor.
    Label -1 marks an unreadable file, reported by path in the main process.
    """

    def __init__(self, index: ImageFolderIndex, spec: LoaderSpec, cache: DecodedCache | None = None):
        self.samples, self.spec, self.cache = index.samples, spec, cache

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, batch: list[tuple[int, int]]):
        idxs = [i for i, _ in batch]
        seeds = [s for _, s in batch]
        labels = torch.tensor([self.samples[i][1] for i in idxs])
        if self.cache is not None:
            for k, i in enumerate(idxs):
                if i in self.cache.bad:  # stored as zeros: replaced by another sample in the main process
                    labels[k] = -1
            block = torch.from_numpy(self.cache.gather(idxs))
            if self.spec.decode_on == "device":
                return block, labels, idxs, seeds  # cropped in batch on the device
            crops = augment_block(block.permute(0, 3, 1, 2), seeds, self.spec)
            return self._finish(crops), labels, idxs, seeds
        if self.spec.decode_on == "device":
            items = []
            for k, (idx, _) in enumerate(batch):
                item = self._encoded(self.samples[idx][0])
                if item is None:
                    labels[k], item = -1, torch.zeros(3, 1, 1, dtype=torch.uint8)
                items.append(item)
            return _pack(items), labels, idxs, seeds
        size = self.spec.img_size
        images = np.empty((len(batch), size, size, 3), dtype=np.uint8)
        for k, (idx, seed) in enumerate(batch):
            path = self.samples[idx][0]
            img = load_jpeg_cropped(path, seed, self.spec)
            if img is None:
                try:
                    img = augment(read_image(path), seed, self.spec)
                except DataError:
                    labels[k], img = -1, 0
            images[k] = img.permute(1, 2, 0).numpy() if isinstance(img, torch.Tensor) else img  # to HWC
        return self._finish(torch.from_numpy(images).permute(0, 3, 1, 2)), labels, idxs, seeds

    def _finish(self, images: torch.Tensor) -> torch.Tensor:
        """Training on the CPU: normalised here, in the worker. The main process then does no tensor
        work of its own, whose idle-spinning threads would take the CPU the workers need."""
        if self.spec.device.type == "cpu":
            return normalize(images, self.spec.channels_last)
        return images  # uint8 NCHW (channels_last view): a quarter of the bytes to the GPU

    def _encoded(self, path: str) -> torch.Tensor | None:
        """JPEG bytes nvJPEG takes (decoded in batch on the device), or the image decoded here."""
        try:
            data = read_file(path)
        except RuntimeError:
            return None
        if is_jpeg(data) and nvjpeg_can_decode(data.numpy().tobytes()):
            return data
        try:
            return read_image(path)  # other formats and JPEGs decode here, in parallel workers
        except DataError:
            return None


def is_jpeg(data: torch.Tensor) -> bool:
    return data.ndim == 1 and data.numel() > 2 and int(data[0]) == 0xFF and int(data[1]) == 0xD8


def _pack(items: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """One flat uint8 tensor for the whole batch: a worker cannot hand over hundreds of small
    tensors (one file descriptor each), and read_file's own storage cannot be shared at all."""
    return torch.cat([d.reshape(-1) for d in items]), [tuple(d.shape) for d in items]


def _unpack(packed: tuple[torch.Tensor, list[tuple[int, ...]]]) -> list[torch.Tensor]:
    flat, shapes = packed
    sizes = [math.prod(s) for s in shapes]
    return [part.view(shape) for part, shape in zip(torch.split(flat, sizes), shapes)]


class TV2Loader:
    """Iterates (images, labels) on the device: float, normalised, NCHW (channels_last), int64."""

    def __init__(self, index: ImageFolderIndex, spec: LoaderSpec, cache: DecodedCache | None = None):
        self.index, self.spec, self.cache = index, spec, cache
        _OPEN_LOADERS.add(self)
        self.sampler = EpochSampler(len(index), spec)
        self.batch_size = spec.batch_size
        on_cuda = spec.device.type == "cuda"
        self._loader = DataLoader(  # whole batches per call: no per-sample fetch and collate
            FolderDataset(index, spec, cache),
            batch_size=None,
            sampler=BatchSampler(self.sampler, spec.batch_size, drop_last=spec.train),
            num_workers=spec.workers,
            pin_memory=on_cuda,  # batches, labels included, cross to the GPU asynchronously
            persistent_workers=spec.workers > 0,
            worker_init_fn=ignore_stop_signals,
        )
        self._decode_stream = None  # `decode_jpegs`'s side stream on CUDA, made at the first batch

    def __len__(self) -> int:
        n = self.sampler.full_length()
        return n // self.batch_size if self.spec.train else math.ceil(n / self.batch_size)

    @property
    def num_samples(self) -> int:
        """Samples one epoch yields on this rank (after drop_last for training)."""
        n = self.sampler.full_length()
        return n // self.batch_size * self.batch_size if self.spec.train else n

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The epoch to iterate next; `start_batch` > 0 resumes it after that many batches, with the
        same samples and crops the uninterrupted epoch would have had."""
        self.sampler.set_epoch(epoch, start_batch * self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._loader is None:
            raise RuntimeError("loader used after close()")
        # the DataLoader's iterator now, not at the first batch: it draws its base seed from torch's
        # RNG, and a run resumed mid-epoch restores the RNGs after this call
        return self._batches(iter(self._loader))

    def _batches(self, batches) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.spec.device
        for data, labels, idxs, seeds in batches:
            bad = (labels < 0).nonzero().flatten().tolist()
            if bad and self.spec.on_error == "fail":
                self._raise_unreadable(idxs[bad[0]])
            if self.cache is not None and self.spec.decode_on == "device":
                images = augment_batch(data.to(device, non_blocking=True), seeds, self.spec)
            elif self.spec.decode_on == "device":
                images, failed = self._decode_on_device(_unpack(data), idxs, seeds)
                bad = sorted(set(bad) | set(failed))
            else:
                images = data.to(device, non_blocking=True)
            if bad:
                images, labels = self._skip_bad(images, labels, bad, idxs)
            if images.dtype == torch.uint8:
                images = normalize(images, self.spec.channels_last)
            yield images, labels.to(device, non_blocking=True)

    def _skip_bad(self, images: torch.Tensor, labels: torch.Tensor, bad: list[int], idxs: list[int]):
        """`on_error: skip`: in training each undecodable sample is replaced by a good one of the same
        batch (the batch keeps its size, so step counts and compiled shapes stay); validation drops
        it. Each is named once."""
        for b in bad:
            path = self.index.samples[idxs[b]][0]
            try:
                read_image(path)
                reason = "cannot decode image"
            except DataError as e:
                reason = str(e).split(": ", 1)[-1]
            warn_skipped(path, reason)
        bad_set = set(bad)
        good = [i for i in range(len(labels)) if i not in bad_set]
        if not good:
            raise DataError(f"{self.index.samples[idxs[bad[0]]][0]}: a whole batch of undecodable images")
        if not self.spec.train:  # validation leaves them out: every image is counted once, as itself
            keep = torch.tensor(good)
            return images[keep.to(images.device)], labels[keep]
        source = torch.tensor([good[j % len(good)] for j in range(len(bad))])
        images, labels = images.clone(), labels.clone()
        images[torch.tensor(bad)] = images[source.to(images.device)]
        labels[torch.tensor(bad)] = labels[source]
        return images, labels

    def _decode_on_device(
        self, items: list[torch.Tensor], idxs: list[int], seeds: list[int]
    ) -> tuple[torch.Tensor, list[int]]:
        """JPEG bytes are decoded here in one batch; other formats arrive decoded from the workers.
        Also returns the positions that failed to decode (`on_error: skip`; else it raises)."""
        device = self.spec.device
        paths = [self.index.samples[i][0] for i in idxs]
        jpeg = [i for i, d in enumerate(items) if d.ndim == 1 and paths[i] not in CPU_JPEGS]
        images: list = [None if d.ndim == 1 else d.to(device, non_blocking=True) for d in items]
        for i, img in zip(jpeg, self._decode_jpegs([items[i] for i in jpeg])):
            images[i] = img
        failed = []
        for i in [i for i, img in enumerate(images) if img is None]:
            first = paths[i] not in CPU_JPEGS
            CPU_JPEGS.add(paths[i])  # later epochs and stages send it straight here
            try:
                images[i] = read_image(paths[i]).to(device, non_blocking=True)
            except DataError:
                if self.spec.on_error == "fail":
                    raise
                failed.append(i)
                images[i] = torch.zeros(3, 8, 8, dtype=torch.uint8, device=device)  # replaced by _skip_bad
                continue
            if first:
                print(f"warning: {paths[i]}: the batched JPEG decoder rejects it; decoded on the CPU", file=sys.stderr)
        return augment_batch(images, seeds, self.spec), failed

    def _decode_jpegs(self, items: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """`decode_jpegs`, None for each JPEG the decoder rejects: a failed call is split in halves
        and retried, so one bad file costs a few calls, not the whole batch decoded on the CPU."""
        if not items:
            return []
        device = self.spec.device
        if device.type == "cuda" and self._decode_stream is None:
            self._decode_stream = torch.cuda.Stream(device)
        try:
            return decode_jpegs(items, device, self._decode_stream)
        except DEVICE_ERRORS:
            raise  # the device's fault, not a file's
        except RuntimeError:
            if len(items) == 1:
                return [None]
            half = len(items) // 2
            return self._decode_jpegs(items[:half]) + self._decode_jpegs(items[half:])

    def _raise_unreadable(self, idx: int) -> None:
        path = self.index.samples[idx][0]
        read_image(path)  # raises the DataError that names the file and the decoder's reason
        raise DataError(f"{path}: cannot decode image")

    def close(self) -> None:
        """Stop the workers and drop the loader (stages rebuild loaders; memory must not grow)."""
        shutdown_workers(self._loader)
        self._loader = None


_OPEN_LOADERS: weakref.WeakSet[TV2Loader] = weakref.WeakSet()
# RuntimeErrors that are the device's, not a file's (AcceleratorError: torch 2.8 on)
DEVICE_ERRORS = (torch.cuda.OutOfMemoryError, getattr(torch, "AcceleratorError", torch.cuda.OutOfMemoryError))
CPU_JPEGS: set[str] = set()  # JPEGs the batched decoder rejected, decoded on the CPU from then on


@atexit.register
def _close_open_loaders() -> None:
    """At exit, stop the workers of loaders never closed (an error path): they ignore SIGTERM, so
    multiprocessing's own clean-up, which terminates and then joins them, would wait for ever."""
    for loader in list(_OPEN_LOADERS):
        loader.close()


def shutdown_workers(loader: DataLoader | None) -> None:
    """Stop a DataLoader's persistent workers now (they otherwise live until garbage collection)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None:
        iterator._shutdown_workers()
