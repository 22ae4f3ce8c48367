"""A run's model for inference: its checkpoint loaded (a run folder: its best), batched forward
passes through the run's own validation loader, test-time augmentation (flipped and corner-cropped
views) and ensembles (the softmax averaged over checkpoints). `eval`, `predict` and `export` use it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import timm
import torch

from pipeline.config import DataConfig, StageSpec, parse_config
from pipeline.data import Loader, build_loader
from pipeline.data.folder import IMG_EXTENSIONS, is_image_file
from pipeline.data.index import ImageFolderIndex
from pipeline.errors import UserError
from pipeline.model import input_problem as model_input_problem
from pipeline.train.checkpoint import Checkpoint
from pipeline.train.step import Precision

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


AUTO = "auto"


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
    """`--img-size` as eval, predict and export take it: None (the trained size), "auto", or an
    integer >= 8; the command line hands it over as text."""
    if value is None or value == AUTO:
        return value
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise UserError(f"--img-size {value}: expected an integer >= 8 or {AUTO}") from None
    if size < 8:
        raise UserError(f"--img-size {value}: need at least 8")
    return size


def last_stage(config: dict[str, Any]) -> StageSpec:
    """The last stage of the run a checkpoint's `config` describes: its size, batch, data and AMP settings."""
    raw = copy.deepcopy(config)
    # the training data and the weights it started from may have moved since: not needed here
    raw["data"].update(train="demo", val="demo")
    raw["model"]["pretrained"] = None
    return parse_config(raw).stages[-1]


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
    for m in members:
        problem = model_input_problem(m.model, size, device, precision.autocast(device))
        if problem:
            return f"{m.path.name} cannot take it ({problem})"
    return None


def collect_images(paths: list[Path]) -> list[str]:
    """The files to predict, in the order given: a file as it is (its content decides whether it is an
    image), a folder's images (by extension, as the loaders read them) recursively, in sorted order."""
    found: list[str] = []
    seen: set[Path] = set()
    for path in paths:
        if path.is_dir():
            files = sorted((p for p in path.rglob("*") if is_image_file(p)), key=lambda p: p.parts)
        elif path.is_file():
            files = [path]
        else:
            raise UserError(f"{path}: no such file or folder")
        for f in files:
            if f.resolve() not in seen:  # a file named twice (itself and in its folder) is predicted once
                seen.add(f.resolve())
                found.append(str(f))
    if not found:
        names = ", ".join(str(p) for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
        raise UserError(f"{names}: no image files there (by extension: {', '.join(IMG_EXTENSIONS)})")
    return found
