"""Recovering from what goes wrong in a long run: out of memory, non-finite numbers, and the
fault injection that lets tests (and users) exercise both on a CPU.

Out of memory: the phase (train or validation) halves the number of examples it pushes through the
model at once and retries the batch. Training accumulates gradients over the smaller pieces, so an
optimiser step still sees the configured batch; validation sums its metrics, so they are unchanged.
The halved size is kept for the rest of the run (and across --resume).
"""

from __future__ import annotations

import gc
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from sage.errors import TrainingError


class MicroBatch:
    """How many examples of one phase's batch go through the model at once. Starts at the phase's
    batch size; `halve()` after an out-of-memory error."""

    def __init__(self, phase: str, batch_size: int, size: int | None, log: Callable[[str], None]) -> None:
        self.phase, self.batch_size, self.log = phase, batch_size, log
        self.size = size or batch_size

    def halve(self, where: str) -> None:
        if self.size == 1:
            raise TrainingError(
                f"out of memory in {self.phase} at {where} with one example per forward pass: the model does not fit. "
                f"Use a smaller model (model.d_model, layers), shorter contexts (data.max_context_tokens, "
                f"model.max_demos), or a device with more memory"
            )
        old, self.size = self.size, self.size // 2
        self.log(f"out of memory in {self.phase} at {where}: {self.phase} now runs {self.size} examples per "
                 f"forward pass instead of {old} (batch size {self.batch_size} kept"
                 f"{' by accumulating gradients' if self.phase == 'training' else ''}) for the rest of the run")

    def pieces(self, batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """`batch` split along its first dimension into pieces of at most `size` examples."""
        n = next(iter(batch.values())).shape[0]
        if self.size >= n:
            return [batch]
        return [{k: v[i : i + self.size] for k, v in batch.items()} for i in range(0, n, self.size)]


def free_memory(device: torch.device) -> None:
    """Drop what an interrupted forward/backward pass left behind."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError)


def all_finite(tensors: Iterator[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


FAULT_PATTERN = re.compile(r"^(oom):(train|val):(\d+)$|^(nan):(train):(\d+)$")


@dataclass
class FaultInjection:
    """Simulated failures, for testing recovery where the real thing cannot be provoked (CPU):
    "oom:train:N" raises out-of-memory on the Nth training forward pass of this process, "oom:val:N"
    on the Nth validation forward pass, "nan:train:N" makes the loss of the Nth training forward
    pass NaN. Counts start at 1 and include retries."""

    oom: dict[str, set[int]] = field(default_factory=lambda: {"train": set(), "val": set()})
    nan: set[int] = field(default_factory=set)
    passes: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})

    @classmethod
    def parse(cls, specs: list[str]) -> "FaultInjection":
        faults = cls()
        for spec in specs:
            match = FAULT_PATTERN.match(spec)
            if not match:
                raise ValueError(f"--inject-fault {spec!r}: expected oom:train:N, oom:val:N or nan:train:N")
            kind, phase, n = [g for g in match.groups() if g is not None]
            (faults.oom[phase] if kind == "oom" else faults.nan).add(int(n))
        return faults

    def forward_pass(self, phase: str) -> bool:
        """Call before each forward pass; raises the injected out-of-memory error, and returns True
        when this pass's loss should be made NaN."""
        self.passes[phase] += 1
        n = self.passes[phase]
        if n in self.oom[phase]:
            raise torch.OutOfMemoryError(f"injected out-of-memory error ({phase} forward pass {n})")
        return phase == "train" and n in self.nan
