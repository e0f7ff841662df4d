"""Data parallelism under `torchrun`: this process's rank, its device, and the collectives the
trainer needs. Outside torchrun everything is rank 0 of 1 and the collectives are no-ops."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def mean_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        return self.all_sum(t.to(self.device).clone()) / self.world if self.world > 1 else t


def init_distributed(device: Optional[torch.device] = None) -> Dist:
    """Join the torchrun process group if launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=device or torch.device("cpu"))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and (device is None or device.type == "cuda")
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank = dist.get_rank()
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    return Dist(rank=rank, world=dist.get_world_size(), device=device or torch.device("cpu"))
