"""The built-in `demo` dataset: a generated JPEG ImageFolder, cached on first use.

A class is a coarse shape (5 kinds) times the orientation of a stripe texture (2 kinds), as photos
hold coarse and fine cues: a 32 px view shows the shape and, faintly, the stripes (8 px apart at the
native 96 px, 2.7 px at 32 px); more pixels make the stripes plain. The `shapes` task labels the
same kind of images by shape alone: a second dataset to fine-tune on. The `digits` task is of
another kind: a rotated digit glyph on a cluttered background, 10 classes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SHAPES = ("circle", "square", "triangle", "cross", "ring")
TEXTURES = ("hstripes", "vstripes")
CLASSES = [f"{s}_{t}" for s in SHAPES for t in TEXTURES]
DIGITS = [str(d) for d in range(10)]
DEMO_VERSION = 3
STRIPE_PERIOD = 8  # pixels at the native size: resolved at a third of it, plain from a half up


def demo_cache_dir() -> Path:
    """Where `demo` lives: $PIPELINE_CACHE, else ~/.cache/pipeline."""
    return Path(os.environ.get("PIPELINE_CACHE", Path.home() / ".cache" / "pipeline")).expanduser()


def demo_root(n_train: int = 5000, n_val: int = 1000, size: int = 96) -> Path:
    """The cached demo dataset folder (with `train/` and `val/`), generated if missing."""
    root = demo_cache_dir() / f"demo-v{DEMO_VERSION}-{n_train}-{n_val}-{size}"
    if not (root / "train").is_dir():
        make_demo_dataset(root, n_train=n_train, n_val=n_val, size=size)
    return root


def make_demo_dataset(
    root: Path, n_train: int, n_val: int, size: int = 96, seed: int = 0, task: str = "shape_texture"
) -> Path:
    """Write `root/train` and `root/val` as JPEG ImageFolders; atomic (built aside, then renamed).
    `task`: shape_texture (10 classes), shapes (5 classes, the texture left to chance) or digits."""
    if task not in ("shape_texture", "shapes", "digits"):
        raise ValueError(task)
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=root.parent))
    try:
        rng = np.random.default_rng(seed)
        classes = {"shape_texture": CLASSES, "shapes": list(SHAPES), "digits": DIGITS}[task]
        for split, n in (("train", n_train), ("val", n_val)):
            for c in classes:
                (tmp / split / c).mkdir(parents=True)
            for i in range(n):
                if task == "digits":
                    folder, img = DIGITS[i % 10], draw_digit(i % 10, size, rng)
                else:
                    label = (
                        i % len(CLASSES) if task == "shape_texture" else (i % len(SHAPES)) * 2 + int(rng.integers(2))
                    )
                    img = draw_sample(label, size, rng)
                    folder = classes[label] if task == "shape_texture" else SHAPES[label // 2]
                Image.fromarray(img).save(tmp / split / folder / f"{i:05d}.jpg", quality=92)
        if root.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def draw_sample(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One HxWx3 uint8 image of class `label`."""
    shape, texture = divmod(label, len(TEXTURES))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = np.broadcast_to(rng.uniform(0, 255, 3), (size, size, 3))  # background colour, unrelated to the class
    # Foreground: a shape of random size and place, filled with dark and light stripes.
    r = rng.uniform(0.28, 0.4) * size
    cx, cy = rng.uniform(r + 2, size - r - 2, 2)
    mask = _shape_mask(SHAPES[shape], (xx - cx) / r, (yy - cy) / r)
    coord = yy if TEXTURES[texture] == "hstripes" else xx
    stripes = ((coord + rng.uniform(0, STRIPE_PERIOD)) % STRIPE_PERIOD) < STRIPE_PERIOD / 2
    fill = np.where(stripes[..., None], rng.uniform(0, 60, 3), rng.uniform(195, 255, 3))
    img = np.where(mask[..., None], fill, img) + rng.normal(0, 4, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def draw_digit(digit: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One HxWx3 uint8 image of the digit: a glyph of random size, place, angle and colour over a
    background of random strokes and ellipses (clutter that a small view blurs into the glyph). The
    ink is dark on a light ground and light on a dark one, so the glyph is always legible."""
    background = rng.uniform(40, 215, 3)
    img = Image.new("RGB", (size, size), tuple(int(v) for v in background))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 5))):
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, size, 4))
        colour = tuple(int(v) for v in rng.uniform(0, 255, 3))
        if rng.random() < 0.5:
            draw.line((x0, y0, x1, y1), fill=colour, width=1)
        else:
            draw.ellipse((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), outline=colour)
    glyph = Image.new("L", (size, size), 0)
    font = ImageFont.load_default(size=max(8, int(size * rng.uniform(0.55, 0.8))))
    left, top, right, bottom = ImageDraw.Draw(glyph).textbbox((0, 0), str(digit), font=font)
    x = rng.uniform(-left, max(-left, size - right))
    y = rng.uniform(-top, max(-top, size - bottom))
    ImageDraw.Draw(glyph).text((x, y), str(digit), font=font, fill=255)
    glyph = glyph.rotate(float(rng.uniform(-20, 20)), resample=Image.BILINEAR, center=(size / 2, size / 2))
    light = background.mean() < 128
    ink = rng.uniform(200, 255, 3) if light else rng.uniform(0, 55, 3)
    img.paste(Image.new("RGB", (size, size), tuple(int(v) for v in ink)), (0, 0), glyph)
    out = np.asarray(img, dtype=np.float32) + rng.normal(0, 6, (size, size, 3))
    return np.clip(out, 0, 255).astype(np.uint8)


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    if shape == "circle":
        return dx**2 + dy**2 <= 1
    if shape == "square":
        return (np.abs(dx) <= 0.85) & (np.abs(dy) <= 0.85)
    if shape == "triangle":
        return (dy <= 0.8) & (dy >= 1.6 * np.abs(dx) - 0.9)
    if shape == "cross":
        return ((np.abs(dx) <= 0.3) & (np.abs(dy) <= 1)) | ((np.abs(dy) <= 0.3) & (np.abs(dx) <= 1))
    if shape == "ring":
        d = dx**2 + dy**2
        return (d <= 1) & (d >= 0.45)
    raise ValueError(shape)
