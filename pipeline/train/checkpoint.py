"""Checkpoints: the one schema (`Checkpoint`), its atomic writer (`Checkpointer`), weights_only reads,
and the run's progress and RNG states they carry.

The model weights sit under `state_dict`, so `timm.create_model(arch, checkpoint_path=...)` loads them.
"""

from __future__ import annotations

import io
import pickle
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import distributed
from pipeline.config import StageSpec
from pipeline.distributed import World
from pipeline.errors import UserError
from pipeline.files import atomic_write


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint, restored on resume."""

    stage: int = 0  # the stage being trained
    epoch: int = 0  # epochs of `stage` already completed
    best_val_top1: float = 0.0
    stages: list[dict[str, Any]] = field(default_factory=list)  # summaries of finished stages
    stage_seconds: float = 0.0  # training seconds spent in `stage` so far
    stage_images: int = 0
    seconds: float = 0.0  # wall seconds of finished stages
    elapsed: float = 0.0  # wall seconds of the whole run so far (validation included; across resumes)
    batch: int = 0  # batches of epoch `epoch` already trained: > 0 in a checkpoint taken mid-epoch
    partial: dict[str, float] = field(default_factory=dict)  # that epoch's loss sum, batches, images, seconds
    replans: list[dict[str, Any]] = field(default_factory=list)  # `run --budget`'s new stage lengths, in order

    @property
    def started(self) -> bool:
        """Whether the stage `stage` has trained at all."""
        return self.epoch > 0 or self.batch > 0

    def finish_stage(self, stage: StageSpec, val_top1: float, val_ema_top1: float | None) -> None:
        """Record the stage that just ended (the summary table's row) and its training seconds."""
        self.stages.append(
            {
                "img_size": stage.img_size,
                **({"start_size": stage.start_size} if stage.start_size is not None else {}),
                "batch_size": stage.batch_size,
                "epochs": stage.epochs,
                "seconds": round(self.stage_seconds, 2),
                "train_images_per_s": round(self.stage_images / self.stage_seconds, 1),
                "val_top1": val_top1,
                **({"val_ema_top1": val_ema_top1} if val_ema_top1 is not None else {}),
            }
        )
        self.seconds += self.stage_seconds

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Progress:
        state = dict(state)
        if "step" in state:  # checkpoints written before the key was named `batch`
            state["batch"] = state.pop("step")
        return cls(**state)


@dataclass
class Checkpoint:
    """What a checkpoint file holds. Evaluation needs the first five fields; resuming needs them all."""

    state_dict: dict[str, torch.Tensor]
    arch: str
    num_classes: int
    classes: list[str]
    config: dict[str, Any]  # the resolved YAML the run trained with
    train_size: int | None = None
    world_size: int = 1
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    state_dict_ema: dict[str, torch.Tensor] | None = None
    ema_updates: int = 0
    progress: dict[str, Any] = field(default_factory=dict)  # Progress.state_dict()
    rng: list[dict[str, Any]] | dict[str, Any] | None = None  # one per rank (older: rank 0's alone)
    plan: list[dict[str, Any]] | None = None  # RunPlan.records(); absent from checkpoints of older versions

    REQUIRED = ("state_dict", "arch", "num_classes", "classes", "config")

    @classmethod
    def read(cls, path: str | Path) -> Checkpoint:
        """A checkpoint of this pipeline, loaded weights_only; anything else is one clear error."""
        state = load_checkpoint(path)
        missing = [k for k in cls.REQUIRED if k not in state] if isinstance(state, dict) else list(cls.REQUIRED)
        if missing:
            raise UserError(f"{path}: not a checkpoint of this pipeline (no {', '.join(missing)})")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in state.items() if k in known})

    @property
    def run_progress(self) -> Progress:
        return Progress.from_state(self.progress)

    def restore_training(self, optimizer: torch.optim.Optimizer, scheduler, scaler) -> None:
        """Put the stage's optimizer, schedule and GradScaler back as they were saved."""
        optimizer.load_state_dict(self.optimizer)
        scheduler.load_state_dict(self.scheduler)
        if scaler is not None and self.scaler:
            scaler.load_state_dict(self.scaler)

    def rng_of(self, rank: int) -> dict[str, Any]:
        """The RNG states of process `rank` (checkpoints of older versions: rank 0's, for every rank)."""
        return self.rng[rank] if isinstance(self.rng, list) else self.rng

    def weights(self, use_ema: bool = False) -> dict[str, torch.Tensor]:
        return self.state_dict_ema if use_ema else self.state_dict

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Checkpointer:
    """The run's checkpoint writer: rank 0 writes; a failed write (a full disk) leaves the previous
    file whole and stops every process with a message that says so. `after_save(paths)` is told of
    each write (tests stand a crash there)."""

    def __init__(
        self,
        run_dir: Path,
        device: torch.device,
        world: World = World(),
        after_save: Callable[[list[Path]], None] | None = None,
    ):
        self.dir = run_dir / "checkpoints"
        self.run_dir, self.device, self.world, self.after_save = run_dir, device, world, after_save

    @property
    def last(self) -> Path:
        return self.dir / "last.pt"

    def save(self, names: list[str], checkpoint: Checkpoint) -> None:
        """Write `checkpoint` as each of `names` (in order: `last.pt` goes last, so a crash before it
        replays this epoch and rewrites them all)."""
        paths = [self.dir / name for name in names]
        problem = None
        if self.world.is_main:
            try:
                save_checkpoint(paths, checkpoint.to_dict())
            except OSError as e:
                kept = (
                    f"the previous checkpoint {self.last} is intact"
                    if self.last.is_file()
                    else ("no checkpoint was written yet")
                )
                problem = (
                    f"cannot write checkpoint {paths[0]} ({e.strerror or e}); {kept}. Free space and resume with: "
                    f"python -m pipeline run --resume {self.run_dir}"
                )
        # every process learns whether rank 0's write failed (and waits for it to finish): they stop together
        failed = distributed.max_all(torch.tensor([int(problem is not None)], device=self.device)).item()
        if failed:
            raise UserError(problem or "rank 0 could not write a checkpoint (its message says why)")
        if self.after_save is not None:
            self.after_save(paths)


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
    except (
        pickle.UnpicklingError
    ):  # torch's text for it suggests weights_only=False: never for a file of unknown origin
        why = "not written by torch.save, or holding objects that a weights-only load refuses"
    except Exception as e:
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        why = "an empty file" if path.stat().st_size == 0 else f"{type(e).__name__}: {first[:200]}".rstrip(": ")
    raise UserError(f"{path}: not a readable checkpoint ({why})")


def derive_seed(*parts: int) -> int:
    """An independent seed for each (run seed, stage, epoch)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def rng_state(device: torch.device) -> dict[str, Any]:
    """Python, NumPy, torch and the training device's CUDA generator states, in types weights_only
    can load. CUDA: the training device's alone, which any machine that can resume can take back."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else [],
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = cuda_rng_of(state["cuda"], device)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def cuda_rng_of(states: list[torch.Tensor], device: torch.device) -> torch.Tensor | None:
    """The saved CUDA generator state for `device`. Older checkpoints hold one per GPU visible when
    they were written (all 8 of a node), which `set_rng_state_all` cannot put back on fewer GPUs."""
    if device.type != "cuda" or not states:
        return None
    if len(states) == 1:
        return states[0]
    index = device.index or 0
    return states[index] if index < len(states) else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
