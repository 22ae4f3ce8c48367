"""`python -m pipeline bench-loader`: every stage's loaders against what its model step consumes.

The measuring is `pipeline.loader_bench`'s; per stage, this says whether the run is loader- or
compute-bound there and which loader setting is fastest, draws the table and the plot, and with
`--apply` writes the stages file with those settings.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config, StageSpec
from pipeline.errors import ConfigError, UserError
from pipeline.options import add_set, whole, write_applied, write_or_fail

HELP = "every stage's loaders against what its model step consumes"
SYNTHETIC = (3000, 300, 160)  # train images, val images, side: like a small real dataset


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="the stages file")
    parser.add_argument(
        "--backends", default="tv2,cache,dali,classic", help="tv2, cache (tv2 + data.cache: decoded), dali, classic"
    )
    parser.add_argument("--workers", default="0,1,2", help="worker counts to try (DALI: threads, at least 1)")
    parser.add_argument(
        "--batches", type=whole(), default=40, help="timed batches per setting, after 5 warm-up batches"
    )
    parser.add_argument(
        "--repeats", type=whole(), default=1, help="measure every setting this many times, in turn; report medians"
    )
    parser.add_argument(
        "--sizes", default=None, help="image sizes to measure instead of the file's stages (batch of its last stage)"
    )
    parser.add_argument(
        "--data",
        default=None,
        metavar="PATH|synthetic",
        help="an ImageFolder instead of data.train; synthetic: 3,000 generated 160x160 JPEGs",
    )
    parser.add_argument("--out", type=Path, default=None, help="folder the output folder is made in")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this file")
    parser.add_argument(
        "--apply", action="store_true", help="write FILE.bench-loader.yaml with each stage's fastest loader"
    )
    add_set(parser)


def int_list(text: str, option: str, least: int) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{option} {text}: expected comma-separated integers, e.g. 0,1,2") from None
    if not values or min(values) < least:
        raise UserError(f"{option} {text}: need integers >= {least}")
    return values


def cmd_bench_loader(args: argparse.Namespace) -> int:
    import yaml

    from pipeline.files import write_json
    from pipeline.loader_bench import run_bench
    from pipeline.train.preflight import prepare
    from pipeline.train.rundir import new_run_dir

    backends = check_backends([b.strip() for b in args.backends.split(",") if b.strip()])
    workers = int_list(args.workers, "--workers", 0)
    if (args.sizes or args.data) and args.apply:
        raise UserError("--apply writes settings for the file's own stages and data: drop --sizes and --data")
    if args.json is not None and not args.json.parent.is_dir():
        raise UserError(f"--json {args.json}: folder {args.json.parent} does not exist")
    sizes = int_list(args.sizes, "--sizes", 8) if args.sizes else None
    cfg = bench_config(args.file, args.overrides, args.data, sizes)
    device, datasets, num_classes = prepare(cfg)
    out_dir = new_run_dir(Path(args.out or cfg.run.out_dir), f"{cfg.run.name}-bench-loader")
    print(f"{len(datasets.train)} training images in {datasets.train.root}; device {device}")
    rows = run_bench(cfg, datasets.train, num_classes, device, backends, workers, args.batches, args.repeats)
    print()
    print(format_table(rows))
    verdict_list = verdicts(rows)
    print()
    for v in verdict_list:
        cache = " (cache: decoded)" if v.backend == "cache" else ""
        print(f"{v.img_size:>4}px: {v.text}; recommended: {v.backend}{cache}, workers {v.workers}")
    write_json(out_dir / "bench_loader.json", rows)
    if args.json:
        write_or_fail(f"--json {args.json}: cannot write", lambda: write_json(args.json, rows))
    plot(rows, out_dir / "bench_loader.png")
    print(f"wrote {out_dir / 'bench_loader.json'} and {out_dir / 'bench_loader.png'}")
    if args.apply:
        raw = apply_settings(cfg.raw, verdict_list, [(s.img_size, s.batch_size) for s in cfg.stages])
        if "cache_size" not in (yaml.safe_load(args.file.read_text()).get("data") or {}):
            raw["data"]["cache_size"] = "auto"  # as the file had it: sized again if its stages change
        target = write_applied(raw, args.file, "bench-loader")
        print(f"wrote {target}; train with: python -m pipeline run {target}")
    return 0


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
    from pipeline.loader_bench import BACKENDS

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
    from pipeline.data import require_backend
    from pipeline.loader_bench import BACKENDS

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
