"""Attempts from augmentation voting: predict each augmented view, undo the augmentation, count votes.

    views(task_id, n, seed)    view 0 is the task as given; views 1..7 use the other 7 dihedral
                               transforms, later views repeat them; every view but 0 also permutes
                               colours 1..9. Deterministic in (seed, task_id).
    vote(predictions)          identical grids (shape and every cell) pool their votes; ranked by
                               votes, then mean confidence, then the earliest view that produced them
    ranked(candidates, rank)   rank "votes" as vote() does, or "likelihood": by the log-probability
                               summed over every view that each candidate's cells and border get
                               (sage.predict computes it), then votes
    attempts(ranked)           the top two grids are attempt 1 and attempt 2

Pure functions on numpy grids; the model that makes the predictions lives elsewhere.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from sage.arc import NUM_COLOURS, Augmentation

# Written to submission.json when a test input got no usable prediction at all (every view decoded
# to an empty grid, or the input does not fit the model's canvas): ARC Prize needs a grid per attempt.
PLACEHOLDER = np.zeros((1, 1), dtype=np.uint8)
RANKINGS = ("votes", "likelihood")  # how candidates become attempts (evaluate.py --rank)


def views(task_id: str, n_views: int, seed: int = 0, colours: bool = True) -> list[Augmentation]:
    """`n_views` augmentations for one task; the first is the identity (the task as given)."""
    if n_views < 1:
        raise ValueError(f"need at least one view, got {n_views}")
    rng = np.random.default_rng([seed, zlib.crc32(task_id.encode())])
    out = [Augmentation()]
    for v in range(1, n_views):
        perm = tuple([0] + (rng.permutation(NUM_COLOURS - 1) + 1).tolist()) if colours else tuple(range(NUM_COLOURS))
        out.append(Augmentation(dihedral=v % 8, colours=perm))
    return out


@dataclass(frozen=True)
class Candidate:
    grid: np.ndarray
    votes: int  # views whose (inverted) prediction is exactly this grid
    confidence: float  # mean over those views of their confidence (higher is surer)
    first_view: int  # earliest view that predicted it
    # Log-probability of this grid (its cells and the EOS border that fixes its size), summed over
    # every view the model answered, each in its own frame (-inf where it cannot fit; nan: not computed).
    likelihood: float = math.nan


def vote(predictions: Sequence[tuple[np.ndarray, float]]) -> list[Candidate]:
    """Rank the distinct grids among per-view (grid, confidence) predictions, best first.

    Empty (0x0) grids are not answers and get no candidate. Ties in votes go to the higher mean
    confidence, then to the earlier view (view 0 is the un-augmented task)."""
    groups: dict[tuple, list] = {}
    for view, (grid, confidence) in enumerate(predictions):
        grid = np.asarray(grid, dtype=np.uint8)
        if grid.size == 0:
            continue
        key = (grid.shape, grid.tobytes())
        if key not in groups:
            groups[key] = [grid, 0, 0.0, view]
        groups[key][1] += 1
        groups[key][2] += float(confidence)
    return ranked([Candidate(g, n, total / n, first) for g, n, total, first in groups.values()], "votes")


def ranked(candidates: Sequence[Candidate], rank: str) -> list[Candidate]:
    """The candidates best first by `rank` (RANKINGS); ties by votes, then the earliest view."""
    if rank == "votes":
        return sorted(candidates, key=lambda c: (-c.votes, -c.confidence, c.first_view))
    if rank == "likelihood":  # not computed (nan) ranks last
        return sorted(candidates, key=lambda c: (-c.likelihood if not math.isnan(c.likelihood) else math.inf,
                                                 -c.votes, c.first_view))
    raise ValueError(f"rank must be one of {', '.join(RANKINGS)}, got {rank!r}")


def attempts(ranked: Sequence[Candidate], k: int = 2) -> list[np.ndarray]:
    """The top `k` grids; when fewer distinct grids exist, the best one is repeated (a repeat can
    never score, it only fills the slot), and with none at all the PLACEHOLDER stands in."""
    grids = [c.grid for c in ranked[:k]]
    while len(grids) < k:
        grids.append(grids[0] if grids else PLACEHOLDER)
    return grids
