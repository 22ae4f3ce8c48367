"""stages.yaml -> typed, validated dataclasses.

Every error is a ConfigError whose message starts with the field path (`stages.1.batch_size`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from pipeline.errors import ConfigError

# A field's `check` returns an error text for a bad value, or None.
Check = typing.Callable[[Any], str | None]


def positive(v: Any) -> str | None:
    return None if v > 0 else f"must be > 0, got {v!r}"


def lr_check(v: Any) -> str | None:
    return None if v == "find" or v > 0 else f"must be > 0 or 'find', got {v!r}"


def non_negative(v: Any) -> str | None:
    return None if v >= 0 else f"must be >= 0, got {v!r}"


def unit_open(v: Any) -> str | None:
    return None if 0 < v < 1 else f"must be between 0 and 1 (exclusive), got {v!r}"


def unit_closed(v: Any) -> str | None:
    return None if 0 <= v <= 1 else f"must be between 0 and 1, got {v!r}"


def at_least_one(v: Any) -> str | None:
    return None if v >= 1 else f"must be >= 1, got {v!r}"


def workers_check(v: Any) -> str | None:
    return None if v == "auto" or v >= 0 else f"must be 'auto' or >= 0, got {v!r}"


def classes_check(v: Any) -> str | None:
    return None if v == "auto" or v >= 2 else f"must be 'auto' or >= 2, got {v!r}"


def scale_check(v: Any) -> str | None:
    lo, hi = v
    return None if 0 < lo <= hi <= 1 else f"must be [low, high] with 0 < low <= high <= 1, got {list(v)}"


def ratio_check(v: Any) -> str | None:
    lo, hi = v
    return None if 0 < lo <= hi else f"must be [low, high] with 0 < low <= high, got {list(v)}"


def betas_check(v: Any) -> str | None:
    return None if all(0 <= b < 1 for b in v) else f"must be two numbers in [0, 1), got {list(v)}"


def freeze_check(v: Any) -> str | None:
    # a single group name is allowed too; names are checked against the model before training
    if isinstance(v, list):
        return None
    if v.startswith("all_but_") and v != "all_but_head" and not re.fullmatch(r"all_but_last_[1-9]\d*", v):
        return f"must be none, all_but_head, all_but_last_N (e.g. all_but_last_2) or groups, got {v!r}"
    return None


def lr_mult_check(v: Any) -> str | None:
    bad = [f"{k}: must be > 0, got {m!r}" for k, m in v.items() if m <= 0]
    return f"multipliers per group, e.g. {{head: 10}}; {bad[0]}" if bad else None


def checked(default: Any, check: Check) -> Any:
    """A dataclass field with a default and a value check."""
    return field(default=default, metadata={"check": check})


@dataclass
class RunConfig:
    name: str = "demo"
    out_dir: str = "runs"
    seed: int = checked(0, lambda v: None if 0 <= v < 2**63 else f"must be in [0, 2**63), got {v!r}")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = checked(20, at_least_one)  # steps between metric flushes (each one syncs the GPU)
    checkpoint_every: float = checked(10.0, non_negative)  # minutes between mid-epoch checkpoints; 0: every step
    tensorboard: bool = False  # TensorBoard event files beside metrics.jsonl (needs the tensorboard package)


@dataclass
class DataConfig:
    train: str = "demo"
    val: str = "demo"
    backend: Literal["tv2", "dali"] = "tv2"
    workers: int | Literal["auto"] = checked("auto", workers_check)
    decode_on: Literal["auto", "workers", "device"] = "auto"  # auto: device for DALI on CUDA, else workers
    scale: tuple[float, float] = checked((0.35, 1.0), scale_check)  # RandomResizedCrop area range
    ratio: tuple[float, float] = checked((3 / 4, 4 / 3), ratio_check)
    hflip: float = checked(0.5, unit_closed)
    crop_pct: float = checked(0.875, lambda v: None if 0 < v <= 1 else f"must be in (0, 1], got {v!r}")
    cache: Literal["decoded"] | None = None  # decoded: decode every image once into a memory-mapped array
    on_error: Literal["fail", "skip"] = "fail"  # a bad image: stop naming it, or leave it out with a warning
    cache_size: int | Literal["auto"] = checked(
        "auto", lambda v: None if v == "auto" or v >= 8 else f"must be 'auto' or >= 8, got {v!r}"
    )


@dataclass
class ModelConfig:
    arch: str = "resnet18"
    # a local weights file (timm/torchvision state dict or a checkpoint of ours); `true`: timm's own
    # download, for machines with hub access
    pretrained: bool | str | None = None
    num_classes: int | Literal["auto"] = checked("auto", classes_check)


@dataclass
class OptimizerConfig:
    name: str = "sgd"  # any timm create_optimizer_v2 name
    lr: float | Literal["find"] = checked(0.1, lr_check)  # find: an LR range test per stage
    momentum: float = checked(0.9, unit_closed)
    weight_decay: float = checked(5.0e-5, non_negative)
    nesterov: bool = True
    scale_lr: Literal["none", "linear", "sqrt"] = "none"  # lr x (batch / base_batch) or its square root
    base_batch: int = checked(256, at_least_one)  # the batch size `lr` is meant for, with scale_lr
    betas: tuple[float, float] | None = checked(None, betas_check)  # Adam-family; null: the optimizer's own
    eps: float | None = checked(None, positive)


@dataclass
class ScheduleConfig:
    """The LR curve, stepped once per optimizer step; every group peaks at its own LR. `scope: run`:
    one curve over every update of every stage; `stage`: a curve of its own in each stage."""

    name: Literal["onecycle", "cosine", "exponential", "multistep", "cyclic", "constant"] = "onecycle"
    scope: Literal["run", "stage"] = "run"
    # onecycle
    pct_start: float = checked(0.25, unit_open)
    div_factor: float = checked(25.0, positive)
    final_div_factor: float = checked(1.0e4, positive)
    base_momentum: float = checked(0.85, unit_closed)
    max_momentum: float = checked(0.95, unit_closed)
    # the others: a linear warm-up from warmup_factor x the LR, then the schedule
    warmup_epochs: float = checked(0.0, non_negative)
    warmup_factor: float = checked(0.01, unit_closed)
    min_lr_ratio: float = checked(0.0, unit_closed)  # cosine's floor and cyclic's low end, as a fraction of the LR
    cycles: int = checked(1, at_least_one)  # cosine: restarts split the stage into this many equal cycles
    cycle_decay: float = checked(1.0, positive)  # cosine: each restart's peak, relative to the previous one
    gamma: float | None = checked(None, positive)  # exponential: per epoch (0.8); multistep: per milestone (0.1)
    milestones: list[float] | None = None  # multistep: epochs of the stage (default: at 1/2 and 3/4 of it)
    cycle_epochs: float | None = checked(None, positive)  # cyclic: one up-and-down (default: half the stage)


@dataclass
class MixupConfig:
    mixup_alpha: float = checked(0.2, non_negative)
    cutmix_alpha: float = checked(1.0, non_negative)
    prob: float = checked(1.0, unit_closed)
    switch_prob: float = checked(0.5, unit_closed)


@dataclass
class EmaConfig:
    decay: float = checked(0.999, unit_open)
    warmup: bool = True  # timm's warm-up: the decay grows with the step count, so early weights fade fast


@dataclass
class SizeJumpConfig:
    """How a run crosses a jump in training size: a change of `ratio` or more from one epoch to the
    next (a 24 -> 40 -> 64 px stage file; not a ramp's 8-px steps). Only in a run with a jump."""

    ratio: float = checked(1.4, lambda v: None if v > 1 else f"must be above 1, got {v!r}")
    # every epoch below the run's final size trains this share of its batches at the final size
    final_share: float = checked(0.25, lambda v: None if 0 <= v < 1 else f"must be in [0, 1), got {v!r}")
    # the last epoch before a jump mixes in the next size, its share rising from 0 to 1 over the epoch
    transition: bool = True


@dataclass
class TrainConfig:
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    compile: Literal["auto", "on", "off"] = "auto"
    channels_last: bool = True
    label_smoothing: float = checked(0.1, lambda v: None if 0 <= v < 1 else f"must be in [0, 1), got {v!r}")
    mixup: MixupConfig | None = field(default_factory=MixupConfig)  # None: off
    # Fine-tuning. Groups are the model's stem, block1..blockN and head (printed at the start of a run).
    freeze: str | list[str] = checked("none", freeze_check)  # none | all_but_head | all_but_last_N | groups
    freeze_bn: bool = False  # BatchNorm running statistics stay fixed in training (frozen groups: always)
    freeze_bn_affine: bool = False  # and BatchNorm's weight and bias are not trained either
    layer_decay: float | None = checked(None, lambda v: None if 0 < v <= 1 else f"must be in (0, 1], got {v!r}")
    lr_mult: dict[str, float] = field(default_factory=dict, metadata={"check": lr_mult_check})  # e.g. {head: 10}
    accum_steps: int = checked(1, at_least_one)  # micro-batches per optimizer step
    clip_grad: float | None = checked(None, positive)
    clip_mode: Literal["norm", "value", "agc"] = "norm"
    ema: EmaConfig | None = None  # e.g. {decay: 0.999}; evaluated and checkpointed beside the weights
    sync_bn: bool = False  # under torchrun on GPUs: BatchNorm statistics over the global batch
    # training images run through the model (no gradient) to re-estimate BatchNorm statistics when the
    # training size changes, and at the validation size before an evaluation larger than training; 0: off
    bn_reestimate: int = checked(0, non_negative)
    size_jumps: SizeJumpConfig | None = field(default_factory=SizeJumpConfig)  # off: a jump is a plain switch


@dataclass
class StageSpec:
    img_size: int  # the training size the stage ends at (its only one without a ramp)
    batch_size: int
    epochs: int
    train: TrainConfig  # the global `train` section with this stage's overrides applied
    data: DataConfig = field(default_factory=DataConfig)  # the global `data` with this stage's `data:` keys
    start_size: int | None = None  # `img_size: [start, end]`: a ramp, stepped per epoch from start to end
    val_size: int | None = None  # validation input size (None: the epoch's training size)
    last_epoch_share: float = 1.0  # the share of its batches the stage's last epoch trains (`run --budget`)

    @property
    def length(self) -> float:
        """Its epochs, the last one counted by the share of it trained: 4.4 for 5 epochs, the last at 0.4."""
        return self.epochs - 1 + self.last_epoch_share

    @property
    def largest_size(self) -> int:
        """The largest input the stage feeds the model, training or validation."""
        return max(self.img_size, self.val_size or 0)


@dataclass
class Config:
    run: RunConfig
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    stages: list[StageSpec]
    raw: dict = field(repr=False)  # the resolved YAML, as written to the run folder


STAGE_SIZE_KEYS = ("img_size", "batch_size", "epochs")
STAGE_KEYS = (*STAGE_SIZE_KEYS, "val_size", "last_epoch_share", "data")  # a stage's own keys; the rest override `train`
SCOPE_KEYS = ("scope",)  # schedule keys set for the whole run only
# Stage shortcuts for deeper training keys, so a stage can say `lr: 0.1`.
STAGE_SHORTCUTS = {"lr": ("optimizer", "lr")}
SECTIONS = {"run": RunConfig, "data": DataConfig, "model": ModelConfig, "train": TrainConfig}


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a stages file, apply `--set KEY=VALUE` overrides, validate, resolve."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return parse_config(raw, base_dir=path.parent)


def apply_override(raw: dict, item: str) -> None:
    """Apply one `KEY=VALUE` (`train.optimizer.lr=0.1`, `stages.1.epochs=5`) in place."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. train.optimizer.lr=0.1")
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        value = text
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {key}: {where}: no such list index (there are {len(node)} items)")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) in (None, False):  # a missing section, or `mixup: off` being turned on
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigError(f"--set {key}: {'.'.join(parts[:i])} is a value, not a section")


def parse_config(raw: dict, base_dir: Path = Path(".")) -> Config:
    """Validate a raw YAML mapping into a Config."""
    raw = copy.deepcopy(raw)
    unknown = set(raw) - set(SECTIONS) - {"stages"}
    for key in sorted(unknown, key=str):
        raise ConfigError(f"{key}: unknown section{_suggest(str(key), list(SECTIONS) + ['stages'])}")
    sections = {name: parse_dataclass(cls, raw.get(name) or {}, name) for name, cls in SECTIONS.items()}
    train_raw = raw.get("train") or {}
    if not isinstance(train_raw, dict):
        raise ConfigError(f"train: must be a mapping, got {_type_name(train_raw)}")
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise ConfigError("stages: must be a non-empty list of {img_size, batch_size, epochs} entries")
    stages = [_parse_stage(s, train_raw, f"stages.{i}") for i, s in enumerate(stages_raw)]

    data: DataConfig = sections["data"]
    _check_cache_backend(data, "data")
    for name in ("train", "val"):
        value = getattr(data, name)
        if value != "demo":
            p = Path(value).expanduser()
            if not p.is_absolute():
                p = (base_dir / p) if (base_dir / p).exists() else p
            if not p.is_dir():
                raise ConfigError(f"data.{name}: folder {value!r} does not exist (an ImageFolder path, or `demo`)")
            setattr(data, name, str(p.resolve()))
    for i, (stage, stage_raw) in enumerate(zip(stages, stages_raw)):
        stage_data = _stage_data(raw.get("data") or {}, stage_raw.get("data"), f"stages.{i}.data")
        stage.data = dataclasses.replace(stage_data, train=data.train, val=data.val)
    if data.cache_size == "auto":  # one cache serves every stage: large enough for each stage's own keys
        data.cache_size = max(cache_side(st.largest_size, st.data) for st in stages)
    for i, stage in enumerate(stages):
        stage.data.cache_size = data.cache_size
        least = math.floor(stage.largest_size / stage.data.crop_pct)
        if stage.data.cache and data.cache_size < least:
            raise ConfigError(
                f"data.cache_size: {data.cache_size} is too small for stage {i} ({stage.largest_size}px, whose "
                f"validation resizes to {least}); use auto or at least {least}"
            )
    model: ModelConfig = sections["model"]
    if isinstance(model.pretrained, str) and not Path(model.pretrained).expanduser().is_file():
        raise ConfigError(f"model.pretrained: file {model.pretrained!r} does not exist")
    _check_arch(model.arch)
    _check_optimizer(sections["train"].optimizer, "train.optimizer")
    for i, stage in enumerate(stages):
        _check_optimizer(stage.train.optimizer, f"stages.{i}.optimizer")
        _check_run_wide(stage, sections["train"], f"stages.{i}")

    resolved = {name: dataclasses.asdict(sections[name]) for name in SECTIONS}
    resolved["stages"] = copy.deepcopy(stages_raw)
    return Config(stages=stages, raw=resolved, **sections)


def cache_side(img_size: int, data: DataConfig) -> int:
    """The cached squares' side for `img_size` crops, up to a multiple of 8: large enough that the
    smallest random crop (area `scale[0]`) is not upsampled, and that validation's resize
    (img_size / crop_pct) is not either."""
    return math.ceil(max(img_size / math.sqrt(data.scale[0]), img_size / data.crop_pct) / 8) * 8


# Loader keys a stage may set for itself (`data: {backend: dali, workers: 2}`); the dataset stays one.
STAGE_DATA_KEYS = ("backend", "workers", "decode_on", "cache", "scale", "ratio", "hflip", "crop_pct")


def _stage_data(data_raw: dict, override: Any, path: str) -> DataConfig:
    if override is None:
        override = {}
    if not isinstance(override, dict):
        raise ConfigError(f"{path}: must be a mapping of loader keys, e.g. {{backend: dali, workers: 2}}")
    for key in override:
        if key not in STAGE_DATA_KEYS:
            hint = "; the dataset is the same for every stage" if key in ("train", "val") else ""
            raise ConfigError(f"{path}.{key}: not a per-stage loader key{hint}{_suggest(str(key), STAGE_DATA_KEYS)}")
    data = parse_dataclass(DataConfig, {**data_raw, **override}, path)
    _check_cache_backend(data, path)
    return data


def _check_cache_backend(data: DataConfig, path: str) -> None:
    if data.cache is not None and data.backend != "tv2":
        raise ConfigError(f"{path}.cache: the decoded cache feeds the tv2 loader; use backend: tv2 with it")


def _parse_stage(stage: Any, train_raw: dict, path: str) -> StageSpec:
    if not isinstance(stage, dict):
        raise ConfigError(f"{path}: must be a mapping like {{img_size: 64, batch_size: 128, epochs: 2}}")
    for key in STAGE_SIZE_KEYS:
        if key not in stage:
            raise ConfigError(f"{path}.{key}: missing (every stage sets img_size, batch_size and epochs)")
    values = {key: _positive_int(stage[key], f"{path}.{key}") for key in ("batch_size", "epochs")}
    values["start_size"], values["img_size"] = _stage_sizes(stage["img_size"], f"{path}.img_size")
    if stage.get("val_size") is not None:
        values["val_size"] = _positive_int(stage["val_size"], f"{path}.val_size")
    if stage.get("last_epoch_share") is not None:
        values["last_epoch_share"] = _share(stage["last_epoch_share"], f"{path}.last_epoch_share")
    if values["batch_size"] < 2:
        raise ConfigError(f"{path}.batch_size: must be at least 2 (BatchNorm needs two samples per batch)")
    overrides = {k: v for k, v in stage.items() if k not in STAGE_KEYS}
    merged = copy.deepcopy(train_raw)
    train_keys = [f.name for f in dataclasses.fields(TrainConfig)]
    for key, value in overrides.items():
        if key in STAGE_SHORTCUTS:
            section, sub = STAGE_SHORTCUTS[key]
            merged.setdefault(section, {})
            if not isinstance(merged[section], dict):
                merged[section] = {}
            merged[section][sub] = value
        elif key in train_keys:
            old = merged.get(key)
            if isinstance(old, dict) and (isinstance(value, dict) or value is True):  # `ema: true` keeps the settings
                merged[key] = _deep_merge(old, value if isinstance(value, dict) else {})
            else:
                merged[key] = value
        else:
            allowed = list(STAGE_KEYS) + train_keys + list(STAGE_SHORTCUTS)
            raise ConfigError(f"{path}.{key}: unknown stage key{_suggest(str(key), allowed)}")
    # Inherited keys were validated as `train.*`; an error here comes from this stage's overrides.
    try:
        train = parse_dataclass(TrainConfig, merged, path)
    except ConfigError as e:
        message = str(e)
        for short, (section, sub) in STAGE_SHORTCUTS.items():
            if short in stage:  # name the key the user wrote
                message = message.replace(f"{path}.{section}.{sub}:", f"{path}.{short}:")
        raise ConfigError(message) from None
    return StageSpec(train=train, **values)


def _positive_int(value: Any, path: str) -> int:
    number = _coerce(value, int, path)
    if number <= 0:
        raise ConfigError(f"{path}: must be a positive integer, got {number}")
    return number


def _share(value: Any, path: str) -> float:
    number = _coerce(value, float, path)
    if not 0 < number <= 1:
        raise ConfigError(f"{path}: a share of the epoch's batches, in (0, 1]; got {number}")
    return number


def _stage_sizes(value: Any, path: str) -> tuple[int | None, int]:
    """`img_size: 64`, or `[32, 64]`: a ramp from 32 to 64 over the stage's epochs; (start, end)."""
    if not isinstance(value, (list, tuple)):
        return None, _positive_int(value, path)
    if len(value) != 2:
        raise ConfigError(f"{path}: a size, or [start, end] for a ramp over the stage's epochs; got {list(value)}")
    start, end = (_positive_int(v, f"{path}.{i}") for i, v in enumerate(value))
    if start >= end:
        raise ConfigError(f"{path}: a ramp grows: [start, end] with start < end, got {list(value)}")
    return start, end


def _check_run_wide(stage: StageSpec, train: TrainConfig, path: str) -> None:
    """Keys a stage cannot set for itself: they describe the whole run."""
    if stage.train.size_jumps != train.size_jumps:
        raise ConfigError(f"{path}.size_jumps: set for the whole run, in train.size_jumps")
    for key in SCOPE_KEYS:
        if getattr(stage.train.schedule, key) != getattr(train.schedule, key):
            raise ConfigError(f"{path}.schedule.{key}: set for the whole run, in train.schedule.{key}")
    if train.schedule.scope == "run" and stage.train.schedule != train.schedule:
        raise ConfigError(
            f"{path}.schedule: with train.schedule.scope: run one schedule spans every stage; set it in "
            "train.schedule (or use scope: stage for a schedule per stage)"
        )


def parse_dataclass(cls: type, data: Any, path: str) -> Any:
    """Build dataclass `cls` from a mapping, checking keys, types and values."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping, got {_type_name(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise ConfigError(f"{path}.{key}: unknown key{_suggest(str(key), list(fields))}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        value = _coerce(data[name], hints[name], f"{path}.{name}")
        check = f.metadata.get("check")
        if check is not None and value is not None and (problem := check(value)):
            raise ConfigError(f"{path}.{name}: {problem}")
        kwargs[name] = value
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Convert a YAML value to type `tp` or raise a ConfigError naming `path`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if type(None) in options and (value is None or value is False or value == "off"):
            return None  # `off`/`false`/`null` switch an optional section off
        options = [o for o in options if o is not type(None)]
        if isinstance(value, (list, dict)):  # a list or mapping is checked against its own option only
            kinds = (list, tuple) if isinstance(value, list) else (dict,)
            options = [o for o in options if typing.get_origin(o) in kinds] or options
        if len(options) == 1:
            return _coerce(value, options[0], path)
        errors = []
        for option in options:
            try:
                return _coerce(value, option, path)
            except ConfigError as e:
                errors.append(str(e).split(": ", 1)[1])
        raise ConfigError(f"{path}: " + " or ".join(dict.fromkeys(errors)))
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and ("on" in choices or "off" in choices):
            value = "on" if value else "off"  # YAML 1.1 reads bare on/off as booleans
        if value not in choices:
            raise ConfigError(f"{path}: must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if value is True:
            value = {}
        return parse_dataclass(tp, value, path)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{path}: must be a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, f"{path}.{i}") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # one item may be written bare
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: must be a list, got {_type_name(value)}")
        return [_coerce(v, item, f"{path}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: must be a mapping, got {_type_name(value)}")
        return {_coerce(k, key_type, path): _coerce(v, value_type, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path}: must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:  # YAML 1.1 reads `1e-4` (no dot) as a string
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{path}: must be a non-empty string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")


def _deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def _check_arch(arch: str) -> None:
    import timm

    if not timm.is_model(arch):
        raise ConfigError(f"model.arch: unknown timm architecture {arch!r}{_suggest(arch, timm.list_models())}")


def _check_optimizer(cfg: OptimizerConfig, path: str) -> None:
    from timm.optim import list_optimizers

    names = list_optimizers()
    if cfg.name not in names:
        raise ConfigError(f"{path}.name: unknown optimizer {cfg.name!r}{_suggest(cfg.name, names)}")
    if cfg.name == "sgd" and cfg.nesterov and cfg.momentum == 0:
        raise ConfigError(f"{path}.nesterov: Nesterov needs momentum > 0 (set nesterov: false or a momentum)")


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (expected one of: {', '.join(options[:12])})"


def _type_name(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__
