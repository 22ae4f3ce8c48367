"""JPEG bytes: the frame header (size, coding, depth, components: what nvJPEG can decode), and the
batched decoder on the training device (TorchCodec's where installed, torchvision's otherwise)."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable

import torch
from torchvision.io import decode_jpeg


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


def is_jpeg(data: torch.Tensor) -> bool:
    return data.ndim == 1 and data.numel() > 2 and int(data[0]) == 0xFF and int(data[1]) == 0xD8
