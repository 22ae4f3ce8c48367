"""The scan of an image folder (ImageFolder layout: one sub-folder per class), kept and reused.

The first start lists the class folders (`walk.py`) and reads each image's first bytes (the header
check); the result is kept as one index file per folder in `index/` under the cache directory. Each
later start lists the folder and stats every file, opening none: a file whose path, size and
modification time are unchanged keeps its verdict; one added or changed is checked again; a removed
one drops out.

One process at a time builds or verifies a folder's index (a lock file beside it); one that waited
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
from pipeline.data.folder import header_problem, warn_skipped
from pipeline.data.walk import Listing, pack, starts, walk
from pipeline.errors import DataError
from pipeline.files import atomic_write

INDEX_VERSION = 2  # 2: other files named under the root


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
    (`prefix` + its name in the packed `names`, from its offset) and its label; `stats` (sizes and
    modification times) where the scan made it: the decoded cache's key."""

    root: Path
    classes: list[str]
    names: np.ndarray  # uint8: every sample's path after `prefix`, encoded, each ended by a zero byte
    offsets: np.ndarray  # int64, len + 1: where each name starts, and the buffer's end
    labels: np.ndarray  # int64
    prefix: str = ""
    stats: np.ndarray | None = None  # int64, len x 2: size, st_mtime_ns

    @classmethod
    def of(cls, root: str | Path, classes: list[str], samples: Sequence[tuple[str, int]]) -> ImageFolderIndex:
        """An index of the given (path, label) pairs (files picked by a command, not scanned)."""
        names = pack([p for p, _ in samples])
        labels = np.fromiter((label for _, label in samples), dtype=np.int64, count=len(samples))
        return cls(Path(root), list(classes), names, starts(names), labels)

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        return self.prefix + os.fsdecode(self.names[self.offsets[i] : self.offsets[i + 1] - 1].tobytes())

    def paths(self) -> list[str]:
        """Every sample's path at once (one decode and split of the buffer, not one call a sample)."""
        return [self.prefix + name for name in os.fsdecode(self.names.tobytes()).split("\0")[:-1]]

    @property
    def samples(self) -> Samples:
        return Samples(self)


@dataclass
class FolderRecord:
    """A folder's index: its listing and each image's header verdict (None: looks like an image)."""

    root: Path
    listing: Listing
    problems: list[str | None]

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.listing.names[i])


def index_file(root: Path) -> Path:
    """Where a folder's index is kept: one file per folder (by its absolute path)."""
    where = str(root.resolve())
    name = re.sub(r"[^A-Za-z0-9]+", "-", where).strip("-")[-60:]
    return demo_cache_dir() / "index" / f"{name}-{hashlib.sha1(os.fsencode(where)).hexdigest()[:12]}.npz"


def read_record(file: Path, root: Path) -> FolderRecord | None:
    """The kept index, or None where there is none readable (a missing, old or torn file)."""
    try:
        with np.load(file, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes())
            if meta.get("version") != INDEX_VERSION or meta.get("root") != str(root.resolve()):
                return None
            listing = Listing(meta["classes"], z["names"], z["labels"], z["stats"], meta["ignored"])
    except Exception:  # noqa: BLE001 - torn, foreign or from another version: scanned again, never trusted
        return None
    problems = dict(meta["problems"])
    return FolderRecord(root, listing, [problems.get(i) for i in range(len(listing.labels))])


def write_record(file: Path, record: FolderRecord) -> None:
    listing = record.listing
    problems = [[i, why] for i, why in enumerate(record.problems) if why]
    meta = {"version": INDEX_VERSION, "root": str(record.root.resolve()), "problems": problems}
    meta |= {"classes": listing.classes, "ignored": listing.ignored}
    buffer, meta = io.BytesIO(), np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(buffer, meta=meta, names=listing.blob, labels=listing.labels, stats=listing.stats)
    atomic_write(file, lambda f: f.write(buffer.getbuffer()))


def check_headers(root: Path, listing: Listing, kept: FolderRecord | None) -> list[str | None]:
    """Each image's header verdict: the kept one where its name, size and time are unchanged, else
    read now (in threads: one small read a file, I/O bound)."""
    old = kept.listing if kept is not None else Listing([], pack([]), np.zeros(0), np.zeros((0, 2)), [])
    known = {n: (s, m, why) for n, (s, m), why in zip(old.names, old.stats.tolist(), kept.problems if kept else [])}
    problems: list[str | None] = [None] * len(listing.names)
    todo = []
    for i, (name, (size, mtime)) in enumerate(zip(listing.names, listing.stats.tolist())):
        k = known.get(name)
        if k is not None and k[0] == size and k[1] == mtime:
            problems[i] = k[2]
        else:
            todo.append(i)
    if todo:
        paths = [os.path.join(root, listing.names[i]) for i in todo]
        with ThreadPoolExecutor(max_workers=16) as pool:
            for i, why in zip(todo, pool.map(header_problem, paths, chunksize=256)):
                problems[i] = why
    return problems


@contextlib.contextmanager
def _held(file: Path) -> Iterator[bool]:
    """The folder's index lock, held while the block runs; False where the cache cannot be written."""
    lock = None
    try:  # a file system without POSIX locks (some Lustre, FUSE or NFS mounts) is one that cannot keep it
        file.parent.mkdir(parents=True, exist_ok=True)
        lock = open(file.with_suffix(".lock"), "a")
        fcntl.lockf(lock, fcntl.LOCK_EX)
    except OSError:
        if lock is not None:
            lock.close()
        yield False
        return
    with lock:
        yield True


def folder_record(root: Path, field: str) -> FolderRecord:
    """The folder's index: the kept one, verified against the folder (or just verified by another
    process while this one waited), updated where the folder changed, or built by a first scan."""
    if not root.is_dir():
        raise DataError(f"{field}: folder {str(root)!r} does not exist")
    file, asked = index_file(root), _asked()
    with _held(file) as keep:
        if not (keep and file.is_file() and file.stat().st_mtime >= asked):
            return _verified(root, field, file, keep)
    kept = read_record(file, root)  # verified by another process while this one waited: read without the lock
    return kept if kept is not None else folder_record(root, field)


def _asked() -> float:
    """From when a listing is fresh enough for this process: now; under torchrun, since the job's
    launcher started, so that the job's processes share one listing (as they must share one list of
    samples) rather than each walking the folder again while the others wait."""
    if "LOCAL_RANK" in os.environ:
        with contextlib.suppress(OSError, ValueError, IndexError, StopIteration):
            return started(os.getppid())
    return time.time()


def started(pid: int) -> float:
    """When a process started (Linux: /proc, against the same clock as the uptime), by `time.time()`."""
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))


def _verified(root: Path, field: str, file: Path, keep: bool) -> FolderRecord:
    kept = read_record(file, root) if keep else None
    listed_at = time.time()  # the index's mtime says when its listing began, by this clock
    try:
        listing = walk(root)
    except OSError as e:
        raise DataError(f"{field}: cannot list {e.filename or root}: {e.strerror or e}") from None
    if not listing.classes:
        raise DataError(f"{field}: {root} has no class sub-folders (expected {root}/<class>/<image>)")
    if kept is not None and kept.listing.same(listing):
        os.utime(file, (listed_at, listed_at))  # verified: a process that asked since need not walk again
        return kept
    record = FolderRecord(root, listing, check_headers(root, listing, kept))
    if keep:
        with contextlib.suppress(OSError):  # a full disk costs the next start a scan, not this run
            write_record(file, record)
            os.utime(file, (listed_at, listed_at))
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
    names = pack([n for n, ok in zip(listing.names, good.tolist()) if ok]) if bad else listing.blob
    return ImageFolderIndex(
        root, listing.classes, names, starts(names), listing.labels[good], str(root) + os.sep, listing.stats[good]
    )
