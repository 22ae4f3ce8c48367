"""Where a batch is augmented: one of four paths (`AugmentPath`); `augment` (one image, CPU or CUDA:
the per-sample reference), `augment_block` (a block of cached squares), `augment_batch` (a batch on
the training device, in a few batched kernels), `load_jpeg_cropped` (a JPEG decoded straight to its
crop) and `normalize`."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from pipeline.data.crops import (
    centre_box,
    draw_crop,
    draw_crops,
    gather_crops,
    padded_groups,
    roi_resize,
    stack_padded,
    to_device,
)
from pipeline.data.folder import dct_scale, jpeg_region
from pipeline.data.jpeg import jpeg_size
from pipeline.data.spec import IMAGENET_MEAN, IMAGENET_STD, LoaderSpec


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


class AugmentPath:
    """Where a batch is decoded and augmented: one of four paths, chosen once per loader from
    (data.cache, data.decode_on); the workers' half is tv2's `FolderDataset`, the main process's
    `TV2Loader`. Each is named as the stage line could say it."""

    CACHE_ON_DEVICE = "decoded cache, cropped in batch on the device"
    CACHE_IN_WORKERS = "decoded cache, cropped in the workers"
    FILES_ON_DEVICE = "files, JPEGs decoded and cropped in batch on the device"
    FILES_IN_WORKERS = "files, decoded and cropped in the workers"

    @staticmethod
    def of(cached: bool, decode_on: str) -> str:
        if cached:
            return AugmentPath.CACHE_ON_DEVICE if decode_on == "device" else AugmentPath.CACHE_IN_WORKERS
        return AugmentPath.FILES_ON_DEVICE if decode_on == "device" else AugmentPath.FILES_IN_WORKERS
