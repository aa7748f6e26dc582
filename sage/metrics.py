"""Scoring predicted grids against targets, and the trivial baselines every score is shown beside.

All pure functions on numpy grids. Exact match is the measure that counts in ARC; pixel accuracy
is only ever taken over the target's own cells (a padded canvas makes any predictor look good).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

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


def score_canvas(logits_or_tokens: np.ndarray, target: np.ndarray) -> GridScore:
    """Score a predicted token canvas [S, S] (already argmax-ed) against a target grid.

    Pixel accuracy reads the canvas cells inside the target's extent directly, so it is defined
    even when the decoded size is wrong.
    """
    tokens = logits_or_tokens
    h, w = target.shape
    cells = tokens[:h, :w].astype(np.int64) - COLOUR_OFFSET
    decoded = canvas_to_grid(tokens)
    exact_and_size = score_grid(decoded, target)
    return GridScore(
        exact=exact_and_size.exact,
        size_correct=exact_and_size.size_correct,
        pixels_correct=int((cells == target).sum()),
        pixels_total=h * w,
    )


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
