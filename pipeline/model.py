"""The timm model: architecture, class count, local pretrained weights, and its parameter groups.

Groups (stem, block1..blockN, head) come from timm's `group_matcher`, so freezing, layer-wise LRs
and LR multipliers mean the same for a ResNet, an EfficientNet, a ConvNeXt or a ViT.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import timm
import torch
from timm.models import group_parameters, load_state_dict

from pipeline.config import ModelConfig, TrainConfig
from pipeline.errors import ConfigError


def build_model(cfg: ModelConfig, num_classes: int) -> torch.nn.Module:
    """Create `cfg.arch` with `num_classes` outputs, loading local weights if given."""
    hub = cfg.pretrained is True  # timm's own download; only where the hub can be reached
    try:
        model = timm.create_model(cfg.arch, pretrained=hub, num_classes=num_classes)
    except Exception as e:
        if not hub:
            raise
        raise ConfigError(
            f"model.pretrained: true needs timm's download of {cfg.arch!r}, which failed ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:160]}); give a local weights file instead"
        ) from None
    if isinstance(cfg.pretrained, str):
        load_pretrained(model, cfg.pretrained)
    return model


def input_problem(model: torch.nn.Module, size: int, device: torch.device, autocast=None) -> str | None:
    """Why `model` cannot take a `size` px input (`ExceptionType: its first line`), from one forward of a
    zero image in eval mode under `autocast` (a context manager, e.g. the run's precision), or None.
    What plan, run, eval, predict and export ask before they use a size: a fixed-size model (a ViT at
    224) fails here in one line, not at hour 2."""
    import contextlib

    was_training = model.training
    model.eval()
    x = torch.zeros(1, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    try:
        with torch.no_grad(), autocast or contextlib.nullcontext():
            model(x)
    except Exception as e:  # noqa: BLE001 - timm's models raise AssertionError or RuntimeError, others others
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        return f"{type(e).__name__}: {first}" if first else type(e).__name__
    finally:
        model.train(was_training)
    return None


def load_pretrained(model: torch.nn.Module, path: str) -> None:
    """Load weights with weights_only=True; tensors whose shape differs (a new head) stay new."""
    try:
        state = load_state_dict(path, use_ema=False, weights_only=True)
    except Exception as e:
        raise ConfigError(f"model.pretrained: cannot load {path!r} as weights ({type(e).__name__}: {e})") from None
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    for k in mismatched:
        del state[k]
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in mismatched]
    loaded = len(own) - len(result.missing_keys)
    if loaded == 0:
        arch = model.default_cfg.get("architecture")
        raise ConfigError(f"model.pretrained: no tensor in {path!r} matches model.arch {arch!r}")
    print(
        f"pretrained: loaded {loaded}/{len(own)} tensors from {path}"
        + (f"; new (shape differs): {', '.join(mismatched)}" if mismatched else "")
        + (f"; missing: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}" if missing else "")
        + (f"; unexpected: {', '.join(result.unexpected_keys[:8])}" if result.unexpected_keys else "")
        + ("" if len(result.unexpected_keys) <= 8 else " ...")
    )


@dataclass
class ParamGroups:
    """The model's named groups, in forward order, and each parameter's group."""

    names: list[str]  # stem, block1, ..., blockN, head
    of_param: dict[str, str]  # parameter name -> group name

    def params_of(self, group: str) -> list[str]:
        return [p for p, g in self.of_param.items() if g == group]

    def describe(self) -> str:
        blocks = [n for n in self.names if n.startswith("block")]
        middle = [f"{blocks[0]}..{blocks[-1]}"] if len(blocks) > 2 else blocks
        return ", ".join([n for n in self.names if n == "stem"] + middle + [n for n in self.names if n == "head"])


def param_groups(model: torch.nn.Module) -> ParamGroups:
    """stem / block1..N / head from timm's coarse group_matcher; the head is the group holding the
    classifier (with what timm puts beside it, e.g. ConvNeXt's head norm)."""
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    head_ids = {id(p) for p in classifier.parameters()} if isinstance(classifier, torch.nn.Module) else set()
    params = dict(model.named_parameters())
    matcher = model.group_matcher(coarse=True) if hasattr(model, "group_matcher") else {}
    if matcher:
        ordinal = group_parameters(model, matcher)  # {group index: [param names]}
        groups = [ordinal[k] for k in sorted(ordinal)]
    else:  # no matcher: body, then head
        groups = [
            [n for n in params if id(params[n]) not in head_ids],
            [n for n in params if id(params[n]) in head_ids],
        ]
        groups = [g for g in groups if g]
    head_idx = next((i for i, g in enumerate(groups) if any(id(params[n]) in head_ids for n in g)), len(groups))
    body, head = groups[:head_idx], [n for g in groups[head_idx:] for n in g]  # the head: the classifier's group on
    stem = matcher.get("stem")
    has_stem = bool(body) and bool(stem) and all(re.match(stem, n) for n in body[0])
    labels = ["stem"] * has_stem + [f"block{i}" for i in range(1, len(body) - has_stem + 1)]
    of_param = {n: label for label, group in zip(labels, body) for n in group}
    if head:
        labels.append("head")
        of_param.update(dict.fromkeys(head, "head"))
    return ParamGroups(labels, of_param)


NORM_TYPES = (torch.nn.modules.batchnorm._BatchNorm,)


def frozen_groups(spec: str | list[str], groups: ParamGroups, field: str) -> list[str]:
    """The groups a stage's `freeze` names: none, all_but_head, all_but_last_N, a group or a list."""
    if isinstance(spec, str) and spec not in ("none", "all_but_head") and not spec.startswith("all_but_last_"):
        spec = [spec]
    if isinstance(spec, list):
        unknown = [g for g in spec if g not in groups.names]
        if unknown:
            raise ConfigError(f"{field}: no group {unknown[0]!r} in this model; its groups are {groups.describe()}")
        return [g for g in groups.names if g in spec]
    if spec == "none":
        return []
    keep = 1 if spec == "all_but_head" else int(spec.rsplit("_", 1)[1])
    if keep > len(groups.names):
        raise ConfigError(f"{field}: {spec} keeps more groups than the model has ({groups.describe()})")
    return groups.names[: len(groups.names) - keep]


@dataclass
class FreezePlan:
    """What one stage trains: frozen parameters get no gradient and no optimizer state; the listed
    BatchNorm layers keep their running statistics (they are put in eval mode after every train())."""

    frozen: list[str]  # group names
    fixed_norms: list[torch.nn.Module]
    trainable: int  # parameters (elements) left to train

    def train_mode(self, model: torch.nn.Module) -> None:
        model.train()
        for m in self.fixed_norms:
            m.eval()


def apply_freeze(model: torch.nn.Module, tc: TrainConfig, groups: ParamGroups, field: str) -> FreezePlan:
    """Set requires_grad for a stage's `freeze`, `freeze_bn` and `freeze_bn_affine`."""
    frozen = frozen_groups(tc.freeze, groups, f"{field}.freeze")
    frozen_params = {p for g in frozen for p in groups.params_of(g)}
    fixed_norms = []
    for module_name, module in model.named_modules():
        if not isinstance(module, NORM_TYPES):
            continue
        own = [f"{module_name}.{n}" for n, _ in module.named_parameters(recurse=False)]
        in_frozen = bool(own) and all(n in frozen_params for n in own)
        if tc.freeze_bn or in_frozen:
            fixed_norms.append(module)
        if tc.freeze_bn_affine:
            frozen_params.update(own)
    trainable = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen_params)
        if not p.requires_grad:
            p.grad = None  # a gradient left from an earlier stage would only hold memory
        trainable += p.numel() if p.requires_grad else 0
    if trainable == 0:
        raise ConfigError(f"{field}.freeze: freezes every parameter; leave at least the head trainable")
    return FreezePlan(frozen, fixed_norms, trainable)


def optimizer_param_groups(model: torch.nn.Module, tc: TrainConfig, groups: ParamGroups, field: str) -> list[dict]:
    """Trainable parameters in optimizer groups, each with an `lr_scale`: layer decay (timm's
    per-layer rule, finest layers of its group_matcher) times the stage's `lr_mult` for its group.
    Norms, biases and the model's no_weight_decay() parameters get no weight decay."""
    unknown = [g for g in tc.lr_mult if g not in groups.names]
    if unknown:
        raise ConfigError(f"{field}.lr_mult: no group {unknown[0]!r} in this model; its groups are {groups.describe()}")
    layer_scale: dict[str, float] = {}
    if tc.layer_decay is not None:
        if hasattr(model, "group_matcher"):
            layer_of = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
        else:
            layer_of = {n: i for i, n in enumerate(groups.names)}  # fallback: one layer per group
            layer_of = {p: layer_of[g] for p, g in groups.of_param.items()}
        top = max(layer_of.values())
        layer_scale = {p: tc.layer_decay ** (top - layer_of.get(p, top)) for p in groups.of_param}
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    weight_decay = tc.optimizer.weight_decay
    buckets: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = 0.0 if p.ndim <= 1 or name in skip else weight_decay
        scale = layer_scale.get(name, 1.0) * tc.lr_mult.get(groups.of_param.get(name, ""), 1.0)
        buckets.setdefault((scale, decay), []).append(p)
    return [{"params": ps, "lr_scale": s, "weight_decay": d} for (s, d), ps in sorted(buckets.items())]
