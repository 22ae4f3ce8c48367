"""Many processes under `torchrun`: one per device, DistributedDataParallel, rank 0 writes.

Outside torchrun every helper is a no-op for a world of one, so the runner never branches on it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
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
    """`auto`: CUDA if present; under torchrun each process takes the GPU of its local rank."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device: cuda was asked for but no CUDA device is available (use auto or cpu)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and world.distributed:
        if world.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"torchrun: local rank {world.local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                "use --nproc_per_node at most the number of GPUs"
            )
        return torch.device("cuda", world.local_rank)
    return torch.device(name)


def init(world: World, cuda: bool) -> None:
    """Join the process group: NCCL between GPUs, gloo on CPU. A rank that fails or stalls brings the
    others down after `timeout` rather than leaving them waiting for ever."""
    if not world.distributed or dist.is_initialized():
        return
    if cuda:
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=10))


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
