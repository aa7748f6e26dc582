"""Pictures of ARC tasks as PNG: the demonstration pairs (the rule), then one row per test input
with its target and the attempts.

Colours are the standard ARC palette (the one the teacher's renders use); each panel's title says
its size and, for attempts, whether it is exactly right (title and frame green when right, red when
wrong).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from sage.teacher.render import ARC_PALETTE

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PANEL_INCHES = 2.3  # at 100 dpi a 30x30 grid gets ~6 pixels a cell: its cells stay countable
RIGHT, WRONG = "green", "firebrick"


def _draw(ax: Axes, grid: np.ndarray, title: str, colour: str = "black", frame: str | None = None) -> None:
    ax.set_title(title, fontsize=8, color=colour)
    ax.set_xticks([])
    ax.set_yticks([])
    if frame is not None:
        for spine in ax.spines.values():
            spine.set(color=frame, linewidth=2.5)
    if grid.ndim != 2 or grid.size == 0:
        ax.text(0.5, 0.5, "empty", ha="center", va="center", fontsize=8)
        return
    h, w = grid.shape
    ax.imshow(ARC_PALETTE[grid], interpolation="nearest", extent=(0, w, h, 0))
    # thin grey lines between cells, as on arcprize.org (one collection each: ticks would be slow)
    ax.vlines(np.arange(1, w), 0, h, color="#555555", linewidth=0.3)
    ax.hlines(np.arange(1, h), 0, w, color="#555555", linewidth=0.3)


def _size(grid: np.ndarray) -> str:
    return f"{grid.shape[0]}x{grid.shape[1]}" if grid.ndim == 2 else "?"


def task_figure(
    task_id: str,
    inputs: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    attempts: Sequence[Sequence[np.ndarray]],
    title: str = "",
    demos: Sequence[tuple[np.ndarray, np.ndarray]] = (),
) -> Figure:
    """Demonstration pairs on top (input, output; as many pairs a row as fit the test rows' width),
    then one row per test input: input, target, attempt 1, attempt 2 (each marked right or wrong)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    cols = 2 + max((len(a) for a in attempts), default=0)
    pairs_per_row = max(cols // 2, 1)
    demo_rows = -(-len(demos) // pairs_per_row)
    test_rows = len(inputs)
    fig = Figure(figsize=(PANEL_INCHES * cols, PANEL_INCHES * (demo_rows + test_rows) + 0.8), layout="constrained")
    parts = fig.subfigures(2, 1, height_ratios=[demo_rows, test_rows]) if demo_rows else [None, fig]
    if demo_rows:
        panels = parts[0].subplots(demo_rows, 2 * pairs_per_row, squeeze=False)
        for i in range(demo_rows * pairs_per_row):
            ax_in, ax_out = panels[i // pairs_per_row][2 * (i % pairs_per_row):2 * (i % pairs_per_row) + 2]
            if i >= len(demos):
                ax_in.axis("off")
                ax_out.axis("off")
                continue
            grid_in, grid_out = (np.asarray(g) for g in demos[i])
            _draw(ax_in, grid_in, f"demo {i + 1} input {_size(grid_in)}")
            _draw(ax_out, grid_out, f"demo {i + 1} output {_size(grid_out)}")
        parts[0].suptitle(f"{len(demos)} demonstration{'s' if len(demos) != 1 else ''} (input, output)",
                          fontsize=9, x=0.01, ha="left")
        parts[0].set_facecolor("#f2f2f2")  # sets the examples apart from the test below
    panels = parts[1].subplots(test_rows, cols, squeeze=False)
    for r, (grid_in, target, tries) in enumerate(zip(inputs, targets, attempts)):
        _draw(panels[r][0], grid_in, f"test {r + 1} input {_size(grid_in)}")
        _draw(panels[r][1], target, f"target {_size(target)}")
        for a in range(cols - 2):
            ax = panels[r][2 + a]
            if a >= len(tries):
                ax.axis("off")
                continue
            guess = np.asarray(tries[a])
            right = guess.shape == target.shape and bool((guess == target).all())
            _draw(ax, guess, f"attempt {a + 1} {_size(guess)} {'RIGHT' if right else 'wrong'}",
                  RIGHT if right else WRONG, frame=RIGHT if right else WRONG)
    fig.suptitle(title or task_id, fontsize=11)
    return fig


def draw_task(
    path: str | Path,
    task_id: str,
    inputs: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    attempts: Sequence[Sequence[np.ndarray]],
    title: str = "",
    demos: Sequence[tuple[np.ndarray, np.ndarray]] = (),
) -> Path:
    """task_figure as a PNG at `path`."""
    path = Path(path)
    task_figure(task_id, inputs, targets, attempts, title, demos).savefig(path, dpi=100)
    return path
