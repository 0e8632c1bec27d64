"""Process-group plumbing: one process, or several started by torchrun.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; with WORLD_SIZE > 1 the
group is initialised from them (init_method env://), with gloo on the CPU and nccl on CUDA, each
process on GPU LOCAL_RANK.  Without them the helpers below degrade to single-process no-ops.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist
import torch.nn as nn

from .options import TrainError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this code initialised the group and destroys it at the end

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device cuda but no GPU is visible (torch {torch.__version__}, CUDA "
                         f"{torch.version.cuda or 'none'})")
    return torch.device(name)


def setup(device_name: str | None) -> tuple[DistEnv, torch.device]:
    """The process group (from torchrun's environment) and this process's device."""
    device = resolve_device(device_name)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise TrainError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size <= 1:
        return DistEnv(), device
    if dist.is_initialized():  # the caller owns the group
        return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, False), device
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://",
                            device_id=device if device.type == "cuda" else None)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, True), device


def teardown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(t: torch.Tensor, env: DistEnv, op: str = "sum") -> torch.Tensor:
    """In place across the group (sum or max); identity in a single process."""
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def all_gather_objects(obj: Any, env: DistEnv) -> List[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every process."""
    if not env.distributed:
        return [obj]
    out: List[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: nn.Module, env: DistEnv) -> None:
    """Give every process rank 0's buffers (BN running statistics).  Without synchronized BN each
    process updates them from its own shard after DDP's start-of-forward broadcast, so they differ
    by the last step; evaluation and checkpoints use rank 0's, as DDP's next forward would."""
    if env.distributed:
        for buf in module.buffers():
            dist.broadcast(buf, src=0)
