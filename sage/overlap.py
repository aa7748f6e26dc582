"""What a model trained on of the tasks it is scored on, checked pair by pair.

Checking task ids (or whole tasks) is not enough: HRM/TRM train on the evaluation tasks'
demonstrations repackaged as tasks under new ids, and a task with its pairs reordered, rotated or
put inside another task is still the same data. So every pair of every training task (train and
test pairs alike) is indexed under a canonical form that ignores the 8 dihedral transforms (the same
transform for both grids of a pair), and each evaluated task is classified:

  whole task           its id is a training task's id, or one of its test pairs (input and output)
                       is a training pair: the model saw the answer. Left out of scoring and named;
                       more than MAX_SHARED_SHARE of a split such is refused (not a held-out set).
  demonstrations only  some demonstration pair is a training pair, no test pair is: the HRM/TRM
                       protocol. Scored, and the report says "trained on the evaluation tasks'
                       demonstrations" (not SAGE's default protocol) and names the tasks.
  test input           a test input is the input of a training pair whose output differs: the model
                       never saw the answer, and small grids (1x1, all zeros) coincide by chance.
                       Scored and named.

Colour permutations are not undone: a repackaged pair with its colours permuted is not found.
ARC-AGI-1 training vs evaluation: 070dd51e (= training 40853293) is a whole task; nothing else.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from sage.arc import Pair, Task
from sage.errors import ARCDataError

WHOLE_TASK = "whole task"
DEMONSTRATIONS = "demonstrations only"
TEST_INPUT = "test input"

# A held-out set whose test outputs were trained on for more than this share of its tasks is not
# held out (e.g. ARC-AGI-2 training holds 376 of ARC-AGI-1's 400 evaluation tasks): refused. Below
# it, such tasks are a data-set quirk (ARC-AGI-1 evaluation task 070dd51e is training task 40853293
# grid for grid): they are left out, by name, in the log or report.
MAX_SHARED_SHARE = 0.05

GridKey = tuple[tuple[int, ...], bytes]
PairKey = tuple[GridKey, GridKey]


@dataclass(frozen=True)
class TaskOverlap:
    """What one evaluated task shares with the training data."""

    task: str
    kinds: tuple[str, ...]  # WHOLE_TASK, DEMONSTRATIONS and/or TEST_INPUT, most severe first
    training_tasks: tuple[str, ...]  # the training tasks holding the shared pairs / grids
    pairs: tuple[str, ...]  # the evaluated task's shared parts: "id", "train 1", "test 0", "test 0 input"

    @property
    def kind(self) -> str:
        return self.kinds[0]

    @property
    def saw_test_outputs(self) -> bool:
        return self.kind == WHOLE_TASK

    def as_dict(self) -> dict[str, Any]:
        return {"task": self.task, "kind": self.kind, "kinds": list(self.kinds),
                "training_tasks": list(self.training_tasks), "pairs": list(self.pairs)}


def _views(grid: np.ndarray) -> list[GridKey]:
    """The grid under each of the 8 dihedral transforms, as hashable (shape, bytes)."""
    out = []
    for k in range(4):
        r = np.rot90(grid, k)
        out += [(r.shape, r.tobytes()), (r.T.shape, r.T.tobytes())]
    return out


def grid_key(grid: np.ndarray) -> GridKey:
    """Equal for two grids exactly when one is a dihedral transform of the other."""
    return min(_views(grid))


def pair_key(pair: Pair) -> PairKey:
    """Equal for two pairs exactly when one transform maps both grids of one onto the other's."""
    return min(zip(_views(pair.input), _views(pair.output)))


def _index(training: Iterable[Task]) -> tuple[set[str], dict[PairKey, set[str]], dict[GridKey, set[str]]]:
    """Training task ids, and the training tasks holding each canonical pair and input grid."""
    ids: set[str] = set()
    pairs: dict[PairKey, set[str]] = defaultdict(set)
    inputs: dict[GridKey, set[str]] = defaultdict(set)
    for t in training:
        ids.add(t.id)
        for p in t.train + t.test:
            if p.output is not None:  # a hidden test output was never trained on
                pairs[pair_key(p)].add(t.id)
            inputs[grid_key(p.input)].add(t.id)
    return ids, pairs, inputs


def find_overlap(training: Sequence[Task], evaluated: Sequence[Task]) -> list[TaskOverlap]:
    """Every evaluated task that shares its id, a pair or a test input with `training`, in order."""
    ids, pairs, inputs = _index(training)
    found = []
    for t in evaluated:
        hits: list[tuple[str, str, set[str]]] = []  # (kind, part, training tasks)
        if t.id in ids:
            hits.append((WHOLE_TASK, "id", {t.id}))
        for i, p in enumerate(t.train):
            if (k := pair_key(p)) in pairs:
                hits.append((DEMONSTRATIONS, f"train {i}", pairs[k]))
        for i, p in enumerate(t.test):
            if p.output is not None and (k := pair_key(p)) in pairs:
                hits.append((WHOLE_TASK, f"test {i}", pairs[k]))
            elif (k := grid_key(p.input)) in inputs:
                hits.append((TEST_INPUT, f"test {i} input", inputs[k]))
        kinds = [k for k in (WHOLE_TASK, DEMONSTRATIONS, TEST_INPUT) if any(h[0] == k for h in hits)]
        if WHOLE_TASK in kinds and DEMONSTRATIONS in kinds:
            kinds.remove(DEMONSTRATIONS)  # "demonstrations only" no longer holds
        if hits:
            holders = sorted(set().union(*(h[2] for h in hits)))
            found.append(TaskOverlap(t.id, tuple(kinds), tuple(holders), tuple(h[1] for h in hits)))
    return found


def describe(overlaps: Sequence[TaskOverlap | dict[str, Any]], limit: int = 10) -> str:
    """'070dd51e (whole task: id, test 0; training 40853293), ...' for logs, notes and reports."""
    items = [o.as_dict() if isinstance(o, TaskOverlap) else o for o in overlaps]
    text = []
    for o in items[:limit]:
        holders = o["training_tasks"]
        named = ", ".join(holders[:3]) + (f" and {len(holders) - 3} more" if len(holders) > 3 else "")
        text.append(f"{o['task']} ({' + '.join(o['kinds'])}: {', '.join(o['pairs'])}; training {named})")
    more = f", and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(text) + more


def drop_trained_tasks(
    training: Sequence[Task], evaluated: Sequence[Task], what: str
) -> tuple[list[Task], list[TaskOverlap], list[TaskOverlap]]:
    """(the evaluated tasks that may be scored, the whole-task overlaps left out, the overlaps kept).

    Raises ARCDataError when more than MAX_SHARED_SHARE of `evaluated` saw their test outputs in
    training: such a set is not held out."""
    overlap = find_overlap(training, evaluated)
    left_out = [o for o in overlap if o.saw_test_outputs]
    if len(left_out) > MAX_SHARED_SHARE * len(evaluated):
        raise ARCDataError(
            f"{len(left_out)} of the {len(evaluated)} {what} tasks are training tasks or had a test pair among the "
            f"training pairs (more than {MAX_SHARED_SHARE:.0%}; e.g. {describe(left_out[:1])}"
            + (f": '{left_out[0].task}' is also a training task" if "id" in left_out[0].pairs else "")
            + "). Choose a held-out set disjoint from training (ARC-AGI-2 training contains most ARC-AGI-1 "
            "evaluation tasks)"
        )
    dropped = {o.task for o in left_out}
    return [t for t in evaluated if t.id not in dropped], left_out, [o for o in overlap if not o.saw_test_outputs]
