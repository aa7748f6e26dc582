"""Data-parallel training under torchrun: process group, per-rank data, reductions.

    torchrun --nproc_per_node=N train_sage.py --config ...      (NCCL on GPUs, gloo on CPU)

Every rank walks the same sequence of global batches (train.batch_size x N examples, in the
single-process order for that global batch size) and takes its own train.batch_size slice, so N
processes step through exactly the batches one process with batch size train.batch_size x N would.
Losses are normalised by the global batch's target cells and teacher slots, so the averaged
gradient is the global batch's. Validation is split by task; its sums are reduced across ranks.
Rank 0 alone writes logs and checkpoints. Without torchrun (WORLD_SIZE unset) all of this is a no-op.

Gradients are averaged explicitly after the whole batch's backward passes (`average_gradients`),
not overlapped with the backward pass as DistributedDataParallel does: an out-of-memory error on one
process must not leave the others inside a half-done reduction, so every process first finishes its
pieces, then all agree whether any ran out of memory (`ranks_where`), and only then reduce.
Collectives time out after run.collective_timeout_s; the wait for rank 0's teacher extraction
(`main_first`) goes through its own gloo group without a practical limit, since an extraction may
take hours (torchrun stops the waiting processes if rank 0 dies).
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from sage.encoding import LengthBucketSampler

EXTRACTION_WAIT = datetime.timedelta(days=7)  # how long the other processes wait for rank 0's extraction


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    wait_group: Any = None  # gloo group with a long timeout, for waiting on rank 0's extraction

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wait_for_all(self) -> None:
        """A barrier without the process group's timeout: for waits as long as an extraction."""
        if self.enabled:
            dist.barrier(group=self.wait_group)

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block (e.g. extracting the teacher cache) before the others do, however
        long it takes (the wait does not use the process group's timeout)."""
        if not self.is_main:
            self.wait_for_all()
        yield
        if self.is_main:
            self.wait_for_all()

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over ranks in place, on its device: no host sync (NCCL: CUDA tensors)."""
        if self.enabled:
            dist.all_reduce(tensor)
        return tensor

    def ranks_where(self, flag: bool) -> list[int]:
        """The ranks on which `flag` is true (every process gets the same list)."""
        if not self.enabled:
            return [0] if flag else []
        flags = torch.zeros(self.world, dtype=torch.float32, device=self._reduce_device)
        flags[self.rank] = float(flag)
        dist.all_reduce(flags)
        return [r for r, f in enumerate(flags.tolist()) if f]

    def average_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Every trainable parameter's gradient averaged over the processes, in one reduction (a
        missing gradient counts as zero, so every process reduces the same layout)."""
        if not self.enabled:
            return
        params = [p for p in parameters if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= self.world
        for grad, averaged in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            grad.copy_(averaged)

    def broadcast_from_main(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers to every process (equal seeds make them equal already;
        this makes sure)."""
        if self.enabled:
            for tensor in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(tensor.data, src=0)

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


def init_distributed(device_type: str, timeout_s: float = 1800) -> DistributedContext:
    """Join torchrun's process group when launched by it (WORLD_SIZE > 1); its collectives time out
    after `timeout_s` seconds."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistributedContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    wait_group = dist.new_group(backend="gloo", timeout=EXTRACTION_WAIT)
    return DistributedContext(rank, world, local_rank, wait_group)


def shutdown_distributed(ctx: DistributedContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


class RankBatchSampler(torch.utils.data.Sampler):
    """This rank's slice of each global batch of a LengthBucketSampler built with the global batch
    size (or a TokenBudgetSampler with the global token budget). A global batch with fewer examples than ranks (only ever the last one) is dropped: every
    rank must take part in every step."""

    def __init__(self, global_sampler: LengthBucketSampler, ctx: DistributedContext) -> None:
        self.global_sampler, self.ctx = global_sampler, ctx

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.global_sampler.set_epoch(epoch, skip_batches)

    @property
    def epoch(self) -> int:
        return self.global_sampler.epoch

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
