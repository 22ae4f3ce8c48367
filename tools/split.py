"""Split a labelled image folder into train/val(/test) ImageFolders: stratified by class, seeded.

    python tools/split.py SRC OUT [--ratios 0.8,0.2 | 0.8,0.1,0.1] [--seed 0] [--mode copy|hardlink|symlink]
    python tools/split.py SRC OUT --labels labels.csv      # a flat folder and a CSV: file,label

SRC is an ImageFolder (one sub-folder per class) or, with --labels, a flat folder whose CSV names
each file's class (a header row is skipped). Every class is split by the ratios on its own, so each
split keeps the class balance; each class puts at least one image in every split it can. OUT must
not exist: nothing is ever overwritten. Per-class counts are printed at the end.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.folder import is_image_file  # noqa: E402  the files the loaders read as images

SPLITS = ("train", "val", "test")


def parse_ratios(text: str) -> list[float]:
    try:
        ratios = [float(r) for r in text.split(",")]
    except ValueError:
        raise SystemExit(f"error: --ratios {text}: expected 2 or 3 numbers, e.g. 0.8,0.2") from None
    if len(ratios) not in (2, 3) or min(ratios) <= 0 or abs(sum(ratios) - 1) > 1e-6:
        raise SystemExit(f"error: --ratios {text}: 2 or 3 positive numbers that sum to 1, e.g. 0.8,0.1,0.1")
    return ratios


def collect(src: Path, labels: Path | None) -> dict[str, list[Path]]:
    """class name -> its image files, sorted (so a seed always gives the same split)."""
    if not src.is_dir():
        raise SystemExit(f"error: {src}: no such folder")
    by_class: dict[str, list[Path]] = {}
    if labels is None:
        for d in sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")):
            files = sorted(f for f in d.rglob("*") if is_image_file(f))
            if files:
                by_class[d.name] = files
        if not by_class:
            raise SystemExit(f"error: {src}: no class sub-folders with images (or give --labels CSV)")
        return by_class
    if not labels.is_file():
        raise SystemExit(f"error: --labels {labels}: no such file")
    with open(labels, newline="") as f:
        for n, row in enumerate(csv.reader(f), start=1):
            if len(row) < 2 or not row[0].strip():
                continue
            name, label = row[0].strip(), row[1].strip()
            path = src / name
            if not path.is_file():
                if n == 1:
                    continue  # a header row
                raise SystemExit(f"error: --labels {labels}, line {n}: {path} does not exist")
            if not label or "/" in label or label.startswith("."):
                raise SystemExit(f"error: --labels {labels}, line {n}: {label!r} cannot be a class folder name")
            by_class.setdefault(label, []).append(path)
    if not by_class:
        raise SystemExit(f"error: --labels {labels}: no rows naming an image in {src}")
    return {k: sorted(v) for k, v in sorted(by_class.items())}


def split_class(files: list[Path], ratios: list[float], rng: random.Random) -> list[list[Path]]:
    """Shuffle one class and cut it by the ratios (largest remainder), at least one file per split
    while there are files enough."""
    files = list(files)
    rng.shuffle(files)
    n = len(files)
    exact = [r * n for r in ratios]
    counts = [int(e) for e in exact]
    for i in sorted(range(len(ratios)), key=lambda i: exact[i] - counts[i], reverse=True)[: n - sum(counts)]:
        counts[i] += 1
    for i in range(len(counts)):  # a split left empty takes one from the largest, if it can spare it
        if counts[i] == 0:
            donor = max(range(len(counts)), key=lambda j: counts[j])
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[i] += 1
    parts, start = [], 0
    for c in counts:
        parts.append(files[start : start + c])
        start += c
    return parts


def place(src: Path, dst: Path, mode: str) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if mode == "copy":
        shutil.copy2(src, dst)
    elif mode == "hardlink":
        os.link(src, dst)
    else:
        os.symlink(src.resolve(), dst)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="an ImageFolder, or a flat folder with --labels")
    parser.add_argument("out", type=Path, help="folder to create: OUT/train, OUT/val (and OUT/test)")
    parser.add_argument("--ratios", default="0.8,0.2", help="train,val or train,val,test (default 0.8,0.2)")
    parser.add_argument("--labels", type=Path, default=None, help="CSV of file,label for a flat SRC folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", choices=["copy", "hardlink", "symlink"], default="copy")
    try:
        args = parser.parse_args(argv)
        ratios = parse_ratios(args.ratios)
        if args.out.exists():
            raise SystemExit(f"error: {args.out} already exists; nothing was written (choose a new folder)")
        by_class = collect(args.src, args.labels)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 2
        raise
    rng = random.Random(args.seed)
    names = SPLITS[: len(ratios)]
    tmp = args.out.with_name(f".{args.out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    counts: dict[str, list[int]] = {}
    try:
        for label, files in by_class.items():
            parts = split_class(files, ratios, rng)
            counts[label] = [len(p) for p in parts]
            for split, part in zip(names, parts):
                for f in part:
                    place(f, tmp / split / label / f.name, args.mode)
        os.rename(tmp, args.out)  # all or nothing
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"error: {e.filename or args.out}: {e.strerror or e} (nothing was written)", file=sys.stderr)
        return 2
    width = max(len(k) for k in counts) + 2
    print(f"{'class':<{width}}" + "".join(f"{s:>8}" for s in names))
    for label, c in counts.items():
        print(f"{label:<{width}}" + "".join(f"{v:>8}" for v in c))
    totals = [sum(c[i] for c in counts.values()) for i in range(len(names))]
    print(f"{'total':<{width}}" + "".join(f"{v:>8}" for v in totals))
    print(f"wrote {args.out} ({args.mode}, seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
