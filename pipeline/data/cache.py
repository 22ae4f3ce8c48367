"""The decode-once cache (`data.cache: decoded`): each split decoded once into a memory-mapped
uint8 array of N x side x side x 3 (each image's central square, just above the largest stage).

Epochs then only crop, flip and resize from it: no JPEG is decoded again. A cache is keyed by the
files' paths, labels, sizes and modification times, so a changed dataset gets a new one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler
from torchvision.transforms.v2 import functional as F

from pipeline.data.demo import demo_cache_dir
from pipeline.data.folder import jpeg_region, read_image, warn_skipped
from pipeline.data.index import ImageFolderIndex
from pipeline.data.spec import ignore_stop_signals
from pipeline.errors import DataError
from pipeline.files import atomic_path, write_json

CACHE_VERSION = 1


@dataclass(frozen=True)
class DecodedCache:
    """A built cache file; opened lazily (and once) in each process that reads it."""

    path: Path
    side: int
    size: int
    bad: frozenset[int] = frozenset()  # samples that failed to decode (`on_error: skip`), stored as zeros

    def array(self) -> np.ndarray:
        arrays = _OPEN.setdefault(os.getpid(), {})
        if self.path not in arrays:
            arrays[self.path] = np.load(self.path, mmap_mode="r")
        return arrays[self.path]

    def gather(self, indices: list[int]) -> np.ndarray:
        """B x side x side x 3 uint8 (a copy: what the caller crops may be written to)."""
        return self.array()[np.asarray(indices)]


_OPEN: dict[int, dict[Path, np.ndarray]] = {}  # per process: a forked worker opens its own map


def cache_key(index: ImageFolderIndex, side: int) -> str:
    """The files, labels, sizes and modification times the cache was built from (the scan's stats)."""
    digest = hashlib.sha1(os.fsencode(f"v{CACHE_VERSION} side {side} {index.prefix}\n"))
    stats = index.stats
    if stats is None:  # an index of picked files, not scanned: stat them now
        stats = np.array([(st.st_size, st.st_mtime_ns) for st in map(os.stat, index.paths())])
    for part in (index.names, index.offsets, index.labels, stats.astype(np.int64)):
        digest.update(np.ascontiguousarray(part).tobytes())
    return digest.hexdigest()[:16]


def open_cache(index: ImageFolderIndex, side: int, workers: int, field: str, on_error: str = "fail") -> DecodedCache:
    """The cache for this split and side, built first if the dataset has none (or has changed).

    One process builds it at a time (a lock file beside it); the others then find it built.
    """
    root = demo_cache_dir() / "decoded"
    root.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9]+", "-", str(index.root)).strip("-")[-60:]
    stem = f"{name}-{hashlib.sha1(str(index.root).encode()).hexdigest()[:8]}-{side}"  # one per folder and side
    path = root / f"{stem}-{cache_key(index, side)}.npy"
    if not path.is_file():
        with open(root / f"{stem}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.is_file():
                build_cache(index, side, workers, path, field, on_error)
                for stale in root.glob(f"{stem}-*.npy"):  # this folder and side, for files since changed
                    if not stale.name.startswith(path.stem):
                        stale.unlink(missing_ok=True)
                for tmp in root.glob(".*.npy.*.tmp"):  # left by a build killed a day or more ago (atomic_path's names)
                    if time.time() - tmp.stat().st_mtime > 86400:
                        tmp.unlink(missing_ok=True)
    sidecar = bad_list(path)
    bad = frozenset(json.loads(sidecar.read_text())) if sidecar.is_file() else frozenset()
    if bad and on_error == "fail":
        first = index.path(min(bad))
        read_image(first)  # raises the DataError naming the file
        raise DataError(f"{first}: cannot decode image")
    return DecodedCache(path=path, side=side, size=len(index), bad=bad)


def bad_list(path: Path) -> Path:
    """Beside a cache: the indices of the samples that could not be decoded into it."""
    return path.with_name(path.stem + ".bad.json")


def smaller_cache(cache: DecodedCache, side: int) -> DecodedCache:
    """The same cache at a smaller side (for a smaller stage), made from it without decoding again:
    cropping a stage's image from a square just above its size costs a fraction of a large one."""
    if side >= cache.side:
        return cache
    path = cache.path.with_name(f"{cache.path.stem}-{side}.npy")
    if not path.is_file():
        source = cache.array()

        def fill(out: np.ndarray) -> None:
            for first in range(0, cache.size, 256):
                block = torch.from_numpy(np.array(source[first : first + 256])).permute(0, 3, 1, 2)
                small = F.resize(block, [side, side], antialias=True)
                out[first : first + len(block)] = small.permute(0, 2, 3, 1).numpy()

        write_array(path, (cache.size, side, side, 3), fill)
    return DecodedCache(path=path, side=side, size=cache.size, bad=cache.bad)


def write_array(
    path: Path,
    shape: tuple[int, ...],
    fill: Callable[[np.ndarray], None],
    before_rename: Callable[[], None] | None = None,
) -> None:
    """A uint8 .npy file of `shape`, filled by `fill(array)` in a temp file beside it, then fsynced and
    renamed (after `before_rename()`, which writes what must exist whenever the file does)."""
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        fill(out)
        out.flush()
        del out
        if before_rename is not None:
            before_rename()


def build_cache(
    index: ImageFolderIndex, side: int, workers: int, path: Path, field: str, on_error: str = "fail"
) -> None:
    """Decode every image once (in `workers` processes) into a .npy file, written aside and renamed.
    With `on_error: skip` an undecodable image is stored as zeros and listed beside the cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print(f"{field}: decoding {len(index)} images once into {path} ({side}x{side})", file=sys.stderr)
    loader = DataLoader(
        SquareDataset(index, side),
        batch_size=None,
        sampler=BatchSampler(SequentialSampler(range(len(index))), 64, drop_last=False),
        num_workers=workers,
        worker_init_fn=ignore_stop_signals,
    )

    bad: list[int] = []

    def fill(out: np.ndarray) -> None:
        for first, block, errors in loader:
            for i, error in errors:
                if on_error == "fail":
                    raise DataError(error)
                warn_skipped(index.path(i), error.split(": ", 1)[-1])
                bad.append(i)
            out[first : first + len(block)] = block.numpy()

    write_array(path, (len(index), side, side, 3), fill, before_rename=lambda: write_json(bad_list(path), bad))
    mb = path.stat().st_size / 2**20
    print(f"{field}: cache ready in {time.perf_counter() - start:.1f} s ({mb:.0f} MB)", file=sys.stderr)


class SquareDataset(Dataset):
    """Batches of images decoded to their central square at `side` x `side` (uint8, HWC)."""

    def __init__(self, index: ImageFolderIndex, side: int):
        self.index, self.side = index, side

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, batch: list[int]) -> tuple[int, torch.Tensor, list[tuple[int, str]]]:
        block = np.zeros((len(batch), self.side, self.side, 3), dtype=np.uint8)
        errors = []
        for k, i in enumerate(batch):
            try:
                block[k] = central_square(self.index.path(i), self.side)
            except DataError as e:  # handed over as text: a worker's exception would carry its traceback
                errors.append((i, str(e)))
        return batch[0], torch.from_numpy(block), errors


def central_square(path: str, side: int) -> np.ndarray:
    """The image's central square resized to side x side, RGB uint8 HWC; JPEGs at a reduced DCT scale."""
    try:
        with Image.open(path) as im:
            if im.format == "JPEG" and im.mode in ("RGB", "L"):
                width, height = im.size
                short = min(width, height)
                return jpeg_region(im, ((width - short) / 2, (height - short) / 2, short, short), side)
    except Exception:  # noqa: BLE001 - decoded again below, which names the problem
        pass
    img = read_image(path)  # raises a DataError naming the file
    short = min(img.shape[-2:])
    img = F.center_crop(img, [short, short])
    return F.resize(img, [side, side], antialias=True).permute(1, 2, 0).numpy()


def check_cache_side(cache: DecodedCache, img_size: int, crop_pct: float) -> None:
    if cache.side < math.floor(img_size / crop_pct):
        raise DataError(
            f"data.cache_size: {cache.side} is too small for {img_size}px stages "
            f"(validation resizes to {math.floor(img_size / crop_pct)}); use auto or a larger size"
        )
