"""The torchvision-v2 loader: per-sample seeded crops and flips, uint8 until the device.

Decoding runs in DataLoader workers (CPU) or, with `decode_on: device`, in batch on the training
device (nvJPEG on CUDA); the augmentation code is the same for CPU and CUDA tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.transforms.v2 import functional as F

from pipeline.data.folder import ImageFolderIndex, read_image
from pipeline.data.spec import IMAGENET_MEAN, IMAGENET_STD, LoaderSpec, sample_seeds, shard_bounds
from pipeline.errors import DataError


class EpochSampler(Sampler):
    """Yields (index, augmentation seed); training shuffles per epoch, validation keeps order.

    Seeds depend only on (seed, epoch, position), so a resumed epoch sees the same crops
    whatever the number of workers.
    """

    def __init__(self, n: int, spec: LoaderSpec):
        self.n, self.spec, self.epoch = n, spec, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

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
        return iter(zip(indices.tolist(), seeds[positions].tolist()))

    def __len__(self) -> int:
        return len(self._positions())


def draw_crop(height: int, width: int, seed: int, spec: LoaderSpec) -> tuple[int, int, int, int, bool]:
    """RandomResizedCrop box (top, left, h, w) and flip for one sample, from its own seed.

    torchvision's `RandomResizedCrop.get_params` (10 tries, then the centre crop at the nearest
    allowed aspect), drawn from a numpy generator: no global RNG state is touched.
    """
    rng = np.random.default_rng(seed)
    area = height * width
    log_ratio = (math.log(spec.ratio[0]), math.log(spec.ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*spec.scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w, bool(rng.random() < spec.hflip)
    in_ratio = width / height
    if in_ratio < spec.ratio[0]:
        w, h = width, int(round(width / spec.ratio[0]))
    elif in_ratio > spec.ratio[1]:
        w, h = int(round(height * spec.ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w, bool(rng.random() < spec.hflip)


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


def augment(img: torch.Tensor, seed: int, spec: LoaderSpec) -> torch.Tensor:
    """One uint8 3xHxW image (CPU or CUDA) -> uint8 3xSxS: random crop+flip, or resize+centre crop."""
    size = [spec.img_size, spec.img_size]
    if spec.train:
        top, left, h, w, flip = draw_crop(img.shape[-2], img.shape[-1], seed, spec)
        img = F.resized_crop(img, top, left, h, w, size, antialias=True)
        return F.horizontal_flip(img) if flip else img
    # timm's crop_pct: resize the shorter side to size / crop_pct, then take the centre
    img = F.resize(img, [math.floor(spec.img_size / spec.crop_pct)], antialias=True)
    return F.center_crop(img, size)


def load_jpeg_cropped(path: str, seed: int, spec: LoaderSpec) -> np.ndarray | None:
    """A JPEG straight to its SxSx3 uint8 crop, decoded at the smallest DCT scale (1/2, 1/4, 1/8)
    that keeps the crop at least `img_size` pixels across; None for other formats or on any error
    (the caller then decodes it fully and reports what fails)."""
    try:
        with Image.open(path) as im:
            if im.format != "JPEG" or im.mode not in ("RGB", "L"):
                return None  # CMYK and others: the full decoder converts them
            width, height = im.size
            if spec.train:
                top, left, h, w, flip = draw_crop(height, width, seed, spec)
            else:
                (top, left, h, w), flip = centre_box(height, width, spec), False
            k = 1
            while k < 8 and min(h, w) >= 2 * k * spec.img_size:
                k *= 2
            if k > 1:
                im.draft("RGB", (math.ceil(width / k), math.ceil(height / k)))
            fx, fy = im.size[0] / width, im.size[1] / height
            box = (left * fx, top * fy, (left + w) * fx, (top + h) * fy)
            out = im.convert("RGB").resize((spec.img_size, spec.img_size), Image.BILINEAR, box=box, reducing_gap=None)
            if flip:
                out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            return np.asarray(out)
    except Exception:  # noqa: BLE001 - decoded again by the full path, which names the problem
        return None


class FolderDataset(Dataset):
    """Items are whole batches: a list of (index, seed) -> (images, labels, indices, seeds).

    Workers mode: images is one uint8 BxSxSx3 tensor (NHWC: viewed as NCHW it is channels_last).
    Device mode: the encoded JPEGs (and other formats decoded), packed in one flat tensor.
    Label -1 marks an unreadable file, reported by path in the main process.
    """

    def __init__(self, index: ImageFolderIndex, spec: LoaderSpec):
        self.samples, self.spec = index.samples, spec

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, batch: list[tuple[int, int]]):
        idxs = [i for i, _ in batch]
        seeds = [s for _, s in batch]
        labels = torch.tensor([self.samples[i][1] for i in idxs])
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
                    img = augment(read_image(path), seed, self.spec).permute(1, 2, 0).numpy()
                except DataError:
                    labels[k], img = -1, 0
            images[k] = img
        return torch.from_numpy(images), labels, idxs, seeds

    def _encoded(self, path: str) -> torch.Tensor | None:
        """JPEG bytes (decoded in batch on the device), or another format decoded here."""
        try:
            data = read_file(path)
        except RuntimeError:
            return None
        if is_jpeg(data):
            return data
        try:
            return read_image(path)  # other formats decode here, in parallel workers
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

    def __init__(self, index: ImageFolderIndex, spec: LoaderSpec):
        self.index, self.spec = index, spec
        self.sampler = EpochSampler(len(index), spec)
        self.batch_size = spec.batch_size
        on_cuda = spec.device.type == "cuda"
        self._loader = DataLoader(  # whole batches per call: no per-sample fetch and collate
            FolderDataset(index, spec),
            batch_size=None,
            sampler=BatchSampler(self.sampler, spec.batch_size, drop_last=spec.train),
            num_workers=spec.workers,
            pin_memory=on_cuda and spec.decode_on == "workers",
            persistent_workers=spec.workers > 0,
        )
        shape = (1, 3, 1, 1)
        self._mean = torch.tensor(IMAGENET_MEAN, device=spec.device).view(shape) * 255
        self._std = torch.tensor(IMAGENET_STD, device=spec.device).view(shape) * 255

    def __len__(self) -> int:
        return len(self._loader)

    @property
    def num_samples(self) -> int:
        """Samples one epoch yields on this rank (after drop_last for training)."""
        n = len(self.sampler)
        return n // self.batch_size * self.batch_size if self.spec.train else n

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._loader is None:
            raise RuntimeError("loader used after close()")
        device = self.spec.device
        for data, labels, idxs, seeds in self._loader:
            bad = (labels < 0).nonzero().flatten().tolist()
            if bad:
                self._raise_unreadable(idxs[bad[0]])
            if self.spec.decode_on == "device":
                images = self._decode_on_device(_unpack(data), idxs, seeds)
            else:  # NHWC uint8: the NCHW view is channels_last, moved as it is
                images = data.permute(0, 3, 1, 2).to(device, non_blocking=True)
            yield self._normalize(images), labels.to(device, non_blocking=True)

    def _decode_on_device(self, items: list[torch.Tensor], idxs: list[int], seeds: list[int]) -> torch.Tensor:
        """JPEG bytes are decoded here in one batch; other formats arrive decoded from the workers."""
        device = self.spec.device
        jpeg = [i for i, d in enumerate(items) if d.ndim == 1]
        images: list = [None if d.ndim == 1 else d.to(device, non_blocking=True) for d in items]
        if jpeg:
            try:  # one batched call: nvJPEG on CUDA
                decoded = decode_jpeg([items[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)
                for i, img in zip(jpeg, decoded):
                    images[i] = img
            except RuntimeError:
                pass  # a corrupt JPEG in the batch: decode one by one below to name it
        for i, img in enumerate(images):
            if img is None:
                path = self.index.samples[idxs[i]][0]
                images[i] = read_image(path).to(device, non_blocking=True)
        return torch.stack([augment(img, s, self.spec) for img, s in zip(images, seeds)])

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().sub_(self._mean).div_(self._std)
        return x.contiguous(memory_format=torch.channels_last) if self.spec.channels_last else x

    def _raise_unreadable(self, idx: int) -> None:
        path = self.index.samples[idx][0]
        read_image(path)  # raises the DataError that names the file and the decoder's reason
        raise DataError(f"{path}: cannot decode image")

    def close(self) -> None:
        """Stop the workers and drop the loader (stages rebuild loaders; memory must not grow)."""
        iterator = getattr(self._loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()  # persistent workers otherwise live until garbage collection
        self._loader = None
