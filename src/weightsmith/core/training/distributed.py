"""Data parallelism without wrappers: a process group from the launcher's environment.

``accelerate launch --num_processes N`` (or ``torchrun``) sets RANK/WORLD_SIZE/MASTER_ADDR;
we join that group (gloo on CPU, nccl on GPU), split every micro-batch across processes and
all-reduce the *summed* gradients, so N processes compute exactly the gradient one process
would on the whole batch (up to float summation order).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ProcessGroup:
    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_process_group(device_type: str) -> ProcessGroup:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return ProcessGroup(rank, world, local)


def all_reduce_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_grads(params: list[torch.nn.Parameter], world: int) -> None:
    """Sum gradients over processes (each already divided by the global token count)."""
    if world == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def gather_objects(obj: object, world: int) -> list:
    if world == 1:
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()
