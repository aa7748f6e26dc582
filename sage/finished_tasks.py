"""Tasks an evaluation has finished, kept on disk as each one finishes, so that a killed or crashed
evaluation continues where it stopped (`evaluate.py --resume`) instead of starting over.

    <report folder>/finished_tasks/
        identity.json      what the answers depend on: checkpoint, split, views, seed, batch size,
                           precision, test-time training settings
        <task id>.pt       that task's outcome (attempts, votes, TTT stats), written atomically

An outcome is stored whole (every array with its dtype, every number as it was), so the resumed
run's submission.json and scores equal an uninterrupted run's. The files hold only tensors, lists,
dicts and plain values, read back with torch.load(weights_only=True): no pickled code runs, and
only the outcome's own dataclasses are rebuilt. They are read only with --resume and an identical
identity, and the folder goes once the report is written.
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sage.errors import EvaluationError
from sage.files import FileKind, atomic_write, first_line, load_tensors, read_json
from sage.predict import OutputPrediction, TaskOutcome, TaskPrediction
from sage.ttt import TTTStats
from sage.voting import Candidate

IDENTITY = "identity.json"
# Nothing is answered again, or removed, until the user says so: a damaged file is named and left as it is.
IDENTITY_FILE = FileKind("the settings the finished tasks were answered with", EvaluationError,
                         "they cannot be checked against this evaluation's: drop --resume to answer every task again "
                         "(this folder is then replaced)")
TASK_FILE = FileKind("a finished task's answers", EvaluationError,
                     "delete this file and rerun with --resume: only this task is answered again, the other finished "
                     "tasks are kept")


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
        atomic_write(self.directory / IDENTITY, json.dumps(self.identity, indent=1, sort_keys=True))
        return outcomes

    def _read(self) -> dict[str, TaskOutcome]:
        path = self.directory / IDENTITY
        if not path.is_file():
            return {}
        saved = read_json(path, IDENTITY_FILE, keys=())  # an object: its keys are compared below
        if saved != self.identity:
            changed = sorted(k for k in set(saved) | set(self.identity) if saved.get(k) != self.identity.get(k))
            raise EvaluationError(
                f"{self.directory}: --resume would mix answers made with other settings ({', '.join(changed)} "
                "differ); run the same command as before, or drop --resume to start over")
        return {file.stem: read_outcome(file) for file in sorted(self.directory.glob("*.pt"))}

    def add(self, task_id: str, outcome: TaskOutcome) -> None:
        buffer = io.BytesIO()
        torch.save(to_plain(outcome), buffer)
        atomic_write(self.directory / f"{task_id}.pt", buffer.getvalue())


def read_outcome(file: Path) -> TaskOutcome:
    """The outcome stored in `file`; a damaged file raises EvaluationError naming it."""
    plain = load_tensors(file, TASK_FILE, keys=("dataclass", "fields"))
    try:
        outcome = from_plain(plain)
    except (KeyError, TypeError, AttributeError) as e:  # readable, but not what `add` writes
        problem = f"corrupted, not a stored task outcome ({type(e).__name__}: {first_line(e)})"
        raise TASK_FILE.damaged(file, problem) from None
    if not isinstance(outcome, TaskOutcome):
        raise TASK_FILE.damaged(file, f"corrupted, it holds a {type(outcome).__name__}, not a task outcome")
    return outcome


# The dataclasses an outcome is made of: the only classes a file can name.
DATACLASSES = {cls.__name__: cls for cls in (TaskOutcome, TaskPrediction, OutputPrediction, Candidate, TTTStats)}


def to_plain(value: Any) -> Any:
    """`value` as tensors, lists, dicts and plain values, marked so that `from_plain` rebuilds it."""
    if is_dataclass(value):
        return {"dataclass": type(value).__name__,
                "fields": {f.name: to_plain(getattr(value, f.name)) for f in fields(value)}}
    if isinstance(value, np.ndarray):
        return {"ndarray": torch.from_numpy(value.copy(order="C"))}  # fresh strides: torch refuses negative ones
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return {"tuple": [to_plain(v) for v in value]}
    if isinstance(value, list):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {"dict": {k: to_plain(v) for k, v in value.items()}}
    return value  # tensors, str, int, float, bool, None


def from_plain(value: Any) -> Any:
    if isinstance(value, list):
        return [from_plain(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "dataclass" in value:
        return DATACLASSES[value["dataclass"]](**{k: from_plain(v) for k, v in value["fields"].items()})
    if "ndarray" in value:
        return value["ndarray"].numpy()
    if "tuple" in value:
        return tuple(from_plain(v) for v in value["tuple"])
    return {k: from_plain(v) for k, v in value["dict"].items()}
