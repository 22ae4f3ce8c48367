"""The DALI loader: fused decode + random crop, resize, flip and normalise in one DALI pipeline.

Decoding runs on the GPU (nvJPEG, DALI's `mixed` device) when training on CUDA, else on DALI's
CPU threads (`device_id=None`); the pipeline is the same code, only the device strings differ.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import backend, fn, types
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from pipeline.data.folder import skipped_files, warn_skipped
from pipeline.data.index import ImageFolderIndex
from pipeline.data.spec import IMAGENET_MEAN, IMAGENET_STD, LoaderSpec, sample_seeds, shard_bounds
from pipeline.errors import DataError

READER = "reader"
PREFETCH = 2  # batches DALI prepares ahead; also how far past the consumed batch a decode error can be
UNSUPPORTED = (".gif",)  # in the ImageFolder extensions, but not decodable by DALI


class DALILoader:
    """One split, one stage. Each epoch is a pipeline over that epoch's file order, built when the
    epoch starts and released when it ends, so the order (and a resumed epoch) is a function of
    (seed, epoch) alone, as in the tv2 loader, and a file DALI cannot decode can be named."""

    def __init__(self, index: ImageFolderIndex, spec: LoaderSpec):
        self._samples = list(zip(index.paths(), index.labels.tolist()))  # DALI's reader takes a list of files
        unsupported = [p for p, _ in self._samples if Path(p).suffix.lower() in UNSUPPORTED]
        if unsupported:
            more = f" and {len(unsupported) - 1} more" if len(unsupported) > 1 else ""
            raise DataError(
                f"{unsupported[0]}{more}: DALI cannot decode GIF; convert to JPEG/PNG or use data.backend: tv2"
            )
        self.index, self.spec, self.batch_size = index, spec, spec.batch_size
        self.epoch = 0
        n = len(index)
        # training: equal shards (the remainder of n / world_size is left out of the epoch), so every
        # rank runs the same number of steps; validation: every sample on exactly one rank
        self._n = n // spec.world_size * spec.world_size if spec.train else n
        self._shard = shard_bounds(self._n, spec.rank, spec.world_size)
        self._pipe: Pipeline | None = None
        self._iterator: DALIGenericIterator | None = None
        self._epoch_token: object | None = None  # which generator owns the current pipeline
        self._closed = False
        self._skip = 0  # batches of the next epoch to drop (resumed mid-epoch)
        self._local = False  # validation without skipped files: this rank's files alone
        # nvJPEG / nvImageCodec on the GPU ("mixed"), or libjpeg-turbo and friends on the CPU
        self._decoder = "mixed" if spec.device.type == "cuda" and spec.decode_on == "device" else "cpu"

    def __len__(self) -> int:
        size = self._shard[1] - self._shard[0]
        return size // self.batch_size if self.spec.train else math.ceil(size / self.batch_size)

    @property
    def num_samples(self) -> int:
        size = self._shard[1] - self._shard[0]
        return len(self) * self.batch_size if self.spec.train else size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The epoch to iterate next; `start_batch` > 0 resumes it after that many batches: they are
        run through the pipeline and dropped, so DALI's random crops continue exactly (decode cost,
        once per resume)."""
        self.epoch, self._skip = epoch, start_batch

    def epoch_files(self) -> tuple[list[str], list[int]]:
        """The whole epoch's file order (all ranks): training shuffles by (seed, epoch), as tv2 does.
        A file found undecodable (`on_error: skip`) is replaced by the next good one in the order."""
        samples = self._samples
        if self.spec.train:
            order, _ = sample_seeds(self.spec.seed, self.epoch, len(samples))
            samples = [samples[i] for i in order[: self._n].tolist()]
        bad = skipped_files()
        if bad and any(p in bad for p, _ in samples):
            if not self.spec.train:  # validation leaves them out: every image counted once, as itself
                # this rank's own shard without them, read as a single shard: the ranks stay disjoint
                start, end = shard_bounds(len(samples), self.spec.rank, self.spec.world_size)
                samples = [s for s in samples[start:end] if s[0] not in bad]
                self._local, self._shard = True, (0, len(samples))
            else:  # training: the next good file stands in, so the epoch keeps its length
                good = [k for k, (p, _) in enumerate(samples) if p not in bad]
                if not good:
                    raise DataError(f"{self.index.root}: no image left that DALI can decode")
                stand_in = {
                    k: good[bisect.bisect_right(good, k) % len(good)] for k, (p, _) in enumerate(samples) if p in bad
                }
                samples = [samples[stand_in[k]] if k in stand_in else s for k, s in enumerate(samples)]
        return [p for p, _ in samples], [label for _, label in samples]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._closed:
            raise RuntimeError("loader used after close()")
        self._release()  # an epoch left unfinished (the LR range test stops early)
        files = self._start_pipeline()
        return self._batches(self._epoch_token, files)

    def _start_pipeline(self) -> list[str]:
        """Build the epoch's pipeline and iterator from the first batch; returns the epoch's files."""
        files, labels = self.epoch_files()
        pipe = self._build_pipeline(files, labels)
        iterator = DALIGenericIterator(
            pipe,
            ["images", "labels"],
            reader_name=READER,
            last_batch_policy=LastBatchPolicy.DROP if self.spec.train else LastBatchPolicy.PARTIAL,
            prepare_first_batch=False,  # nothing runs before the first batch is asked for
        )
        self._pipe, self._iterator, self._epoch_token = pipe, iterator, object()
        return files

    def _batches(self, token: object, files: list[str]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # holds no reference to the pipeline, so close() frees it even while this generator is suspended
        device = self.spec.device
        skip, i = self._skip, 0
        try:
            while i < len(self):
                if self._epoch_token is not token:
                    raise RuntimeError("DALI loader closed or restarted while an epoch was being read")
                try:
                    out = next(self._iterator, None)
                except RuntimeError as e:
                    bad = self._find_undecodable(files, i, str(e))
                    if bad is None:
                        raise  # not a file's fault: a bug or the environment, with DALI's own traceback
                    path, reason = bad
                    if self.spec.on_error == "fail":
                        raise DataError(
                            f"{path}: DALI cannot decode this image ({reason}); "
                            "fix or remove the file, set data.on_error: skip, or use data.backend: tv2"
                        ) from None
                    # skip: the epoch starts again without the file, and the batches already given
                    # are run through again and dropped (the same files, so the same crops)
                    warn_skipped(path, reason)  # and remembered: epoch_files leaves it out from now on
                    self._release()
                    files = self._start_pipeline()
                    token, skip, i = self._epoch_token, max(skip, i), 0
                    continue
                if out is None:
                    raise RuntimeError(f"DALI ended the epoch after {i} of {len(self)} batches")
                i += 1
                if i <= skip:
                    continue
                images, labels = out[0]["images"], out[0]["labels"]
                # DALI writes NHWC: viewed as NCHW it is channels_last with no copy
                images = images.permute(0, 3, 1, 2) if self.spec.channels_last else images
                yield images.to(device, non_blocking=True), labels.view(-1).to(device, torch.int64)
        finally:
            if self._epoch_token is token:
                self._release()

    def _build_pipeline(self, files: list[str], labels: list[int]) -> Pipeline:
        spec = self.spec
        cuda = spec.device.type == "cuda"
        decoder = self._decoder
        device_id = None  # DALI on CPU only
        if cuda:
            device_id = spec.device.index if spec.device.index is not None else torch.cuda.current_device()
        seed = np.random.SeedSequence([spec.seed, self.epoch, spec.rank]).generate_state(1)[0] % 2**31
        pipe = Pipeline(
            batch_size=spec.batch_size,
            num_threads=max(1, spec.workers),
            device_id=device_id,
            seed=int(seed),
            prefetch_queue_depth=PREFETCH,
            # outputs are handed to PyTorch without a copy; safe on the GPU: the buffer torch drops goes
            # back to DALI's pool only after a cudaDeviceSynchronize (DLTensorGraveyard, dltensor.cc),
            # so kernels still queued on torch's stream have read it
            exec_dynamic=True,
        )
        size = spec.img_size
        with pipe:
            encoded, label = fn.readers.file(
                files=files,
                labels=labels,
                shard_id=0 if self._local else spec.rank,
                num_shards=1 if self._local else spec.world_size,
                pad_last_batch=True,  # each epoch starts at the shard's first file
                name=READER,
            )
            if spec.train:
                images = fn.decoders.image_random_crop(
                    encoded,
                    device=decoder,
                    output_type=types.RGB,
                    random_area=list(spec.scale),
                    random_aspect_ratio=list(spec.ratio),
                    num_attempts=10,
                )
                images = fn.resize(images, size=[size, size], antialias=True)
                crop = {"mirror": fn.random.coin_flip(probability=spec.hflip)}
            else:
                # the whole image: the mixed decoder upsamples chroma as the CPU one does (libjpeg-turbo's
                # fancy upsampling; off by default), so validation sees the same pixels whichever decodes.
                # Not for the random crop: with a region, nvImageCodec refuses it before nvJPEG 13.2
                images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB, jpeg_fancy_upsampling=True)
                # timm's crop_pct: the shorter side to size / crop_pct, then the centre
                images = fn.resize(images, resize_shorter=math.floor(size / spec.crop_pct), antialias=True)
                crop = {"crop": [size, size]}
            if cuda and decoder == "cpu":
                if not spec.train:  # crop before the copy: only the stage-size image crosses
                    images, crop = fn.crop(images, crop=[size, size]), {}
                images = images.gpu()  # uint8: a quarter of the float batch
            if cuda:
                label = label.gpu()
            images = fn.crop_mirror_normalize(
                images,
                dtype=types.FLOAT,
                output_layout="HWC" if spec.channels_last else "CHW",
                mean=[m * 255 for m in IMAGENET_MEAN],
                std=[s * 255 for s in IMAGENET_STD],
                **crop,
            )
            pipe.set_outputs(images, label)
        pipe.build()
        return pipe

    def _find_undecodable(self, files: list[str], batch: int, message: str) -> tuple[str, str] | None:
        """The file DALI failed on, with the reason: among the batches in flight, those its message
        names first, each decoded alone. None when every file decodes (the failure is not a file's)."""
        start, end = self._shard
        window = files[start:end][batch * self.batch_size : (batch + PREFETCH + 2) * self.batch_size]
        for path in sorted(window, key=lambda f: f not in message):
            reason = decode_failure(path, on_gpu=self._decoder == "mixed")
            if reason is not None:
                return path, reason
        return None

    def _release(self) -> None:
        """Drop the epoch's pipeline: the last references, so it is freed here, without a GC pass."""
        self._iterator = self._pipe = self._epoch_token = None

    def close(self) -> None:
        """Free the pipeline and hand DALI's pooled memory back (each stage rebuilds its loaders)."""
        self._release()
        backend.ReleaseUnusedMemory()  # DALI's device and pinned memory pools
        trim_heap()
        self._closed = True


def _libc_malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return getattr(libc, "malloc_trim", None)


_MALLOC_TRIM = _libc_malloc_trim()


def trim_heap() -> None:
    """Return freed heap pages to the OS: glibc keeps what DALI's threads freed, and resident memory
    would creep up by ~0.2 MB per pipeline without it (measured in tests/test_dali.py)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def decode_failure(path: str, on_gpu: bool = False) -> str | None:
    """Why DALI cannot decode one file (None if it can): decodes it alone, with the pipeline's own
    decoder (a file nvJPEG rejects, as a truncated JPEG, may decode on the CPU)."""
    import nvidia.dali.experimental.dynamic as ndd

    try:
        data = np.fromfile(path, dtype=np.uint8)
        # dynamic mode's "gpu" is the mixed (nvJPEG / nvImageCodec) decoder
        ndd.decoders.image(ndd.as_tensor(data), device="gpu" if on_gpu else "cpu", output_type=types.RGB).evaluate()
    except Exception as e:  # noqa: BLE001 - any failure here is the answer
        text = re.sub(r"\s+", " ", str(e)).strip()
        return text or type(e).__name__
    return None
