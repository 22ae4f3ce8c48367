"""One file: is it an image (its extension, its header), and its decoding to RGB, whole or a JPEG
region at a reduced DCT scale. The folder's scan is `index.py`.

Problems are reported as DataError naming the file.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS as TV_EXTENSIONS
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2.functional import to_dtype

from pipeline.errors import DataError

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec; they remain the decoders here.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities", category=DeprecationWarning)


IMG_EXTENSIONS = (*TV_EXTENSIONS, ".gif")


def is_image_file(p: Path) -> bool:
    """An image by its extension; hidden files (macOS `._name.jpg` resource forks) are not.
    The one test of what the loaders read: check-data and tools/split.py use it too."""
    return p.suffix.lower() in IMG_EXTENSIONS and not p.name.startswith(".") and p.is_file()


def header_problem(path: str) -> str | None:
    """Why a file cannot be an image, from its first bytes (one small read): unreadable, empty, or
    a header no image format starts with. None when it looks like an image (decoding may still fail)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if not head:
        return "zero bytes"
    if head.startswith(IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return None
    try:  # a rarer format: PIL's own header detection decides
        with Image.open(path):
            return None
    except Exception:  # noqa: BLE001
        return "not an image (no image format's header)"


# JPEG, PNG, GIF, BMP, TIFF and BigTIFF (both byte orders), PPM/PGM/PBM; WebP is RIFF....WEBP
IMAGE_MAGIC = (
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"II+\x00",
    b"MM\x00+",
    *(f"P{i}".encode() for i in range(1, 7)),
)


_SKIPPED: set[str] = set()


def warn_skipped(path: str, why: str) -> None:
    """`data.on_error: skip`: name each left-out file once per process."""
    if path not in _SKIPPED:
        _SKIPPED.add(path)
        print(f"warning: skipping {path}: {why}", file=sys.stderr)


def skipped_files() -> set[str]:
    """Files found bad so far in this process: later loaders (stages, validation) leave them out."""
    return _SKIPPED


def read_image(path: str) -> torch.Tensor:
    """Decode a file to a 3xHxW uint8 RGB tensor (grayscale, CMYK, RGBA and palette included)."""
    try:
        img = decode_image(path, mode=ImageReadMode.RGB)
        if img.ndim == 4:  # an animated GIF: its first frame
            img = img[0]
        # 16-bit PNGs decode to uint16: scale down to the uint8 the loaders expect
        return img if img.dtype == torch.uint8 else to_dtype(img, torch.uint8, scale=True)
    except Exception:  # formats torchvision cannot decode (e.g. some TIFF/WebP variants): try PIL
        pass
    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
        return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()
    except Exception as e:
        raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None


def dct_scale(region: float, size: int) -> int:
    """The JPEG decode scale (1, 2, 4 or 8) that keeps a region `region` pixels across at least
    `size` pixels across: no upsampling, and never decoding more than twice what is needed."""
    k = 1
    while k < 8 and region >= 2 * k * size:
        k *= 2
    return k


def jpeg_region(im: Image.Image, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """The region (left, top, w, h) of an opened RGB or grayscale JPEG, resized to size x size (HWC
    uint8), decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps it `size` pixels across."""
    width, height = im.size
    left, top, w, h = box
    k = dct_scale(min(w, h), size)
    if k > 1:
        im.draft("RGB", (width // k, height // k))  # PIL takes the largest scale that still gives this size
    im.load()
    s = round(width / im.size[0])  # the scale it took: scaled pixel j covers original pixels [j*s, (j+1)*s)
    rgb = im if im.mode == "RGB" else im.convert("RGB")  # convert() would copy an RGB image
    region = (left / s, top / s, (left + w) / s, (top + h) / s)
    return np.asarray(rgb.resize((size, size), Image.BILINEAR, box=region, reducing_gap=None))
