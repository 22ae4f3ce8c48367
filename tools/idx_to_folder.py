"""Convert IDX image/label files (MNIST, Fashion-MNIST, KMNIST...) to train/val ImageFolders.

    python tools/idx_to_folder.py SRC OUT [--per-class-train N] [--per-class-val N] [--names fashion]

SRC holds the four IDX files, gzipped or not: `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
`t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte` (Debian's `dataset-fashion-mnist` package puts
them in /usr/share/datasets/fashion-mnist). The train files become OUT/train, the t10k files
OUT/val, one PNG per image, one sub-folder per class. `--per-class-train/--per-class-val` keep the
first N images of each class in file order (a subset with every class balanced); leave them out for
all. `--names fashion` names the class folders by Fashion-MNIST's classes instead of 0-9. OUT must
not exist: nothing is overwritten. Per-class counts are printed at the end.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

FASHION = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
SPLITS = (("train", "train"), ("val", "t10k"))
DTYPES = {0x08: np.uint8}  # the only type image/label IDX files use


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) as an array of its dimensions."""
    with open(path, "rb") as f:
        zipped = f.read(2) == b"\x1f\x8b"
    try:
        with (gzip.open if zipped else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise SystemExit(f"error: {path}: cannot be read ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in DTYPES:
        raise SystemExit(f"error: {path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)]
    need = 4 + 4 * ndim + int(np.prod(dims))
    if len(data) != need:
        raise SystemExit(f"error: {path}: {len(data)} bytes, its header says {need}")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def find(src: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (src / name).is_file():
            return src / name
    raise SystemExit(f"error: {src / stem}(.gz): no such file")


def convert(src: Path, out: Path, per_class: dict[str, int | None], names: tuple[str, ...] | None) -> dict:
    """Write OUT/{train,val}/CLASS/NNNNN.png; returns {split: {class: count}}."""
    counts: dict[str, dict[str, int]] = {}
    for split, prefix in SPLITS:
        images = read_idx(find(src, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(find(src, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise SystemExit(f"error: {src}: {prefix} images {images.shape} and labels {labels.shape} do not match")
        limit = per_class[split]
        kept: dict[str, int] = {}
        for i, label in enumerate(labels.tolist()):
            cls = names[label] if names and label < len(names) else str(label)
            if limit is not None and kept.get(cls, 0) >= limit:
                continue
            folder = out / split / cls
            if cls not in kept:
                folder.mkdir(parents=True)
            Image.fromarray(images[i]).save(folder / f"{i:05d}.png")
            kept[cls] = kept.get(cls, 0) + 1
        counts[split] = dict(sorted(kept.items()))
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path, help="folder with the four IDX files (gzipped or not)")
    p.add_argument("out", type=Path, help="folder to create: OUT/train, OUT/val")
    p.add_argument("--per-class-train", type=int, default=None, metavar="N", help="first N per class (default all)")
    p.add_argument("--per-class-val", type=int, default=None, metavar="N", help="first N per class (default all)")
    p.add_argument("--names", choices=("digits", "fashion"), default="digits", help="class folder names")
    tmp = None
    try:
        a = p.parse_args(argv)
        for flag, n in (("--per-class-train", a.per_class_train), ("--per-class-val", a.per_class_val)):
            if n is not None and n < 1:
                raise SystemExit(f"error: {flag} {n}: must be 1 or more")
        if not a.src.is_dir():
            raise SystemExit(f"error: {a.src}: no such folder")
        if a.out.exists():
            raise SystemExit(f"error: {a.out} already exists; nothing was written (choose a new folder)")
        tmp = a.out.with_name(f".{a.out.name}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        names = FASHION if a.names == "fashion" else None
        counts = convert(a.src, tmp, {"train": a.per_class_train, "val": a.per_class_val}, names)
        os.rename(tmp, a.out)  # all or nothing
    except SystemExit as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 2
        raise
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"error: {e.filename or a.out}: {e.strerror or e} (nothing was written)", file=sys.stderr)
        return 2
    for split, per in counts.items():
        print(f"{split}: {sum(per.values())} images; " + ", ".join(f"{c} {n}" for c, n in per.items()))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
