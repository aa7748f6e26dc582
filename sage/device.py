"""Where to run: `run.device` / `--device` strings to a torch.device; memory between phases."""

from __future__ import annotations

import gc
import re
from typing import Callable

import torch

from sage.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda', 'cuda:N'; a clear error for CUDA
    without a GPU rather than a failure deep inside the first forward pass."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"run.device '{name}' is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device is '{name}' but no CUDA device is available (use run.device=cpu or auto)")
    return device


# release_cached_memory's log line, for whoever reads a log back (benchmarks/gpu_check.py):
# (the phase that ended, GiB reserved before, GiB reserved after).
MEMORY_LINE = re.compile(r"memory after (.+?): ([\d.]+) GiB reserved -> ([\d.]+) GiB")


def has_native_bf16(device: torch.device) -> bool:
    """bf16 matmuls in hardware: CUDA GPUs from Ampere on (V100 and T4 only emulate them, slower
    than fp32). `auto` keeps CPUs in fp32 whatever they have (run.precision=bf16 opts in)."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def release_cached_memory(device: torch.device, after: str, log: Callable[[str], None]) -> tuple[int, int] | None:
    """Between phases on CUDA: what the last phase left in PyTorch's caching allocator (a 3B
    teacher's weights and activations, training's activations) goes back to the card, and the log
    says how much was reserved before and after (`after`: the phase that ended). (bytes reserved
    before, after); None on a CPU, which has no such cache."""
    if device.type != "cuda":
        return None
    gc.collect()  # a phase's tensors held only by reference cycles are freed before the cache is emptied
    before = torch.cuda.memory_reserved(device)
    torch.cuda.empty_cache()
    now = torch.cuda.memory_reserved(device)
    log(memory_line(after, before, now, torch.cuda.memory_allocated(device)))
    return before, now


def memory_line(after: str, reserved_before: int, reserved_now: int, in_use: int) -> str:
    """release_cached_memory's log line (bytes in, GiB out); MEMORY_LINE reads it back."""
    return (f"memory after {after}: {reserved_before / 2**30:.2f} GiB reserved -> {reserved_now / 2**30:.2f} GiB "
            f"({in_use / 2**30:.2f} GiB in use)")
