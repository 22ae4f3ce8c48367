"""Crops: where each sample's box comes from and how a batch is cut to it.

`draw_crops` / `draw_crop` draw every sample's RandomResizedCrop box and flip from its seed (the same
box whichever path decodes it), `centre_box` is validation's; the rest crops, resizes and flips a whole
batch on the device, each sample with its own box: a few torchvision roi_align calls instead of one
resize per image (over a thousand kernel launches at batch 256)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from pipeline.data.spec import LoaderSpec

MAX_SAMPLES = 8  # roi_align samples per output pixel and axis; past that a downscale aliases a little
MAX_STEPS = 4  # downscales by 2x or more resample at up to 4x the size first (see `roi_resize`)
PAD_BYTES = 256 * 2**20  # one padded float32 buffer at most this large (one larger image: alone)


def roi_resize(images: torch.Tensor, boxes: np.ndarray, size: int, flips: np.ndarray | None = None) -> torch.Tensor:
    """B x 3 x H x W (any dtype) -> uint8 B x 3 x size x size: box b (top, left, h, w, in pixels) of
    image b resized, then mirrored where flips[b]. roi_align clamps at the tensor's edges, so these
    must be the images' own edges (`stack_padded` and `gather_crops` arrange that).

    Upscales are bilinear at the pixel centres, as `augment`. roi_align averages sampling_ratio^2
    bilinear samples per output pixel, a box filter, where the antialiased resize weighs a triangle
    twice as wide: a downscale by r >= 1.5 is therefore resampled to k = ceil(r) times the size first
    (k at most 4) and then antialiased down by k, a triangle-weighted sum of k finer boxes (exact for
    r = 2, 3, 4); milder ones take 3 x 3 samples. Samples are grouped by (k, sampling ratio), one call
    each: a sample's pixels never depend on the rest of its batch.
    """
    n = len(images)
    x = images.to(torch.float32, memory_format=torch.contiguous_format)
    top, left, h, w = np.asarray(boxes, dtype=np.float64)[:, :4].T
    ratio = np.maximum(h, w) / size
    steps = np.where(ratio < 1.5, 1, np.minimum(np.ceil(ratio), MAX_STEPS)).astype(np.int64)
    mild = np.where(ratio <= 1, 1, 3)  # upscales: one bilinear sample, exact
    samples = np.where(steps == 1, mild, np.clip(np.ceil(ratio / steps), 1, MAX_SAMPLES)).astype(np.int64)
    order = np.lexsort((samples, steps))  # grouped: one contiguous slice per (steps, samples)
    rois = np.stack([np.arange(n), left, top, left + w, top + h], axis=1)[order]
    rois = to_device(rois.astype(np.float32), x.device)
    _, firsts = np.unique(np.stack([steps, samples], axis=1)[order], axis=0, return_index=True)
    parts = []
    for start, end in zip(firsts, [*firsts[1:], n]):
        k, r = int(steps[order[start]]), int(samples[order[start]])
        chunk = max(1, PAD_BYTES // (3 * 4 * (k * size) ** 2))  # the k x size intermediate, bounded too
        for first in range(start, end, chunk):
            part = roi_align(x, rois[first : min(end, first + chunk)], k * size, 1.0, r, aligned=True)
            parts.append(part if k == 1 else F.interpolate(part, (size, size), mode="bilinear", antialias=True))
    out = parts[0] if len(parts) == 1 else torch.cat(parts)[to_device(np.argsort(order), x.device)]
    if flips is not None and np.any(flips):
        mask = to_device(np.asarray(flips, dtype=bool), x.device).view(-1, 1, 1, 1)
        out = torch.where(mask, out.flip(-1), out)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def stack_padded(images: list[torch.Tensor], boxes: np.ndarray, margin: int) -> tuple[torch.Tensor, np.ndarray]:
    """3 x H x W images of any sizes -> one float32 batch of the regions the boxes read, and the boxes
    moved into it. `margin` 0: each box alone, its edges clamped as in a resize of the crop itself
    (training's crop-then-resize); 1: with the pixel around it that sampling reaches (validation
    resizes the whole image, clamped at the image's edges).

    Each region's last row and column are repeated once outward, into the zero padding: sampling near
    a region's far edge reads one pixel past it, which must be the edge pixel again, not a zero.
    """
    sizes = np.array([img.shape[-2:] for img in images], dtype=np.int64).reshape(-1, 2)
    start, end = regions(boxes, sizes, margin)
    extent = end - start
    buf = torch.zeros(len(images), 3, *(extent.max(axis=0) + 1), dtype=torch.float32, device=images[0].device)
    for b, (img, (r0, c0), (r1, c1)) in enumerate(zip(images, start.tolist(), end.tolist())):
        buf[b, :, : r1 - r0, : c1 - c0] = img[:, r0:r1, c0:c1]
    rows = torch.arange(len(images), device=buf.device)
    h, w = (to_device(extent[:, k], buf.device) for k in (0, 1))
    buf[rows, :, h] = buf[rows, :, h - 1]
    buf[rows, :, :, w] = buf[rows, :, :, w - 1]
    return buf, moved(boxes, start)


def padded_groups(sizes: np.ndarray, boxes: np.ndarray, margin: int) -> list[np.ndarray]:
    """The batch split into groups whose `stack_padded` buffer stays under PAD_BYTES: one large photo
    would otherwise pad every image of the batch to its size (256 x 3 x 2500^2 floats: 19 GB). By
    region size, largest first, so each group pads little."""
    start, end = regions(boxes, sizes, margin)
    extent = end - start + 1  # the repeated edge row and column
    groups, group, most = [], [], np.zeros(2, dtype=np.int64)
    for i in np.argsort(-extent.prod(axis=1), kind="stable"):
        grown = np.maximum(most, extent[i])
        if group and (len(group) + 1) * int(grown.prod()) * 3 * 4 > PAD_BYTES:
            groups.append(np.array(group))
            group, grown = [], extent[i]
        group.append(i)
        most = grown
    return [*groups, np.array(group)]


def gather_crops(block: torch.Tensor, boxes: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """`stack_padded` with margin 0 for a B x H x W x 3 batch of equal-sized images (the decoded
    cache), in one indexing kernel: each crop's rows and columns, the last of each repeated outward."""
    start, end = regions(boxes, np.array(block.shape[1:3]), 0)
    extent = end - start
    rows, cols = (  # positions past a crop's extent repeat its last row or column
        to_device(np.minimum(np.arange(n + 1), extent[:, k, None] - 1) + start[:, k, None], block.device)
        for k, n in enumerate(extent.max(axis=0))
    )
    batch = torch.arange(len(block), device=block.device)[:, None, None]
    crops = block[batch, rows[:, :, None], cols[:, None, :]]
    return crops.permute(0, 3, 1, 2), moved(boxes, start)


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A small index or box array on `device`; to CUDA through pinned memory, without waiting: a
    copy from pageable memory synchronises the stream, so the host would wait for the model."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def regions(boxes: np.ndarray, sizes: np.ndarray, margin: int) -> tuple[np.ndarray, np.ndarray]:
    """The (row, column) start and end of each box's region: the box, widened by `margin` pixels
    and rounded out to whole pixels, within its image."""
    boxes = np.asarray(boxes, dtype=np.float64)
    start = np.maximum(np.floor(boxes[:, :2]).astype(np.int64) - margin, 0)
    end = np.minimum(np.ceil(boxes[:, :2] + boxes[:, 2:4]).astype(np.int64) + margin, sizes)
    return start, end


def moved(boxes: np.ndarray, start: np.ndarray) -> np.ndarray:
    """(top, left, h, w) boxes in the coordinates of regions that start at `start`."""
    out = np.array(boxes, dtype=np.float64)[:, :4]
    out[:, :2] -= start
    return out


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
