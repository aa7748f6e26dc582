"""Training batches filled to a number of tokens (`train.tokens_per_step`) instead of a number of
examples (`train.batch_size`).

A step's cost grows with its tokens, not its examples: a batch of eight 3x3 tasks is a few hundred
tokens, eight 30x30 tasks tens of thousands. On a GPU a step also pays a fixed cost (kernel
launches) whatever its size, so small examples are cheapest many to a step. Here every example
falls in a shape bucket: its context length rounded up by `sage.encoding.bucketed_length`, its
answer canvas side rounded up to `CANVAS_BUCKET`. An example costs that length plus the canvas's
cells, and a bucket's batches take as many examples as fit in the budget (at least one). The number
of batches an epoch is the same every epoch (bucket membership does not change), so schedules,
resuming mid-epoch and torchrun's slices work as with a fixed batch size. One difference under
torchrun: a global batch with fewer examples than processes cannot be split and is dropped, which
with a fixed batch size only ever hits the last batch, and here may hit a bucket's last batch or an
example costing more than one process's budget (tests/test_token_batches.py checks the slices).
For configs/sage_44m_1gpu.yaml at 32,768 tokens a process: 4, 11 and 37 of 2,413 examples an epoch
on 2, 4 and 8 processes, buckets' last batches, other examples every epoch (shuffled).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from sage.encoding import CANVAS_BUCKET, LengthBucketSampler, bucketed_length


def example_tokens(lengths: np.ndarray, sides: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(each example's shape bucket as one integer, its cost in tokens: the bucket's context length
    plus its answer canvas's cells)."""
    context = np.array([bucketed_length(int(n)) for n in lengths], dtype=np.int64)
    side = -(-np.asarray(sides, dtype=np.int64) // CANVAS_BUCKET) * CANVAS_BUCKET
    return context * 1000 + side, context + side * side


class TokenBudgetSampler(torch.utils.data.Sampler):
    """Batches of one shape bucket each, as many examples as fit in `tokens_per_step` tokens, in an
    order fixed by (seed, epoch): each bucket's examples shuffled and cut into batches, then the
    batches of every bucket shuffled together. Every example is in exactly one batch an epoch.
    The same interface as LengthBucketSampler (set_epoch with skip_batches, batches, len)."""

    def __init__(self, lengths: np.ndarray, sides: np.ndarray, tokens_per_step: int, seed: int = 0) -> None:
        self.bucket, self.cost = example_tokens(lengths, sides)
        self.tokens_per_step, self.seed = tokens_per_step, seed
        self.epoch, self.skip_batches = 0, 0
        self.buckets = {int(b): np.flatnonzero(self.bucket == b) for b in np.unique(self.bucket)}
        # Examples a batch of each bucket takes: what the budget buys, at least one.
        self.per_batch = {b: max(1, tokens_per_step // int(self.cost[members[0]]))
                          for b, members in self.buckets.items()}

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        batches = []
        for bucket, members in self.buckets.items():  # dicts keep the sorted order of np.unique
            size = self.per_batch[bucket]
            shuffled = members[rng.permutation(len(members))]
            batches += [shuffled[i : i + size].tolist() for i in range(0, len(shuffled), size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    @property
    def largest_batch(self) -> int:
        """The most examples any batch takes (where out-of-memory halving starts)."""
        return max(min(self.per_batch[b], len(m)) for b, m in self.buckets.items())

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches()[self.skip_batches :]

    def __len__(self) -> int:
        full = sum(-(-len(m) // self.per_batch[b]) for b, m in self.buckets.items())
        return full - self.skip_batches


def training_sampler(lengths: np.ndarray, sides: np.ndarray, batch_size: int, tokens_per_step: int,
                     seed: int) -> LengthBucketSampler | TokenBudgetSampler:
    """The training run's sampler (global over processes: pass batch size and tokens times the
    number of processes): examples by the token budget when `tokens_per_step` > 0, else
    `batch_size` examples a step."""
    if tokens_per_step > 0:
        return TokenBudgetSampler(lengths, sides, tokens_per_step, seed)
    return LengthBucketSampler(lengths, batch_size, shuffle=True, seed=seed, sides=sides)


def describe_batches(sampler: LengthBucketSampler | TokenBudgetSampler, tokens_per_step: int) -> str:
    """What a training step takes, for the log: "up to N tokens (1-96 examples, 12.3 on average)"."""
    if not isinstance(sampler, TokenBudgetSampler):
        return str(sampler.batch_size)
    sizes = [len(b) for b in sampler.batches()]
    return (f"up to {tokens_per_step:,} tokens ({min(sizes)}-{max(sizes)} examples, "
            f"{np.mean(sizes):.1f} on average)")
