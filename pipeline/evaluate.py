"""`python -m pipeline eval`: a checkpoint (or several, averaged) on a validation folder.

Top-1/top-5, per-class accuracy and a confusion matrix; test-time augmentation averages the softmax
over flipped (and corner-cropped) views, an ensemble averages it over checkpoints. `--img-size auto`
evaluates at the trained size and a few larger ones and keeps the best (FixRes).
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import timm
import torch

from pipeline.config import DataConfig, StageSpec, parse_config
from pipeline.data import Loader, build_loader, scan_image_folder
from pipeline.data.demo import demo_root
from pipeline.data.folder import ImageFolderIndex
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


def run_folder(checkpoint: Path) -> Path:
    """The run folder a checkpoint belongs to (RUN_DIR for RUN_DIR/checkpoints/x.pt), else its folder."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def load_member(
    path: Path, device: torch.device, use_ema: bool, memory_format: torch.memory_format = torch.channels_last
) -> Member:
    """A checkpoint's model, for inference (channels_last by default: as the loaders' batches)."""
    checkpoint = Checkpoint.read(path)  # weights_only
    if use_ema and checkpoint.state_dict_ema is None:
        raise UserError(f"{path}: --ema asked for, but this run kept no EMA weights (train.ema was off)")
    model = timm.create_model(checkpoint.arch, pretrained=False, num_classes=checkpoint.num_classes)
    model.load_state_dict(checkpoint.weights(use_ema))
    model.to(device, memory_format=memory_format).eval()
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
        probs.append(total / (len(models) * len(views)))
        labels.append(y)
    return torch.cat(probs).cpu(), torch.cat(labels).cpu()  # one host sync, at the end


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


AUTO = "auto"
SIZE_FACTORS_PERCENT = (115, 130, 150)  # of the trained size: what `--img-size auto` tries besides it


@dataclass
class EvalSetup:
    """What every evaluated size shares: the models, the validation images and the run's last stage."""

    members: list[Member]
    data: Path
    index: ImageFolderIndex
    data_cfg: DataConfig
    batch_size: int
    run_size: int  # the size the run validated at: the candidates of `auto` start from it
    tta: str
    precision: Precision
    device: torch.device


def check_img_size(value: int | str | None) -> int | str | None:
    """`--img-size` as `run_eval` takes it: None (the trained size), "auto", or an integer >= 8; the
    command line hands it over as text."""
    if value is None or value == AUTO:
        return value
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise UserError(f"--img-size {value}: expected an integer >= 8 or {AUTO}") from None
    if size < 8:
        raise UserError(f"--img-size {value}: need at least 8")
    return size


def candidate_sizes(trained: int) -> list[int]:
    """The sizes `--img-size auto` tries: the trained size as it is, and 1.15, 1.3 and 1.5 times it
    rounded half up to a multiple of 8; increasing, without duplicates."""
    # integer arithmetic: 24 * 1.5 / 8 is a tie (4.5) that must round up, not to even
    scaled = {(trained * percent + 400) // 800 * 8 for percent in SIZE_FACTORS_PERCENT}
    return sorted(scaled | {trained})


def last_stage(config: dict[str, Any]) -> StageSpec:
    """The last stage of the run a checkpoint's `config` describes: its size, batch, data and AMP settings."""
    raw = copy.deepcopy(config)
    # the training data and the weights it started from may have moved since: not needed here
    raw["data"].update(train="demo", val="demo")
    raw["model"]["pretrained"] = None
    return parse_config(raw).stages[-1]


def prepare(
    paths: list[Path],
    data: Path | None,
    tta: str,
    use_ema: bool,
    batch_size: int | None,
    workers: int | None,
    device: torch.device,
) -> EvalSetup:
    """Load the checkpoints and check that `data` (default: the run's data.val) has their classes."""
    members = [load_member(p, device, use_ema) for p in paths]
    first = members[0]
    for m in members[1:]:
        if m.classes != first.classes:
            raise UserError(f"--ensemble {m.path}: its classes differ from {first.path}'s; members must share classes")
    val = first.config["data"]["val"]
    last = last_stage(first.config)
    field = "--data" if data is not None else f"data.val (from {first.path})"
    if data is None:
        data = demo_root() / "val" if val == "demo" else Path(val)
    index = scan_image_folder(data, field)
    if index.classes != first.classes:
        raise UserError(
            f"{field}: the class folders of {data} ({len(index.classes)}) are not the {len(first.classes)} classes "
            f"the checkpoint was trained on ({', '.join(first.classes[:5])}, ...)"
        )
    data_cfg = replace(last.data, cache=None, workers=last.data.workers if workers is None else workers)
    precision = resolve_precision(last.train.amp, device)  # as the run validated
    batch = batch_size or last.batch_size
    # the size the run validated at: its last stage's val_size, else its training size
    return EvalSetup(members, data, index, data_cfg, batch, last.val_size or last.img_size, tta, precision, device)


def evaluate_at(setup: EvalSetup, size: int) -> dict[str, Any]:
    """The metrics of the (averaged) models on the validation images at `size`."""
    probs, labels = probabilities_at(setup, size)
    return metrics(probs, labels, setup.members[0].classes)


def probabilities_at(
    setup: EvalSetup, size: int, watch: Callable[[Loader], Iterable] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (averaged) softmax of every image of `setup.index` at `size`, through the validation loader,
    and their labels; `watch` may wrap the loader (a progress bar)."""
    data_cfg, load_size = setup.data_cfg, size
    if setup.tta == "flip+crops":  # corner crops come from the resized image before its centre crop
        load_size, data_cfg = math.floor(size / data_cfg.crop_pct), replace(data_cfg, crop_pct=1.0)
    loader = build_loader(
        data_cfg,
        setup.index,
        train=False,
        img_size=load_size,
        batch_size=setup.batch_size,
        device=setup.device,
        seed=0,
    )
    try:
        models = [m.model for m in setup.members]
        batches = loader if watch is None else watch(loader)
        return predict(models, batches, setup.tta, size, setup.precision, setup.device)
    finally:
        loader.close()


def size_problem(setup: EvalSetup, size: int) -> str | None:
    """Why a model cannot take `size` x `size` inputs (a ViT's fixed input, a window that does not
    divide it), or None when all can."""
    return input_problem(setup.members, size, setup.precision, setup.device)


@torch.no_grad()
def input_problem(members: list[Member], size: int, precision: Precision, device: torch.device) -> str | None:
    """`size_problem` for any members, precision and device."""
    x = torch.zeros(1, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    for m in members:
        try:
            with precision.autocast(device):
                m.model(x)
        except (AssertionError, RuntimeError) as e:  # what timm's models raise on a size they cannot take
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return f"{m.path.name} cannot take it ({why})"
    return None


def search_sizes(setup: EvalSetup) -> tuple[dict[str, Any], int, list[dict[str, Any]]]:
    """Evaluate at every candidate size the models can take; returns the metrics at the best (the
    highest top-1, the smaller size on a tie), that size and a row per evaluated size."""
    results: dict[int, dict[str, Any]] = {}
    for size in candidate_sizes(setup.run_size):
        problem = size_problem(setup, size)
        if problem is not None:
            print(f"warning: --img-size {AUTO}: skipping {size}px: {problem}", file=sys.stderr)
            continue
        results[size] = evaluate_at(setup, size)
    if not results:
        tried = ", ".join(map(str, candidate_sizes(setup.run_size)))
        raise UserError(f"--img-size {AUTO}: the model takes none of the sizes {tried} (see the warnings above)")
    best = max(results, key=lambda size: (results[size]["top1"], -size))
    rows = [{"img_size": size, "top1": r["top1"], "top5": r["top5"]} for size, r in results.items()]
    return results[best], best, rows


def run_eval(
    target: Path,
    data: Path | None = None,
    img_size: int | str | None = None,
    tta: str = "none",
    ensemble: list[Path] = (),
    out: Path | None = None,
    use_ema: bool = False,
    batch_size: int | None = None,
    workers: int | None = None,
    device_name: str = "auto",
) -> tuple[dict[str, Any], Path]:
    """Evaluate `target` (and the `ensemble` checkpoints with it) at `img_size` (default: the last
    stage's; "auto": the best of `candidate_sizes`); returns the result and its folder."""
    if tta not in TTA_MODES:
        raise UserError(f"--tta {tta}: expected one of {', '.join(TTA_MODES)}")
    img_size = check_img_size(img_size)
    device = resolve_device(device_name)
    paths = [resolve_checkpoint(target, use_ema)] + [resolve_checkpoint(p, use_ema) for p in ensemble]
    setup = prepare(paths, data, tta, use_ema, batch_size, workers, device)
    if img_size == AUTO:
        scores, size, rows = search_sizes(setup)
        searched = {"sizes": rows}
    else:
        size = img_size or setup.run_size
        scores, searched = evaluate_at(setup, size), {}
    result = {
        "checkpoints": [str(p) for p in paths],
        "weights": "ema" if use_ema else "raw",
        "data": str(setup.data),
        "img_size": size,
        **searched,
        "tta": tta,
        **scores,
    }
    out_dir = Path(out) if out is not None else run_folder(paths[0]) / "eval"
    write_json(out_dir / "eval.json", result)
    models = f"{len(paths)} checkpoints" if len(paths) > 1 else paths[0].name
    title = f"{models}, {size}px, TTA {tta}: top-1 {result['top1']:.2f}%"
    plot_confusion(result["confusion"], setup.members[0].classes, out_dir / "confusion_matrix.png", title)
    return result, out_dir
