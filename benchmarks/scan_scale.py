"""What a start costs on an ImageNet-sized folder: the scan kept as an index, a resume, workers' memory.

For folders of N tiny JPEGs (`--classes` class folders, ImageNet's layout; made once under `--root`
and reused), this measures:

1. the scan alone, in this process: the scan before the index (every file listed, `is_file`'d and
   its header read in 16 threads), the first scan with the index (none kept), the second (kept);
2. `python -m pipeline run` (and under `torchrun --nproc_per_node 2`, gloo), from launch to the first
   training batch written to metrics.jsonl: a first start (no index kept), a second start (index
   kept) and a `--resume` of that second run, killed (SIGKILL) after a few batches;
3. loader workers' memory over one pass of the index: each of 2 forked DataLoader workers looks up
   the path and label of every sample (what the tv2 loader does per sample, without decoding), from
   the index's arrays and from a list of (str, int) tuples (the layout before the index); RSS and
   USS (private pages) per worker after the first batch and after the last. `--loader-epoch` also
   runs one real tv2 training epoch (decode, crop, 16 px) over the whole index with 2 workers.

The page cache is warm throughout (the folder was just made or read).

    python benchmarks/scan_scale.py [--files 10000,100000,1280000] [--root DIR] [--procs 1,2] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.data.folder import header_problem, is_image_file  # noqa: E402
from pipeline.data.index import index_file, scan_image_folder  # noqa: E402


def make_folder(root: Path, n: int, classes: int) -> Path:
    """N tiny JPEGs (16 distinct 8x8 images) in `classes` folders, made once (a marker says it is whole)."""
    if (root / ".complete").is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(16):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        blobs.append(buffer.getvalue())
    for c in range(classes):
        folder = root / f"c{c:04d}"
        folder.mkdir(parents=True)
        for j in range(c, n, classes):
            (folder / f"img{j:07d}.jpg").write_bytes(blobs[j % 16])
    (root / ".complete").touch()
    return root


def scan_before_the_index(root: Path) -> int:
    """The scan as it was before the index (the baseline): list, is_file, read every header."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    found = []
    for label, name in enumerate(classes):
        found.extend((str(p), label) for p in sorted((root / name).rglob("*")) if is_image_file(p))
    with ThreadPoolExecutor(max_workers=16) as pool:
        problems = list(pool.map(header_problem, [f for f, _ in found], chunksize=256))
    return sum(why is None for why in problems)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def forget(*roots: Path) -> None:
    for root in roots:
        index_file(root).unlink(missing_ok=True)


def batches(run_dir: Path | None) -> int:
    if run_dir is None or not (run_dir / "metrics.jsonl").is_file():
        return 0
    return (run_dir / "metrics.jsonl").read_text().count('"kind": "batch"')


def to_first_batch(cmd: list[str], out: Path, run_dir: Path | None, until: int, env: dict) -> tuple[float, Path]:
    """Seconds from launch to the next batch record in metrics.jsonl; the process group is killed
    (SIGKILL) once `until` more batches are written (a checkpoint is written at every step)."""
    before = batches(run_dir)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = None
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{' '.join(cmd)} ended ({proc.returncode}): {proc.stderr.read()[-2000:]}")
            found = run_dir or next((d for d in out.glob("*") if (d / "metrics.jsonl").is_file()), None)
            done = batches(found) - before
            if done >= 1 and first is None:
                first, run_dir = time.perf_counter() - start, found
            if done >= until and (found / "checkpoints" / "last.pt").is_file():
                return first, found
            time.sleep(0.05)
    finally:
        for pid in [proc.pid, *descendants(proc.pid)]:  # torchrun's workers are in sessions of their own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        time.sleep(1.0)  # the lock's holder is gone; its loader workers too


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc), so that a whole torchrun job is killed as a node's loss would."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parent[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        frontier = [p for p, pp in parent.items() if pp in frontier]
        found += frontier
    return found


def starts(train: Path, val: Path, procs: int, work: Path) -> dict[str, float]:
    cfg = {
        "run": {"name": "scale", "device": "cpu", "log_every": 1, "checkpoint_every": 0, "seed": 0},
        "data": {"train": str(train), "val": str(val), "workers": 1},
        "model": {"arch": "resnet18"},
        "train": {"amp": "off", "compile": "off", "mixup": "off", "optimizer": {"name": "sgd", "lr": 0.05}},
        "stages": [{"img_size": 16, "batch_size": 32, "epochs": 1}],
    }
    file = work / "scale.yaml"
    file.write_text(yaml.safe_dump(cfg))
    launcher = [sys.executable, "-m", "pipeline"]
    if procs > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
        launcher += ["-m", "pipeline"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.setdefault("PIPELINE_CACHE", str(work / "cache"))
    forget(train, val)
    first, _ = to_first_batch([*launcher, "run", str(file), "--out", str(work / "a")], work / "a", None, 1, env)
    second, run_dir = to_first_batch([*launcher, "run", str(file), "--out", str(work / "b")], work / "b", None, 3, env)
    resume, _ = to_first_batch([*launcher, "run", "--resume", str(run_dir)], work / "b", run_dir, 1, env)
    return {"first_start_s": first, "second_start_s": second, "resume_s": resume}


def memory(pid: int) -> tuple[float, float]:
    """RSS and USS (private clean + dirty pages) of a process, in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0])
    return fields["Rss"] / 1024, (fields["Private_Clean"] + fields["Private_Dirty"]) / 1024


class Lookups(torch.utils.data.Dataset):
    """A batch of indices -> their labels, after looking up each sample's path as the loader does."""

    def __init__(self, index, layout: str):
        self.index = index
        self.samples = [(index.path(i), int(index.labels[i])) for i in range(len(index))] if layout == "list" else None

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, idxs: list[int]) -> torch.Tensor:
        if self.samples is not None:
            return torch.tensor([len(self.samples[i][0]) + self.samples[i][1] for i in idxs])
        return torch.tensor([len(self.index.path(i)) + int(self.index.labels[i]) for i in idxs])


def note_memory(folder: Path):
    """A worker_init_fn: each worker writes its RSS and USS before its first sample."""

    def note(worker_id: int) -> None:
        (folder / f"worker-{os.getpid()}.json").write_text(json.dumps(memory(os.getpid())))

    return note


def worker_memory(loader, folder: Path) -> dict[str, float]:
    """Each worker's RSS and USS as it starts and after the epoch's last batch (the largest growth)."""
    it = iter(loader)
    pids = [w.pid for w in it._workers]
    end = None
    for _ in it:
        end = [memory(pid) for pid in pids]
    start = [json.loads((folder / f"worker-{pid}.json").read_text()) for pid in pids]
    growth_rss = max((e[0] - s[0]) / s[0] for s, e in zip(start, end))
    growth_uss = max(e[1] - s[1] for s, e in zip(start, end))
    rss = max(s[0] for s in start)
    return {"rss_start_mib": rss, "rss_growth_pct": 100 * growth_rss, "uss_growth_mib": growth_uss}


def lookups_memory(index, layout: str, folder: Path) -> dict[str, float]:
    sampler = torch.utils.data.BatchSampler(torch.randperm(len(index)).tolist(), 1024, drop_last=False)
    dataset = Lookups(index, layout)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=sampler, num_workers=2, worker_init_fn=note_memory(folder)
    )
    return worker_memory(loader, folder)


def loader_epoch_memory(index, folder: Path) -> dict[str, float]:
    from pipeline.data.spec import LoaderSpec
    from pipeline.data.tv2 import TV2Loader

    spec = LoaderSpec(img_size=16, batch_size=512, train=True, device=torch.device("cpu"), seed=0, workers=2)
    loader = TV2Loader(index, spec)
    loader.set_epoch(0)
    loader._loader.worker_init_fn = note_memory(folder)
    try:
        return worker_memory(loader._loader, folder)
    finally:
        loader.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", default="10000,100000,1280000")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--root", type=Path, default=Path("/tmp/pipeline-scan-scale"))
    ap.add_argument("--procs", default="1,2")
    ap.add_argument("--loader-epoch", action="store_true", help="also one real tv2 epoch over the whole index")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("PIPELINE_CACHE", str(args.root / "cache"))
    rows = []
    for n in (int(v) for v in args.files.split(",")):
        train = make_folder(args.root / f"n{n}", n, args.classes)
        val = make_folder(args.root / f"n{n}-val", args.classes, args.classes)
        row: dict[str, object] = {"files": n}
        row["scan_before_s"], found = timed(lambda: scan_before_the_index(train))
        forget(train)
        row["scan_first_s"], index = timed(lambda: scan_image_folder(train, "data.train"))
        row["scan_second_s"], again = timed(lambda: scan_image_folder(train, "data.train"))
        assert len(index) == len(again) == found == n
        for procs in (int(p) for p in args.procs.split(",") if p):  # --procs "": the scan and memory only
            work = args.root / f"runs-{n}-{procs}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            row[f"start_{procs}p"] = starts(train, val, procs, work)
        notes = args.root / "worker-notes"
        notes.mkdir(exist_ok=True)
        row["workers_arrays"] = lookups_memory(index, "arrays", notes)
        row["workers_list"] = lookups_memory(index, "list", notes)
        if args.loader_epoch:
            row["workers_tv2_epoch"] = loader_epoch_memory(index, notes)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


def format_table(rows: list[dict]) -> str:
    procs = sorted({k.split("_")[1] for r in rows for k in r if k.startswith("start_")})
    epoch = any("workers_tv2_epoch" in r for r in rows)
    head = "| files | scan before (s) | first scan (s) | second scan (s) |"
    for p in procs:
        head += f" {p}: first start / second / resume (s) |"
    head += " worker RSS growth, arrays / list (%) | worker USS growth, arrays / list (MiB) |"
    head += " tv2 epoch: worker RSS (MiB), growth (%) |" if epoch else ""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        line = f"| {r['files']:,} | {r['scan_before_s']:.2f} | {r['scan_first_s']:.2f} | {r['scan_second_s']:.2f} |"
        for p in procs:
            s = r[f"start_{p}"]
            line += f" {s['first_start_s']:.1f} / {s['second_start_s']:.1f} / {s['resume_s']:.1f} |"
        a, b = r["workers_arrays"], r["workers_list"]
        line += f" {a['rss_growth_pct']:.1f} / {b['rss_growth_pct']:.1f} |"
        line += f" {a['uss_growth_mib']:.1f} / {b['uss_growth_mib']:.1f} |"
        if epoch:
            e = r["workers_tv2_epoch"]
            line += f" {e['rss_start_mib']:.0f}, {e['rss_growth_pct']:.1f} |"
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
