"""Crop, resize and flip a whole batch on the device, each sample with its own box: a few torchvision
roi_align calls instead of one resize per image (over a thousand kernel launches at batch 256)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

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
