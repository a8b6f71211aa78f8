"""The process group of a run launched by ``torchrun``: which process this is, and the few
collective operations the trainers need.

``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` for every process it starts. Without
them (or with ``WORLD_SIZE=1``) no process group is created and every helper below returns at
once, so a single-process run pays nothing.

The backend is gloo without CUDA. With CUDA it is ``cpu:gloo,cuda:nccl``: gradients (CUDA tensors)
go through NCCL, while the small CPU exchanges (metrics of CPU runs, the memories gathered for a
checkpoint, barriers) go through gloo, whatever device the run trains on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Group:
    """This process's place in the run: ``rank`` of ``world_size`` processes, ``local_rank`` on
    its machine (the CUDA device it uses)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run directory and shows progress; the others write nothing."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def place(self, device: torch.device) -> torch.device:
        """The device this process trains on: ``cuda:LOCAL_RANK`` when the run asks for CUDA
        (``auto`` or ``cuda``); an explicit ``cuda:N`` would put every process on one device."""
        if not self.distributed or device.type != "cuda":
            return device
        if device.index is not None:
            raise ValueError(
                f"device {device} given under torchrun: every process would use it; pass "
                "--device cuda (or auto) and each process takes cuda:LOCAL_RANK"
            )
        return torch.device("cuda", self.local_rank)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over all processes (a new tensor; ``values`` itself is unchanged)."""
        total = values.detach().clone()
        if self.distributed:
            dist.all_reduce(total)
        return total

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds in some process (all processes must call it together)."""
        if not self.distributed:
            return flag
        return bool(self.sum(torch.tensor([float(flag)], device=_collective_device())) > 0)

    def gather(self, value: Any) -> list[Any] | None:
        """Every process's ``value`` (picklable, CPU tensors only), in rank order, on rank 0;
        ``None`` elsewhere."""
        if not self.distributed:
            return [value]
        values: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, values, dst=0)
        return values

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` (picklable), in every process."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def _collective_device() -> torch.device:
    """Where tensors of :meth:`Group.any` live: CUDA under NCCL alone, else the CPU (gloo)."""
    return torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")


def launched_group() -> Group:
    """The group ``torchrun``'s environment describes (one process without it)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Group()
    return Group(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def current() -> Group:
    """The group of the initialised process group (one process when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Group()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return Group(dist.get_rank(), dist.get_world_size(), local_rank)


@contextmanager
def process_group() -> Iterator[Group]:
    """Join the process group torchrun set up for the duration of the block, and leave it
    however the block ends (errors and Ctrl-C included); a no-op for a single process."""
    group = launched_group()
    if not group.distributed or dist.is_initialized():
        yield current() if group.distributed else group
        return
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(group.local_rank)
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, rank=group.rank, world_size=group.world_size)
    try:
        yield group
    finally:
        dist.destroy_process_group()
