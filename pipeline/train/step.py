"""One training step: Mixup/CutMix on the device, AMP forward, backward, optimizer and LR step.

Also the precision choice (bf16 needs no GradScaler; fp16 does) and torch.compile.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

from pipeline.config import MixupConfig, TrainConfig

COMPILE_BACKEND = "inductor"  # tests swap in a counting backend


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timing); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Precision:
    """Autocast dtype (None: full fp32) and whether a GradScaler is needed."""

    dtype: torch.dtype | None

    @property
    def needs_scaler(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype is not None)

    @property
    def name(self) -> str:
        return {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


def resolve_precision(amp: str, device: torch.device) -> Precision:
    """`auto`: bf16 where CUDA supports it, else fp16 on CUDA; off on CPU."""
    if amp == "auto":
        if device.type != "cuda":
            return Precision(None)
        return Precision(torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return Precision({"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp])


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """Compile once for the whole run; each new input shape compiles once (no dynamic shapes)."""
    return torch.compile(model, backend=COMPILE_BACKEND, dynamic=False)


def build_mixup(cfg: MixupConfig | None, label_smoothing: float, num_classes: int) -> Mixup | None:
    if cfg is None or cfg.prob == 0 or (cfg.mixup_alpha == 0 and cfg.cutmix_alpha == 0):
        return None
    return Mixup(
        mixup_alpha=cfg.mixup_alpha,
        cutmix_alpha=cfg.cutmix_alpha,
        prob=cfg.prob,
        switch_prob=cfg.switch_prob,
        label_smoothing=label_smoothing,
        num_classes=num_classes,
    )


class TrainStep:
    """Callable on a device batch; returns the detached loss without synchronising."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        precision: Precision,
        device: torch.device,
        mixup: Mixup | None,
        label_smoothing: float,
        scaler: torch.amp.GradScaler | None = None,
    ):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.precision, self.device, self.mixup = precision, device, mixup
        self.scaler = scaler
        # Mixup's targets already carry the label smoothing
        self.criterion = (
            SoftTargetCrossEntropy() if mixup else torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        )

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.mixup is not None:
            images, labels = self.mixup(images, labels)
        with self.precision.autocast(self.device):
            loss = self.criterion(self.model(images), labels)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        if self.scheduler is not None:  # None: the LR range test sets the LR itself
            self.scheduler.step()
        return loss.detach()


def build_train_step(
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    cfg: TrainConfig,
    device: torch.device,
    num_classes: int,
) -> TrainStep:
    """The step a stage's training settings describe: precision, GradScaler (fp16 only), Mixup."""
    precision = resolve_precision(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type) if precision.needs_scaler else None
    mixup = build_mixup(cfg.mixup, cfg.label_smoothing, num_classes)
    return TrainStep(net, optimizer, scheduler, precision, device, mixup, cfg.label_smoothing, scaler)
