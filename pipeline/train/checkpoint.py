"""Checkpoints: atomic saves, weights_only loads, and the RNG states they carry.

The model weights sit under `state_dict`, so `timm.create_model(arch, checkpoint_path=...)` loads them.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.files import atomic_write


def save_checkpoint(paths: list[Path], state: dict[str, Any]) -> None:
    """Serialise once, in memory, then write each file atomically (a failed save leaves the old one)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    for path in paths:
        atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint there")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch and CUDA generator states, in types weights_only can load."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
