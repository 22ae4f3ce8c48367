"""The torchvision-v2 loader: per-sample seeded crops and flips, uint8 until the device.

Decoding runs in DataLoader workers (CPU) or, with `decode_on: device`, in batch on the training
device (nvJPEG on CUDA), where each batch is cropped and resized at once. The parts live by job:
the epoch's samples and seeds in `sampler`, the crop boxes in `crops`, the augmentation in `augment`,
JPEG headers and the batched decoder in `jpeg`; this module is the dataset and the loader.
"""

from __future__ import annotations

import atexit
import math
import sys
import weakref
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset
from torchvision.io import read_file

from pipeline.data.augment import AugmentPath, augment, augment_batch, augment_block, load_jpeg_cropped, normalize
from pipeline.data.cache import DecodedCache
from pipeline.data.folder import read_image, warn_skipped
from pipeline.data.index import ImageFolderIndex
from pipeline.data.jpeg import decode_jpegs, is_jpeg, nvjpeg_can_decode
from pipeline.data.sampler import EpochSampler
from pipeline.data.spec import (
    LoaderSpec,
    ignore_stop_signals,
)
from pipeline.errors import DataError


class FolderDataset(Dataset):
    """Items are whole batches: a list of (index, seed) -> (images, labels, indices, seeds).

    Workers mode: images is one BxCxSxS batch in channels_last memory, uint8 for a GPU (normalised
    there) or already normalised float for CPU training.
    Device mode: the encoded JPEGs (and other formats decoded), packed in one flat tensor.
    Label -1 marks an unreadable file, reported by path in the main process.
    """

    def __init__(self, index: ImageFolderIndex, spec: LoaderSpec, cache: DecodedCache | None = None):
        self.index, self.spec, self.cache = index, spec, cache
        self.path = AugmentPath.of(cache is not None, spec.decode_on)
        self._work = {
            AugmentPath.CACHE_ON_DEVICE: self._cached_block,
            AugmentPath.CACHE_IN_WORKERS: self._cached_crops,
            AugmentPath.FILES_ON_DEVICE: self._encoded_batch,
            AugmentPath.FILES_IN_WORKERS: self._decoded_crops,
        }[self.path]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, batch: list[tuple[int, int]]):
        idxs = [i for i, _ in batch]
        seeds = [s for _, s in batch]
        labels = torch.from_numpy(self.index.labels[np.asarray(idxs, dtype=np.int64)])
        return self._work(idxs, seeds, labels), labels, idxs, seeds

    def _cached_block(self, idxs: list[int], seeds: list[int], labels: torch.Tensor) -> torch.Tensor:
        """The cache's squares as they are: cropped in batch on the device."""
        for k, i in enumerate(idxs):
            if i in self.cache.bad:  # stored as zeros: replaced by another sample in the main process
                labels[k] = -1
        return torch.from_numpy(self.cache.gather(idxs))

    def _cached_crops(self, idxs: list[int], seeds: list[int], labels: torch.Tensor) -> torch.Tensor:
        """The cache's squares, each cropped here."""
        block = self._cached_block(idxs, seeds, labels)
        return self._finish(augment_block(block.permute(0, 3, 1, 2), seeds, self.spec))

    def _encoded_batch(self, idxs: list[int], seeds: list[int], labels: torch.Tensor):
        """JPEG bytes for the device's batched decoder (other formats decoded here), packed."""
        items = []
        for k, idx in enumerate(idxs):
            item = self._encoded(self.index.path(idx))
            if item is None:
                labels[k], item = -1, torch.zeros(3, 1, 1, dtype=torch.uint8)
            items.append(item)
        return _pack(items)

    def _decoded_crops(self, idxs: list[int], seeds: list[int], labels: torch.Tensor) -> torch.Tensor:
        """Every file decoded and cropped here (JPEGs straight to their crop)."""
        size = self.spec.img_size
        images = np.empty((len(idxs), size, size, 3), dtype=np.uint8)
        for k, (idx, seed) in enumerate(zip(idxs, seeds)):
            path = self.index.path(idx)
            img = load_jpeg_cropped(path, seed, self.spec)
            if img is None:
                try:
                    img = augment(read_image(path), seed, self.spec)
                except DataError:
                    labels[k], img = -1, 0
            images[k] = img.permute(1, 2, 0).numpy() if isinstance(img, torch.Tensor) else img  # to HWC
        return self._finish(torch.from_numpy(images).permute(0, 3, 1, 2))

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
        self.path = AugmentPath.of(cache is not None, spec.decode_on)  # where its batches are decoded and cropped
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
            if self.path == AugmentPath.CACHE_ON_DEVICE:
                images = augment_batch(data.to(device, non_blocking=True), seeds, self.spec)
            elif self.path == AugmentPath.FILES_ON_DEVICE:
                images, failed = self._decode_on_device(_unpack(data), idxs, seeds)
                bad = sorted(set(bad) | set(failed))
            else:  # cropped in the workers
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
            path = self.index.path(idxs[b])
            try:
                read_image(path)
                reason = "cannot decode image"
            except DataError as e:
                reason = str(e).split(": ", 1)[-1]
            warn_skipped(path, reason)
        bad_set = set(bad)
        good = [i for i in range(len(labels)) if i not in bad_set]
        if not good:
            raise DataError(f"{self.index.path(idxs[bad[0]])}: a whole batch of undecodable images")
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
        paths = [self.index.path(i) for i in idxs]
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
        path = self.index.path(idx)
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
