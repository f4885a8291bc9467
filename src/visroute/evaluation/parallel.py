"""Data parallelism: under `accelerate launch --num_processes N -m visroute study run ...` every process runs
the same grid on its own share of each task's items (item i goes to process i mod N) and writes its rows to the
shared database itself. Each (run, item) is the database's primary key and each item belongs to one process, so
each row lands exactly once; a resumed sweep, with any number of processes, skips the rows already there."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None  # None: the grid's model settings decide
    _state: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: list) -> list:
        """This process's items: every world_size-th, from its rank."""
        return items[self.rank::self.world_size]

    def wait(self) -> None:
        """Block until every process arrives (a no-op in one process)."""
        if self._state is not None:
            self._state.wait_for_everyone()


def context() -> Context:
    """The process group `accelerate launch` (or torchrun) set up, or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    from accelerate import PartialState

    state = PartialState()
    return Context(rank=state.process_index, world_size=state.num_processes, device=state.device, _state=state)
