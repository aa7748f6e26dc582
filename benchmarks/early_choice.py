"""Could a short probe tell which TTT run will fit? Reads two or more evaluations of the same tasks
that differ only in their TTT draws (`ttt.seed`), and scores, for each fraction f of a run, the
choice that keeps per task the run whose mean loss on the demonstrations over the 10 steps up to
f was lowest. f = 1 is what `ttt.runs` > 1 does at the end of full runs; a choice made early
that scores as well would let short probes stand in for full runs.

    python -m benchmarks.early_choice reports/holdout/seed0 reports/holdout/seed1

Reads each folder's ttt_curves.json and per_task.csv (the student_ttt_score column); no test output.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

FRACTIONS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.33, 0.5, 0.75, 1.0)


def read_runs(folders: list[Path]) -> tuple[list[dict[str, list[float]]], list[dict[str, float]]]:
    """Each evaluation's first loss curve per tuned task, and its TTT score per task."""
    curves, scores = [], []
    for folder in folders:
        tasks = json.loads((folder / "ttt_curves.json").read_text())["tasks"]
        curves.append({task: runs[0] for task, runs in tasks.items() if runs and runs[0]})
        with open(folder / "per_task.csv", newline="") as f:
            scores.append({row["task_id"]: float(row["student_ttt_score"]) for row in csv.DictReader(f)})
    if any(s.keys() != scores[0].keys() for s in scores):
        raise SystemExit("the evaluations scored different tasks: compare runs of the same split")
    return curves, scores


def loss_at(curve: list[float], fraction: float) -> float:
    """The curve's point (a mean over 10 steps) at `fraction` of its length."""
    return curve[max(0, min(len(curve) - 1, round(fraction * len(curve)) - 1))]


def choose(curves: list[dict[str, list[float]]], task: str, fraction: float) -> int:
    """The run with the lowest loss at `fraction` (an untuned run never wins; ties keep the first)."""
    return min(range(len(curves)), key=lambda r: loss_at(curves[r][task], fraction) if task in curves[r] else float("inf"))


def early_choice(curves: list[dict[str, list[float]]], scores: list[dict[str, float]]) -> list[dict[str, float]]:
    """Per fraction: the mean score of the chosen runs, and on how many tuned tasks the choice equals
    the choice at the end."""
    tasks, tuned = list(scores[0]), [t for t in scores[0] if any(t in c for c in curves)]
    rows = []
    for fraction in FRACTIONS:
        picks = {t: choose(curves, t, fraction) if t in tuned else 0 for t in tasks}
        rows.append({"fraction": fraction, "score": sum(scores[picks[t]][t] for t in tasks) / len(tasks),
                     "same_as_end": sum(picks[t] == choose(curves, t, 1.0) for t in tuned), "tuned": len(tuned)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="evaluate.py --ttt output folders, one per TTT seed")
    args = parser.parse_args(argv)
    if len(args.folders) < 2:
        parser.error("give at least two evaluations to choose between")
    curves, scores = read_runs(args.folders)
    n = len(scores[0])
    each = ", ".join(f"{100 * sum(s.values()) / n:.2f}%" for s in scores)
    best = sum(max(s[t] for s in scores) for t in scores[0]) / n
    print(f"{n} tasks; each run alone: {each}; the best run per task (reads the scores): {100 * best:.2f}%")
    print("| choice made at | held-out score of the chosen runs | tuned tasks where it equals the choice at the end |")
    print("|---|---|---|")
    for row in early_choice(curves, scores):
        print(f"| {row['fraction']:.0%} | {100 * row['score']:.2f}% | {row['same_as_end']} of {row['tuned']} |")


if __name__ == "__main__":
    main()
