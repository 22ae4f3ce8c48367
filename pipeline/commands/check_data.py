"""`python -m pipeline check-data PATH`: what is in an image dataset, before hours are spent on it.

Class counts, image modes (grayscale, CMYK, RGBA, palette, 16-bit), sizes, files that do not
decode, and the same file in train and val. Every file is decoded once, in parallel processes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import statistics
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import DataError
from pipeline.options import whole, write_or_fail

HELP = "class counts, image modes, sizes, bad files, train/val duplicates"

ODD_MODES = {
    "L": "grayscale",
    "LA": "grayscale + alpha",
    "1": "1-bit",
    "P": "palette",
    "CMYK": "CMYK",
    "RGBA": "RGBA",
    "I;16": "16-bit",
    "I;16B": "16-bit",
    "I": "32-bit integer",
    "F": "32-bit float",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="an ImageFolder, or a folder with train/ and val/ ImageFolders")
    parser.add_argument("--json", type=Path, default=None, help="also write the report to this file")
    parser.add_argument("--workers", type=whole(), default=None, help="decoding processes (default: every core)")


def cmd_check_data(args: argparse.Namespace) -> int:
    """Exit status 0 when nothing would stop or spoil training, 1 when something would."""
    from pipeline.files import write_json

    report = check_dataset(args.path, args.workers)
    print(format_report(report))
    if args.json:
        write_or_fail(f"--json {args.json}: cannot write", lambda: write_json(args.json, report))
    return 1 if problems(report) else 0


@dataclass
class FileReport:
    path: str
    label: str
    mode: str | None = None
    width: int = 0
    height: int = 0
    problem: str | None = None
    digest: str | None = None


def inspect(args: tuple[str, str, str | None]) -> FileReport:
    """One file: its header verdict (from the folder's index), then a full decode (a truncated or
    corrupt file fails here)."""
    from PIL import Image

    path, label, problem = args
    report = FileReport(path, label, problem=problem)
    if report.problem:
        return report
    try:
        data = Path(path).read_bytes()
        report.digest = hashlib.sha1(data).hexdigest()
        with Image.open(io.BytesIO(data)) as im:  # the bytes already read, not the file again
            report.mode, (report.width, report.height) = im.mode, im.size
            im.load()
    except Exception as e:  # noqa: BLE001 - any decoder failure is the file's problem, reported by name
        report.problem = f"cannot decode ({type(e).__name__}: {e})"
    return report


def splits_of(root: Path) -> dict[str, Path]:
    """`root/train` and `root/val` (and `test`) when they are there, else `root` as one split."""
    named = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
    return named or {root.name or "data": root}


IGNORED = "not an image file"


def list_files(root: Path) -> list[tuple[str, str, str | None]]:
    """(path, class, header verdict) for each image the loaders would read, from the folder's index
    (the training scan's own, built or reused: both see the same images); (path, class, IGNORED) for
    each other file not hidden, and ("", class, None) marking a class with no images."""
    from pipeline.data.index import folder_record

    record = folder_record(root, "check-data")
    listing = record.listing
    files = [
        (record.path(i), listing.classes[k], why) for i, (k, why) in enumerate(zip(listing.labels, record.problems))
    ]
    for k in sorted(set(range(len(listing.classes))) - set(listing.labels.tolist())):
        files.append(("", listing.classes[k], None))  # marks an empty class
    for name in listing.ignored:  # names under the root
        files.append((os.path.join(root, name), name.split("/", 1)[0], IGNORED))
    return files


def check_dataset(root: Path, workers: int | None = None) -> dict[str, Any]:
    """The report: per split, class counts, modes, sizes, bad files; duplicates within and across."""
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    report: dict[str, Any] = {"root": str(root), "splits": {}}
    digests: dict[str, dict[str, str]] = {}
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for split, folder in splits_of(root).items():
            listed = list_files(folder)
            empty = sorted({label for path, label, _ in listed if not path})
            images = [(p, label, why) for p, label, why in listed if p and why != IGNORED]
            ignored = [p for p, _, why in listed if why == IGNORED]
            files = list(pool.map(inspect, images, chunksize=64))
            good = [f for f in files if not f.problem]
            counts = Counter(f.label for f in files)
            seen: dict[str, str] = {}
            within = []
            for f in good:
                if f.digest in seen:
                    within.append([seen[f.digest], f.path])
                else:
                    seen[f.digest] = f.path
            digests[split] = seen
            widths, heights = [f.width for f in good], [f.height for f in good]
            report["splits"][split] = {
                "folder": str(folder),
                "images": len(files),
                "classes": {label: counts.get(label, 0) for label in sorted({lb for _, lb, _ in listed})},
                "empty_classes": empty,
                "modes": dict(Counter(f.mode for f in good).most_common()),
                "odd_modes": {
                    m: [f.path for f in good if f.mode == m][:5] for m in sorted({f.mode for f in good}) if m != "RGB"
                },
                "size": _size_stats(widths, heights),
                "bad_files": [{"path": f.path, "problem": f.problem} for f in files if f.problem],
                "ignored_files": ignored[:20],
                "duplicates_within": within[:50],
            }
    names = list(digests)
    across = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            for digest, path in digests[a].items():
                if digest in digests[b]:
                    across.append([path, digests[b][digest]])
    report["duplicates_across"] = across
    return report


def _size_stats(widths: list[int], heights: list[int]) -> dict[str, Any]:
    if not widths:
        return {}
    return {
        "width": {"min": min(widths), "median": statistics.median(widths), "max": max(widths)},
        "height": {"min": min(heights), "median": statistics.median(heights), "max": max(heights)},
    }


def problems(report: dict[str, Any]) -> int:
    """How many things would stop or spoil a training run: bad files, empty classes, train/val overlap."""
    per_split = sum(len(s["bad_files"]) + len(s["empty_classes"]) for s in report["splits"].values())
    return per_split + len(report["duplicates_across"])


def format_report(report: dict[str, Any]) -> str:
    lines = [f"dataset {report['root']}"]
    for split, s in report["splits"].items():
        counts = s["classes"]
        lines.append(f"\n{split}: {s['images']} images in {len(counts)} classes ({s['folder']})")
        if counts:
            low, high = min(counts.values()), max(counts.values())
            shown = ", ".join(f"{k} {v}" for k, v in list(counts.items())[:12]) + (" ..." if len(counts) > 12 else "")
            lines.append(f"  classes: {shown}  (smallest {low}, largest {high})")
        for name in s["empty_classes"]:
            lines.append(f"  empty class folder: {name}")
        modes = ", ".join(f"{m} {n}" for m, n in s["modes"].items())
        lines.append(f"  modes: {modes or '-'}")
        for mode, paths in s["odd_modes"].items():
            what = ODD_MODES.get(mode, mode)
            lines.append(f"    {mode} ({what}, converted to RGB when loaded): e.g. {paths[0]}")
        if s["size"]:
            w, h = s["size"]["width"], s["size"]["height"]
            lines.append(
                f"  sizes: width {w['min']}..{w['max']} (median {w['median']:g}), "
                f"height {h['min']}..{h['max']} (median {h['median']:g})"
            )
        for bad in s["bad_files"]:
            lines.append(f"  bad file: {bad['path']}: {bad['problem']}")
        if s["ignored_files"]:
            lines.append(
                f"  not images by extension (ignored): {len(s['ignored_files'])}, e.g. {s['ignored_files'][0]}"
            )
        if s["duplicates_within"]:
            a, b = s["duplicates_within"][0]
            lines.append(f"  identical files within {split}: {len(s['duplicates_within'])}, e.g. {a} = {b}")
    across = report["duplicates_across"]
    if across:
        lines.append(f"\nthe same file in two splits: {len(across)}, e.g. {across[0][0]} = {across[0][1]}")
    n = problems(report)
    lines.append(f"\n{n} problem(s)" if n else "\nno problems found")
    return "\n".join(lines)
