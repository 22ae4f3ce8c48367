"""Listing a folder: every class folder's image files, with sizes and modification times, no file
opened; the names packed into one byte buffer (the form the index keeps and the loaders read)."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from pipeline.data.folder import IMG_EXTENSIONS


def pack(names: list[str]) -> np.ndarray:
    """Names end to end, encoded as the file system does, each ended by a zero byte (no path has one)."""
    text = "\0".join(names) + "\0" if names else ""
    return np.frombuffer(os.fsencode(text), dtype=np.uint8)


def starts(blob: np.ndarray) -> np.ndarray:
    """Where each name of a packed buffer starts, and the buffer's end."""
    return np.concatenate(([0], np.flatnonzero(blob == 0) + 1)).astype(np.int64)


@dataclass
class Listing:
    """What one walk of a folder found: classes, and per image file (sorted within its class, as the
    loaders read them) its name under the root, label, size and modification time; other files."""

    classes: list[str]
    blob: np.ndarray  # the image files' names under the root, packed
    labels: np.ndarray
    stats: np.ndarray
    ignored: list[str]

    @cached_property
    def names(self) -> list[str]:
        return os.fsdecode(self.blob.tobytes()).split("\0")[:-1]

    def same(self, other: Listing) -> bool:
        """The same files, each with the same size and modification time."""
        return (
            np.array_equal(self.blob, other.blob)
            and np.array_equal(self.stats, other.stats)
            and (self.classes, self.ignored) == (other.classes, other.ignored)
        )


def walk(root: Path) -> Listing:
    """List and stat every file under each class folder (no file is opened), class folders in
    parallel processes where the folder is large. Hidden files are left out; files without an image
    extension are listed as ignored."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    parts = [_walk_class(str(root), name) for name in classes[:1]]
    cores = min(8, len(os.sched_getaffinity(0)))
    if len(classes) > 1 and cores > 1 and parts[0][0].count("\0") * len(classes) >= PARALLEL_WALK:
        with ProcessPoolExecutor(cores, mp_context=multiprocessing.get_context("fork")) as pool:
            parts += pool.map(_walk_class, [str(root)] * (len(classes) - 1), classes[1:], chunksize=8)
    else:
        parts += [_walk_class(str(root), name) for name in classes[1:]]
    names = [n for joined, _, _ in parts for n in joined.split("\0")[:-1]]
    counts = [joined.count("\0") for joined, _, _ in parts]
    listing = Listing(
        classes=classes,
        blob=pack(names),
        labels=np.repeat(np.arange(len(classes), dtype=np.int64), counts),
        stats=np.concatenate([st for _, st, _ in parts]) if parts else np.zeros((0, 2), np.int64),
        ignored=sorted(f for _, _, ignored in parts for f in ignored),
    )
    listing.names = names  # known already: not decoded again
    return listing


PARALLEL_WALK = 50_000  # files (estimated from the first class folder) from which the walk runs in processes


def _walk_class(root: str, name: str) -> tuple[str, np.ndarray, list[str]]:
    """One class folder: its images' names under the root (sorted, each ended by a zero character: one
    string, cheap to send between processes), their sizes and modification times, its other files."""
    found, ignored = [], []
    stack = [(os.path.join(root, name), name)]
    while stack:
        folder, rel = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except PermissionError:
            if rel == name:
                raise  # the class folder itself: named in the error
            continue  # a sub-folder that cannot be read is passed over, as pathlib's rglob does
        for e in entries:
            if e.is_dir(follow_symlinks=False):  # as pathlib's rglob: linked folders are not entered
                stack.append((e.path, f"{rel}/{e.name}"))
            elif e.name.startswith(".") or not e.is_file():
                continue
            elif e.name.lower().endswith(IMG_EXTENSIONS):
                try:
                    st = e.stat()
                except FileNotFoundError:  # removed since it was listed (a copy still running)
                    continue
                found.append((f"{rel}/{e.name}", st.st_size, st.st_mtime_ns))
            else:
                ignored.append(f"{rel}/{e.name}")  # under the root, however the root was spelled
    found.sort()
    joined = "".join(f"{f}\0" for f, _, _ in found)
    return joined, np.array([(size, mtime) for _, size, mtime in found], dtype=np.int64).reshape(-1, 2), ignored
