"""Deterministic synthetic ARC-format tasks: small grids under simple, inferable transformations.

Each task draws one transformation and applies it to random grids; the demonstrations show it, the
test pair asks for it. A model can only score above the copy-the-input and most-frequent-colour
baselines by reading the demonstrations, which makes these tasks a quick proof that training works.
Task i depends only on (seed, i), so growing `num_tasks` never changes the earlier tasks.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from sage.arc import Pair, Task

Transform = Callable[[np.ndarray], np.ndarray]


def _geometric(fn: Transform) -> Callable[[np.random.Generator], Transform]:
    return lambda rng: fn


def _colour_map(rng: np.random.Generator) -> Transform:
    """Swap two colours (a task-specific pair); all other cells unchanged."""
    a, b = (rng.permutation(9) + 1)[:2]
    table = np.arange(10, dtype=np.uint8)
    table[a], table[b] = b, a
    return lambda g: table[g]


def _recolour(rng: np.random.Generator) -> Transform:
    """Paint every non-background cell one task-specific colour."""
    colour = np.uint8(rng.integers(1, 10))
    return lambda g: np.where(g > 0, colour, 0).astype(np.uint8)


def _fill_background(rng: np.random.Generator) -> Transform:
    """Paint every background (0) cell one task-specific colour; the rest unchanged."""
    colour = np.uint8(rng.integers(1, 10))
    return lambda g: np.where(g == 0, colour, g).astype(np.uint8)


TRANSFORMS: dict[str, Callable[[np.random.Generator], Transform]] = {
    "flip_lr": _geometric(np.fliplr),
    "flip_ud": _geometric(np.flipud),
    "rot90": _geometric(lambda g: np.rot90(g, 1)),
    "rot180": _geometric(lambda g: np.rot90(g, 2)),
    "transpose": _geometric(lambda g: g.T),
    "colour_swap": _colour_map,
    "recolour": _recolour,
    "fill_background": _fill_background,
}


def random_grid(rng: np.random.Generator, min_side: int, max_side: int) -> np.ndarray:
    h, w = rng.integers(min_side, max_side + 1, size=2)
    palette = rng.permutation(9)[: int(rng.integers(2, 5))] + 1
    density = rng.uniform(0.3, 0.7)
    cells = rng.choice(palette, size=(h, w))
    return np.where(rng.random((h, w)) < density, cells, 0).astype(np.uint8)


def generate_task(
    seed: int,
    index: int,
    transforms: Sequence[str] = tuple(TRANSFORMS),
    min_side: int = 3,
    max_side: int = 6,
    demos: int = 3,
) -> Task:
    rng = np.random.default_rng([seed, index])
    name = transforms[int(rng.integers(len(transforms)))]
    fn = TRANSFORMS[name](rng)
    pairs = []
    for _ in range(demos + 1):
        grid = random_grid(rng, min_side, max_side)
        pairs.append(Pair(grid, np.ascontiguousarray(fn(grid))))
    return Task(f"syn{seed}-{index:05d}-{name}", tuple(pairs[:-1]), tuple(pairs[-1:]), f"synthetic seed {seed}")


def generate_tasks(
    num_tasks: int = 1000,
    seed: int = 0,
    transforms: Sequence[str] = tuple(TRANSFORMS),
    min_side: int = 3,
    max_side: int = 6,
    demos: int = 3,
) -> list[Task]:
    unknown = sorted(set(transforms) - set(TRANSFORMS))
    if unknown:
        raise ValueError(f"unknown synthetic transforms {unknown}; choose from {sorted(TRANSFORMS)}")
    if not 1 <= min_side <= max_side <= 30:
        raise ValueError(f"need 1 <= min_side <= max_side <= 30, got {min_side}, {max_side}")
    return [generate_task(seed, i, tuple(transforms), min_side, max_side, demos) for i in range(num_tasks)]
