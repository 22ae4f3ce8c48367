"""`python -m pipeline bench-loader`: every stage's loaders against what its model step consumes.

For each stage (size, batch), backend and worker count: steady-state images/s, time to the first
batch and CPU use (GPU memory on CUDA); per stage, the train step's images/s on batches already in
memory, whether the run is loader- or compute-bound there, and the fastest loader setting.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import torch

from pipeline.config import Config, DataConfig, StageSpec
from pipeline.data import Loader, build_loader, require_backend
from pipeline.data.folder import ImageFolderIndex
from pipeline.data.spec import IMAGENET_MEAN, IMAGENET_STD
from pipeline.data.tv2 import shutdown_workers
from pipeline.errors import ConfigError
from pipeline.train.plan import train_batch_size
from pipeline.train.step import synchronize

BACKENDS = ("tv2", "cache", "dali", "classic")  # cache: tv2 with data.cache: decoded
SYNTHETIC = (3000, 300, 160)  # train images, val images, side: like a small real dataset


@dataclass(frozen=True)
class LoaderSpeed:
    images_per_s: float  # after the warm-up batches, across epoch boundaries
    first_batch_s: float  # from the first iteration to the first batch
    cpu_percent: float = 0.0  # CPU time of this process and its workers over wall time, x100


def endless(loader: Loader, first_epoch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's batches epoch after epoch (from `first_epoch`), as a run consumes them."""
    for epoch in count(first_epoch):
        loader.set_epoch(epoch)
        yield from loader


def measure_loader(loader: Loader, batches: int, warmup: int = 5) -> LoaderSpeed:
    """Time `batches` batches after `warmup` batches; the loader is left open."""
    stream = endless(loader)
    start = time.perf_counter()
    x, _ = next(stream)
    first = time.perf_counter() - start
    device = x.device
    for _ in range(warmup - 1):
        next(stream)
    synchronize(device)
    cpu0, start, images = cpu_seconds(), time.perf_counter(), 0
    for _ in range(batches):
        x, _ = next(stream)
        images += x.shape[0]
    synchronize(device)
    wall = time.perf_counter() - start
    return LoaderSpeed(images / wall, first, 100 * (cpu_seconds() - cpu0) / wall)


def gpu_free_mb(device: torch.device) -> float | None:
    """Free device memory after handing torch's cached blocks back (CUDA only), so the drop across a
    loader's life is what the loader itself holds: its batches, DALI's pools, the JPEG decoder."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0] / 2**20


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live children (DataLoader workers)."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        pids = [os.getpid()]
        for task in os.listdir(f"/proc/{pids[0]}/task"):
            with open(f"/proc/{pids[0]}/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
        total = 0.0
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
            except (OSError, IndexError, ValueError):
                pass  # a worker that just exited
        return total
    except OSError:  # no /proc: this process only
        return time.process_time()


class ClassicLoader:
    """The reference point: torchvision ImageFolder + PIL + RandomResizedCrop/ToTensor/Normalize +
    a shuffling DataLoader, batches moved to the device as they come."""

    def __init__(self, root: Path, img_size: int, batch_size: int, workers: int, device: torch.device, cfg: DataConfig):
        from torchvision import datasets, transforms

        transform = transforms.Compose(
            [
                transforms.RandomResizedCrop(img_size, scale=cfg.scale, ratio=cfg.ratio),
                transforms.RandomHorizontalFlip(cfg.hflip),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
        self.batch_size, self.device = batch_size, device
        self._loader = torch.utils.data.DataLoader(
            datasets.ImageFolder(str(root), transform=transform),
            batch_size=batch_size,
            shuffle=True,
            num_workers=workers,
            drop_last=True,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
        )

    def __len__(self) -> int:
        return len(self._loader)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self._loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def close(self) -> None:
        shutdown_workers(self._loader)


def make_loader(
    cfg: Config, stage: StageSpec, index: ImageFolderIndex, backend: str, workers: int, device: torch.device
):
    if backend == "classic":
        return ClassicLoader(index.root, stage.img_size, stage.batch_size, workers, device, stage.data)
    data = dataclasses.replace(
        stage.data,
        backend="tv2" if backend == "cache" else backend,
        workers=workers,
        cache="decoded" if backend == "cache" else None,
    )
    return build_loader(
        data,
        index,
        train=True,
        img_size=stage.img_size,
        batch_size=stage.batch_size,
        device=device,
        seed=cfg.run.seed,
        channels_last=stage.train.channels_last,
    )


def measure_step(cfg: Config, k: int, device: torch.device, num_classes: int, batches: int) -> float:
    """Images/s of stage `k`'s train step (its model, freezing, AMP, compile, Mixup, EMA), built as a
    run builds it, on batches already in memory."""
    from pipeline.model import build_model, param_groups
    from pipeline.train.stage import RunContext, build_stage

    stage = cfg.stages[k]
    torch.manual_seed(cfg.run.seed)
    model = build_model(dataclasses.replace(cfg.model, pretrained=None), num_classes).to(device)
    ctx = RunContext(cfg, device, model, param_groups(model), num_classes)
    # `lr: find`: time a usable LR, not the range test's placeholder 1.0 (which may diverge)
    with build_stage(ctx, k, choose_lr=lambda parts: 0.01) as parts:
        train_step = parts.train_step
    bs = train_batch_size(stage)
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(min(batches, 8)):  # a few distinct batches, cycled
        x = torch.randn(bs, 3, stage.img_size, stage.img_size, generator=g).to(device)
        x = x.contiguous(memory_format=torch.channels_last) if stage.train.channels_last else x
        data.append((x, torch.randint(0, num_classes, (bs,), generator=g).to(device)))
    for x, y in data[:2]:  # warm-up (and compilation, when on)
        train_step(x, y)
    synchronize(device)
    start = time.perf_counter()
    for i in range(batches):
        train_step(*data[i % len(data)])
    synchronize(device)
    return bs * batches / (time.perf_counter() - start)


def run_bench(
    cfg: Config,
    index: ImageFolderIndex,
    num_classes: int,
    device: torch.device,
    backends: list[str],
    workers: list[int],
    batches: int,
    repeats: int = 1,
    log=print,
) -> list[dict]:
    """Every stage x backend x worker count, then the step; rows as written to bench_loader.json.
    With `repeats`, the settings of a stage are measured in turn that many times (so a slow moment
    of the machine spreads over all of them) and each row holds the medians."""
    rows: list[dict] = []
    for k, stage in enumerate(cfg.stages):
        key = {"img_size": stage.img_size, "batch_size": stage.batch_size}
        settings = [
            (backend, w)
            for backend in backends
            for w in (sorted({max(1, w) for w in workers}) if backend == "dali" else workers)  # DALI: >= 1 thread
        ]
        runs: dict[tuple[str, int], list[tuple[LoaderSpeed, float, float | None]]] = {s: [] for s in settings}
        for _ in range(repeats):
            for backend, w in settings:
                free = gpu_free_mb(device)
                setup = time.perf_counter()
                loader = make_loader(cfg, stage, index, backend, w, device)
                setup = time.perf_counter() - setup
                try:
                    speed = measure_loader(loader, batches)
                    held = None if free is None else free - gpu_free_mb(device)  # pools, buffers, decoder
                    runs[(backend, w)].append((speed, setup, held))
                finally:
                    loader.close()
        for (backend, w), measured in runs.items():
            speeds = [m for m, _, _ in measured]
            row = {
                **key,
                "backend": backend,
                "workers": w,
                "images_per_s": round(statistics.median(m.images_per_s for m in speeds), 1),
                "first_batch_s": round(statistics.median(m.first_batch_s for m in speeds), 3),
                "cpu_percent": round(statistics.median(m.cpu_percent for m in speeds), 1),
                "setup_s": round(max(setup for _, setup, _ in measured), 3),
            }
            if measured[0][2] is not None:
                row["gpu_memory_mb"] = round(max(held for _, _, held in measured), 1)
            if repeats > 1:
                row["passes"] = [round(m.images_per_s, 1) for m in speeds]
            rows.append(row)
            log(
                f"{stage.img_size:>4}px batch {stage.batch_size:<4} {backend:<8} workers {w}: "
                f"{row['images_per_s']:>9.1f} img/s, first batch {row['first_batch_s']:.2f} s, "
                f"CPU {row['cpu_percent']:.0f}%"
            )
        step = statistics.median(
            measure_step(cfg, k, device, num_classes, batches=max(8, batches // 2)) for _ in range(repeats)
        )
        rows.append({**key, "backend": "step", "images_per_s": round(step, 1)})
        log(f"{stage.img_size:>4}px batch {stage.batch_size:<4} model step: {step:9.1f} img/s")
    return rows


@dataclass(frozen=True)
class StageVerdict:
    img_size: int
    batch_size: int
    backend: str  # the recommended setting (see `verdicts`)
    workers: int
    loader_images_per_s: float
    step_images_per_s: float

    @property
    def ratio(self) -> float:
        return self.loader_images_per_s / self.step_images_per_s

    @property
    def text(self) -> str:
        if self.ratio < 1:
            return f"loader-bound: the loader gives {self.ratio:.0%} of what the step takes"
        return f"compute-bound: the loader is {self.ratio:.1f}x the step"


HEADROOM = 2.0  # a loader this many times faster than the step never makes it wait


def verdicts(rows: list[dict]) -> list[StageVerdict]:
    """Per stage: the fastest backend (classic excluded: it is only the reference) and, within it,
    the fewest workers that still keep HEADROOM over the step (else its fastest count): workers the
    loader does not need only take CPU from the step."""
    out = []
    for size, batch in dict.fromkeys((r["img_size"], r["batch_size"]) for r in rows):
        mine = [r for r in rows if (r["img_size"], r["batch_size"]) == (size, batch)]
        step = next(r["images_per_s"] for r in mine if r["backend"] == "step")
        loaders = [r for r in mine if r["backend"] not in ("step", "classic")]
        backend = max(loaders, key=lambda r: r["images_per_s"])["backend"]
        options = sorted((r for r in loaders if r["backend"] == backend), key=lambda r: r["workers"])
        enough = [r for r in options if r["images_per_s"] >= HEADROOM * step]
        best = enough[0] if enough else max(options, key=lambda r: r["images_per_s"])
        out.append(StageVerdict(size, batch, backend, best["workers"], best["images_per_s"], step))
    return out


def format_table(rows: list[dict]) -> str:
    """One line per stage and setting, with each against classic at the same worker count (and the
    device memory a loader holds, on CUDA)."""
    classic = {(r["img_size"], r["workers"]): r["images_per_s"] for r in rows if r["backend"] == "classic"}
    gpu = any("gpu_memory_mb" in r for r in rows)
    lines = [
        f"{'size':>4} {'batch':>5} {'backend':<8} {'workers':>7} {'img/s':>9} "
        f"{'x classic':>9} {'first s':>7} {'CPU %':>6}" + (f" {'GPU MB':>7}" if gpu else ""),
        "-" * (70 if gpu else 62),
    ]
    for r in rows:
        if r["backend"] == "step":
            lines.append(f"{r['img_size']:>4} {r['batch_size']:>5} {'step':<8} {'':>7} {r['images_per_s']:>9.1f}")
            continue
        base = classic.get((r["img_size"], r["workers"]))
        vs = f"{r['images_per_s'] / base:.2f}" if base else "-"
        lines.append(
            f"{r['img_size']:>4} {r['batch_size']:>5} {r['backend']:<8} {r['workers']:>7} {r['images_per_s']:>9.1f} "
            f"{vs:>9} {r['first_batch_s']:>7.2f} {r['cpu_percent']:>6.0f}"
            + (f" {r.get('gpu_memory_mb', 0):>7.0f}" if gpu else "")
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Images/s per stage size: each backend at its best worker count; the step's rate across."""
    from pipeline.files import pyplot, write_png

    plt = pyplot()

    sizes = sorted({r["img_size"] for r in rows})
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for backend in [b for b in BACKENDS if any(r["backend"] == b for r in rows)]:
        best = [
            max((r["images_per_s"] for r in rows if r["backend"] == backend and r["img_size"] == s), default=math.nan)
            for s in sizes
        ]
        ax.plot(sizes, best, marker="o", label=f"{backend} (best worker count)")
    step = [
        next((r["images_per_s"] for r in rows if r["backend"] == "step" and r["img_size"] == s), math.nan)
        for s in sizes
    ]
    ax.plot(sizes, step, "k--", marker="s", label="model step consumes")
    ax.set_xlabel("stage image size (px)")
    ax.set_ylabel("images/s (log scale)")
    ax.set_yscale("log")
    ax.set_xticks(sizes)
    ax.set_title("Loader throughput per stage size, against the model step")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the curves, never on them
    fig.tight_layout()
    write_png(path, fig, dpi=120)


def apply_settings(raw: dict, verdict_list: list[StageVerdict], stage_sizes: list[tuple[int, int]]) -> dict:
    """A copy of the resolved YAML with each stage's fastest loader: in `data` when one setting
    wins everywhere, else as per-stage `data:` keys."""
    raw = copy.deepcopy(raw)

    def keys(v: StageVerdict) -> dict:
        return {
            "backend": "tv2" if v.backend == "cache" else v.backend,
            "workers": v.workers,
            "cache": "decoded" if v.backend == "cache" else None,
        }

    by_size = {(v.img_size, v.batch_size): keys(v) for v in verdict_list}
    chosen = [by_size[s] for s in stage_sizes]
    for stage in raw["stages"]:
        for k in ("backend", "workers", "cache"):
            (stage.get("data") or {}).pop(k, None)
        if "data" in stage and not stage["data"]:
            del stage["data"]
    if all(c == chosen[0] for c in chosen):
        raw["data"].update(chosen[0])
    else:
        for stage, c in zip(raw["stages"], chosen):
            stage.setdefault("data", {}).update(c)
    return raw


def check_backends(names: list[str]) -> list[str]:
    for name in names:
        if name not in BACKENDS:
            raise ConfigError(f"--backends: unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    if not set(names) - {"classic"}:
        raise ConfigError("--backends: name at least one of tv2, cache, dali besides classic (the reference)")
    for name in names:
        if name == "dali":
            require_backend("dali")
    return names


def bench_config(file: Path, overrides: list[str], data: str | None, sizes: list[int] | None) -> Config:
    """FILE's configuration as `bench-loader` measures it: `data` an ImageFolder (or `synthetic`)
    in place of data.train; `sizes` one stage per size, each with the last stage's batch and keys."""
    from pipeline.config import cache_side, load_config
    from pipeline.data.demo import demo_root

    overrides = list(overrides)
    if data is not None:
        root = demo_root(*SYNTHETIC) if data == "synthetic" else Path(data)
        train, val = (root / "train", root / "val") if data == "synthetic" else (root, root)
        overrides += [f"data.train={train}", f"data.val={val}"]
    cfg = load_config(file, overrides)
    if sizes:
        last = cfg.stages[-1]
        side = max(int(last.data.cache_size), cache_side(max(sizes), last.data))  # fits the largest
        stage_data = dataclasses.replace(last.data, cache_size=side)
        cfg.stages = [StageSpec(size, last.batch_size, 1, last.train, stage_data) for size in sizes]
    return cfg
