"""How far a score can be trusted: bootstrap intervals over tasks, and paired comparisons of two runs.

An ARC score is a mean over a few hundred tasks (or a few dozen held-out ones), and which tasks a
run happens to solve is partly luck: on the 36 held-out tasks the TTT seed alone moves two tasks.
So every score is given with a 95% percentile bootstrap interval over tasks (resample the tasks
with replacement, take the mean score, keep the middle 95% of those means), and two runs on the
same tasks are compared task by task (a paired bootstrap of the per-task differences), which is
far tighter than setting two unpaired intervals side by side: both runs share each task's
difficulty.

Pure numpy, deterministic (a fixed seed): the same scores always give the same interval, so a
report written twice says the same thing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from sage.errors import EvaluationError

CONFIDENCE = 0.95
RESAMPLES = 10_000
SEED = 0
# Resampled task indices held in memory at once (int64: 32 MB), whatever the number of tasks.
_BLOCK_ENTRIES = 4_000_000
METHOD = f"percentile bootstrap over tasks ({RESAMPLES:,} resamples, seed {SEED})"


class Interval(NamedTuple):
    """A confidence interval of a mean: unpacks as (low, high)."""

    low: float
    high: float


def _bootstrap_means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """The mean of `values` over `resamples` resamplings with replacement (same length)."""
    rng = np.random.default_rng(seed)
    n = len(values)
    block = max(1, _BLOCK_ENTRIES // n)
    means = [values[rng.integers(0, n, size=(min(block, resamples - done), n))].mean(axis=1)
             for done in range(0, resamples, block)]
    return np.concatenate(means)


def _percentile_interval(values: np.ndarray, confidence: float, resamples: int, seed: int) -> Interval:
    if len(values) == 0:
        raise ValueError("a bootstrap needs at least one task's score")
    if not np.isfinite(values).all():
        raise ValueError("per-task scores must be finite numbers")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    tail = (1 - confidence) / 2
    values = np.sort(values)  # the same scores in any order resample alike: the interval is the multiset's
    low, high = np.quantile(_bootstrap_means(values, resamples, seed), [tail, 1 - tail])
    # A mean of identical values (all zeros) must come back exact, not a rounding away from it.
    return Interval(float(np.clip(low, values.min(), values.max())), float(np.clip(high, values.min(), values.max())))


def bootstrap_interval(scores: Sequence[float], confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                       seed: int = SEED) -> Interval:
    """The percentile bootstrap interval of the mean of per-task scores (each in [0, 1], partial
    credit allowed: a task's fraction of test outputs solved).

    It says how much the score would move on another draw of tasks like these, the spread that
    decides whether two runs differ. With no task solved it is (0, 0): the bootstrap cannot bound a
    rate it never saw (for that, the rule of three: below 3/n at 95%)."""
    values = np.asarray(scores, dtype=np.float64)
    if values.size and ((values < 0) | (values > 1)).any():
        raise ValueError(f"per-task scores must lie in [0, 1] (fractions, not percentages); got "
                         f"{values[(values < 0) | (values > 1)][0]:g}")
    return _percentile_interval(values, confidence, resamples, seed)


def interval_record(scores: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """A score with its interval as report.json keeps it: {"score", "low", "high", "confidence",
    "tasks", "method"}."""
    low, high = bootstrap_interval(scores, confidence)
    return {"score": float(np.mean(scores)), "low": low, "high": high, "confidence": confidence,
            "tasks": len(scores), "method": METHOD}


def describe_interval(record: Mapping[str, Any]) -> str:
    """'95% CI 1.88-5.00%' from an interval_record."""
    return f"{record['confidence']:.0%} CI {100 * record['low']:.2f}-{100 * record['high']:.2f}%"


@dataclass(frozen=True)
class PairedComparison:
    """Two runs' per-task scores on the same tasks, task by task (A minus B)."""

    name_a: str
    name_b: str
    tasks: int
    mean_a: float
    mean_b: float
    difference: float  # mean_a - mean_b
    interval: Interval  # paired bootstrap interval of the difference
    confidence: float
    won: list[str]  # task ids where A scores higher
    lost: list[str]  # task ids where B scores higher
    tied: int
    verdict: str

    def as_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["interval"] = list(self.interval)
        return record


def verdict(name_a: str, name_b: str, interval: Interval, all_tied: bool) -> str:
    """One phrase: which run is better, or that the interval of the difference cannot tell."""
    if all_tied:
        return "level (every task tied)"
    if interval.low > 0:
        return f"{name_a} better"
    if interval.high < 0:
        return f"{name_b} better"
    return "cannot tell (interval contains 0)"


def check_same_tasks(scores_a: Mapping[str, float], scores_b: Mapping[str, float], name_a: str, name_b: str) -> None:
    """Refuse a comparison of runs scored on different tasks: a paired difference needs pairs."""
    only_a, only_b = sorted(set(scores_a) - set(scores_b)), sorted(set(scores_b) - set(scores_a))
    if only_a or only_b:
        raise EvaluationError(
            f"{name_a} and {name_b} were scored on different tasks ({len(scores_a)} and {len(scores_b)}; "
            f"{len(only_a)} only in {name_a}: {', '.join(only_a[:3]) or '-'}; {len(only_b)} only in {name_b}: "
            f"{', '.join(only_b[:3]) or '-'}): compare reports of the same split, --max-grid-side and --limit")
    if not scores_a:
        raise EvaluationError(f"{name_a} and {name_b} hold no task scores to compare")


def compare_paired(scores_a: Mapping[str, float], scores_b: Mapping[str, float], name_a: str = "A",
                   name_b: str = "B", confidence: float = CONFIDENCE) -> PairedComparison:
    """A against B on the same tasks ({task_id: score in [0, 1]} each): tasks won, lost and tied,
    the mean difference and its paired bootstrap interval (the same resampled tasks for both
    runs), and the verdict. Adopt a change only when the verdict says it is better."""
    check_same_tasks(scores_a, scores_b, name_a, name_b)
    ids = sorted(scores_a)
    a = np.array([scores_a[i] for i in ids], dtype=np.float64)
    b = np.array([scores_b[i] for i in ids], dtype=np.float64)
    for name, values in ((name_a, a), (name_b, b)):
        if ((values < 0) | (values > 1)).any() or not np.isfinite(values).all():
            raise EvaluationError(f"{name}: per-task scores must lie in [0, 1]")
    differences = a - b
    interval = _percentile_interval(differences, confidence, RESAMPLES, SEED)
    won = [i for i, d in zip(ids, differences) if d > 0]
    lost = [i for i, d in zip(ids, differences) if d < 0]
    return PairedComparison(
        name_a=name_a, name_b=name_b, tasks=len(ids), mean_a=float(a.mean()), mean_b=float(b.mean()),
        difference=float(differences.mean()), interval=interval, confidence=confidence, won=won, lost=lost,
        tied=len(ids) - len(won) - len(lost), verdict=verdict(name_a, name_b, interval, not won and not lost))
