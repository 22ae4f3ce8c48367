"""One training step: Mixup/CutMix on the device, AMP forward, backward; every `accum_steps`
micro-batches gradient clipping, the optimizer, the LR schedule and the weights' EMA.

Also the precision choice (bf16 needs no GradScaler; fp16 does) and torch.compile.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3, dispatch_clip_grad

from pipeline.config import EmaConfig, MixupConfig, TrainConfig

COMPILE_BACKEND = "inductor"  # tests swap in a counting backend


@contextlib.contextmanager
def keep_modes(module: torch.nn.Module):
    """Put every submodule's train/eval mode back on exit (frozen BatchNorm layers stay in eval)."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


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
    """`auto`: bf16 where the GPU computes in it natively (Ampere on), else fp16 on CUDA; off on CPU."""
    if amp == "auto":
        if device.type != "cuda":
            return Precision(None)
        # the default also counts emulated bf16 (Turing: T4), which is slow and which Inductor refuses
        # to compile (it skips the frame and runs eager): pytorch#118122
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return Precision(torch.bfloat16 if native else torch.float16)
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


class WeightEma:
    """timm's ModelEmaV3 of `source` (the raw model), updated after each optimizer step; its update
    count drives timm's decay warm-up and is checkpointed with it. One EMA lives through every stage."""

    def __init__(self, source: torch.nn.Module, cfg: EmaConfig):
        self.source = source
        self.ema = ModelEmaV3(source, decay=cfg.decay, use_warmup=cfg.warmup)
        self.updates = 0

    @property
    def module(self) -> torch.nn.Module:
        return self.ema.module

    def configure(self, cfg: EmaConfig) -> None:
        """A stage's own `ema` settings."""
        self.ema.decay, self.ema.use_warmup = cfg.decay, cfg.warmup

    def update(self) -> None:
        self.updates += 1
        self.ema.update(self.source, step=self.updates)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict, updates: int) -> None:
        self.module.load_state_dict(state)
        self.updates = updates


class TrainStep:
    """Callable on a device batch; returns the detached loss without synchronising.

    With `accum_steps` > 1 each call is a micro-batch: losses are averaged over the window and the
    optimizer steps at its end; the last window of an epoch may be shorter (`start_epoch` says how
    many batches the epoch has), so every batch counts and the step count is ceil(batches / accum).
    """

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
        accum_steps: int = 1,
        clip_grad: float | None = None,
        clip_mode: str = "norm",
        ema: WeightEma | None = None,
    ):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.precision, self.device, self.mixup = precision, device, mixup
        self.scaler, self.accum_steps, self.ema = scaler, accum_steps, ema
        self.clip_grad, self.clip_mode = clip_grad, clip_mode
        # Mixup's targets already carry the label smoothing
        self.criterion = (
            SoftTargetCrossEntropy() if mixup else torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        )
        self.optimizer_steps = 0
        self._params = [p for g in optimizer.param_groups for p in g["params"]]  # what clipping sees
        self.start_epoch(None)

    def start_epoch(self, batches: int | None, start: int = 0) -> None:
        """An epoch of `batches` micro-batches begins (at batch `start` when resumed mid-epoch, which
        is always the start of an accumulation window)."""
        self._batch, self._batches = start, batches
        # the last call ended with an optimizer step: no accumulated gradient is pending, so a
        # checkpoint taken now loses nothing
        self.at_boundary = False

    def retarget(self, batches: int) -> None:
        """The epoch under way now has `batches` micro-batches (a re-plan inside the run's last epoch,
        made at an update boundary: the windows from here are counted against the new end)."""
        self._batches = batches

    @staticmethod
    def steps_per_epoch(batches: int, accum_steps: int) -> int:
        return math.ceil(batches / accum_steps)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        i, accum = self._batch, self.accum_steps
        self._batch += 1
        window_start = i - i % accum
        remaining = self._batches - window_start if self._batches is not None else accum
        window = max(1, min(accum, remaining))  # the epoch's last window may be shorter
        self.at_boundary = i - window_start == window - 1  # the window completes with this batch
        if self.mixup is not None:
            images, labels = self.mixup(images, labels)
        if i % accum == 0:
            self.optimizer.zero_grad(set_to_none=True)
        # DDP: gradients are averaged across processes once per window, at its last micro-batch
        no_sync = getattr(self.model, "no_sync", None)
        with no_sync() if no_sync is not None and not self.at_boundary else contextlib.nullcontext():
            with self.precision.autocast(self.device):
                loss = self.criterion(self.model(images), labels)
            scaled = loss / window if window > 1 else loss
            if self.scaler is not None:
                self.scaler.scale(scaled).backward()
            else:
                scaled.backward()
        if self.at_boundary:
            self._optimizer_step()
        return loss.detach()

    def _optimizer_step(self) -> None:
        if self.clip_grad is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            dispatch_clip_grad(self._params, self.clip_grad, mode=self.clip_mode)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer_steps += 1
        if self.scheduler is not None:  # None: the LR range test sets the LR itself
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update()


def build_train_step(
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    cfg: TrainConfig,
    device: torch.device,
    num_classes: int,
    ema: WeightEma | None = None,
    accumulate: bool = True,
    scaler: torch.amp.GradScaler | None = None,
) -> TrainStep:
    """The step a stage's training settings describe: precision, GradScaler (fp16 only: `scaler`, the
    previous stage's, goes on with the loss scale it found), Mixup, accumulation (unless `accumulate`
    is off, as for the LR range test), clipping, EMA."""
    precision = resolve_precision(cfg.amp, device)
    if not precision.needs_scaler:
        scaler = None
    elif scaler is None:
        scaler = torch.amp.GradScaler(device.type)
    mixup = build_mixup(cfg.mixup, cfg.label_smoothing, num_classes)
    return TrainStep(
        net,
        optimizer,
        scheduler,
        precision,
        device,
        mixup,
        cfg.label_smoothing,
        scaler,
        accum_steps=cfg.accum_steps if accumulate else 1,
        clip_grad=cfg.clip_grad,
        clip_mode=cfg.clip_mode,
        ema=ema,
    )
