"""GPU memory before and during training: one forward and backward per stage before the first batch,
so a batch that does not fit stops the run at once with the largest that does; one line for a late out-of-memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.config import Config
from pipeline.errors import ConfigError, UserError
from pipeline.model import ParamGroups, apply_freeze
from pipeline.train.checkpoint import rng_state, set_rng_state
from pipeline.train.plan import RunPlan
from pipeline.train.step import resolve_precision


def check_memory(
    model: torch.nn.Module,
    cfg: Config,
    plan: RunPlan,
    groups: ParamGroups,
    device: torch.device,
    first_stage: int = 0,
    world_size: int = 1,
) -> dict[int, int]:
    """One forward and backward per stage, at its largest training size and per-process batch, with
    its freeze, AMP and memory format: a batch that does not fit the GPU stops the run now, with the
    largest that fitted, not hours in at that stage. Returns each stage's peak allocated bytes (CUDA).
    Weights, BatchNorm statistics, gradients, trainable flags and RNGs are left as they were, and the
    model in the default (contiguous) memory format, as it is built; each stage sets its own."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    trainable = [p.requires_grad for p in model.parameters()]
    rng = rng_state(device)
    peaks = {}
    try:
        for k in range(first_stage, len(cfg.stages)):
            stage, epochs = cfg.stages[k], plan.of_stage(k)
            size, batch = max(e.img_size for e in epochs), epochs[0].batch_per_process
            apply_freeze(model, stage.train, groups, f"stages.{k}").train_mode(model)
            channels_last = stage.train.channels_last
            model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

            def train_pass(b: int) -> int:
                return _train_pass(model, stage.train.amp, channels_last, b, size, device)

            try:
                peaks[k] = train_pass(batch)
                continue
            except torch.cuda.OutOfMemoryError:
                pass  # searched below, once this error (and the tensors its frames hold) is gone
            fits = _largest_batch(train_pass, batch)
            accum = stage.train.accum_steps * math.ceil(batch / fits) if fits else 0
            advice = (
                f"the largest that fitted is {fits} per process: set stages.{k}.batch_size to {fits * world_size} "
                f"and its accum_steps to {accum} (about the same images per optimizer step)"
                if fits
                else "not even one image fits: choose a smaller model.arch or img_size"
            )
            raise ConfigError(
                f"stages.{k}: a batch of {batch} per process at {size}px does not fit in {device}'s memory"
                f"{_capacity(device)} (one forward and backward, amp {stage.train.amp}); {advice}"
            )
    finally:
        model.zero_grad(set_to_none=True)
        model.to(memory_format=torch.contiguous_format)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        for p, flag in zip(model.parameters(), trainable):
            p.requires_grad_(flag)
        set_rng_state(rng, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return peaks


def _capacity(device: torch.device) -> str:
    if device.type != "cuda":
        return ""
    return f" ({torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB)"


def _train_pass(
    model: torch.nn.Module, amp: str, channels_last: bool, batch: int, size: int, device: torch.device
) -> int:
    """Peak bytes allocated by one forward and backward of `batch` random images (0 off CUDA)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    x = torch.randn(batch, 3, size, size, device=device)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    try:
        with resolve_precision(amp, device).autocast(device):
            out = model(x)
        out.float().sum().backward()
    finally:
        del x
        model.zero_grad(set_to_none=True)
    return torch.cuda.max_memory_allocated(device) if cuda else 0


def _largest_batch(fits: Callable[[int], object], failed: int) -> int:
    """The largest batch below `failed` for which `fits(batch)` does not run out of memory (0: none)."""
    lo, hi = 0, failed  # lo fits (0 trivially), hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            fits(mid)
            lo = mid
        except torch.cuda.OutOfMemoryError:
            hi = mid
    return lo


def out_of_memory(k: int, run_dir: Path, begun: bool) -> UserError:
    """Training ran out of device memory although the probe's pass fitted: what to change, and how to go
    on. `begun`: the last checkpoint is within stage k, whose batch can then no longer change."""
    resume = f"python -m pipeline run --resume {run_dir}"
    if begun:
        how = (
            f"the stage has begun, so its batch cannot change: resume with less fragmentation "
            f"(PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True {resume}), or start again with a smaller "
            f"stages.{k}.batch_size"
        )
    else:
        how = f"resume with a smaller batch: {resume} --set stages.{k}.batch_size=N (and accum_steps to keep the step)"
    return UserError(f"stage {k}: out of device memory; {how}")
