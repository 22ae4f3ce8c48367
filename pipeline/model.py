"""The timm model: architecture, class count and local pretrained weights.

Nothing is downloaded: `model.pretrained` is a file (timm/torchvision state dict or our checkpoint).
"""

from __future__ import annotations

import timm
import torch
from timm.models import load_state_dict

from pipeline.config import ModelConfig
from pipeline.errors import ConfigError


def build_model(cfg: ModelConfig, num_classes: int) -> torch.nn.Module:
    """Create `cfg.arch` with `num_classes` outputs, loading local weights if given."""
    model = timm.create_model(cfg.arch, pretrained=False, num_classes=num_classes)
    if cfg.pretrained:
        load_pretrained(model, cfg.pretrained)
    return model


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
    loaded = len(own) - len(result.missing_keys)
    if loaded == 0:
        arch = model.default_cfg.get("architecture")
        raise ConfigError(f"model.pretrained: no tensor in {path!r} matches model.arch {arch!r}")
    print(
        f"pretrained: loaded {loaded}/{len(own)} tensors from {path}"
        + (f"; new (shape differs): {', '.join(mismatched)}" if mismatched else "")
        + (f"; missing: {', '.join(result.missing_keys[:8])}" if result.missing_keys else "")
        + (f"; unexpected: {', '.join(result.unexpected_keys[:8])}" if result.unexpected_keys else "")
    )
