"""Checkpoints: a directory per checkpoint, written atomically, loaded without pickle.

    checkpoints/<run>/<name>/
        model.safetensors     weights (safetensors: no code execution on load)
        training_state.pt     optimiser state and RNG states (torch.load with weights_only=True)
        meta.json             resolved config, step, epoch, metrics, best-so-far: human readable

A checkpoint is written into a temporary sibling directory and renamed into place, so a crash at
any moment leaves the previous checkpoint intact and loadable (a crash between moving the old one
aside and renaming the new one in is repaired on the next load or save).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sage.errors import CheckpointError
from sage.files import FileKind, first_line, load_tensors, read_json

WEIGHTS, STATE, META = "model.safetensors", "training_state.pt", "meta.json"

# A damaged file spoils its checkpoint only: the run's other checkpoints are whole (each is written apart).
DAMAGED_CHECKPOINT_FIX = ("this checkpoint is damaged: evaluate or resume from another of the run (best, last, "
                          "epoch_N; to resume from one, copy its folder over last), or train again")
CHECKPOINT_META = FileKind("the checkpoint's metadata", CheckpointError, DAMAGED_CHECKPOINT_FIX)
CHECKPOINT_WEIGHTS = FileKind("weights", CheckpointError, DAMAGED_CHECKPOINT_FIX)
CHECKPOINT_STATE = FileKind("training state", CheckpointError, DAMAGED_CHECKPOINT_FIX)


@dataclass
class Checkpoint:
    path: Path
    meta: dict[str, Any]
    weights: dict[str, torch.Tensor]
    training_state: dict[str, Any] | None  # None when loaded for inference only


def _left_by_dead_process(path: Path) -> bool:
    """Temporary names end in the writer's pid; a live writer (another run, or an evaluation
    loading while training saves) must be left alone."""
    try:
        pid = int(path.name.rsplit("-", 1)[1])
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError):
        return True
    except PermissionError:
        return False
    return pid == os.getpid()


def recover_interrupted_save(directory: Path) -> None:
    """A save killed between its two renames leaves the previous checkpoint as `.NAME.old-PID` and
    no NAME: put it back. Leftovers of killed saves are removed."""
    for tmp in directory.parent.glob(f".{directory.name}.tmp-*"):
        if _left_by_dead_process(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    olds = [p for p in directory.parent.glob(f".{directory.name}.old-*") if _left_by_dead_process(p)]
    olds.sort(key=lambda p: p.stat().st_mtime)
    if not directory.exists() and olds:
        olds.pop().rename(directory)
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    directory: str | Path, weights: dict[str, torch.Tensor], training_state: dict[str, Any], meta: dict[str, Any]
) -> Path:
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_save(directory)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / WEIGHTS)
    torch.save(training_state, tmp / STATE)
    (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
    for f in tmp.iterdir():  # durable before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def load_checkpoint(directory: str | Path, with_training_state: bool = True, meta_keys: Sequence[str] = (),
                    state_keys: Sequence[str] = ()) -> Checkpoint:
    """The checkpoint in `directory`, whose meta.json must hold `meta_keys` and (`with_training_state`)
    training_state.pt `state_keys`. A missing, truncated or corrupted file raises CheckpointError
    naming it."""
    directory = Path(directory)
    if directory.parent.is_dir():
        recover_interrupted_save(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no checkpoint here (expected a directory with {WEIGHTS} and {META})")
    for name in (WEIGHTS, META) + ((STATE,) if with_training_state else ()):
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory}: incomplete checkpoint, {name} is missing")
    meta = read_json(directory / META, CHECKPOINT_META, meta_keys)
    try:
        weights = load_file(directory / WEIGHTS)
    except (SafetensorError, OSError, ValueError) as e:
        raise CHECKPOINT_WEIGHTS.damaged(directory / WEIGHTS, f"truncated or corrupted ({first_line(e)})") from None
    state = load_tensors(directory / STATE, CHECKPOINT_STATE, state_keys) if with_training_state else None
    return Checkpoint(directory, meta, weights, state)


def load_weights_into(model: torch.nn.Module, checkpoint: Checkpoint) -> None:
    """Strict load with a readable error when the checkpoint's model config differs from `model`'s."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(checkpoint.weights))
    unexpected = sorted(set(checkpoint.weights) - set(expected))
    mismatched = [k for k in expected if k in checkpoint.weights and checkpoint.weights[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        details = []
        if missing:
            details.append(f"missing {missing[:3]}")
        if unexpected:
            details.append(f"unexpected {unexpected[:3]}")
        if mismatched:
            k = mismatched[0]
            details.append(f"shape of {k}: checkpoint {tuple(checkpoint.weights[k].shape)} vs model {tuple(expected[k].shape)}")
        raise CheckpointError(
            f"{checkpoint.path}: weights do not fit this model config ({'; '.join(details)}). "
            "Use the model section the checkpoint was trained with (meta.json: config.model)."
        )
    model.load_state_dict(checkpoint.weights)
