"""The scan of an image folder (ImageFolder layout: one sub-folder per class), kept and reused.

The first start lists the class folders and reads each image's first bytes (the header check); the
result is kept in one index file per folder under the cache directory ($PIPELINE_CACHE, else
~/.cache/pipeline, in `index/`). Each later start lists the folder again and stats every file, opening
none: a file whose path, size and modification time are unchanged keeps its verdict; one added or
changed is checked again; a removed one drops out. A changed folder is never trusted stale.

One process at a time builds or updates a folder's index (a lock file beside it); one that waited
while another verified it uses that verification, so torchrun's processes scan once between them.
The loaders get arrays (`ImageFolderIndex`: path bytes, offsets, labels), which forked workers share
rather than copy page by page as a list of (str, int) tuples is when its reference counts are touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.demo import demo_cache_dir
from pipeline.data.folder import IMG_EXTENSIONS, header_problem, warn_skipped
from pipeline.errors import DataError
from pipeline.files import atomic_write

INDEX_VERSION = 1


class Samples(Sequence):
    """(path, label) pairs, made on access from the index's arrays (nothing per sample is kept)."""

    def __init__(self, index: ImageFolderIndex):
        self._index = index

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        i = i + len(self) if i < 0 else i
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._index.path(i), int(self._index.labels[i])


@dataclass(frozen=True, eq=False)
class ImageFolderIndex:
    """The images of one split: class names (sorted, as ImageFolder) and, per sample, its path
    (`prefix` + its name in `names`, a byte buffer cut at `offsets`) and its label. `stats` (sizes
    and modification times) where the scan made it: the decoded cache's key."""

    root: Path
    classes: list[str]
    names: np.ndarray  # uint8: every sample's path after `prefix`, encoded, end to end
    offsets: np.ndarray  # int64, len + 1
    labels: np.ndarray  # int64
    prefix: str = ""
    stats: np.ndarray | None = None  # int64, len x 2: size, st_mtime_ns

    @classmethod
    def of(cls, root: str | Path, classes: list[str], samples: Sequence[tuple[str, int]]) -> ImageFolderIndex:
        """An index of the given (path, label) pairs (files picked by a command, not scanned)."""
        names, offsets = pack([os.fsencode(p) for p, _ in samples])
        labels = np.fromiter((label for _, label in samples), dtype=np.int64, count=len(samples))
        return cls(Path(root), list(classes), names, offsets, labels)

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        return self.prefix + os.fsdecode(self.names[self.offsets[i] : self.offsets[i + 1]].tobytes())

    @property
    def samples(self) -> Samples:
        return Samples(self)


def pack(encoded: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Byte strings end to end, and the offsets that cut them apart again."""
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


@dataclass
class Listing:
    """What one walk of a folder found: classes, and per image file (sorted within its class, as the
    loaders read them) its name under the root, label, size and modification time; other files."""

    classes: list[str]
    names: list[bytes]
    labels: np.ndarray
    stats: np.ndarray
    ignored: list[str]

    def same(self, other: Listing) -> bool:
        """The same files, each with the same size and modification time."""
        return (
            self.names == other.names
            and np.array_equal(self.stats, other.stats)
            and (self.classes, self.ignored) == (other.classes, other.ignored)
        )


def walk(root: Path) -> Listing:
    """List and stat every file under each class folder (no file is opened). Hidden files are left
    out; files without an image extension are listed as ignored."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    names: list[bytes] = []
    labels: list[np.ndarray] = []
    stats: list[tuple[int, int]] = []
    ignored: list[str] = []
    for label, name in enumerate(classes):
        found = []
        stack = [(os.path.join(root, name), name)]
        while stack:
            folder, rel = stack.pop()
            for e in os.scandir(folder):
                if e.is_dir(follow_symlinks=False):  # as pathlib's rglob: linked folders are not entered
                    stack.append((e.path, f"{rel}/{e.name}"))
                elif e.name.startswith(".") or not e.is_file():
                    continue
                elif os.path.splitext(e.name)[1].lower() in IMG_EXTENSIONS:
                    st = e.stat()
                    found.append((f"{rel}/{e.name}", st.st_size, st.st_mtime_ns))
                else:
                    ignored.append(e.path)
        found.sort()
        names.extend(os.fsencode(f) for f, _, _ in found)
        stats.extend((size, mtime) for _, size, mtime in found)
        labels.append(np.full(len(found), label, dtype=np.int64))
    return Listing(
        classes=classes,
        names=names,
        labels=np.concatenate(labels) if labels else np.zeros(0, np.int64),
        stats=np.asarray(stats, dtype=np.int64).reshape(-1, 2),
        ignored=sorted(ignored),
    )


@dataclass
class FolderRecord:
    """A folder's index: its listing and each image's header verdict (None: looks like an image)."""

    root: Path
    listing: Listing
    problems: list[str | None]

    def path(self, i: int) -> str:
        return os.path.join(self.root, os.fsdecode(self.listing.names[i]))


def index_file(root: Path) -> Path:
    """Where a folder's index is kept: one file per folder (by its absolute path)."""
    where = str(root.resolve())
    name = re.sub(r"[^A-Za-z0-9]+", "-", where).strip("-")[-60:]
    return demo_cache_dir() / "index" / f"{name}-{hashlib.sha1(where.encode()).hexdigest()[:12]}.npz"


def read_record(file: Path, root: Path) -> FolderRecord | None:
    """The kept index, or None where there is none readable (a missing, old or torn file)."""
    try:
        with np.load(file, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes())
            if meta.get("version") != INDEX_VERSION or meta.get("root") != str(root.resolve()):
                return None
            blob, offsets = z["names"].tobytes(), z["offsets"]
            names = [blob[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
            listing = Listing(meta["classes"], names, z["labels"], z["stats"], meta["ignored"])
    except Exception:  # noqa: BLE001 - torn, foreign or from another version: scanned again, never trusted
        return None
    problems: list[str | None] = [None] * len(names)
    for i, why in meta["problems"]:
        problems[i] = why
    return FolderRecord(root, listing, problems)


def write_record(file: Path, record: FolderRecord) -> None:
    listing = record.listing
    blob, offsets = pack(listing.names)
    problems = [[i, why] for i, why in enumerate(record.problems) if why]
    meta = {"version": INDEX_VERSION, "root": str(record.root.resolve()), "problems": problems}
    meta |= {"classes": listing.classes, "ignored": listing.ignored}
    buffer = io.BytesIO()
    np.savez(
        buffer,
        meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
        names=blob,
        offsets=offsets,
        labels=listing.labels,
        stats=listing.stats,
    )
    atomic_write(file, lambda f: f.write(buffer.getbuffer()))


def check_headers(root: Path, listing: Listing, kept: FolderRecord | None) -> list[str | None]:
    """Each image's header verdict: the kept one where its name, size and time are unchanged, else
    read now (in threads: one small read a file, I/O bound)."""
    known: dict[bytes, tuple[int, int, str | None]] = {}
    if kept is not None:
        old = kept.listing
        known = {n: (s, m, why) for n, (s, m), why in zip(old.names, old.stats.tolist(), kept.problems)}
    problems: list[str | None] = [None] * len(listing.names)
    todo = []
    for i, (name, (size, mtime)) in enumerate(zip(listing.names, listing.stats.tolist())):
        k = known.get(name)
        if k is not None and k[0] == size and k[1] == mtime:
            problems[i] = k[2]
        else:
            todo.append(i)
    if todo:
        paths = [os.path.join(root, os.fsdecode(listing.names[i])) for i in todo]
        with ThreadPoolExecutor(max_workers=16) as pool:
            for i, why in zip(todo, pool.map(header_problem, paths, chunksize=256)):
                problems[i] = why
    return problems


@contextlib.contextmanager
def _held(file: Path) -> Iterator[bool]:
    """The folder's index lock, held while the block runs; yields False where the cache directory
    cannot be written (then the folder is scanned without keeping its index)."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        lock = open(file.with_suffix(".lock"), "a")
    except OSError:
        yield False
        return
    with lock:
        fcntl.lockf(lock, fcntl.LOCK_EX)
        yield True


def folder_record(root: Path, field: str) -> FolderRecord:
    """The folder's index: the kept one, verified against the folder (or just verified by another
    process while this one waited), updated where the folder changed, or built by a first scan."""
    if not root.is_dir():
        raise DataError(f"{field}: folder {str(root)!r} does not exist")
    file = index_file(root)
    asked = time.time()
    with _held(file) as keep:
        kept = read_record(file, root) if keep else None
        if kept is not None and file.stat().st_mtime >= asked:
            return kept  # verified by the process that held the lock while this one waited
        listing = walk(root)
        if not listing.classes:
            raise DataError(f"{field}: {root} has no class sub-folders (expected {root}/<class>/<image>)")
        if kept is not None and kept.listing.same(listing):
            os.utime(file)  # verified now: a process waiting for the lock need not walk again
            return kept
        record = FolderRecord(root, listing, check_headers(root, listing, kept))
        if keep:
            with contextlib.suppress(OSError):  # a full disk costs the next start a scan, not this run
                write_record(file, record)
        return record


def scan_image_folder(root: str | Path, field: str, on_error: str = "fail") -> ImageFolderIndex:
    """The images of an ImageFolder, from its kept index (see the module); `field` (e.g. `data.train`)
    is named in errors. Files that cannot be images (unreadable, empty, not an image) fail the scan
    with their list, or with `on_error: skip` are left out, each named in a warning."""
    root = Path(root)
    record = folder_record(root, field)
    listing, problems = record.listing, record.problems
    counts = np.bincount(listing.labels, minlength=len(listing.classes))
    if empty := [c for c, n in zip(listing.classes, counts) if not n]:
        raise DataError(f"{field}: class folder(s) with no images in {root}: {', '.join(empty)}")
    bad = [(record.path(i), why) for i, why in enumerate(problems) if why]
    if bad and on_error == "fail":
        listed = "; ".join(f"{f}: {why}" for f, why in bad[:3])
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise DataError(
            f"{field}: {len(bad)} bad file(s): {listed}{more}. Remove them, or set data.on_error: skip; "
            f"python -m pipeline check-data {root} lists them all"
        )
    for f, why in bad:
        warn_skipped(f, why)
    good = np.array([why is None for why in problems], dtype=bool)
    if not good.any():
        raise DataError(f"{field}: no readable images in {root}")
    counts = np.bincount(listing.labels[good], minlength=len(listing.classes))
    if lost := [c for c, n in zip(listing.classes, counts) if not n]:
        raise DataError(f"{field}: class folder(s) left with no readable images in {root}: {', '.join(lost)}")
    kept = [n for n, ok in zip(listing.names, good.tolist()) if ok] if bad else listing.names
    names, offsets = pack(kept)
    return ImageFolderIndex(
        root, listing.classes, names, offsets, listing.labels[good], str(root) + os.sep, listing.stats[good]
    )
