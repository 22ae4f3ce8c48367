"""Cheap probes of "how small can this data go", measured against what training showed.

For a plan to choose its start size from the data without training, a probe must rank the datasets
the way training does: on the demo a ramp from half the final size ends level with the fixed run, on
the digits task it does not (BENCHMARKS.md). Two probes, each on up to `--images` training images
(and half as many validation images) of each folder, at every multiple of 8 from half the final size
up to it:

  detail   the share of the final-size image's detail (its difference from a 1/8-size blur) that an
           image made at size s keeps, once scaled back up: 1 - |x_F - up(x_s)|^2 / |x_F - up(x_F/8)|^2
  features the top-1 of a ridge classifier on the pooled features of an untrained ResNet-18 (timm,
           BatchNorm on batch statistics, two seeds), trained and tested at size s
  trained  the probe `plan --budget` runs (`pipeline.probe`, `--probes trained`): the stages file's
           model and optimizer trained from its starting weights for 4 epochs over the sampled images
           at F, then from F/2 up until a size keeps the classes, then its val top-1 at each; the size
           the plan would start at; then, back to back, the same at every size (F/2, 3F/4, F): the
           top-1 table, and the seconds the early stop saves

    python benchmarks/size_probes.py NAME=FOLDER[@FINAL] ... [--images 1000] [--probes trained --stages stages.yaml]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.folder import is_image_file  # noqa: E402

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def load(folder: Path, n: int) -> tuple[list[torch.Tensor], list[str]]:
    """Up to `n` images of `folder` (class folders), a seeded sample, as float tensors, and their classes."""
    from torchvision.io import ImageReadMode, decode_image

    files = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))
    random.Random(0).shuffle(files)
    files = files[:n]
    images = [decode_image(str(p), mode=ImageReadMode.RGB)[None].float() / 255 for p in files]
    return images, [p.parent.name for p in files]


def detail_kept(images: list[torch.Tensor], final: int, size: int) -> float:
    x = torch.cat([resize(i, final) for i in images])
    blur = resize(resize(x, final // 8), final)
    made = resize(torch.cat([resize(i, size) for i in images]), final)
    return float(1 - ((x - made) ** 2).sum() / ((x - blur) ** 2).sum())


def features(model: torch.nn.Module, images: list[torch.Tensor], size: int) -> torch.Tensor:
    x = (torch.cat([resize(i, size) for i in images]) - MEAN) / STD
    with torch.no_grad():
        return torch.cat([torch.cat([f.mean((2, 3)) for f in model(b)], 1) for b in x.split(100)])


def ridge_top1(a: torch.Tensor, b: torch.Tensor, ya: torch.Tensor, yb: torch.Tensor, classes: int) -> float:
    mu, sd = a.mean(0), a.std(0) + 1e-6
    a, b = (a - mu) / sd, (b - mu) / sd
    a, b = torch.cat([a, torch.ones(len(a), 1)], 1), torch.cat([b, torch.ones(len(b), 1)], 1)
    target = F.one_hot(ya, classes).float() * 2 - 1
    w = torch.linalg.solve(a.T @ a + len(a) * torch.eye(a.shape[1]), a.T @ target)
    return 100 * float(((b @ w).argmax(1) == yb).float().mean())


def probe(folder: Path, final: int, n: int) -> dict:
    import timm

    train, train_cls = load(folder / "train", n)
    val, val_cls = load(folder / "val", n // 2)
    names = sorted(set(train_cls))
    ya = torch.tensor([names.index(c) for c in train_cls])
    yb = torch.tensor([names.index(c) if c in names else -1 for c in val_cls])
    sizes = list(range(final // 2, final + 1, 8))
    rows = {s: {"detail": round(detail_kept(train[:256], final, s), 3), "features": []} for s in sizes}
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = timm.create_model("resnet18", num_classes=len(names), features_only=True, out_indices=(2, 3, 4))
        model.train()  # BatchNorm on batch statistics: an untrained network's running ones mean nothing
        for s in sizes:
            top1 = ridge_top1(features(model, train, s), features(model, val, s), ya, yb, len(names))
            rows[s]["features"].append(round(top1, 1))
    return {str(s): r for s, r in rows.items()}


def trained_probe(folder: Path, final: int, n: int, stages: Path, seed: int = 0) -> dict:
    """The probe `plan --budget` runs (`pipeline.probe`): the stages file's model and optimizer, trained
    briefly at the sizes the plan measures, on `n` sampled training images of `folder`."""
    from pipeline.budget import candidate_sizes
    from pipeline.config import load_config
    from pipeline.data import scan_datasets
    from pipeline.probe import probe_sizes

    cfg = load_config(stages, [f"data.train={folder / 'train'}", f"data.val={folder / 'val'}"])
    datasets = scan_datasets(cfg.data)
    sizes, cpu, classes = candidate_sizes(final), torch.device("cpu"), len(datasets.classes)
    result = probe_sizes(cfg, datasets, classes, sizes, final, n, cpu, seed)  # as the plan runs it
    every = probe_sizes(cfg, datasets, classes, sizes, final, n, cpu, seed, every=True)  # back to back
    return {"top1": {str(s): t for s, t in every.top1.items()}, "images": result.images,
            "seconds": round(result.seconds, 1), "start": result.start(final), "line": result.line(final),
            "trained": sorted(result.top1), "every_seconds": round(every.seconds, 1),
            "every_start": every.start(final)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", metavar="NAME=FOLDER[@FINAL]")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--probes", default="detail,features", help="detail,features (no training) or trained")
    parser.add_argument("--seed", type=int, default=0, help="the trained probe's sample and weights (the plan's: 0)")
    parser.add_argument(
        "--stages", type=Path, default=Path("stages.yaml"), help="the trained probe's model and optimizer"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    report = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "date": time.strftime("%F")}
    for spec in args.folders:
        name, _, rest = spec.partition("=")
        path, _, final = rest.partition("@")
        t0 = time.perf_counter()
        if args.probes == "trained":
            report[name] = trained_probe(Path(path), int(final or 64), args.images, args.stages, args.seed)
            r = report[name]
            print(
                f"{name}: {r['line']}\n  trained {r['trained']} px in {r['seconds']:.1f} s; every size "
                f"{r['every_seconds']:.1f} s ({r['seconds'] / r['every_seconds']:.2f}x), starting at "
                f"{r['every_start']} px (the plan's probe: {r['start']} px)",
                flush=True,
            )
            if args.json:
                args.json.write_text(json.dumps(report, indent=1))
            continue
        report[name] = probe(Path(path), int(final or 64), args.images)
        cells = " ".join(f"{s}: {r['detail']:.2f} / {sum(r['features']) / 2:.1f}%" for s, r in report[name].items())
        print(f"{name} (detail kept / feature top-1): {cells}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
