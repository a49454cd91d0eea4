"""Data-parallel training with ``torchrun`` (DistributedDataParallel), no MLflow in here.

``torchrun --nproc-per-node N -m skinml train ...`` starts N processes with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` set; :func:`setup` joins them into one process group (NCCL
on GPUs, gloo on CPUs) and gives each its device (``cuda:LOCAL_RANK``).

**The global batch is the recipe's ``batch_size``**, split evenly over the processes, so the
learning rates of the recipe hold unchanged: every optimiser step sees ``batch_size`` images in
all, as in a single-process run. :class:`GlobalBatchSlices` makes them the *same* images: every
process draws the single-process sample order (shuffle, or the weighted sampler of the
``sampler`` imbalance strategy, from the same per-epoch generator) and takes its slice of each
global batch. Gradients are averaged over processes by DDP; BatchNorm uses per-process batch
statistics on CPUs and synchronised statistics (SyncBatchNorm) on GPUs; augmentation and
questionnaire-dropout draws differ per process (seeded by rank).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sized
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> DistInfo:
    """What torchrun set (a single process when nothing is set)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def setup(info: DistInfo, device: str = "auto") -> torch.device:
    """Join the process group and pick this process's device."""
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return torch.device(f"cuda:{info.local_rank}") if use_cuda else torch.device("cpu")


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast(value: Any, info: DistInfo) -> Any:
    """Rank 0's ``value`` on every rank (e.g. the split a rank-0-only step resolved)."""
    if not info.enabled:
        return value
    box = [value if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def per_rank_batch(global_batch: int, info: DistInfo) -> int:
    if global_batch % info.world_size:
        raise ValueError(f"batch_size {global_batch} (the global batch) must be a multiple of the "
                         f"{info.world_size} processes torchrun started")
    return global_batch // info.world_size


class GlobalBatchSlices(Sampler[int]):
    """Rank ``rank``'s part of each global batch of the single-process order of ``base``.

    Every rank iterates ``base`` (seeded identically), cuts the order into global batches of
    ``global_batch`` and yields positions ``[rank * b, (rank + 1) * b)`` of each, ``b =
    global_batch / world_size``. With ``drop_last`` an incomplete last global batch is dropped;
    otherwise it is dealt out as evenly as possible (a rank may get one index fewer).
    """

    def __init__(self, base: Sampler[int] | Sized, global_batch: int, rank: int, world_size: int,
                 drop_last: bool) -> None:
        if not 0 <= rank < world_size or global_batch % world_size:
            raise ValueError(f"bad slice: rank {rank} of {world_size}, global batch {global_batch}")
        self.base, self.global_batch, self.rank, self.world_size = base, global_batch, rank, world_size
        self.drop_last = drop_last

    def __iter__(self) -> Iterator[int]:
        order = list(iter(self.base))
        per = self.global_batch // self.world_size
        full = len(order) // self.global_batch
        for start in range(0, full * self.global_batch, self.global_batch):
            yield from order[start + self.rank * per:start + (self.rank + 1) * per]
        rest = order[full * self.global_batch:]
        if rest and not self.drop_last:
            share = math.ceil(len(rest) / self.world_size)
            yield from rest[self.rank * share:(self.rank + 1) * share]

    def __len__(self) -> int:
        n = len(self.base)
        full = (n // self.global_batch) * (self.global_batch // self.world_size)
        rest = n % self.global_batch
        if rest and not self.drop_last:
            share = math.ceil(rest / self.world_size)
            full += max(0, min(share, rest - self.rank * share))
        return full


def global_train_row(info: DistInfo, device: torch.device):
    """A fit() row transform: ``train_loss`` as the mean over all processes' rows, and
    ``images_per_second`` summed (every process trains its own slice at once)."""

    def transform(row: dict) -> dict:
        values = torch.tensor([row["train_loss"], row["images_per_second"]], dtype=torch.float64,
                              device=device)
        dist.all_reduce(values)
        return {**row, "train_loss": float(values[0]) / info.world_size, "images_per_second": float(values[1])}

    return transform
