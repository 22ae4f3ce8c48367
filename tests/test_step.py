"""The training step's pieces: Mixup/CutMix targets, even batches, optimizer and schedule wiring."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import MixupConfig, OptimizerConfig, ScheduleConfig, StageSpec, TrainConfig
from pipeline.train.plan import train_batch_size
from pipeline.train.schedule import build_optimizer, build_scheduler
from pipeline.train.step import Precision, TrainStep, build_mixup

CLASSES = 5


def smooth(labels: torch.Tensor, eps: float) -> torch.Tensor:
    return F.one_hot(labels, CLASSES).float() * (1 - eps) + eps / CLASSES


def test_mixup_targets_mix_the_labels_by_the_image_weight():
    torch.manual_seed(0)
    mixup = build_mixup(MixupConfig(mixup_alpha=0.4, cutmix_alpha=0.0, prob=1.0), 0.1, CLASSES)
    x = torch.rand(6, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    mixed, target = mixup(x.clone(), y)
    lam = ((mixed - x.flip(0)) / (x - x.flip(0)))[0, 0, 0, 0].item()  # mixed = lam*x + (1-lam)*flip(x)
    assert torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0), atol=1e-5)
    assert torch.allclose(target, lam * smooth(y, 0.1) + (1 - lam) * smooth(y.flip(0), 0.1), atol=1e-5)


def test_cutmix_targets_follow_the_pasted_area():
    torch.manual_seed(0)
    mixup = build_mixup(MixupConfig(mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0), 0.0, CLASSES)
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 16, 16).clone()  # image i is all i
    y = torch.tensor([0, 1, 2, 3])
    mixed, target = mixup(x.clone(), y)
    kept = (mixed[0] == 0).float().mean().item()  # share of image 0 left after pasting image 3
    assert torch.allclose(target[0], kept * smooth(y[:1], 0)[0] + (1 - kept) * smooth(y[3:], 0)[0], atol=1e-5)
    assert torch.allclose(target.sum(1), torch.ones(4))


def test_mixup_off_means_no_mixup_and_hard_label_loss():
    assert build_mixup(None, 0.1, CLASSES) is None
    assert build_mixup(MixupConfig(prob=0.0), 0.1, CLASSES) is None
    model = torch.nn.Linear(4, CLASSES)
    opt = build_optimizer(model, OptimizerConfig(lr=0.1))
    step = TrainStep(
        model, opt, build_scheduler(opt, ScheduleConfig(), 4), Precision(None), torch.device("cpu"), None, 0.2
    )
    assert isinstance(step.criterion, torch.nn.CrossEntropyLoss) and step.criterion.label_smoothing == 0.2


@pytest.mark.parametrize("batch,mixup,expected", [(7, True, 6), (8, True, 8), (7, False, 7)])
def test_batch_is_made_even_for_mixup(batch, mixup, expected):
    stage = StageSpec(16, batch, 1, TrainConfig(mixup=MixupConfig() if mixup else None))
    assert train_batch_size(stage) == expected


def test_optimizer_groups_and_nesterov():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    opt = build_optimizer(model, OptimizerConfig(lr=0.1, weight_decay=1e-4, nesterov=True))
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"]
    decays = sorted(g["weight_decay"] for g in opt.param_groups)
    assert decays == [0.0, 1e-4]  # norms and biases are not decayed
    assert not build_optimizer(model, OptimizerConfig(nesterov=False)).defaults["nesterov"]
    adamw = build_optimizer(model, OptimizerConfig(name="adamw", lr=1e-3))
    sched = build_scheduler(adamw, ScheduleConfig(), 10)
    betas = []
    for _ in range(10):
        betas.append(adamw.param_groups[0]["betas"][0])
        adamw.step()
        sched.step()
    assert betas[0] == pytest.approx(0.95) and min(betas) == pytest.approx(0.85, abs=0.01)  # beta1 cycles


@pytest.mark.parametrize("pct_start", [0.1, 0.25, 0.3, 0.5, 0.9])
def test_onecycle_never_fails_for_short_stages(pct_start):
    for total in range(1, 40):
        opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9)
        sched = build_scheduler(opt, ScheduleConfig(pct_start=pct_start), total)
        lrs = []
        for _ in range(total):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert max(lrs) <= 0.1 + 1e-9 and all(lr > 0 for lr in lrs)
