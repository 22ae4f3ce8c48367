"""Config validation: defaults, overrides, stage merging, and errors that name the field."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from pipeline.config import apply_override, load_config, parse_config
from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_default_stages_file_parses():
    cfg = load_config(ROOT / "stages.yaml")
    stages = [(s.start_size, s.img_size, s.batch_size, s.epochs) for s in cfg.stages]
    assert stages == [(32, 64, 64, 6), (None, 64, 64, 2)]  # a 32 -> 64 px ramp, then 64 px
    assert cfg.data.train == "demo" and cfg.model.arch == "resnet18"
    assert cfg.train.optimizer.name == "sgd" and cfg.train.optimizer.nesterov is True
    assert cfg.train.schedule.scope == "run" and cfg.train.bn_reestimate == 0  # the benchmark's winners
    assert cfg.train.mixup is not None and cfg.train.mixup.cutmix_alpha == 1.0
    assert cfg.stages[1].train.mixup is None  # `mixup: off` in the last stage
    assert cfg.stages[0].train.mixup == cfg.train.mixup


def test_stage_overrides_merge_into_train(tiny_config):
    cfg = copy.deepcopy(tiny_config)
    cfg["stages"][0].update(lr=0.3, label_smoothing=0.0, mixup={"prob": 0.5}, optimizer={"weight_decay": 0.01})
    parsed = parse_config(cfg)
    s0, s1 = parsed.stages[0].train, parsed.stages[1].train
    assert s0.optimizer.lr == 0.3 and s0.optimizer.weight_decay == 0.01
    assert s0.optimizer.name == "sgd"  # untouched keys are inherited
    assert s0.label_smoothing == 0.0 and s0.mixup.prob == 0.5 and s0.mixup.cutmix_alpha == 1.0
    assert s1.optimizer.lr == 0.05 and s1.mixup is None


def test_set_overrides(tiny_config, write_yaml):
    path = write_yaml(tiny_config)
    cfg = load_config(path, ["train.optimizer.lr=0.1", "stages.1.epochs=5", "train.amp=bf16", "train.mixup=off"])
    assert cfg.train.optimizer.lr == 0.1 and cfg.stages[0].train.optimizer.lr == 0.1
    assert cfg.stages[1].epochs == 5
    assert cfg.train.amp == "bf16" and cfg.train.mixup is None
    assert cfg.raw["train"]["optimizer"]["lr"] == 0.1  # the resolved config records overrides


def test_yaml_quirks_are_read_as_meant(tiny_config):
    cfg = copy.deepcopy(tiny_config)
    cfg["train"].update(compile=True, amp=False)  # YAML 1.1 reads bare `on`/`off` as booleans
    cfg["train"]["optimizer"]["weight_decay"] = "1e-4"  # and `1e-4` (no dot) as a string
    parsed = parse_config(cfg)
    assert parsed.train.compile == "on" and parsed.train.amp == "off"
    assert parsed.train.optimizer.weight_decay == pytest.approx(1e-4)


BAD = [
    ({"run": {"nmae": "x"}}, "run.nmae: unknown key (did you mean 'name'?)"),
    ({"trian": {}}, "trian: unknown section"),
    ({"run": {"device": "tpu"}}, "run.device: must be one of auto, cpu, cuda"),
    ({"run": {"seed": "zero"}}, "run.seed: must be an integer"),
    ({"data": {"backend": "ffcv"}}, "data.backend: must be one of tv2"),
    ({"data": {"workers": -1}}, "data.workers: must be 'auto' or >= 0"),
    ({"data": {"train": "/no/such/folder"}}, "data.train: folder '/no/such/folder' does not exist"),
    ({"data": {"scale": [0.9, 0.1]}}, "data.scale: must be [low, high]"),
    ({"model": {"arch": "resnet19"}}, "model.arch: unknown timm architecture 'resnet19'"),
    ({"model": {"pretrained": "/no/weights.pt"}}, "model.pretrained: file '/no/weights.pt' does not exist"),
    ({"model": {"num_classes": 1}}, "model.num_classes: must be 'auto' or >= 2"),
    ({"train": {"optimizer": {"lr": -0.1}}}, "train.optimizer.lr: must be > 0"),
    ({"train": {"optimizer": {"lr": "fast"}}}, "train.optimizer.lr: must be a number"),
    ({"train": {"schedule": {"pct_start": 1.5}}}, "train.schedule.pct_start: must be between 0 and 1"),
    ({"train": {"schedule": {"name": "cosinus"}}}, "train.schedule.name: must be one of onecycle, cosine"),
    ({"train": {"amp": "fp8"}}, "train.amp: must be one of auto, bf16, fp16, off"),
    ({"train": {"channels_last": "yes"}}, "train.channels_last: must be true or false"),
    ({"train": {"label_smoothing": 1.0}}, "train.label_smoothing: must be in [0, 1)"),
    ({"train": {"mixup": {"alpha": 0.2}}}, "train.mixup.alpha: unknown key"),
    ({"train": {"mixup": {"prob": 2}}}, "train.mixup.prob: must be between 0 and 1"),
    ({"stages": []}, "stages: must be a non-empty list"),
    ({"stages": [{"img_size": 32, "batch_size": 8}]}, "stages.0.epochs: missing"),
    ({"stages": [{"img_size": 32, "batch_size": 0, "epochs": 1}]}, "stages.0.batch_size: must be a positive integer"),
    ({"stages": [{"img_size": -32, "batch_size": 8, "epochs": 1}]}, "stages.0.img_size: must be a positive integer"),
    ({"stages": [{"img_size": 32, "batch_size": 8, "epochs": 1.5}]}, "stages.0.epochs: must be an integer"),
    ({"stages": [{"img_size": 32, "batch_size": 8, "epochs": 1, "lr": 0}]}, "stages.0.lr: must be > 0"),
    ({"stages": [{"img_size": 32, "batch_size": 8, "epochs": 1, "mixup": {"prob": 3}}]}, "stages.0.mixup.prob"),
    ({"stages": [{"img_size": 32, "batch_size": 8, "epochs": 1, "imgsize": 3}]}, "stages.0.imgsize: unknown stage key"),
    ({"stages": [16, 24]}, "stages.0: must be a mapping"),
    (
        {"stages": [{"img_size": 32, "batch_size": 8, "epochs": 2, "last_epoch_share": 0}]},
        "stages.0.last_epoch_share: a share of the epoch's batches, in (0, 1]; got 0",
    ),
    (
        {"stages": [{"img_size": 32, "batch_size": 8, "epochs": 2, "last_epoch_share": 1.5}]},
        "stages.0.last_epoch_share: a share of the epoch's batches, in (0, 1]; got 1.5",
    ),
    (
        {"stages": [{"img_size": 32, "batch_size": 8, "epochs": 2, "last_epoch_share": "half"}]},
        "stages.0.last_epoch_share:",
    ),
    ({"stages": [{"img_size": 32, "batch_size": 1, "epochs": 1}]}, "stages.0.batch_size: must be at least 2"),
    ({"train": {"optimizer": {"name": "adamww"}}}, "train.optimizer.name: unknown optimizer 'adamww'"),
    ({"train": {"optimizer": {"momentum": 0}}}, "train.optimizer.nesterov: Nesterov needs momentum > 0"),
    ({"run": {"seed": 2**64}}, "run.seed: must be in [0, 2**63)"),
    ({1: "x"}, "1: unknown section"),
    ({"run": {"checkpoint_every": -1}}, "run.checkpoint_every: must be >= 0"),
    ({"data": {"on_error": "ignore"}}, "data.on_error: must be one of fail, skip"),
    ({"data": {"cache": "ram"}}, "data.cache: must be one of decoded"),
    ({"train": {"accum_steps": 0}}, "train.accum_steps: must be >= 1"),
    ({"train": {"ema": {"decay": 2}}}, "train.ema.decay: must be between 0 and 1"),
    ({"train": {"schedule": {"name": "cosine", "cycles": 0}}}, "train.schedule.cycles: must be >= 1"),
    ({"train": {"optimizer": {"betas": [0.9, 1.5]}}}, "train.optimizer.betas: must be two numbers in [0, 1)"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_config_names_the_field(tiny_config, change, message):
    cfg = copy.deepcopy(tiny_config)
    for section, value in change.items():
        if isinstance(value, dict) and isinstance(cfg.get(section), dict):
            for k, v in value.items():
                if isinstance(v, dict) and isinstance(cfg[section].get(k), dict):
                    cfg[section][k].update(v)
                else:
                    cfg[section][k] = v
        else:
            cfg[section] = value
    with pytest.raises(ConfigError) as e:
        parse_config(cfg)
    assert str(e.value).startswith(message), str(e.value)


@pytest.mark.parametrize(
    "item,message",
    [
        ("train.optimizer.lr", "--set train.optimizer.lr: expected KEY=VALUE"),
        ("stages.7.epochs=2", "--set stages.7.epochs: stages.7: no such list index"),
        ("run.name.x=2", "--set run.name.x: run.name is a value, not a section"),
    ],
)
def test_bad_set_override(tiny_config, item, message):
    with pytest.raises(ConfigError, match="^" + message.replace(".", r"\.")):
        apply_override(copy.deepcopy(tiny_config), item)


def test_unreadable_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("run: {name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML \(line"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"missing\.yaml: no such file"):
        load_config(tmp_path / "missing.yaml")
