"""Data parallelism: under a launcher that starts N processes (`accelerate launch --multi_gpu --num_processes N
-m visroute study run ...`, or `torchrun --nproc_per_node N -m visroute ...`) every process runs the same grid
on its own share of each task's items (item i goes to process i mod N) and writes its rows to the shared
database itself. (On a machine without GPUs `accelerate launch --multi_gpu` starts N CPU processes the same
way; its `--cpu` flag starts several processes only through MPI.)

Each (run, item) is the database's primary key and each item belongs to one process, so each row lands
exactly once; a resumed sweep, with any number of processes, skips the rows already there.

The rank comes from the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK); torch.distributed is set up
only for the final barrier (gloo on CPU, NCCL on GPUs)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None  # None: the grid's model settings decide

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: list) -> list:
        """This process's items: every world_size-th, from its rank."""
        return items[self.rank::self.world_size]

    def wait(self) -> None:
        """Block until every process arrives (a no-op in one process)."""
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()


def context() -> Context:
    """The process group a launcher set up, or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return Context(rank=rank, world_size=world, device=device)
