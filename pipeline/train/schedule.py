"""Per-stage optimizer (timm's create_optimizer_v2) and OneCycleLR sized from real step counts.

Norm and bias parameters get no weight decay (timm's filter_bias_and_bn).
"""

from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2
from torch.optim.lr_scheduler import OneCycleLR

from pipeline.config import OptimizerConfig, ScheduleConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    # timm's `sgd` is Nesterov SGD and `momentum` plain momentum SGD
    name = "momentum" if cfg.name == "sgd" and not cfg.nesterov else cfg.name
    return create_optimizer_v2(model, opt=name, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int) -> OneCycleLR:
    """OneCycleLR over exactly `total_steps` optimizer steps; each group's peak is its own lr."""
    defaults = optimizer.defaults
    pct_start = cfg.pct_start
    if total_steps >= 2:  # a warm-up under two steps divides by zero inside OneCycleLR
        pct_start = max(pct_start, min(0.75, 2 / total_steps))
    return OneCycleLR(
        optimizer,
        max_lr=[g["lr"] for g in optimizer.param_groups],
        total_steps=total_steps,
        pct_start=pct_start,
        div_factor=cfg.div_factor,
        final_div_factor=cfg.final_div_factor,
        cycle_momentum="momentum" in defaults or "betas" in defaults,
        base_momentum=cfg.base_momentum,
        max_momentum=cfg.max_momentum,
    )


def current_lr_momentum(optimizer: torch.optim.Optimizer) -> tuple[float, float | None]:
    """The first group's lr and momentum (or beta1), as OneCycleLR sets them."""
    group = optimizer.param_groups[0]
    momentum = group.get("momentum", group.get("betas", (None,))[0])
    return float(group["lr"]), momentum
