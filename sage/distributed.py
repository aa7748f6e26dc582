"""Data-parallel training under torchrun: process group, per-rank data, reductions.

    torchrun --nproc_per_node=N train_sage.py --config ...      (NCCL on GPUs, gloo on CPU)

Every rank walks the same sequence of global batches (train.batch_size x N examples, in the
single-process order for that global batch size) and takes its own train.batch_size slice, so N
processes step through exactly the batches one process with batch size train.batch_size x N would.
Losses are normalised by the global batch's target cells and teacher slots, so the averaged
gradient is the global batch's. Validation is split by task; its sums are reduced across ranks.
Rank 0 alone writes logs and checkpoints. Without torchrun (WORLD_SIZE unset) all of this is a no-op.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from sage.encoding import LengthBucketSampler


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block (e.g. extracting the teacher cache) before the others do."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over ranks (float64, on the CPU: a handful of scalars per step)."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._reduce_device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, items: list[Any]) -> list[Any]:
        """Every rank's list, concatenated in rank order."""
        if not self.enabled:
            return items
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, items)
        return [x for part in parts for x in part]

    @property
    def _reduce_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")


def init_distributed(device_type: str) -> DistributedContext:
    """Join torchrun's process group when launched by it (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistributedContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistributedContext(rank, world, local_rank)


def shutdown_distributed(ctx: DistributedContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


class RankBatchSampler(torch.utils.data.Sampler):
    """This rank's slice of each global batch of a LengthBucketSampler built with the global batch
    size. A global batch with fewer examples than ranks (only ever the last one) is dropped: every
    rank must take part in every step."""

    def __init__(self, global_sampler: LengthBucketSampler, ctx: DistributedContext) -> None:
        self.global_sampler, self.ctx = global_sampler, ctx

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.global_sampler.set_epoch(epoch, skip_batches)

    def _slices(self) -> list[list[int]]:
        world, rank = self.ctx.world, self.ctx.rank
        batches = self.global_sampler.batches()[self.global_sampler.skip_batches :]
        return [np.array_split(b, world)[rank].tolist() for b in batches if len(b) >= world]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._slices()

    def __len__(self) -> int:
        return len(self._slices())


def examples_of_rank(refs: Sequence[Any], ctx: DistributedContext) -> list[Any]:
    """The validation examples this rank scores: whole tasks, task k on rank k mod N."""
    return [r for r in refs if r.task_index % ctx.world == ctx.rank]
