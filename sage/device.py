"""Where to run: `run.device` / `--device` strings to a torch.device."""

from __future__ import annotations

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
