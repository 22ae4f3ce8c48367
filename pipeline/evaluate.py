"""`python -m pipeline eval`: a checkpoint (or several, averaged) on a validation folder.

Top-1/top-5, per-class accuracy and a confusion matrix; test-time augmentation averages the softmax
over flipped (and corner-cropped) views, an ensemble averages it over checkpoints.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import timm
import torch

from pipeline.config import DataConfig, parse_config
from pipeline.data import build_loader, scan_image_folder
from pipeline.data.demo import demo_root
from pipeline.distributed import resolve_device
from pipeline.errors import UserError
from pipeline.files import pyplot, write_json, write_png
from pipeline.train.checkpoint import Checkpoint
from pipeline.train.loop import topk_hits
from pipeline.train.step import Precision, resolve_precision

TTA_MODES = ("none", "flip", "flip+crops")


@dataclass
class Member:
    """One checkpoint of the ensemble, its model ready for inference."""

    path: Path
    model: torch.nn.Module
    classes: list[str]
    config: dict[str, Any]


def resolve_checkpoint(target: Path, use_ema: bool = False) -> Path:
    """A run folder means its best checkpoint (else its last; with the EMA weights, its last: best.pt
    is chosen by the raw weights' accuracy); a file is taken as it is."""
    if target.is_dir():
        for name in ("last.pt",) if use_ema else ("best.pt", "last.pt"):
            if (target / "checkpoints" / name).is_file():
                return target / "checkpoints" / name
        raise UserError(f"{target}: no checkpoint in {target / 'checkpoints'} (not a run folder?)")
    if not target.is_file():
        raise UserError(f"{target}: no such run folder or checkpoint")
    return target


def load_member(path: Path, device: torch.device, use_ema: bool) -> Member:
    checkpoint = Checkpoint.read(path)  # weights_only
    if use_ema and checkpoint.state_dict_ema is None:
        raise UserError(f"{path}: --ema asked for, but this run kept no EMA weights (train.ema was off)")
    model = timm.create_model(checkpoint.arch, pretrained=False, num_classes=checkpoint.num_classes)
    model.load_state_dict(checkpoint.weights(use_ema))
    model.to(device).eval()
    return Member(path, model, list(checkpoint.classes), checkpoint.config)


def tta_views(images: torch.Tensor, mode: str, size: int) -> list[torch.Tensor]:
    """The views of a batch that TTA averages. `flip`: the image and its mirror. `flip+crops`: the
    batch is larger than `size` (the validation resize before its centre crop); the centre and four
    corner crops of `size`, each with its mirror. `none`: the batch itself."""
    if mode == "none":
        return [images]
    if mode == "flip":
        return [images, images.flip(-1)]
    h, w = images.shape[-2:]
    top, left = int(round((h - size) / 2)), int(round((w - size) / 2))  # as torchvision's center_crop
    corners = [(top, left), (0, 0), (0, w - size), (h - size, 0), (h - size, w - size)]
    crops = [images[..., y : y + size, x : x + size] for y, x in corners]
    return [v for c in crops for v in (c, c.flip(-1))]


@torch.no_grad()
def predict(
    models: list[torch.nn.Module], loader, tta: str, size: int, precision: Precision, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities averaged over every model and every TTA view, and the labels (CPU)."""
    probs, labels = [], []
    for x, y in loader:
        total = None
        views = [
            v.contiguous(memory_format=torch.channels_last) for v in tta_views(x, tta, size)
        ]  # once, not per model
        for model in models:
            for v in views:
                with precision.autocast(device):
                    p = model(v).float().softmax(dim=1)
                total = p if total is None else total + p
        probs.append((total / (len(models) * len(views))).cpu())
        labels.append(y.cpu())
    return torch.cat(probs), torch.cat(labels)


def metrics(probs: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """Top-1/top-5 (percent), per-class accuracy and the confusion matrix (rows: true class)."""
    n, c = probs.shape
    top, hits = topk_hits(probs, labels)
    confusion = torch.zeros(c, c, dtype=torch.long)
    confusion.index_put_((labels, top[:, 0]), torch.ones(n, dtype=torch.long), accumulate=True)
    per_class = {}
    for i, name in enumerate(classes):
        count = int(confusion[i].sum())
        per_class[name] = {"samples": count, "top1": round(100.0 * int(confusion[i, i]) / count, 3) if count else None}
    return {
        "samples": n,
        "top1": round(100.0 * hits[:, 0].float().mean().item(), 3),
        "top5": round(100.0 * hits.any(dim=1).float().mean().item(), 3),
        "per_class": per_class,
        "confusion": confusion.tolist(),
    }


def plot_confusion(confusion: list[list[int]], classes: list[str], path: Path, title: str) -> None:
    """Row-normalised confusion matrix (each true class sums to 1), counts written in the cells."""
    plt = pyplot()

    counts = torch.tensor(confusion, dtype=torch.float64)
    rates = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    c = len(classes)
    side = min(16.0, max(4.5, 0.45 * c + 2))
    fig, ax = plt.subplots(figsize=(side + 1, side))
    im = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    if c <= 40:
        ax.set_xticks(range(c), classes, rotation=90, fontsize=8)
        ax.set_yticks(range(c), classes, fontsize=8)
    if c <= 25:
        for i in range(c):
            for j in range(c):
                if counts[i, j]:
                    color = "white" if rates[i, j] > 0.5 else "black"
                    ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7, color=color)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.tight_layout()
    write_png(path, fig)


def format_report(result: dict[str, Any]) -> str:
    lines = [f"{'class':<24} {'samples':>8} {'top-1 %':>8}"]
    for name, row in result["per_class"].items():
        acc = "-" if row["top1"] is None else f"{row['top1']:.2f}"
        lines.append(f"{name[:24]:<24} {row['samples']:>8} {acc:>8}")
    lines.append(f"{'all':<24} {result['samples']:>8} {result['top1']:>8.2f}   top-5 {result['top5']:.2f}%")
    return "\n".join(lines)


def run_eval(
    target: Path,
    data: Path | None = None,
    img_size: int | None = None,
    tta: str = "none",
    ensemble: list[Path] = (),
    out: Path | None = None,
    use_ema: bool = False,
    batch_size: int | None = None,
    workers: int | None = None,
    device_name: str = "auto",
) -> tuple[dict[str, Any], Path]:
    """Evaluate `target` (and the `ensemble` checkpoints with it); returns the result and its folder."""
    if tta not in TTA_MODES:
        raise UserError(f"--tta {tta}: expected one of {', '.join(TTA_MODES)}")
    if img_size is not None and img_size < 8:
        raise UserError(f"--img-size {img_size}: need at least 8")
    device = resolve_device(device_name)
    paths = [resolve_checkpoint(target, use_ema)] + [resolve_checkpoint(p, use_ema) for p in ensemble]
    members = [load_member(p, device, use_ema) for p in paths]
    first = members[0]
    for m in members[1:]:
        if m.classes != first.classes:
            raise UserError(f"--ensemble {m.path}: its classes differ from {first.path}'s; members must share classes")
    raw = copy.deepcopy(first.config)
    val = raw["data"]["val"]
    # the training data and the weights it started from may have moved since: not needed here
    raw["data"].update(train="demo", val="demo")
    raw["model"]["pretrained"] = None
    cfg = parse_config(raw)
    last = cfg.stages[-1]
    size = img_size or last.img_size
    field = "--data" if data is not None else f"data.val (from {first.path})"
    if data is None:
        data = demo_root() / "val" if val == "demo" else Path(val)
    index = scan_image_folder(data, field)
    if index.classes != first.classes:
        raise UserError(
            f"{field}: the class folders of {data} ({len(index.classes)}) are not the {len(first.classes)} classes "
            f"the checkpoint was trained on ({', '.join(first.classes[:5])}, ...)"
        )
    data_cfg: DataConfig = replace(last.data, cache=None, workers=last.data.workers if workers is None else workers)
    load_size = size
    if tta == "flip+crops":  # corner crops come from the resized image before its centre crop
        load_size, data_cfg = math.floor(size / data_cfg.crop_pct), replace(data_cfg, crop_pct=1.0)
    loader = build_loader(
        data_cfg,
        index,
        train=False,
        img_size=load_size,
        batch_size=batch_size or last.batch_size,
        device=device,
        seed=0,
    )
    try:
        precision = resolve_precision(last.train.amp, device)  # as the run validated
        probs, labels = predict([m.model for m in members], loader, tta, size, precision, device)
    finally:
        loader.close()
    result = {
        "checkpoints": [str(p) for p in paths],
        "weights": "ema" if use_ema else "raw",
        "data": str(data),
        "img_size": size,
        "tta": tta,
        **metrics(probs, labels, first.classes),
    }
    run_dir = paths[0].parent.parent if paths[0].parent.name == "checkpoints" else paths[0].parent
    out_dir = Path(out) if out is not None else run_dir / "eval"
    write_json(out_dir / "eval.json", result)
    models = f"{len(members)} checkpoints" if len(members) > 1 else paths[0].name
    title = f"{models}, {size}px, TTA {tta}: top-1 {result['top1']:.2f}%"
    plot_confusion(result["confusion"], first.classes, out_dir / "confusion_matrix.png", title)
    return result, out_dir
