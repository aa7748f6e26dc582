"""Recovering from what goes wrong in a long run: out of memory, non-finite numbers, and the
fault injection that lets tests (and users) exercise both on a CPU.

Out of memory: the phase (train or validation) halves the number of examples it pushes through the
model at once and retries the batch. Training accumulates gradients over the smaller pieces, so an
optimiser step still sees the configured batch; validation sums its metrics, so they are unchanged.
The halved size is kept for the rest of the run (and across --resume). Under torchrun every process
learns of an out-of-memory error on any of them and all halve together (sage/step.py); memory is
released after leaving the `except` block, whose traceback still holds the interrupted activations.
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

    def __init__(self, phase: str, batch_size: int, size: int | None, log: Callable[[str], None],
                 accumulates: bool | None = None, scope: str = "the rest of the run") -> None:
        self.phase, self.batch_size, self.log, self.scope = phase, batch_size, log, scope
        self.accumulates = phase == "training" if accumulates is None else accumulates  # gradients over pieces
        self.size = self.start = min(size or batch_size, batch_size)

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
                 f"{' by accumulating gradients' if self.accumulates else ''}) for {self.scope}")

    @property
    def halved_size(self) -> int:
        """Examples per pass after out-of-memory halvings; 0 while never halved."""
        return self.size if self.size < self.start else 0

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


FAULT_PATTERN = re.compile(r"^(oom):(train|val|ttt):(\d+)(?:@(\d+))?$|^(nan):(train):(\d+)(?:@(\d+))?$")
DELAY_PATTERN = re.compile(r"^delay:extract:(\d+(?:\.\d+)?)$")
FAULT_FORMS = ("oom:train:N, oom:val:N, oom:ttt:N or nan:train:N (each optionally @R: rank R only), "
               "or delay:extract:SECONDS")


@dataclass
class FaultInjection:
    """Simulated failures, for testing recovery where the real thing cannot be provoked (CPU):
    "oom:train:N" raises out-of-memory on the Nth training forward pass of every process, "oom:val:N"
    on the Nth validation forward pass, "oom:ttt:N" on the Nth of test-time training, "nan:train:N" makes the loss of the Nth training forward
    pass NaN; a suffix "@R" (oom:train:N@R) limits the fault to the process of rank R under torchrun.
    Counts start at 1 and include retries. "delay:extract:S" makes the teacher extraction before
    training S seconds slower (the other processes' wait for it must not time out)."""

    # (pass number, rank or None for every rank)
    oom: dict[str, set[tuple[int, int | None]]] = field(
        default_factory=lambda: {"train": set(), "val": set(), "ttt": set()})
    nan: set[tuple[int, int | None]] = field(default_factory=set)
    passes: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0, "ttt": 0})
    rank: int = 0  # this process's rank (set by the training loop)
    extraction_delay: float = 0.0  # seconds

    @classmethod
    def parse(cls, specs: list[str]) -> "FaultInjection":
        faults = cls()
        for spec in specs:
            if delay := DELAY_PATTERN.match(spec):
                faults.extraction_delay += float(delay.group(1))
                continue
            match = FAULT_PATTERN.match(spec)
            if not match:
                raise ValueError(f"--inject-fault {spec!r}: expected {FAULT_FORMS}")
            kind, phase, n, rank = match.groups()[:4] if match.group(1) else match.groups()[4:]
            fault = (int(n), None if rank is None else int(rank))
            (faults.oom[phase] if kind == "oom" else faults.nan).add(fault)
        return faults

    def _hits(self, faults: set[tuple[int, int | None]], n: int) -> bool:
        return (n, None) in faults or (n, self.rank) in faults

    def forward_pass(self, phase: str) -> bool:
        """Call before each forward pass; raises the injected out-of-memory error, and returns True
        when this pass's loss should be made NaN."""
        self.passes[phase] += 1
        n = self.passes[phase]
        if self._hits(self.oom[phase], n):
            raise torch.OutOfMemoryError(f"injected out-of-memory error ({phase} forward pass {n}, rank {self.rank})")
        return phase == "train" and self._hits(self.nan, n)
