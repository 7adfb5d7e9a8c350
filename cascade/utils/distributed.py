"""Process groups for sampling and evaluation under ``torchrun`` (NCCL on CUDA, gloo on CPU), and a few collectives.

The same command runs on one process (no process group: every helper is then the identity) or on K
ranks started by ``torchrun --nproc_per_node=K``; rank r takes items r, r + K, r + 2K, … of a fixed
list of work units, so which unit holds which images never depends on K.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["init_distributed", "rank_world", "barrier", "broadcast_object", "all_reduce_sum", "collective_device"]

T = TypeVar("T")


def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) — joining the process group (NCCL on CUDA, gloo on CPU) when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        # Ranks wait for each other only at a few points; a long unit of work on one rank must not time the others out.
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=6))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(value: T, src: int = 0) -> T:
    """Rank ``src``'s ``value`` on every rank (pickled)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box: list[Any] = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def collective_device() -> torch.device:
    """Where tensors of a collective must live: the rank's GPU for NCCL, the CPU for gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over ranks (itself without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    out = tensor.to(collective_device()).clone()
    dist.all_reduce(out)
    return out.to(tensor.device)
