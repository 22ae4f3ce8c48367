"""Fine-tuning keys: groups, freezing, frozen BatchNorm, layer-wise LRs, schedules, accumulation, EMA,
pretrained weights, and the trainer carrying them through stages."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.models import group_parameters

from pipeline.cli import main
from pipeline.config import EmaConfig, OptimizerConfig, ScheduleConfig, TrainConfig, parse_config
from pipeline.errors import ConfigError
from pipeline.model import apply_freeze, build_model, optimizer_param_groups, param_groups
from pipeline.train.checkpoint import load_checkpoint
from pipeline.train.run import RunHooks, run_training
from pipeline.train.schedule import build_optimizer, build_scheduler
from pipeline.train.step import Precision, TrainStep, WeightEma

from conftest import Killed, die_after_saves

CPU = torch.device("cpu")


def tiny_step(model, tc: TrainConfig, scheduler_steps: int = 100, ema=None, accum: int = 1) -> TrainStep:
    groups = param_groups(model)
    plan = apply_freeze(model, tc, groups, "train")
    plan.train_mode(model)
    opt = build_optimizer(optimizer_param_groups(model, tc, groups, "train"), tc.optimizer)
    sched = build_scheduler(opt, tc.schedule, scheduler_steps)
    return TrainStep(model, opt, sched, Precision(None), CPU, None, 0.0, accum_steps=accum, ema=ema)


def batches(n: int, size: int = 16, batch: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 5, (batch,), generator=g)) for _ in range(n)
    ]


@pytest.mark.parametrize("arch", ["test_resnet", "test_efficientnet", "test_vit", "test_convnext", "test_vit2"])
def test_groups_cover_every_parameter_from_stem_to_head(arch):
    model = timm.create_model(arch, num_classes=5)
    groups = param_groups(model)
    assert groups.names[0] == "stem" and groups.names[-1] == "head"
    assert groups.names[1:-1] == [f"block{i}" for i in range(1, len(groups.names) - 1)] and len(groups.names) >= 4
    assert set(groups.of_param) == {n for n, _ in model.named_parameters()}
    classifier = {id(p) for p in model.get_classifier().parameters()}
    head = {id(p) for n, p in model.named_parameters() if groups.of_param[n] == "head"}
    assert classifier <= head


def test_frozen_parameters_do_not_change_and_get_no_optimizer_state():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=5)
    before = copy.deepcopy(model.state_dict())
    step = tiny_step(model, TrainConfig(freeze="all_but_head", optimizer=OptimizerConfig(lr=0.1)))
    for x, y in batches(3):
        step(x, y)
    groups = param_groups(model)
    in_optimizer = {id(p) for g in step.optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if groups.of_param[name] == "head":
            assert not torch.equal(p, before[name]), name
            assert id(p) in in_optimizer and step.optimizer.state[p], name
        else:
            assert torch.equal(p, before[name]) and p.grad is None, name
            assert id(p) not in in_optimizer and p not in step.optimizer.state, name
    # a frozen group is frozen whole: its BatchNorm statistics stay too
    for name, v in model.state_dict().items():
        if "running_" in name:
            assert torch.equal(v, before[name]), name


def test_all_but_last_n_and_named_groups():
    model = timm.create_model("test_resnet", num_classes=5)
    groups = param_groups(model)
    plan = apply_freeze(model, TrainConfig(freeze="all_but_last_2"), groups, "stages.1")
    assert plan.frozen == ["stem", "block1", "block2", "block3"]
    plan = apply_freeze(model, TrainConfig(freeze=["stem", "block1"]), groups, "stages.1")
    assert plan.frozen == ["stem", "block1"]
    assert all(p.requires_grad == (groups.of_param[n] not in ("stem", "block1")) for n, p in model.named_parameters())
    with pytest.raises(ConfigError, match=r"stages.1.freeze: no group 'layer4' in this model; its groups are stem"):
        apply_freeze(model, TrainConfig(freeze=["layer4"]), groups, "stages.1")
    with pytest.raises(ConfigError, match="stages.1.freeze: all_but_last_9 keeps more groups"):
        apply_freeze(model, TrainConfig(freeze="all_but_last_9"), groups, "stages.1")


@pytest.mark.parametrize("affine", [False, True])
def test_freeze_bn_keeps_running_stats_in_train_mode(affine):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=5)
    before = copy.deepcopy(model.state_dict())
    step = tiny_step(model, TrainConfig(freeze_bn=True, freeze_bn_affine=affine))
    assert model.training
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    for x, y in batches(3):
        step(x, y)
    state = model.state_dict()
    bn_names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    affine_changed = []
    for name, v in state.items():
        module, _, leaf = name.rpartition(".")
        if module in bn_names and leaf.startswith("running_"):
            assert torch.equal(v, before[name]), name
        if module in bn_names and leaf in ("weight", "bias"):
            affine_changed.append(not torch.equal(v, before[name]))
    assert not any(affine_changed) if affine else any(affine_changed)
    assert not torch.equal(state["fc.weight"], before["fc.weight"])


def test_layer_decay_gives_each_layer_its_lr():
    model = timm.create_model("test_resnet", num_classes=5)
    groups = param_groups(model)
    tc = TrainConfig(layer_decay=0.5, optimizer=OptimizerConfig(lr=0.2, weight_decay=0.01))
    opt = build_optimizer(optimizer_param_groups(model, tc, groups, "train"), tc.optimizer)
    layer = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    top = max(layer.values())
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert lr_of[id(p)] == pytest.approx(0.2 * 0.5 ** (top - layer[name])), name
        assert wd_of[id(p)] == (0.0 if p.ndim <= 1 else 0.01), name  # no decay on norms and biases
    assert lr_of[id(model.fc.weight)] == pytest.approx(0.2) and lr_of[id(model.conv1[0].weight)] < 0.2 * 0.5**3
    # OneCycleLR peaks every group at its own LR
    sched = build_scheduler(opt, ScheduleConfig(pct_start=0.5), 10)
    peaks = {}
    for _ in range(10):
        for g in opt.param_groups:
            peaks[id(g)] = max(peaks.get(id(g), 0), g["lr"])
        opt.step()
        sched.step()
    for g in opt.param_groups:
        assert peaks[id(g)] == pytest.approx(0.2 * g["lr_scale"], rel=0.02)


def test_lr_mult_scales_its_group():
    model = timm.create_model("test_resnet", num_classes=5)
    groups = param_groups(model)
    tc = TrainConfig(lr_mult={"head": 10.0, "stem": 0.5}, optimizer=OptimizerConfig(lr=0.01))
    opt = build_optimizer(optimizer_param_groups(model, tc, groups, "train"), tc.optimizer)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        expected = {"head": 0.1, "stem": 0.005}.get(groups.of_param[name], 0.01)
        assert lr_of[id(p)] == pytest.approx(expected), name
    with pytest.raises(ConfigError, match="stages.0.lr_mult: no group 'fc'"):
        optimizer_param_groups(model, TrainConfig(lr_mult={"fc": 2.0}), groups, "stages.0")


def lrs_of(cfg: ScheduleConfig, total: int, per_epoch: int) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, cfg, total, per_epoch)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_with_warmup_and_restarts():
    lrs = lrs_of(ScheduleConfig(name="cosine", warmup_epochs=1, warmup_factor=0.1), total=50, per_epoch=10)
    assert lrs[0] == pytest.approx(0.1) and lrs[5] == pytest.approx(0.55) and lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] == pytest.approx(0.0, abs=1e-9)
    cfg = ScheduleConfig(name="cosine", cycles=2, cycle_decay=0.5, min_lr_ratio=0.1)
    lrs = lrs_of(cfg, total=20, per_epoch=10)
    assert lrs[0] == pytest.approx(1.0) and lrs[9] == pytest.approx(0.1)  # first cycle ends at the floor
    assert lrs[10] == pytest.approx(0.5) and lrs[19] == pytest.approx(0.1)  # the restart peaks at half


def test_exponential_multistep_cyclic_constant():
    lrs = lrs_of(ScheduleConfig(name="exponential", gamma=0.5), total=30, per_epoch=10)
    assert lrs[10] == pytest.approx(0.5) and lrs[20] == pytest.approx(0.25) and lrs[5] == pytest.approx(0.5**0.5)
    lrs = lrs_of(ScheduleConfig(name="multistep", milestones=[1, 2.5]), total=30, per_epoch=10)
    assert lrs[9] == 1.0 and lrs[10] == pytest.approx(0.1) and lrs[25] == pytest.approx(0.01)
    lrs = lrs_of(ScheduleConfig(name="cyclic", cycle_epochs=1, min_lr_ratio=0.2), total=20, per_epoch=10)
    assert lrs[0] == pytest.approx(0.2) and lrs[5] == pytest.approx(1.0) and lrs[10] == pytest.approx(0.2)
    assert lrs_of(ScheduleConfig(name="constant"), total=5, per_epoch=5) == [1.0] * 5


def test_accumulation_counts_optimizer_and_scheduler_steps():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 5))
    tc = TrainConfig(accum_steps=3)
    step = tiny_step(model, tc, accum=3)
    calls = {"opt": 0}
    step.optimizer.register_step_post_hook(lambda *_: calls.update(opt=calls["opt"] + 1))
    for epoch in range(2):
        step.start_epoch(7)
        for x, y in batches(7, seed=epoch):
            step(x, y)
    assert TrainStep.steps_per_epoch(7, 3) == 3
    assert calls["opt"] == 6 and step.optimizer_steps == 6 and step.scheduler.last_epoch == 6


def test_accumulated_micro_batches_equal_one_big_batch():
    """Without BatchNorm, two micro-batches of 4 give the same update as one batch of 8."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
    (x1, y1), (x2, y2) = batches(2, size=8)
    small, big = copy.deepcopy(base), copy.deepcopy(base)
    tc = TrainConfig(optimizer=OptimizerConfig(lr=0.5, weight_decay=0.0), schedule=ScheduleConfig(name="constant"))
    step = tiny_step(small, tc, accum=2)
    step.start_epoch(2)
    step(x1, y1)
    step(x2, y2)
    one = tiny_step(big, tc)
    one(torch.cat([x1, x2]), torch.cat([y1, y2]))
    for a, b in zip(small.parameters(), big.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert step.optimizer_steps == one.optimizer_steps == 1


def test_ema_is_the_exponential_average_of_the_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
    ema = WeightEma(model, EmaConfig(decay=0.8, warmup=False))
    tc = TrainConfig(optimizer=OptimizerConfig(lr=0.5), schedule=ScheduleConfig(name="constant"))
    step = tiny_step(model, tc, ema=ema)
    expected = None
    for x, y in batches(4, size=8):
        step(x, y)
        w = model[1].weight.detach().clone()
        expected = w if expected is None else 0.8 * expected + 0.2 * w  # the first update copies
    assert ema.updates == 4
    assert torch.allclose(ema.module[1].weight, expected, atol=1e-6)
    assert not torch.allclose(ema.module[1].weight, model[1].weight)


def test_pretrained_from_our_checkpoint_with_a_new_head(tmp_path, capsys):
    source = timm.create_model("test_resnet", num_classes=10)
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": source.state_dict(), "arch": "test_resnet"}, path)
    from pipeline.config import ModelConfig

    model = build_model(ModelConfig(arch="test_resnet", pretrained=str(path)), num_classes=3)
    out = capsys.readouterr().out
    assert "new (shape differs): fc.weight, fc.bias" in out
    for name, v in model.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(v, source.state_dict()[name]), name
    assert model.fc.weight.shape == (3, model.fc.in_features)


def test_pretrained_from_a_torchvision_state_dict(tmp_path, capsys):
    import torchvision

    tv = torchvision.models.resnet18(num_classes=7)
    path = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), path)
    from pipeline.config import ModelConfig

    model = build_model(ModelConfig(arch="resnet18", pretrained=str(path)), num_classes=4)
    assert torch.equal(model.layer4[1].conv2.weight, tv.layer4[1].conv2.weight)
    out = capsys.readouterr().out
    assert "loaded 120/122 tensors" in out and "new (shape differs): fc.weight, fc.bias" in out
    assert "missing" not in out and "unexpected" not in out


def finetune_config(tiny_config: dict) -> dict:
    cfg = copy.deepcopy(tiny_config)
    cfg["train"]["ema"] = {"decay": 0.9}
    cfg["train"]["layer_decay"] = 0.7
    cfg["stages"] = [
        {"img_size": 16, "batch_size": 8, "epochs": 1, "freeze": "all_but_head", "lr": 0.05},
        {"img_size": 16, "batch_size": 8, "epochs": 1, "freeze": "all_but_last_2", "accum_steps": 2},
        {"img_size": 24, "batch_size": 8, "epochs": 1, "freeze": "none", "schedule": {"name": "cosine"}},
    ]
    return cfg


def test_progressive_unfreezing_through_the_stages(tiny_config, tmp_path):
    cfg = finetune_config(tiny_config)
    seen = []

    def spy(parts):  # once per stage, before its first step
        net = parts.train_net
        trainable = {n for n, p in net.named_parameters() if p.requires_grad}
        seen.append((trainable, copy.deepcopy(net.state_dict())))

    run_dir = run_training(parse_config(cfg), out_dir=tmp_path / "runs", hooks=RunHooks(stage_built=spy))
    groups = param_groups(timm.create_model("test_resnet", num_classes=10))
    assert seen[0][0] == set(groups.params_of("head"))
    assert seen[1][0] == set(groups.params_of("head")) | set(groups.params_of("block4"))
    assert len(seen[2][0]) == len(groups.of_param)
    # stage 0 trained the head only: the backbone entering stage 1 is the one stage 0 started with
    for name in groups.params_of("stem") + groups.params_of("block1"):
        assert torch.equal(seen[0][1][name], seen[1][1][name]), name
    assert not torch.equal(seen[0][1]["fc.weight"], seen[1][1]["fc.weight"])
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert ckpt["state_dict_ema"] is not None and ckpt["ema_updates"] == 5 + 3 + 5  # 40 images / 8; accum 2
    ema_w = timm.create_model("test_resnet", num_classes=10)
    ema_w.load_state_dict(ckpt["state_dict_ema"])  # timm layout: loadable on its own
    epochs = [json for json in (run_dir / "metrics.jsonl").read_text().splitlines() if '"kind": "epoch"' in json]
    assert all('"val_ema_top1"' in line for line in epochs)


def mid_stage_config(tiny_config: dict) -> dict:
    """A two-epoch second stage with LambdaLR, accumulation, clipping, EMA and layer decay."""
    cfg = copy.deepcopy(tiny_config)
    cfg["train"].update(ema={"decay": 0.9}, layer_decay=0.7, clip_grad=1.0)
    cfg["stages"] = [
        {"img_size": 16, "batch_size": 8, "epochs": 1, "freeze": "all_but_head"},
        {"img_size": 16, "batch_size": 8, "epochs": 2, "accum_steps": 2, "schedule": {"name": "cosine"}},
    ]
    return cfg


@pytest.mark.parametrize(
    "make_config,epoch_at_kill,ema_updates",
    [(finetune_config, 1, 5 + 3 + 5), (mid_stage_config, 1, 5 + 2 * 3)],  # at a stage end; mid-stage
)
def test_killed_and_resumed_matches_a_run_never_stopped(
    tiny_config, tmp_path, make_config, epoch_at_kill, ema_updates, reference_run
):
    """Killed after its second checkpoint, resumed: the same weights, EMA and scheduler state."""
    cfg = make_config(tiny_config)
    reference = reference_run(cfg)
    with pytest.raises(Killed):
        run_training(parse_config(cfg), out_dir=tmp_path / "b", hooks=die_after_saves(2))
    (run_dir,) = (tmp_path / "b").iterdir()
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["progress"]["epoch"] == epoch_at_kill
    run_training(parse_config(cfg), resume=run_dir)
    a = load_checkpoint(reference / "checkpoints" / "last.pt")
    b = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert a["ema_updates"] == b["ema_updates"] == ema_updates
    for key in ("state_dict", "state_dict_ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]


def test_lr_range_test_sweeps_the_base_lr_of_scaled_groups():
    from pipeline.train.range_test import range_test

    model = timm.create_model("test_resnet", num_classes=5)
    groups = param_groups(model)
    tc = TrainConfig(layer_decay=0.5, lr_mult={"head": 2.0}, optimizer=OptimizerConfig(lr=1.0))
    opt = build_optimizer(optimizer_param_groups(model, tc, groups, "train"), tc.optimizer)
    seen = []

    def step(x, y):
        seen.append([(g["lr"], g["lr_scale"]) for g in opt.param_groups])
        return torch.tensor(1.0)

    result = range_test(step, opt, lambda: batches(3), start=1e-4, end=1.0, steps=6)
    for lr, groups_now in zip(result.lrs, seen):
        for group_lr, scale in groups_now:
            assert group_lr == pytest.approx(lr * scale)


@pytest.mark.parametrize(
    "stage_keys,message",
    [
        (
            {"freeze": ["layer1"]},
            "stages.0.freeze: no group 'layer1' in this model; its groups are stem, block1..block4, head",
        ),
        ({"freeze": "all_but_tail"}, "stages.0.freeze: must be none, all_but_head, all_but_last_N"),
        ({"freeze": "layer4"}, "stages.0.freeze: no group 'layer4' in this model"),
        ({"lr_mult": {"head": 0}}, "stages.0.lr_mult: multipliers per group, e.g. {head: 10}; head: must be > 0"),
        ({"lr_mult": {"backbone": 0.1}}, "stages.0.lr_mult: no group 'backbone'"),
        ({"layer_decay": 1.5}, "stages.0.layer_decay: must be in (0, 1]"),
        ({"accum_steps": 0}, "stages.0.accum_steps: must be >= 1"),
        ({"ema": {"decay": 1.0}}, "stages.0.ema.decay: must be between 0 and 1"),
        ({"schedule": {"name": "multistep", "milestones": "soon"}}, "stages.0.schedule.milestones.0: must be a number"),
        ({"clip_mode": "max"}, "stages.0.clip_mode: must be one of norm, value, agc"),
    ],
)
def test_bad_finetuning_keys_are_one_line(tiny_config, write_yaml, capsys, stage_keys, message):
    tiny_config["stages"][0].update(stage_keys)
    assert main(["run", str(write_yaml(tiny_config))]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {message}" or err.startswith(f"error: {message}")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_steps_per_epoch_rounds_up():
    assert [TrainStep.steps_per_epoch(n, 4) for n in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]


def test_finetuning_from_pretrained_weights_beats_training_from_scratch(tmp_path, capsys):
    """The "pretrained" file is made here: a tiny model trained on the 10-class demo task, then
    fine-tuned (head only, then everything) on a different task (5 shapes, 50 images) against the
    same model from scratch with the same budget."""
    from pipeline.data.demo import make_demo_dataset

    pre_data = make_demo_dataset(tmp_path / "pre", n_train=400, n_val=20, size=32)
    ft_data = make_demo_dataset(tmp_path / "ft", n_train=50, n_val=100, size=32, seed=1, task="shapes")
    cfg = {
        "run": {"name": "pre", "seed": 0, "device": "cpu", "log_every": 50},
        "data": {"workers": 0, "train": str(pre_data / "train"), "val": str(pre_data / "val")},
        "model": {"arch": "test_resnet"},
        "train": {"optimizer": {"name": "sgd", "lr": 0.1}, "amp": "off", "compile": "off", "mixup": "off"},
        "stages": [{"img_size": 24, "batch_size": 32, "epochs": 6}],
    }
    pretrained = run_training(parse_config(cfg), out_dir=tmp_path / "runs") / "checkpoints" / "last.pt"
    cfg["data"].update(train=str(ft_data / "train"), val=str(ft_data / "val"))
    scratch = copy.deepcopy(cfg)
    scratch["stages"] = [{"img_size": 24, "batch_size": 16, "epochs": 3}]
    finetune = copy.deepcopy(cfg)
    finetune["model"]["pretrained"] = str(pretrained)
    finetune["stages"] = [
        {"img_size": 24, "batch_size": 16, "epochs": 1, "freeze": "all_but_head"},
        {"img_size": 24, "batch_size": 16, "epochs": 2, "lr": 0.02},
    ]
    capsys.readouterr()
    top1 = {}
    for name, c in (("scratch", scratch), ("finetune", finetune)):
        run_dir = run_training(parse_config(c), out_dir=tmp_path / "runs")
        top1[name] = load_checkpoint(run_dir / "checkpoints" / "last.pt")["progress"]["stages"][-1]["val_top1"]
    assert "new (shape differs): fc.weight, fc.bias" in capsys.readouterr().out
    assert top1["finetune"] >= top1["scratch"] + 10, top1  # 5 classes: chance is 20%


@pytest.mark.parametrize("name", ["sgd", "adamw", "rmsprop", "lamb", "lion"])
def test_optimizers_take_scaled_groups(name):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=5)
    groups = param_groups(model)
    tc = TrainConfig(layer_decay=0.5, optimizer=OptimizerConfig(name=name, lr=0.01))
    opt = build_optimizer(optimizer_param_groups(model, tc, groups, "train"), tc.optimizer)
    assert sorted({round(g["lr"] / g["lr_scale"], 12) for g in opt.param_groups}) == [0.01]
    before = model.fc.weight.detach().clone()
    step = TrainStep(model, opt, None, Precision(None), CPU, None, 0.0)
    x, y = batches(1)[0]
    assert torch.isfinite(step(x, y))
    assert not torch.equal(before, model.fc.weight)


@pytest.mark.parametrize("mode,limit", [("norm", 0.01), ("value", 0.001)])
def test_gradient_clipping_bounds_the_step_gradients(mode, limit):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=5)
    tc = TrainConfig(optimizer=OptimizerConfig(lr=0.1))
    groups = param_groups(model)
    opt = build_optimizer(optimizer_param_groups(model, tc, groups, "train"), tc.optimizer)
    seen = []

    def record(optimizer, *_):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if mode == "norm":
            seen.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        else:
            seen.append(max(g.abs().max().item() for g in grads))

    opt.register_step_pre_hook(record)
    step = TrainStep(model, opt, None, Precision(None), CPU, None, 0.0, clip_grad=limit, clip_mode=mode)
    for x, y in batches(2):
        step(x, y)
    assert len(seen) == 2 and max(seen) <= limit * 1.001
