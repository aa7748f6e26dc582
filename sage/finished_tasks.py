"""Tasks an evaluation has finished, kept on disk as each one finishes, so that a killed or crashed
evaluation continues where it stopped (`evaluate.py --resume`) instead of starting over.

    <report folder>/finished_tasks/
        identity.json      what the answers depend on: checkpoint, split, views, seed, batch size,
                           precision, test-time training settings
        <task id>.pt       that task's outcome (attempts, votes, TTT stats), written atomically

An outcome is the very object an uninterrupted run computes, so the resumed run's submission.json
and scores equal an uninterrupted run's. The files are pickles the evaluation wrote itself into the
user's own report folder; they are read back only with --resume and an identical identity, and the
folder is removed once the report is written.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from sage.errors import EvaluationError
from sage.predict import TaskOutcome

IDENTITY = "identity.json"


class FinishedTasks:
    """The finished tasks of one evaluation, in `directory`."""

    def __init__(self, directory: str | Path, identity: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.identity = json.loads(json.dumps(identity, default=str))  # as it reads back from disk

    def start(self, resume: bool) -> dict[str, TaskOutcome]:
        """The outcomes to keep: with `resume`, those already on disk (refused when they were made
        with other settings); without, none (an earlier run's are removed)."""
        if not resume:
            shutil.rmtree(self.directory, ignore_errors=True)
        outcomes = self._read() if resume else {}
        self.directory.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.directory / IDENTITY, json.dumps(self.identity, indent=1, sort_keys=True).encode())
        return outcomes

    def _read(self) -> dict[str, TaskOutcome]:
        path = self.directory / IDENTITY
        if not path.is_file():
            return {}
        saved = json.loads(path.read_text())
        if saved != self.identity:
            changed = sorted(k for k in set(saved) | set(self.identity) if saved.get(k) != self.identity.get(k))
            raise EvaluationError(
                f"{self.directory}: --resume would mix answers made with other settings ({', '.join(changed)} "
                "differ); run the same command as before, or drop --resume to start over")
        outcomes = {}
        for file in sorted(self.directory.glob("*.pt")):
            outcomes[file.stem] = torch.load(file, weights_only=False)  # our own pickle, see the docstring
        return outcomes

    def add(self, task_id: str, outcome: TaskOutcome) -> None:
        path = self.directory / f"{task_id}.pt"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        torch.save(outcome, tmp)
        os.replace(tmp, path)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
