"""The torchvision-v2 loader: per-sample seeded crops and flips, uint8 until the device.

Decoding runs in DataLoader workers (CPU) or, with `decode_on: device`, in batch on the training
device (nvJPEG on CUDA); the augmentation code is the same for CPU and CUDA tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.transforms import RandomResizedCrop
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
    """RandomResizedCrop box and flip for one sample, from its own seed."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # torch.manual_seed would reseed CUDA too
        shape_only = torch.empty(1, 1, 1).expand(1, height, width)
        top, left, h, w = RandomResizedCrop.get_params(shape_only, list(spec.scale), list(spec.ratio))
        flip = bool(torch.rand(()) < spec.hflip)
    return top, left, h, w, flip


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


class FolderDataset(Dataset):
    """Items are (uint8 image or encoded bytes, label, index); label -1 marks an unreadable file."""

    def __init__(self, index: ImageFolderIndex, spec: LoaderSpec):
        self.samples, self.spec = index.samples, spec

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]):
        idx, seed = item
        path, label = self.samples[idx]
        unreadable = torch.zeros(3, self.spec.img_size, self.spec.img_size, dtype=torch.uint8), -1, idx, seed
        if self.spec.decode_on == "device":
            try:
                data = read_file(path)
            except RuntimeError:
                return unreadable  # reported by path in the main process, without a traceback
            if is_jpeg(data):
                return data, label, idx, seed  # decoded in batch on the device
        try:
            img = read_image(path)  # other formats decode here, in parallel workers
        except DataError:
            return unreadable
        if self.spec.decode_on == "device":
            return img, label, idx, seed  # augmented on the device with the JPEGs
        return augment(img, seed, self.spec), label, idx, seed


def is_jpeg(data: torch.Tensor) -> bool:
    return data.ndim == 1 and data.numel() > 2 and int(data[0]) == 0xFF and int(data[1]) == 0xD8


def _collate_encoded(batch):
    """One flat uint8 tensor for the whole batch: a worker cannot hand over hundreds of small
    tensors (one file descriptor each), and read_file's own storage cannot be shared at all."""
    data, labels, idxs, seeds = zip(*batch)
    flat = torch.cat([d.reshape(-1) for d in data])
    return (flat, [tuple(d.shape) for d in data]), torch.tensor(labels), list(idxs), list(seeds)


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
        self._loader = DataLoader(
            FolderDataset(index, spec),
            batch_size=spec.batch_size,
            sampler=self.sampler,
            num_workers=spec.workers,
            drop_last=spec.train,
            pin_memory=on_cuda and spec.decode_on == "workers",
            persistent_workers=spec.workers > 0,
            collate_fn=_collate_encoded if spec.decode_on == "device" else None,
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
            else:
                images = data.to(device, non_blocking=True)
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
