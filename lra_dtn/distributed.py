"""Multi-process training through ``torchrun`` (PyTorch DDP): one process per device.

Without ``torchrun`` (no ``TORCHELASTIC_RUN_ID`` and no ``WORLD_SIZE`` > 1 in the environment)
everything here is a no-op, so the same code path serves a laptop, one GPU, and many nodes. Under
``torchrun`` the process group is joined even with one process, so ``--nproc_per_node 1`` runs the
real DDP/NCCL path on a single GPU. NCCL on CUDA, gloo on CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    device: torch.device
    group: bool = False  # a process group is up (launched by torchrun): collectives and DDP apply

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes files (checkpoints, JSON, tables, TensorBoard)."""
        return self.rank == 0


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def init(device: str = "auto") -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dev = pick_device(device)
    if "TORCHELASTIC_RUN_ID" not in os.environ and world_size == 1:
        return DistContext(0, 1, dev)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        visible = torch.cuda.device_count()
        if local_rank >= visible:
            raise ValueError(f"torchrun started {os.environ.get('LOCAL_WORLD_SIZE', local_rank + 1)} processes on "
                             f"this node but {visible} GPU(s) are visible: use --nproc_per_node {visible} (one "
                             "process per GPU) or --device cpu (gloo)")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), world_size, dev, group=True)


def barrier(ctx: DistContext) -> None:
    if ctx.group:
        dist.barrier()


def all_reduce_sum(ctx: DistContext, values: list[float]) -> list[float]:
    """Sum a few numbers over all ranks (evaluation counts, losses)."""
    if not ctx.group:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast(ctx: DistContext, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (any picklable object)."""
    if not ctx.group:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(ctx: DistContext) -> None:
    if ctx.group and dist.is_initialized():
        dist.destroy_process_group()
