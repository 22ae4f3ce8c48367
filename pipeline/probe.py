"""Whether smaller sizes keep the classes of these images: a short training probe (`plan --budget`).

A ramp that starts below the size where the classes can still be told apart trains its first epochs
on noise: the digits task lost 9.6 points to a ramp from half its final size, the demo's 1,000-image
folder 15.7 (BENCHMARKS.md). How much of the image survives a resize does not say it (the probes that
need no training, same page); training does. So the probe trains FILE's model from its starting
weights, briefly and the same way, at each candidate start size and at the final size, on the same
sample of the training images, and compares their validation top-1: a start size is kept when it
ends at most `KEEP_POINTS` under the final size. It trains the final size first, then the candidates
from the smallest up, and stops at the first kept (the larger ones could not move the start). Short
training favours small sizes (they learn faster at first), so a size the probe rejects is one whose
classes are really lost at that scale.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.config import Config, ScheduleConfig
from pipeline.data.spec import IMAGENET_MEAN, IMAGENET_STD

PROBE_IMAGES = 1000  # training images sampled (at most)
PROBE_VAL = 500  # validation images sampled (at most)
PROBE_EPOCHS = 4  # over the sample, at each size
PROBE_BATCH = 64
KEEP_POINTS = 2.0  # a start size is kept when its top-1 is at most this many points under the final size's
LEARNED_POINTS = 10.0  # the probe tells only where some size ended this many points above chance
PROBE_SHARE = 0.1  # of the budget left (`plan --budget`): the most the probe may take
MIN_IMAGES = 200  # fewer than this and the probe says nothing (a budget too short for it)
MIN_FEATURE_SIDE = 2  # a budget too short to probe: the start is the smallest size whose deepest map is this wide


@dataclass(frozen=True)
class ProbeResult:
    top1: dict[int, float]  # validation top-1 (percent) after the probe's training at each size
    images: int  # training images sampled
    seconds: float
    classes: int

    @property
    def learned(self) -> bool:
        """Whether any size learned enough to be told from chance (a probe too short says nothing)."""
        return max(self.top1.values()) >= 100 / self.classes + LEARNED_POINTS

    def start(self, final: int, keep: float = KEEP_POINTS) -> int:
        """The smallest size whose top-1 is within `keep` points of the final size's (the final size
        itself when none is, or when the probe learned too little to tell)."""
        if not self.learned:
            return final
        return min(s for s, top1 in self.top1.items() if s == final or top1 >= self.top1[final] - keep)

    def line(self, final: int) -> str:
        """Why the plan starts where it does, from the probe."""
        first = self.start(final)
        cells = ", ".join(f"{s} px {t:.1f}%" for s, t in sorted(self.top1.items()))
        probe = (
            f"a short training on {self.images} of the images ({PROBE_EPOCHS} epochs at each size, "
            f"{self.seconds:.0f} s): {cells}"
        )
        if not self.learned:
            return (
                f"every epoch at {final} px: the probe learned too little to tell whether smaller sizes keep the "
                f"classes ({probe})"
            )
        if first == final:
            return f"every epoch at {final} px: smaller sizes lose the classes here ({probe})"
        return f"a ramp from {first} px: the smallest size within {KEEP_POINTS:g} points of {final} px ({probe})"


def probe_images(budget_s: float, seconds_per_image: float, available: int) -> int:
    """How many training images the probe can sample for `budget_s` when one image at every size, for
    `PROBE_EPOCHS` epochs, costs `seconds_per_image`: up to `PROBE_IMAGES`, 0 when under `MIN_IMAGES`."""
    n = min(PROBE_IMAGES, available, int(budget_s / max(seconds_per_image * PROBE_EPOCHS, 1e-9)))
    return n if n >= MIN_IMAGES or n == available else 0


def _sample(samples: list, n: int, seed: int = 0) -> list:
    picked = list(samples)
    random.Random(seed).shuffle(picked)
    return picked[:n]


def _load(samples: list, final: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The images at `final` px (shorter side resized, centre crop: as validation sees them), as uint8."""
    from torchvision.transforms.v2 import functional as TF

    from pipeline.data.folder import read_image

    images = [TF.center_crop(TF.resize(read_image(path), final, antialias=True), final) for path, _ in samples]
    return torch.stack(images), torch.tensor([label for _, label in samples])


@functools.cache
def _stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The ImageNet mean and std on `device`, in 0-255 units (made once, not per batch)."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    return mean, torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255


def _at(x: torch.Tensor, size: int, device: torch.device) -> torch.Tensor:
    """uint8 images at `size` px (antialiased), normalised, channels_last."""
    x = x.to(device).float()
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean, std = _stats(device)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def _trained_top1(cfg: Config, num_classes: int, data, size: int, device: torch.device, seed: int = 0) -> float:
    """Top-1 on the sampled validation images after `PROBE_EPOCHS` epochs at `size` from FILE's
    starting weights: its optimizer and LR (0.1, or 1e-3 for Adam-family ones, under `lr: find`), one
    OneCycle, label smoothing 0.1, no augmentation."""
    from pipeline.model import build_model
    from pipeline.train.schedule import build_optimizer, build_scheduler

    (xa, ya), (xb, yb) = data
    torch.manual_seed(seed)
    model = build_model(cfg.model, num_classes).to(device).to(memory_format=torch.channels_last)
    opt_cfg = cfg.train.optimizer
    if opt_cfg.lr == "find":
        opt_cfg = dataclasses.replace(opt_cfg, lr=0.1 if "sgd" in opt_cfg.name else 1e-3)
    optimizer = build_optimizer(model, opt_cfg)
    batch = min(PROBE_BATCH, max(2, len(xa) // 2))
    per_epoch = len(xa) // batch
    scheduler = build_scheduler(optimizer, ScheduleConfig(name="onecycle"), PROBE_EPOCHS * per_epoch, per_epoch)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(PROBE_EPOCHS):
        order = torch.randperm(len(xa), generator=generator)
        for k in range(per_epoch):
            idx = order[k * batch : (k + 1) * batch]
            with autocast:
                loss = F.cross_entropy(
                    model(_at(xa[idx], size, device)).float(), ya[idx].to(device), label_smoothing=0.1
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    hits = 0
    with torch.no_grad(), autocast:
        for i in range(0, len(xb), 256):
            hits += int((model(_at(xb[i : i + 256], size, device)).argmax(1).cpu() == yb[i : i + 256]).sum())
    return 100.0 * hits / max(len(xb), 1)


def probe_sizes(
    cfg: Config,
    datasets,
    num_classes: int,
    sizes: list[int],
    final: int,
    images: int,
    device: torch.device,
    seed: int = 0,
    every: bool = False,
) -> ProbeResult:
    """Train FILE's model briefly on `images` sampled training images at the final size, then at each of
    `sizes` from the smallest up, until one keeps the classes (the sizes above it would not change the
    start: `ProbeResult.start`); the top-1 of each size trained (`every`: of every size, for a table).
    `seed`: the sample, the starting weights and the order (the plan uses 0), the same at every size,
    so a size's top-1 does not hang on which sizes were trained before it."""
    t0 = time.perf_counter()
    train = _load(_sample(datasets.train.samples, images, seed), final)
    val = _load(_sample(datasets.val.samples, min(PROBE_VAL, len(datasets.val.samples)), seed), final)
    data = (train, val)
    top1 = {final: round(_trained_top1(cfg, num_classes, data, final, device, seed), 1)}
    for size in sorted(set(sizes) - {final}):
        result = ProbeResult(top1, len(train[0]), 0.0, num_classes)
        if not every and result.learned and result.start(final) < final:
            break  # a smaller size kept the classes: the start is found
        top1[size] = round(_trained_top1(cfg, num_classes, data, size, device, seed), 1)
    return ProbeResult(dict(sorted(top1.items())), len(train[0]), time.perf_counter() - t0, num_classes)


def feature_sides(cfg: Config, num_classes: int, sizes: list[int]) -> dict[int, int | None]:
    """The side of the model's deepest feature map (timm's `forward_features`, NCHW) at each size: 1 for
    ResNet-18 at 32 px, 2 at 40 to 64 px; None where it has no such map (a ViT's tokens)."""
    from pipeline.model import build_model

    model = build_model(dataclasses.replace(cfg.model, pretrained=None), num_classes).eval()
    sides: dict[int, int | None] = {}
    for size in sizes:
        try:
            with torch.no_grad():
                out = model.forward_features(torch.zeros(1, 3, size, size))
        except Exception:  # noqa: BLE001 - no forward_features, or not at this size: no side to read
            out = None
        nchw = isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[1] == getattr(model, "num_features", -1)
        sides[size] = min(out.shape[-2:]) if nchw else None
    return sides


def unprobed_start(cfg: Config, num_classes: int, sizes: list[int]) -> tuple[str, int]:
    """A budget too short for the probe: the smallest of `sizes` at which the model's deepest feature map is
    at least `MIN_FEATURE_SIDE` wide (below it the last block's 3x3 convolutions see one position, and the
    ramps that lost ran there: the digits task and the demo's textures from 32 px, BENCHMARKS.md), with
    its line; the final size where none is smaller, or the model has no such map."""
    final = max(sizes)
    too_short = "the budget is too short to probe whether smaller sizes keep the classes"
    sides = feature_sides(cfg, num_classes, sorted(sizes))
    wide = [s for s, side in sides.items() if s < final and side is not None and side >= MIN_FEATURE_SIDE]
    if not wide:
        return f"every epoch at {final} px: {too_short}", final
    start = wide[0]
    below = ", ".join(f"{sides[s]}x{sides[s]} at {s} px" for s in sides if s < start and sides[s] is not None)
    return (
        f"a ramp from {start} px: {too_short}, so it starts at the smallest size where {cfg.model.arch}'s "
        f"deepest feature map is {MIN_FEATURE_SIDE}x{MIN_FEATURE_SIDE} or wider ({sides[start]}x{sides[start]}"
        f"{'; ' + below if below else ''})",
        start,
    )


def probe_start(cfg: Config, datasets, num_classes: int, device, speeds, sizes: list[int], left_s: float):
    """The probe's line and the start size it keeps (`pipeline.probe`), within `PROBE_SHARE` of the budget
    left; where that is too short for it, the smallest size with a wide enough feature map (`unprobed_start`)."""
    from pipeline.speeds import per_image

    final = max(sizes)
    n = probe_images(PROBE_SHARE * left_s, sum(per_image(speeds.train, s) for s in sizes), len(datasets.train))
    if not n:
        return unprobed_start(cfg, num_classes, sizes)
    result = probe_sizes(cfg, datasets, num_classes, sizes, final, n, device)
    return result.line(final), result.start(final)
