"""The kept scan (`pipeline.data.index`): reused while a folder is unchanged, every change noticed and
only the changed files read again, one scan between processes, and samples as shared arrays."""

from __future__ import annotations

import io
import multiprocessing
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipeline.data.index as index_mod
from pipeline.commands.check_data import check_dataset
from pipeline.data.index import ImageFolderIndex, index_file, scan_image_folder
from pipeline.errors import DataError


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 30, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


JPEG = _jpeg()


def make_folder(root: Path, classes: int, per_class: int) -> Path:
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            (root / f"c{c}" / f"{i:05d}.jpg").write_bytes(JPEG)
    return root


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """Every file whose header the scan reads."""
    read: list[str] = []
    real = index_mod.header_problem
    monkeypatch.setattr(index_mod, "header_problem", lambda path: read.append(path) or real(path))
    return read


def paths(index: ImageFolderIndex) -> list[str]:
    return [p for p, _ in index.samples]


def test_a_second_scan_reads_no_file_and_gives_the_same_samples(tmp_path, reads):
    root = make_folder(tmp_path / "train", classes=10, per_class=1000)  # 10k files
    first = scan_image_folder(root, "data.train")
    assert len(reads) == 10_000 and index_file(root).is_file()
    reads.clear()
    second = scan_image_folder(root, "data.train")
    assert reads == []  # every file stat'ed, none opened
    assert paths(second) == paths(first) and second.classes == first.classes == [f"c{c}" for c in range(10)]
    assert np.array_equal(second.labels, np.repeat(np.arange(10), 1000))
    assert paths(first)[:2] == [str(root / "c0" / "00000.jpg"), str(root / "c0" / "00001.jpg")]  # sorted, full


def test_added_removed_and_corrupted_files_are_noticed_and_only_they_are_read(tmp_path, reads):
    root = make_folder(tmp_path / "train", classes=3, per_class=20)
    scan_image_folder(root, "data.train")
    reads.clear()

    (root / "c1" / "new.jpg").write_bytes(JPEG)  # added
    (root / "c2" / "00003.jpg").unlink()  # removed
    index = scan_image_folder(root, "data.train")
    assert reads == [str(root / "c1" / "new.jpg")]
    assert str(root / "c1" / "new.jpg") in paths(index) and str(root / "c2" / "00003.jpg") not in paths(index)
    assert len(index) == 60

    reads.clear()
    corrupt = root / "c0" / "00007.jpg"
    with open(corrupt, "r+b") as f:  # in place: the folder's own time does not change
        f.truncate(0)
    with pytest.raises(DataError, match=r"data.train: 1 bad file\(s\): .*c0/00007.jpg: zero bytes"):
        scan_image_folder(root, "data.train")
    assert reads == [str(corrupt)]
    reads.clear()
    with pytest.raises(DataError, match="00007.jpg: zero bytes"):  # the verdict is kept, not forgotten
        scan_image_folder(root, "data.train")
    assert reads == []
    skipped = scan_image_folder(root, "data.train", on_error="skip")
    assert str(corrupt) not in paths(skipped) and len(skipped) == 59

    corrupt.write_bytes(JPEG)  # mended
    st = os.stat(corrupt)
    os.utime(corrupt, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert str(corrupt) in paths(scan_image_folder(root, "data.train")) and reads == [str(corrupt)]

    (root / "c2" / "00004.jpg").write_bytes(b"GIF89a" + bytes(40))  # same name and time stamp, other size
    os.utime(root / "c2" / "00004.jpg", ns=(st.st_atime_ns, st.st_mtime_ns))
    reads.clear()
    scan_image_folder(root, "data.train")
    assert reads == [str(root / "c2" / "00004.jpg")]


def test_a_class_emptied_or_added_between_runs_is_noticed(tmp_path):
    root = make_folder(tmp_path / "train", classes=2, per_class=3)
    scan_image_folder(root, "data.train")
    for f in (root / "c1").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"class folder\(s\) with no images in .*: c1"):
        scan_image_folder(root, "data.train")
    (root / "c1" / "a.jpg").write_bytes(JPEG)
    (root / "c2").mkdir()
    (root / "c2" / "a.jpg").write_bytes(JPEG)
    assert scan_image_folder(root, "data.train").classes == ["c0", "c1", "c2"]


def test_a_torn_index_is_rebuilt_and_a_cache_that_cannot_be_written_only_costs_the_keeping(
    tmp_path, reads, monkeypatch
):
    root = make_folder(tmp_path / "train", classes=2, per_class=5)
    scan_image_folder(root, "data.train")
    index_file(root).write_bytes(b"PK\x03\x04 torn")
    reads.clear()
    assert len(scan_image_folder(root, "data.train")) == 10 and len(reads) == 10
    reads.clear()
    assert len(scan_image_folder(root, "data.train")) == 10 and reads == []  # kept again
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "a-file"))  # no folder can be made there
    reads.clear()
    assert len(scan_image_folder(root, "data.train")) == 10 and len(reads) == 10


def _scan_in_a_process(root: str, log: str, ready) -> None:
    real = index_mod.walk

    def walk(path):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # the other process, past the barrier too, is waiting for the lock by now
        return real(path)

    index_mod.walk = walk
    ready.wait()
    scan_image_folder(Path(root), "data.train")


def _launch_two(root: str, log: str) -> None:
    """A launcher, as torchrun's agent: started after the folder changed, parent of both processes."""
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Barrier(2, timeout=60)
    procs = [ctx.Process(target=_scan_in_a_process, args=(root, log, ready)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    os._exit(0 if [p.exitcode for p in procs] == [0, 0] else 1)


def test_two_processes_of_one_job_scan_once_between_them(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")  # as under torchrun: the job began when their launcher started
    root = make_folder(tmp_path / "train", classes=2, per_class=50)
    scan_image_folder(root, "data.train")
    (root / "c0" / "new.jpg").write_bytes(JPEG)  # the kept index is stale: one of them must walk
    log = tmp_path / "walks.log"
    time.sleep(0.05)  # the launcher starts after the change, by the clock's tick
    launcher = multiprocessing.get_context("fork").Process(target=_launch_two, args=(str(root), str(log)))
    launcher.start()
    launcher.join(120)
    assert launcher.exitcode == 0
    assert len(log.read_text().split()) == 1  # one walked; the other used what it had just verified
    assert len(scan_image_folder(root, "data.train")) == 101


def test_check_data_reads_the_same_index(tmp_path, reads):
    root = make_folder(tmp_path / "train", classes=2, per_class=4)
    (root / "c1" / "empty.jpg").write_bytes(b"")
    with pytest.raises(DataError):
        scan_image_folder(root, "data.train")
    reads.clear()
    (split,) = check_dataset(root, workers=1)["splits"].values()
    assert reads == []  # the verdicts of the training scan
    assert [b["problem"] for b in split["bad_files"]] == ["zero bytes"] and split["images"] == 9


def test_samples_are_arrays_a_forked_worker_shares(tmp_path):
    root = make_folder(tmp_path / "train", classes=4, per_class=25)
    index = scan_image_folder(root, "data.train")
    arrays = (index.names, index.offsets, index.labels)
    assert all(isinstance(a, np.ndarray) for a in arrays) and index.names.dtype == np.uint8
    assert not isinstance(index.samples, list) and index.samples[-1] == (str(root / "c3" / "00024.jpg"), 3)
    assert len(pickle.dumps(index)) < 10_000  # a few arrays, no object per sample
    picked = ImageFolderIndex.of(tmp_path, ["a", "b"], [("/x/1.jpg", 1), ("/y/2.png", 0)])
    assert list(picked.samples) == [("/x/1.jpg", 1), ("/y/2.png", 0)] and picked.stats is None
    assert index.paths() == [p for p, _ in index.samples] and picked.paths() == ["/x/1.jpg", "/y/2.png"]


def test_the_walk_in_processes_lists_what_the_walk_in_one_does(tmp_path, monkeypatch):
    import pipeline.data.walk as walk_mod

    root = make_folder(tmp_path / "train", classes=5, per_class=7)
    (root / "c2" / "sub").mkdir()
    (root / "c2" / "sub" / "deep.jpg").write_bytes(JPEG)
    (root / "c3" / "notes.txt").write_text("x")
    (root / "c4" / ".hidden.jpg").write_bytes(JPEG)
    one = walk_mod.walk(root)
    monkeypatch.setattr(walk_mod, "PARALLEL_WALK", 1)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # as on a 2-core machine
    many = walk_mod.walk(root)
    assert many.same(one) and many.names == one.names and np.array_equal(many.labels, one.labels)
    assert "c2/sub/deep.jpg" in one.names and len(one.names) == 36
    assert one.ignored == ["c3/notes.txt"]  # under the root, however it is spelled


def test_the_index_is_dated_by_when_its_listing_began_not_when_it_was_written(tmp_path, monkeypatch):
    """A process that asked for the lock while another was listing must not take that listing as
    fresh: a file added meanwhile would be missed. The index's time is its listing's start."""
    root = make_folder(tmp_path / "train", classes=2, per_class=3)
    real, began = index_mod.walk, []

    def slow_walk(path):
        began.append(time.time())
        listing = real(path)
        time.sleep(0.5)  # a process asking now comes after the listing began
        return listing

    monkeypatch.setattr(index_mod, "walk", slow_walk)
    scan_image_folder(root, "data.train")
    assert abs(index_file(root).stat().st_mtime - began[0]) < 0.1
    asked = time.time()
    assert index_file(root).stat().st_mtime < asked  # so a later asker walks again
    (root / "c0" / "late.jpg").write_bytes(JPEG)
    assert str(root / "c0" / "late.jpg") in paths(scan_image_folder(root, "data.train"))


def test_a_folder_that_cannot_be_listed_or_locked_is_one_line(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "train", classes=2, per_class=2)
    monkeypatch.setattr(index_mod.fcntl, "lockf", lambda *a: (_ for _ in ()).throw(OSError(38, "no locks")))
    assert len(scan_image_folder(root, "data.train")) == 4  # scanned, not kept

    def refused(path):
        raise PermissionError(13, "Permission denied", str(root / "c1"))

    monkeypatch.setattr(index_mod, "walk", refused)
    with pytest.raises(DataError, match=r"data.train: cannot list .*c1: Permission denied"):
        scan_image_folder(root, "data.train")


def test_under_torchrun_a_listing_is_fresh_from_the_launch_of_the_job(monkeypatch):
    """The job's processes share one listing: one begun after torchrun started is taken as fresh."""
    assert -600 < index_mod.started(os.getpid()) - time.time() < 0.05  # this process: started minutes ago at most
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert abs(index_mod._asked() - time.time()) < 1
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert abs(index_mod._asked() - index_mod.started(os.getppid())) < 0.05
    assert index_mod._asked() <= index_mod.started(os.getpid()) + 0.05
