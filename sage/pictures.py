"""Pictures of ARC grids: a task's test inputs, targets and attempts side by side, as PNG.

Colours are the standard ARC palette (the one the teacher's renders use); each panel's title says
its size and, for attempts, whether it is exactly right.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from sage.teacher.render import ARC_PALETTE


def _draw(ax, grid: np.ndarray, title: str, colour: str = "black") -> None:  # noqa: ANN001 - a matplotlib Axes
    ax.set_title(title, fontsize=8, color=colour)
    ax.set_xticks([])
    ax.set_yticks([])
    if grid.size == 0:
        ax.text(0.5, 0.5, "empty", ha="center", va="center", fontsize=8)
        return
    h, w = grid.shape
    ax.imshow(ARC_PALETTE[grid], interpolation="nearest", extent=(0, w, h, 0))
    # thin grey lines between cells, as on arcprize.org
    ax.set_xticks(np.arange(w + 1), minor=True)
    ax.set_yticks(np.arange(h + 1), minor=True)
    ax.grid(which="minor", color="#555555", linewidth=0.3)
    ax.tick_params(which="minor", length=0)


def draw_task(
    path: str | Path,
    task_id: str,
    inputs: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    attempts: Sequence[Sequence[np.ndarray]],
    title: str = "",
) -> Path:
    """One row per test input: input, target, attempt 1, attempt 2 (each marked right or wrong)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_attempts = max(len(a) for a in attempts)
    rows, cols = len(inputs), 2 + n_attempts
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows + 0.4), squeeze=False)
    for r, (grid_in, target, tries) in enumerate(zip(inputs, targets, attempts)):
        _draw(axes[r][0], grid_in, f"test {r} input {grid_in.shape[0]}x{grid_in.shape[1]}")
        _draw(axes[r][1], target, f"target {target.shape[0]}x{target.shape[1]}")
        for a in range(n_attempts):
            ax = axes[r][2 + a]
            if a >= len(tries):
                ax.axis("off")
                continue
            guess = np.asarray(tries[a])
            right = guess.shape == target.shape and bool((guess == target).all())
            size = f"{guess.shape[0]}x{guess.shape[1]}" if guess.ndim == 2 else "?"
            _draw(ax, guess, f"attempt {a + 1} {size} {'RIGHT' if right else 'wrong'}",
                  "green" if right else "firebrick")
    fig.suptitle(title or task_id, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
