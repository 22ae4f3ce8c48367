"""Many processes under `torchrun`: one per device, DistributedDataParallel, rank 0 writes.

Outside torchrun every helper is a no-op for a world of one, so the trainer never branches on it.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from timm.utils import distribute_bn

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class World:
    """This process's place: rank among world_size processes, local_rank on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environment() -> World:
    """torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them this is a world of one."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return World()
    return World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))


def resolve_device(name: str, world: World = World()) -> torch.device:
    """`auto`: CUDA if present; under torchrun each process takes the GPU of its local rank. On CUDA,
    also cuDNN autotuning and TF32, for training, evaluation and prediction alike."""
    device = _pick_device(name, world)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # a few input shapes per stage: each tuned once
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def _pick_device(name: str, world: World) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device: cuda was asked for but no CUDA device is available (use auto or cpu)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
        if name == "cpu":
            check_unused_gpu()
    if name == "cuda" and world.distributed:
        if world.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"torchrun: local rank {world.local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                "use --nproc_per_node at most the number of GPUs"
            )
        return torch.device("cuda", world.local_rank)
    return torch.device(name)


DRIVER_FOR_CUDA = {13: 580, 12: 525}  # the oldest NVIDIA driver branch each CUDA major runs on


def driver_version() -> int | None:
    """The loaded NVIDIA kernel driver's branch (580 for 580.65.06); None without one."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    found = re.search(r"Kernel Module.*?\s(\d{3,})\.\d", text)
    return int(found.group(1)) if found else None


def check_unused_gpu() -> None:
    """`device: auto` found no usable CUDA device on a machine with an NVIDIA driver. A driver too old
    for this torch build stops the run (it would train on the CPU for hours at a fraction of the
    speed); a GPU hidden or busy (CUDA_VISIBLE_DEVICES, exclusive mode) is a warning."""
    driver, cuda = driver_version(), torch.version.cuda
    if driver is None or not cuda:
        return
    needed = DRIVER_FOR_CUDA.get(int(cuda.split(".")[0]), 0)
    if driver < needed:
        raise ConfigError(
            f"run.device: auto: the NVIDIA driver {driver} is too old for torch {torch.__version__}, built for "
            f"CUDA {cuda}, which needs driver {needed} or newer, so it would train on the CPU; update the driver, "
            "install the torch build for this driver's CUDA (https://pytorch.org/get-started/locally/), "
            "or set run.device: cpu"
        )
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    hidden = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
    print(
        f"warning: run.device: auto: torch cannot use this machine's NVIDIA GPU{hidden}; training on the CPU",
        file=sys.stderr,
    )


def init(world: World, cuda: bool) -> None:
    """Join the process group: NCCL between GPUs, gloo on CPU. A rank that fails or stalls brings the
    others down after `timeout` rather than leaving them waiting for ever."""
    if not world.distributed or dist.is_initialized():
        return
    if cuda:
        torch.cuda.set_device(world.local_rank)
    # device_id binds NCCL to this process's GPU at once (no guessing at the first barrier)
    device = torch.device("cuda", world.local_rank) if cuda else None
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=10), device_id=device)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def sum_all(t: torch.Tensor) -> torch.Tensor:
    """The element-wise sum over every rank (in place); the tensor itself for a world of one."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def max_all(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def from_main(value: Any) -> Any:
    """Rank 0's `value` on every rank (a run folder, an LR found by the range test)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_all(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order (a list of one for a world of one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def same_buffers(*modules: torch.nn.Module | None) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank: DDP sends them at the start of each
    training forward, so after an epoch's last step every rank holds its own; evaluation and the
    checkpoint use rank 0's."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    for module in modules:
        if module is not None:
            distribute_bn(module, dist.get_world_size(), reduce=False)  # rank 0's running statistics


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
