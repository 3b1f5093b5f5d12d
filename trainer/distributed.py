"""Data parallelism under ``torchrun``: who am I, and the few collectives the loop needs.

Gradients are averaged with plain all-reduces rather than through ``DistributedDataParallel``
because the classifier's output layer grows when a class appears, and DDP fixes its set of
parameters when it wraps the module. Every rank reads its own partitions, so ranks see
different labels: new labels are gathered and adopted by all ranks in the same order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """The process that writes checkpoints and serves Prometheus."""
        return self.rank == 0


def setup(device_type: str) -> World:
    """Join the process group when started by ``torchrun`` (``WORLD_SIZE`` > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def teardown(world: World) -> None:
    """Leave the process group."""
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def average_gradients(module: torch.nn.Module, world: World) -> None:
    """Average every gradient across ranks (a missing gradient counts as zeros)."""
    if not world.distributed:
        return
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def any_flag(flags: list[bool], world: World, device: torch.device) -> list[bool]:
    """Element-wise OR of boolean flags across ranks (stop requested, out of data, ...)."""
    if not world.distributed:
        return flags
    t = torch.tensor([int(f) for f in flags], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def gather(obj: Any, world: World) -> list[Any]:
    """Every rank's ``obj``, in rank order (just ``[obj]`` on one process)."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out


def union_in_order(lists: list[list[str]]) -> list[str]:
    """Distinct items of ``lists``, first occurrence first (rank order, then list order)."""
    return list(dict.fromkeys(item for items in lists for item in items))
