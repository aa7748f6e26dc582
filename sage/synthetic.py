"""Deterministic synthetic ARC-format tasks: small grids under simple, inferable transformations.

Each task draws one transformation and applies it to random grids; the demonstrations show it, the
test pair asks for it. A model can only score above the copy-the-input and most-frequent-colour
baselines by reading the demonstrations, which makes these tasks a quick proof that training works.
Task i depends only on (seed, i), so growing `num_tasks` never changes the earlier tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from sage.arc import NUM_COLOURS, Augmentation, Pair, Task

RULE_CODE_DIM = 8 + NUM_COLOURS * NUM_COLOURS  # one-hot dihedral transform, one-hot colour table


@dataclass(frozen=True)
class Rule:
    """A synthetic task's hidden rule: output = colours[dihedral(input)].

    `dihedral` is one of the 8 dihedral transforms in sage.arc.Augmentation's numbering; `colours`
    maps each input colour (after the transform) to its output colour. Every family below is one
    of these: flips, rotations and transpose change only the dihedral, colour swaps, recolouring and
    filling only the colour table. The oracle teacher (sage/teacher/oracle.py) encodes this."""

    dihedral: int = 0
    colours: tuple[int, ...] = tuple(range(NUM_COLOURS))

    def apply(self, grid: np.ndarray) -> np.ndarray:
        return np.asarray(self.colours, dtype=np.uint8)[Augmentation(self.dihedral).apply(grid)]

    def under(self, aug: Augmentation) -> "Rule":
        """The rule of the same task seen through `aug` (applied to every grid): if
        output = colours[D(input)], then aug(output) = colours'[D'(aug(input))] with
        D' = E D E^-1 (E: aug's dihedral) and colours' = p colours p^-1 (p: aug's colour map)."""
        spatial = Augmentation(aug.dihedral)
        probe = np.arange(6, dtype=np.uint8).reshape(2, 3)  # no symmetry: tells all 8 transforms apart
        moved = spatial.apply(Augmentation(self.dihedral).apply(spatial.invert(probe)))
        (dihedral,) = [d for d in range(8) if np.array_equal(Augmentation(d).apply(probe), moved)]
        p = aug.colours
        inverse = np.argsort(np.asarray(p))
        return Rule(dihedral, tuple(int(p[self.colours[int(inverse[c])]]) for c in range(NUM_COLOURS)))

    def code(self) -> np.ndarray:
        """[8 + 100] float32: one-hot of the dihedral, then the one-hot colour table (row c: colour c's output)."""
        out = np.zeros(RULE_CODE_DIM, dtype=np.float32)
        out[self.dihedral] = 1.0
        out[8 + np.arange(NUM_COLOURS) * NUM_COLOURS + np.asarray(self.colours)] = 1.0
        return out


def _geometric(dihedral: int) -> Callable[[np.random.Generator], Rule]:
    return lambda rng: Rule(dihedral)


def _colour_map(rng: np.random.Generator) -> Rule:
    """Swap two colours (a task-specific pair); all other cells unchanged."""
    a, b = (rng.permutation(9) + 1)[:2]
    table = list(range(NUM_COLOURS))
    table[a], table[b] = int(b), int(a)
    return Rule(colours=tuple(table))


def _recolour(rng: np.random.Generator) -> Rule:
    """Paint every non-background cell one task-specific colour."""
    colour = int(rng.integers(1, 10))
    return Rule(colours=(0,) + (colour,) * 9)


def _fill_background(rng: np.random.Generator) -> Rule:
    """Paint every background (0) cell one task-specific colour; the rest unchanged."""
    colour = int(rng.integers(1, 10))
    return Rule(colours=(colour,) + tuple(range(1, NUM_COLOURS)))


# Each family draws its task's rule (its parameters) from the task's random stream. Dihedral numbers
# as in sage.arc.Augmentation: rotate counter-clockwise d % 4 times, then transpose if d >= 4.
TRANSFORMS: dict[str, Callable[[np.random.Generator], Rule]] = {
    "flip_lr": _geometric(5),
    "flip_ud": _geometric(7),
    "rot90": _geometric(1),
    "rot180": _geometric(2),
    "transpose": _geometric(4),
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


def generate_task_and_rule(
    seed: int,
    index: int,
    transforms: Sequence[str] = tuple(TRANSFORMS),
    min_side: int = 3,
    max_side: int = 6,
    demos: int = 3,
) -> tuple[Task, Rule]:
    """Task `index` of the stream `seed`, and the hidden rule its pairs follow."""
    rng = np.random.default_rng([seed, index])
    name = transforms[int(rng.integers(len(transforms)))]
    rule = TRANSFORMS[name](rng)
    pairs = []
    for _ in range(demos + 1):
        grid = random_grid(rng, min_side, max_side)
        pairs.append(Pair(grid, rule.apply(grid)))
    task = Task(f"syn{seed}-{index:05d}-{name}", tuple(pairs[:-1]), tuple(pairs[-1:]), f"synthetic seed {seed}")
    return task, rule


def generate_task(seed: int, index: int, transforms: Sequence[str] = tuple(TRANSFORMS), min_side: int = 3,
                  max_side: int = 6, demos: int = 3) -> Task:
    return generate_task_and_rule(seed, index, transforms, min_side, max_side, demos)[0]


def generate_tasks_and_rules(
    num_tasks: int = 1000,
    seed: int = 0,
    transforms: Sequence[str] = tuple(TRANSFORMS),
    min_side: int = 3,
    max_side: int = 6,
    demos: int = 3,
) -> list[tuple[Task, Rule]]:
    unknown = sorted(set(transforms) - set(TRANSFORMS))
    if unknown:
        raise ValueError(f"unknown synthetic transforms {unknown}; choose from {sorted(TRANSFORMS)}")
    if not 1 <= min_side <= max_side <= 30:
        raise ValueError(f"need 1 <= min_side <= max_side <= 30, got {min_side}, {max_side}")
    return [generate_task_and_rule(seed, i, tuple(transforms), min_side, max_side, demos) for i in range(num_tasks)]


def generate_tasks(**options) -> list[Task]:
    """The tasks of `generate_tasks_and_rules(**options)` (num_tasks, seed, transforms, min_side, max_side, demos)."""
    return [task for task, _ in generate_tasks_and_rules(**options)]
