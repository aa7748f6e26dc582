"""Bootstrap intervals over tasks, paired comparisons of two runs, their place in report.json and
report.md, and `python -m sage.compare_reports` on report folders written by the real report writer."""

import csv
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from tiny import REPO, run_main, write_tasks

from sage import compare_reports
from sage.errors import EvaluationError
from sage.evaluation import EvalSettings, evaluate, score_system
from sage.report import write_report
from sage.synthetic import generate_tasks
from sage.uncertainty import bootstrap_interval, compare_paired


def solved(n_solved: int, n_tasks: int) -> list[float]:
    return [1.0] * n_solved + [0.0] * (n_tasks - n_solved)


# ----------------------------------------------------------------------------- the interval of one score


def test_the_interval_holds_the_mean_and_is_as_wide_as_the_binomial_spread():
    scores = solved(100, 400)  # 25% of 400 tasks: standard error sqrt(.25 * .75 / 400) = 2.17 points
    low, high = bootstrap_interval(scores)
    assert low < np.mean(scores) < high
    assert high - low == pytest.approx(2 * 1.96 * np.sqrt(0.25 * 0.75 / 400), rel=0.1)


def test_the_interval_shrinks_with_more_tasks():
    pattern = [1.0, 0.5, 0.0, 0.0, 0.0, 1 / 3, 0.0, 0.0]  # partial credit: tasks with 2 or 3 test outputs
    widths = [np.subtract(*bootstrap_interval(pattern * k)[::-1]) for k in (5, 50)]  # 40 and 400 tasks
    assert widths[1] < widths[0] / 2.5  # ~ sqrt(10) narrower


def test_the_interval_is_deterministic_and_its_seed_is_what_fixes_it():
    scores = np.random.default_rng(3).uniform(0, 1, size=60).tolist()
    assert bootstrap_interval(scores) == bootstrap_interval(list(scores)) == bootstrap_interval(scores[::-1])
    assert bootstrap_interval(scores, seed=1) != bootstrap_interval(scores)


def test_all_zeros_and_all_ones_give_exact_intervals():
    assert bootstrap_interval(solved(0, 400)) == (0.0, 0.0)
    assert bootstrap_interval(solved(36, 36)) == (1.0, 1.0)


@pytest.mark.parametrize("scores, problem", [([], "at least one"), ([0.0, 3.38], "not percentages"),
                                             ([0.0, float("nan")], "finite")])
def test_scores_that_are_not_per_task_fractions_are_refused(scores, problem):
    with pytest.raises(ValueError, match=problem):
        bootstrap_interval(scores)


# ----------------------------------------------------------------------------- two runs, task by task


def the_recipes_ttt_seeds() -> tuple[dict[str, float], dict[str, float]]:
    """docs/results/ttt.md: the recipe's 36 held-out tasks under ttt.seed=0 (12.96%) and ttt.seed=1 (5.56%)."""
    held_out = {f"task{i:02d}": 0.0 for i in range(31)}
    seed0 = {**held_out, "1bfc4729": 1.0, "662c240a": 1.0, "7c008303": 1.0, "dae9d2b5": 1.0, "27a28665": 2 / 3}
    seed1 = {**held_out, "1bfc4729": 1.0, "662c240a": 1.0, "7c008303": 0.0, "dae9d2b5": 0.0, "27a28665": 0.0}
    return seed0, seed1


def test_won_lost_and_tied_are_counted_per_task_whatever_the_order():
    a = {"t1": 1.0, "t2": 0.5, "t3": 0.0, "t4": 0.0, "t5": 1.0}
    b = {"t5": 1.0, "t4": 0.0, "t3": 1.0, "t2": 0.0, "t1": 0.5}  # another order: pairs are by task id
    c = compare_paired(a, b, "A", "B")
    assert (c.won, c.lost, c.tied, c.tasks) == (["t1", "t2"], ["t3"], 2, 5)
    assert c.difference == pytest.approx(0.0) and (c.mean_a, c.mean_b) == pytest.approx((0.5, 0.5))
    assert c.interval.low < 0 < c.interval.high and c.verdict == "cannot tell (interval contains 0)"
    assert compare_paired(b, a).as_dict()["lost"] == ["t1", "t2"]


def test_the_ttt_seed_alone_cannot_be_told_from_luck():
    seed0, seed1 = the_recipes_ttt_seeds()
    c = compare_paired(seed0, seed1, "seed 0", "seed 1")
    assert (len(c.won), len(c.lost), c.tied) == (3, 0, 33)
    assert c.difference == pytest.approx((1 + 1 + 2 / 3) / 36)
    assert c.interval.low == 0.0 and c.verdict == "cannot tell (interval contains 0)"


def test_the_verdict_names_the_better_run_when_the_interval_excludes_0():
    base = {f"t{i}": 0.0 for i in range(100)}
    better = {**base, **{f"t{i}": 1.0 for i in range(12)}}  # 12 tasks gained, none lost
    assert compare_paired(better, base, "new", "old").verdict == "new better"
    assert compare_paired(base, better, "old", "new").verdict == "new better"
    assert compare_paired(base, dict(base)).verdict == "level (every task tied)"


def test_pairing_tells_apart_what_two_unpaired_intervals_cannot():
    """Both runs solve the same 20 tasks and A 6 more: the unpaired intervals overlap, the paired
    one (each task's difficulty shared) excludes 0."""
    a = {f"t{i}": float(i < 26) for i in range(120)}
    b = {f"t{i}": float(i < 20) for i in range(120)}
    (a_low, _), (_, b_high) = bootstrap_interval(list(a.values())), bootstrap_interval(list(b.values()))
    assert a_low < b_high
    assert compare_paired(a, b).verdict == "A better"


def test_runs_on_different_tasks_are_refused_naming_both():
    a = {"t1": 1.0, "t2": 0.0}
    with pytest.raises(EvaluationError, match=r"reports/a and reports/b .*1 only in reports/a: t2.*0 only in"):
        compare_paired(a, {"t1": 1.0}, "reports/a", "reports/b")


# ----------------------------------------------------------------------------- reports and the CLI


@pytest.fixture(scope="module")
def reports(tmp_path_factory, tiny_run):
    """Two report folders of the same 5 unseen tasks (one with two test outputs), written by the real
    writer from one tiny evaluation (of conftest.py's tiny_run), with the student's attempts set per
    report so the scores differ: A solves t0, t1 (with attempt 2) and half of the two-output task; B
    solves t2 and the two-output task."""
    root = tmp_path_factory.mktemp("compare")
    tasks = generate_tasks(num_tasks=4, seed=7, transforms=["recolour"], max_side=4)
    two = generate_tasks(num_tasks=1, seed=8, transforms=["recolour"], max_side=4, demos=4)[0]
    tasks.append(type(two)("two", two.train[:3], two.train[3:] + two.test, two.source))
    split = write_tasks(tasks, root / "unseen")
    result = evaluate(tiny_run.checkpoints / "last", EvalSettings(split=str(split), views=1, speed_tasks=0),
                      progress=False, log=lambda _: None)
    ids = [t.id for t in result.tasks]

    def wrong(target: np.ndarray) -> np.ndarray:
        return np.zeros((target.shape[0] + 1, target.shape[1]), dtype=target.dtype)  # never the target's shape

    def written(name: str, right: dict[str, list[list[int]]]) -> Path:
        """The report with the student answering right the (test output, attempt) pairs in `right`."""
        attempts = {t.id: [[p.output if k in right.get(t.id, [[]] * len(t.test))[j] else wrong(p.output)
                            for k in range(2)] for j, p in enumerate(t.test)] for t in result.tasks}
        student = score_system("student", attempts, result.tasks)
        write_report(replace(result, systems={**result.systems, "student": student}), root / name, pictures=0)
        return root / name

    a = written("A", {ids[0]: [[0]], ids[1]: [[1]], "two": [[0], []]})
    b = written("B", {ids[2]: [[0]], "two": [[0], [0]]})
    return {"a": a, "b": b, "ids": ids}


def compare_cli(capsys, *args) -> subprocess.CompletedProcess:
    """`python -m sage.compare_reports args`, run in this process: its exit status, stdout and stderr."""
    code = run_main(compare_reports.main, args)
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["sage.compare_reports", *map(str, args)], code, out.out, out.err)


def test_report_json_gives_every_score_its_interval_and_keeps_per_task_scores(reports):
    record = json.loads((reports["a"] / "report.json").read_text())
    ids = reports["ids"]
    assert record["per_task_scores"]["student"]["arc_prize_score"] == {
        ids[0]: 1.0, ids[1]: 1.0, ids[2]: 0.0, ids[3]: 0.0, "two": 0.5}
    assert record["per_task_scores"]["student"]["pass_at_1"][ids[1]] == 0.0  # right on attempt 2 only
    assert set(record["score_intervals"]) == set(record["scores"])  # the baselines too
    for name, measures in record["score_intervals"].items():
        for measure, interval in measures.items():
            assert interval["score"] == pytest.approx(record["scores"][name][measure])  # the old key, unchanged
            assert interval["low"] <= interval["score"] <= interval["high"] and interval["tasks"] == 5
    assert record["scores"]["student"]["arc_prize_score"] == pytest.approx(0.5)
    assert record["score_intervals"]["student"]["arc_prize_score"]["low"] > 0  # t0 and t1 solved whole
    md = (reports["a"] / "report.md").read_text()
    low, high = (record["score_intervals"]["student"]["arc_prize_score"][k] for k in ("low", "high"))
    assert f"| SAGE student | **50.00%** (95% CI {100 * low:.2f}-{100 * high:.2f}%) |" in md
    assert "percentile bootstrap over tasks" in md and "sage.compare_reports" in md


def test_compare_reports_prints_the_paired_table(reports, tmp_path, capsys):
    done = compare_cli(capsys, reports["a"], reports["b"], "--json", tmp_path / "comparison.json")
    assert done.returncode == 0, done.stderr
    ids = reports["ids"]
    assert "5 tasks in both" in done.stdout
    assert ("| student | ARC Prize score (pass@2) | 50.00% | 40.00% | +10.00% (" in done.stdout
            and "| 2 / 2 / 1 | cannot tell (interval contains 0) |" in done.stdout)
    baseline = next(line for line in done.stdout.splitlines() if line.startswith("| copy_input | ARC Prize"))
    assert baseline.endswith("| +0.00% (+0.00% to +0.00%) | 0 / 0 / 5 | level (every task tied) |")  # shared
    assert f"student, pass@2: A higher on {', '.join(sorted(ids[:2]))}; B higher on {', '.join(sorted([ids[2], 'two']))}" \
        in done.stdout
    saved = json.loads((tmp_path / "comparison.json").read_text())["comparisons"][0]
    assert (saved["system_a"], saved["measure"], saved["comparison"]["tied"]) == ("student", "arc_prize_score", 1)


def test_an_older_report_is_read_from_its_per_task_csv_and_systems_can_be_paired(reports, tmp_path, capsys):
    old = tmp_path / "old"
    old.mkdir()
    record = json.loads((reports["b"] / "report.json").read_text())
    del record["per_task_scores"], record["score_intervals"]  # a report.json from before them
    (old / "report.json").write_text(json.dumps(record))
    (old / "per_task.csv").write_text((reports["b"] / "per_task.csv").read_text())
    done = compare_cli(capsys, reports["a"] / "report.json", old, "--system", "student")
    assert done.returncode == 0, done.stderr
    assert f"B: {old / 'per_task.csv'}" in done.stdout
    assert "| student | ARC Prize score (pass@2) | 50.00% | 40.00% |" in done.stdout
    paired = compare_cli(capsys, reports["a"], reports["a"], "--system", "student:copy_input")
    copy = json.loads((reports["a"] / "report.json").read_text())["scores"]["copy_input"]["arc_prize_score"]
    assert f"| student vs copy_input | ARC Prize score (pass@2) | 50.00% | {100 * copy:.2f}% |" in paired.stdout


def test_mistakes_exit_2_and_say_which_file_and_what_to_do(reports, tmp_path, capsys):
    fewer = tmp_path / "fewer" / "per_task.csv"  # a report of fewer tasks (e.g. --limit 4)
    fewer.parent.mkdir()
    lines = (reports["b"] / "per_task.csv").read_text().splitlines()
    fewer.write_text("\n".join(lines[:-1]) + "\n")
    dropped = next(csv.DictReader(lines[:1] + lines[-1:]))["task_id"]
    # The real command line, once: `python -m sage.compare_reports` exits with main's status.
    done = subprocess.run([sys.executable, "-m", "sage.compare_reports", str(reports["a"]), str(fewer)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert f"{reports['a'] / 'report.json'} and {fewer} were scored on different tasks" in done.stderr
    assert f"1 only in {reports['a'] / 'report.json'}: {dropped}" in done.stderr and "same split" in done.stderr

    missing = compare_cli(capsys, reports["a"], tmp_path / "nowhere")
    assert missing.returncode == 2 and "nowhere: no such file or folder; give a report folder" in missing.stderr
    unknown = compare_cli(capsys, reports["a"], reports["b"], "--system", "student_ttt")
    assert unknown.returncode == 2 and "no system 'student_ttt' (it has student, " in unknown.stderr
    broken = tmp_path / "broken.csv"
    broken.write_text("task_id,score\nt1,abc\n")
    bad = compare_cli(capsys, broken, broken)
    assert bad.returncode == 2 and "task t1, column score: 'abc' is not a number" in bad.stderr
