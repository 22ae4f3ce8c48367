"""Data: dataset scan, the loader factory behind one contract, and the `demo` dataset.

The trainer calls `build_loader` (and `describe_loader`) and never branches on the backend.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pipeline.config import DataConfig, cache_side
from pipeline.data.cache import check_cache_side, open_cache, smaller_cache
from pipeline.data.demo import demo_root
from pipeline.data.index import ImageFolderIndex, scan_image_folder
from pipeline.data.spec import Loader, LoaderSpec
from pipeline.data.tv2 import TV2Loader
from pipeline.errors import ConfigError, DataError

__all__ = ["Datasets", "Loader", "LoaderSpec", "build_loader", "describe_loader", "require_backend", "scan_datasets"]

DALI_INSTALL = "pip install -e '.[dali]' (CUDA 13 driver; nvidia-dali-cuda120 for CUDA 12)"


class Datasets:
    """The scanned train and val splits, with one class list."""

    def __init__(self, train: ImageFolderIndex, val: ImageFolderIndex):
        if train.classes != val.classes:
            only_train = sorted(set(train.classes) - set(val.classes))
            only_val = sorted(set(val.classes) - set(train.classes))
            raise DataError(
                f"data.val: class folders differ from data.train (only in train: {only_train or '-'}; "
                f"only in val: {only_val or '-'})"
            )
        self.train, self.val, self.classes = train, val, train.classes


def scan_datasets(cfg: DataConfig) -> Datasets:
    """Resolve `demo` (generating it on first use) and scan both splits."""

    def folder(value: str, split: str) -> Path:
        return demo_root() / split if value == "demo" else Path(value)

    return Datasets(
        scan_image_folder(folder(cfg.train, "train"), "data.train", cfg.on_error),
        scan_image_folder(folder(cfg.val, "val"), "data.val", cfg.on_error),
    )


def resolve_workers(workers: int | str) -> int:
    """`auto`: the cores this process may use, less one for each process feeding a device, shared among
    the processes torchrun starts on this node (LOCAL_WORLD_SIZE); at least 1, at most 8 each."""
    if workers == "auto":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
        return max(1, min(8, (cores - local) // local))
    return int(workers)


def resolve_decode_on(cfg: DataConfig, device: torch.device) -> str:
    """`auto`: DALI decodes on the GPU (its `mixed` decoder, what it is for); tv2 decodes in its workers
    everywhere: in parallel, off the training thread, at PIL's reduced DCT scale for small stages (the
    pixels every benchmark measured), where nvJPEG runs in the training thread (docs/gpu.md)."""
    if cfg.decode_on != "auto":
        return cfg.decode_on
    return "device" if cfg.backend == "dali" and device.type == "cuda" else "workers"


def describe_loader(data: DataConfig, path: str | None = None) -> str:
    """How a stage's loader is set up, for the stage line: backend, cache, workers or DALI threads, and
    the loader's `path` where it has one (tv2's `AugmentPath`: where its batches are decoded and cropped)."""
    cache = " + decoded cache" if data.cache else ""
    unit = "threads" if data.backend == "dali" else "workers"
    return f"{data.backend}{cache}, {resolve_workers(data.workers)} {unit}" + (f" ({path})" if path else "")


def build_loader(
    cfg: DataConfig,
    index: ImageFolderIndex,
    *,
    train: bool,
    img_size: int,
    batch_size: int,
    device: torch.device,
    seed: int,
    channels_last: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> Loader:
    """A loader for one split and one stage. Training: shuffled per epoch, per-sample crops, last
    partial batch dropped; validation: every sample once, in order, resize + centre crop."""
    require_backend(cfg.backend)
    decode_on = resolve_decode_on(cfg, device)
    spec = LoaderSpec(
        img_size=img_size,
        batch_size=batch_size,
        train=train,
        device=device,
        seed=seed,
        workers=resolve_workers(cfg.workers),
        decode_on=decode_on,
        channels_last=channels_last,
        scale=cfg.scale,
        ratio=cfg.ratio,
        hflip=cfg.hflip,
        crop_pct=cfg.crop_pct,
        rank=rank,
        world_size=world_size,
        on_error=cfg.on_error,
    )
    if cfg.backend == "dali":
        from pipeline.data.dali import DALILoader

        return DALILoader(index, spec)
    cache = None
    if cfg.cache == "decoded":
        field = "data.train" if train else "data.val"
        stage_side = cache_side(img_size, cfg)
        side = stage_side if cfg.cache_size == "auto" else int(cfg.cache_size)
        cache = open_cache(index, side, spec.workers, field, cfg.on_error)  # decoded once, at the run's largest size
        check_cache_side(cache, img_size, cfg.crop_pct)
        if train:  # crops from a square just large enough; validation resizes the full one, once
            cache = smaller_cache(cache, stage_side)
    return TV2Loader(index, spec, cache)


def require_backend(backend: str) -> None:
    """Fail before any training when the chosen backend's package is not installed."""
    if backend == "dali":
        try:
            import nvidia.dali  # noqa: F401
        except ModuleNotFoundError:
            raise ConfigError(f"data.backend: dali needs NVIDIA DALI, which is not installed: {DALI_INSTALL}") from None
        except Exception as e:  # noqa: BLE001 - a wheel for another CUDA version or platform
            raise ConfigError(
                f"data.backend: dali: NVIDIA DALI is installed but does not import ({type(e).__name__}: {e}); "
                f"install the wheel for this machine's CUDA driver: {DALI_INSTALL}"
            ) from None
