"""Compare two evaluations on the same tasks, task by task: is the difference real or luck?

    python -m sage.compare_reports reports/run/A reports/run/B
    python -m sage.compare_reports reports/A/report.json reports/B/per_task.csv --system student_ttt
    python -m sage.compare_reports reports/A reports/A --system student_ttt:student   # TTT against none

A and B are report folders written by evaluate.py, their report.json, or their per_task.csv (older
reports, whose report.json has no per-task scores, are read from the per_task.csv beside it; that
file holds pass@2 for every system and pass@1 for the student alone). For every system both hold
(or the --system pairs given) it prints the tasks won, lost and tied, the mean difference A - B and
its 95% paired bootstrap interval, and a verdict: adopt a change only when the verdict says it is
better (sage/uncertainty.py, docs/evaluation.md). Reports of different tasks are refused.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from sage.errors import INPUT_ERRORS, EvaluationError
from sage.files import FileKind, read_json
from sage.uncertainty import PairedComparison, check_same_tasks, compare_paired

MEASURE_LABELS = {"arc_prize_score": "ARC Prize score (pass@2)", "pass_at_1": "pass@1"}
WHAT_TO_GIVE = ("give a report folder written by evaluate.py (holding report.json or per_task.csv), "
                "its report.json or its per_task.csv")

REPORT_FILE = FileKind("an evaluation report", EvaluationError, "write the report again with evaluate.py (--resume "
                       "keeps the answered tasks)")

Scores = dict[str, dict[str, dict[str, float]]]  # system -> measure -> task id -> score in [0, 1]


@dataclass
class ReportScores:
    source: Path  # the file the scores were read from
    systems: Scores


def read_per_task_csv(path: Path) -> Scores:
    """Per-task scores from per_task.csv: the student's `score` (pass@2) and `pass_at_1`, and every
    other system's `<system>_score` (pass@2)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = rows[0].keys() if rows else []
    if "task_id" not in columns or "score" not in columns:
        raise EvaluationError(f"{path}: not a per_task.csv of evaluate.py (no rows with task_id and score columns); "
                              + WHAT_TO_GIVE)
    sources = {("student", "arc_prize_score"): "score", ("student", "pass_at_1"): "pass_at_1"}
    sources |= {(c.removesuffix("_score"), "arc_prize_score"): c for c in columns if c.endswith("_score")}
    systems: Scores = {}
    for (system, measure), column in sources.items():
        if column in columns:
            systems.setdefault(system, {})[measure] = {row["task_id"]: _number(row[column], path, row, column)
                                                       for row in rows}
    return systems


def _number(text: str, path: Path, row: dict[str, str], column: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise EvaluationError(f"{path}: task {row['task_id']}, column {column}: {text!r} is not a number; "
                              "the file was edited or cut short: write it again with evaluate.py")


def _report_files(path: Path) -> tuple[Path | None, Path]:
    """(report.json or None, per_task.csv) that `path` names."""
    if path.is_dir():
        return path / "report.json", path / "per_task.csv"
    if path.suffix == ".json":
        return path, path.with_name("per_task.csv")
    if path.suffix == ".csv":
        return None, path
    raise EvaluationError(f"{path}: neither a folder, a .json nor a .csv file; {WHAT_TO_GIVE}")


def load_report(path: str | Path) -> ReportScores:
    """The per-task scores of one evaluation: report.json's per_task_scores, else per_task.csv."""
    path = Path(path)
    if not path.exists():
        raise EvaluationError(f"{path}: no such file or folder; {WHAT_TO_GIVE}")
    json_file, csv_file = _report_files(path)
    if json_file is not None and json_file.is_file():
        record = read_json(json_file, REPORT_FILE)
        if isinstance(record, dict) and "per_task_scores" in record:
            return ReportScores(json_file, record["per_task_scores"])
    if csv_file.is_file():
        return ReportScores(csv_file, read_per_task_csv(csv_file))
    raise EvaluationError(f"{path}: no per-task scores: neither a report.json with per_task_scores nor a "
                          f"per_task.csv ({csv_file} is missing); {WHAT_TO_GIVE}")


def system_pairs(a: ReportScores, b: ReportScores, wanted: Sequence[str]) -> list[tuple[str, str]]:
    """(system of A, system of B) to compare: the --system pairs given ('NAME' or 'NAME_A:NAME_B'),
    or every system both reports hold, in A's order."""
    pairs = [tuple(w.split(":", 1)) if ":" in w else (w, w) for w in wanted]
    if not pairs:
        pairs = [(name, name) for name in a.systems if name in b.systems]
    for name_a, name_b in pairs:
        for report, name in ((a, name_a), (b, name_b)):
            if name not in report.systems:
                raise EvaluationError(f"{report.source}: no system {name!r} (it has {', '.join(report.systems)}); "
                                      "choose one with --system")
    if not pairs:
        raise EvaluationError(f"{a.source} and {b.source} share no system ({', '.join(a.systems)} against "
                              f"{', '.join(b.systems)}); pair two with --system NAME_A:NAME_B")
    return pairs


def compare_reports(a: ReportScores, b: ReportScores, wanted: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Every (system pair, measure both hold) compared task by task: [{"system_a", "system_b",
    "measure", "comparison": PairedComparison}]."""
    rows = []
    for name_a, name_b in system_pairs(a, b, wanted):
        for measure in [m for m in a.systems[name_a] if m in b.systems[name_b]]:
            scores_a, scores_b = a.systems[name_a][measure], b.systems[name_b][measure]
            check_same_tasks(scores_a, scores_b, str(a.source), str(b.source))
            rows.append({"system_a": name_a, "system_b": name_b, "measure": measure,
                         "comparison": compare_paired(scores_a, scores_b, "A", "B")})
    return rows


def _signed_pct(x: float) -> str:
    return f"{100 * x:+.2f}%"


def table(a: ReportScores, b: ReportScores, rows: Sequence[dict[str, Any]]) -> str:
    """The paired table, then the tasks each side won."""
    first: PairedComparison = rows[0]["comparison"]
    lines = [f"A: {a.source}", f"B: {b.source}",
             f"{first.tasks} tasks in both; 95% paired bootstrap interval of A - B over tasks.", "",
             "| system | measure | A | B | A - B (95% CI) | won / lost / tied | verdict |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        c: PairedComparison = row["comparison"]
        system = row["system_a"] if row["system_a"] == row["system_b"] else f"{row['system_a']} vs {row['system_b']}"
        lines.append(f"| {system} | {MEASURE_LABELS.get(row['measure'], row['measure'])} | {100 * c.mean_a:.2f}% | "
                     f"{100 * c.mean_b:.2f}% | {_signed_pct(c.difference)} ({_signed_pct(c.interval.low)} to "
                     f"{_signed_pct(c.interval.high)}) | {len(c.won)} / {len(c.lost)} / {c.tied} | {c.verdict} |")
    for row in rows:
        c = row["comparison"]
        if row["measure"] == "arc_prize_score" and (c.won or c.lost):
            lines += ["", f"{row['system_a']}, pass@2: A higher on {', '.join(c.won) or 'none'}; "
                      f"B higher on {', '.join(c.lost) or 'none'}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("a", help="report A: a report folder, its report.json or its per_task.csv")
    parser.add_argument("b", help="report B, on the same tasks")
    parser.add_argument("--system", action="append", default=[], metavar="NAME[:NAME_B]",
                        help="compare only this system (repeatable); NAME_A:NAME_B pairs two systems, "
                             "e.g. student_ttt:student (default: every system both reports hold)")
    parser.add_argument("--json", metavar="FILE", help="also write the comparisons as JSON")
    args = parser.parse_args(argv)
    try:
        a, b = load_report(args.a), load_report(args.b)
        rows = compare_reports(a, b, args.system)
    except INPUT_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(a, b, rows), end="")
    if args.json:
        Path(args.json).write_text(json.dumps({"a": str(a.source), "b": str(b.source), "comparisons": [
            {**row, "comparison": row["comparison"].as_dict()} for row in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
