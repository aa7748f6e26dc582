"""Writing an evaluation out: one folder per evaluation.

    submission.json      the student's attempts (after test-time training, with --ttt) in the ARC Prize format:
                         {task_id: [{"attempt_1": grid, "attempt_2": grid}, ...]}, one dict per test input
    report.json          everything: protocol, settings, scores of every system with their 95% bootstrap
                         intervals, every system's score per task, student vs GR00T, machine
    report.md            the same as tables
    per_task.csv         one row per task: the student's and the baselines' scores, votes, time, TTT steps
    pictures/*.png       a sample of tasks: demonstration pairs, then test input, target, attempt 1, attempt 2
    training_curves.png  the run's curves from its metrics.jsonl (when the log is still there)
    ttt_curves.png       with --ttt: each tuned task's loss on its demonstrations, step by step
    ttt_curves.json      the same numbers: {"steps_per_point": 10, "tasks": {task_id: [[loss, ...] per run]}}

The folder is written under a temporary name and renamed into place, so it never holds a mix of
two evaluations.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from sage.config import TTTConfig
from sage.errors import EvaluationError
from sage.evaluation import EvaluationResult, candidate_ceiling
from sage.metrics import size_band, summarize_by_size_band, task_score
from sage.overlap import describe
from sage.pictures import draw_task
from sage.runlog import plot_training_curves, plot_ttt_curves
from sage.ttt import LOSS_WINDOW, describe_budget, describe_tuning
from sage.uncertainty import METHOD, describe_interval, interval_record

SCORING = ("official ARC Prize: 2 attempts per test output, solved when either equals the target exactly; "
           "a task scores the fraction of its test outputs solved; the score is the mean over tasks")
BASELINE_NAMES = ("copy_input", "most_frequent_colour", "all_zeros")
LABELS = {
    "student": "SAGE student",
    "student_ttt": "SAGE student + test-time training",
    "teacher_probe": "GR00T features + probe head",
    "copy_input": "baseline: copy the test input",
    "most_frequent_colour": "baseline: most frequent colour",
    "all_zeros": "baseline: all zeros",
}
# The task-weighted scores that get an interval, by the attempts each counts.
MEASURES = {"arc_prize_score": 2, "pass_at_1": 1}


def submission(result: EvaluationResult, system: str | None = None) -> dict[str, list[dict[str, list]]]:
    """ARC Prize submission of `system` (default: the student, after test-time training when it ran)."""
    attempts = result.systems[system or result.primary].attempts
    return {
        task.id: [{f"attempt_{k + 1}": np.asarray(a).tolist() for k, a in enumerate(tries)}
                  for tries in attempts[task.id]]
        for task in result.tasks
    }


def per_task_scores(result: EvaluationResult) -> dict[str, dict[str, dict[str, float]]]:
    """{system: {measure: {task_id: the task's score}}} for every MEASURES entry: what an interval
    and a paired comparison of two reports (sage/compare_reports.py) are computed from."""
    return {name: {measure: {t.id: task_score(system.scores[t.id], attempts) for t in result.tasks}
                   for measure, attempts in MEASURES.items()}
            for name, system in result.systems.items()}


def score_intervals(per_task: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{system: {measure: interval_record}}: each score with its 95% bootstrap interval over tasks."""
    return {name: {measure: interval_record(list(scores.values())) for measure, scores in measures.items()}
            for name, measures in per_task.items()}


def report_record(result: EvaluationResult) -> dict[str, Any]:
    preds = result.predictions.values()
    tests = [t for p in preds for t in p.tests]
    probe = result.systems.get("teacher_probe")
    per_task = per_task_scores(result)
    return {
        "checkpoint": result.checkpoint,
        "run": result.run,
        "split": result.protocol["split"],
        "protocol": result.protocol,
        "scoring": SCORING,
        "notes": result.notes,
        "settings": result.settings,
        "scores": {name: system.summary for name, system in result.systems.items()},
        "score_intervals": score_intervals(per_task),
        "per_task_scores": per_task,
        "scores_by_size_band": {name: summarize_by_size_band(system.scores, result.tasks)
                                for name, system in result.systems.items()},
        "student_vs_teacher": {
            "probe": probe.summary if probe else {"measured": False, "reason": "no --teacher-probe checkpoint given"},
            "feature_fidelity": result.fidelity,
            "parameters": result.parameters,
            "speed": result.speed,
            "teacher_of_the_run": result.teacher,
        },
        "voting": {
            "views": result.settings["views"],
            "rank": result.settings["rank"],
            "scores_by_rank": result.rankings,
            "mean_distinct_grids_per_test_input": float(np.mean([len(t.candidates) for t in tests])) if tests else 0.0,
            "mean_votes_of_attempt_1": float(np.mean([t.candidates[0].votes for t in tests if t.candidates]))
            if any(t.candidates for t in tests) else 0.0,
            "test_inputs_without_any_prediction": sum(not t.candidates for t in tests),
            "candidate_ceiling": {name: candidate_ceiling(result.tasks, preds) for name, preds in
                                  (("student", result.predictions), ("student_ttt", result.ttt_predictions)) if preds},
        },
        "student_seconds_per_task_all_views": float(np.mean([p.seconds for p in preds])) if tests else 0.0,
        "machine": result.machine,
        "seconds": result.seconds,
    }


def per_task_rows(result: EvaluationResult) -> list[dict[str, Any]]:
    rows = []
    student = result.systems["student"]
    for task in result.tasks:
        scores = student.scores[task.id]
        pred = result.predictions[task.id]
        row = {
            "task_id": task.id,
            "size_band": size_band(task),
            "test_outputs": len(task.test),
            "score": task_score(scores, 2),
            "pass_at_1": task_score(scores, 1),
            "solved": all(s.pass_at_2 for s in scores),
            "size_correct": sum(s.size_correct for s in scores),
            "pixel_accuracy": round(sum(s.pixels_correct for s in scores) / sum(s.pixels_total for s in scores), 4),
            "attempt_1_votes": ";".join(str(t.candidates[0].votes) if t.candidates else "0" for t in pred.tests),
            "distinct_grids": ";".join(str(len(t.candidates)) for t in pred.tests),
            "views_with_a_grid": ";".join(str(t.views) for t in pred.tests),
            "seconds": round(pred.seconds, 4),
        }
        stats = result.ttt_stats.get(task.id)
        if stats is not None:
            row.update(ttt_steps=stats.steps, ttt_seconds=round(stats.seconds, 2), ttt_examples=stats.examples,
                       ttt_first_loss=round(stats.first_loss, 4), ttt_last_loss=round(stats.last_loss, 4),
                       ttt_micro_batch=stats.micro_batch)
            if stats.run_last_losses:  # ttt.runs > 1: each run's (ttt_last_loss is their mean)
                row["ttt_run_last_losses"] = ";".join(f"{loss:.4f}" for loss in stats.run_last_losses)
        for name in result.systems:
            if name != "student":
                row[f"{name}_score"] = task_score(result.systems[name].scores[task.id], 2)
        rows.append(row)
    return rows


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _time(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def markdown(record: dict[str, Any], rows: list[dict[str, Any]], pictures: list[str], curves: str | None,
             ttt_curves: str | None = None) -> str:
    """report.md: the protocol, the scores beside the baselines, the student against GR00T, voting,
    the tasks solved, pictures, training curves and test-time training curves."""
    lines = (_protocol_lines(record) + _score_lines(record) + _student_vs_teacher_lines(record)
             + _speed_lines(record["student_vs_teacher"]["speed"])
             + _task_lines(record, rows, pictures, curves, ttt_curves))
    return "\n".join(lines) + "\n"


def _protocol_lines(record: dict[str, Any]) -> list[str]:
    p = record["protocol"]
    s = record["settings"]
    lines = [
        f"# Evaluation: {record['run']} on {record['split']}",
        "",
        f"- checkpoint: `{record['checkpoint']}`",
        f"- split: **{p['split']}**, scored on its {p['scored_on']}",
        f"- trained on: {p['trained_on']}"
        + ("; **trained on the evaluation tasks' demonstrations** (the HRM/TRM protocol, not SAGE's default)"
           if p["evaluation_demonstrations_trained_on"] else "")
        + f"; evaluation tasks trained on: {p['evaluation_tasks_trained_on']}"
        + (f" ({describe(p['evaluation_overlap'])})" if p["evaluation_overlap"] else "")
        + f"; evaluation demonstrations trained on: {'yes' if p['evaluation_demonstrations_trained_on'] else 'no'} "
        f"({p['disjointness']})",
        f"- context: {p['demonstrations_cut']['context']}",
        f"- attempts: voting over {s['views']} augmented views per test input (view 0 as given, the others dihedral "
        f"transforms + colour permutations, seed {s['seed']})",
        f"- compute: {s['precision']}",
        f"- scoring: {record['scoring']}",
    ]
    if s.get("ttt_config"):
        t = TTTConfig(**s["ttt_config"])
        lines.append(f"- test-time training (student + TTT): per task, {describe_budget(t)}"
                     + f", batch {t.batch_size}, lr {t.lr:g}, tuning {describe_tuning(t)}, "
                     "on leave-one-out examples of the task's "
                     "demonstrations only (augmented), then the original weights; test outputs never seen")
    lines += [f"- **note**: {n}" for n in record["notes"]]
    return lines


def _score_lines(record: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    lines += ["", "## Scores", "",
              "| system | ARC Prize score (pass@2) | tasks fully solved | pass@1 | output size | pixels (target cells) |",
              "|---|---|---|---|---|---|"]
    for name, m in record["scores"].items():
        label = LABELS.get(name, name)
        interval = record["score_intervals"][name]
        lines.append(f"| {label} | **{_pct(m['arc_prize_score'])}** ({describe_interval(interval['arc_prize_score'])})"
                     f" | {m['tasks_solved_count']}/{m['tasks']} ({_pct(m['tasks_solved'])}) | {_pct(m['pass_at_1'])} "
                     f"({describe_interval(interval['pass_at_1'])}) | {_pct(m['size_accuracy'])} | "
                     f"{_pct(m['pixel_accuracy'])} |")
    any_m = next(iter(record["scores"].values()))
    lines += ["", f"{any_m['tasks']} tasks, {any_m['test_outputs']} test outputs. pass@1, output size and pixels "
              "use attempt 1; pass@1 is averaged per task like the official score; pixels are counted over the "
              "target's own cells only. Baselines make one guess (attempt 2 = attempt 1).",
              "", f"95% CI: {METHOD}, over these {any_m['tasks']} tasks: how far the score could move on another "
              "draw of tasks like them. A score of 0 gets 0-0, which bounds nothing (at most 3/n at 95% by the rule "
              "of three). Two runs on the same tasks: `python -m sage.compare_reports REPORT_A REPORT_B` (paired, "
              "task by task)."]
    return lines + _band_lines(record) + _rank_lines(record)


def _rank_lines(record: dict[str, Any]) -> list[str]:
    """The student's scores with its attempts ranked each way (evaluate.py --rank), same predictions."""
    voting = record["voting"]
    lines = ["", f"## Ranking the candidates (this report's attempts: by {voting['rank']})", "",
             "| system | attempts ranked by | ARC Prize score (pass@2) | pass@1 | tasks fully solved |",
             "|---|---|---|---|---|"]
    for name, by_rank in voting["scores_by_rank"].items():
        for rank, m in by_rank.items():
            lines.append(f"| {LABELS.get(name, name)} | {rank} | {_pct(m['arc_prize_score'])} | {_pct(m['pass_at_1'])} "
                         f"| {m['tasks_solved_count']}/{m['tasks']} |")
    lines += ["", ("votes: the grids most of the views predicted (ties: mean confidence). likelihood: the "
                   "log-probability each distinct grid gets, its cells and the border that fixes its size, summed "
                   "over every view.")]
    ceiling = voting.get("candidate_ceiling", {})
    if ceiling:
        lines += ["", "The right grid among all the distinct grids the views gave (the ceiling of any ranking, "
                  "ARC Prize weighting): " + "; ".join(
                      f"{LABELS.get(name, name)} {_pct(c['score'])} ({c['outputs_found']}/{c['test_outputs']} "
                      "test outputs)" for name, c in ceiling.items()) + "."]
    return lines


def _band_lines(record: dict[str, Any]) -> list[str]:
    """ARC Prize score per band of the tasks' largest grid side (metrics.SIZE_BANDS)."""
    by_band = record["scores_by_size_band"]
    counts = next(iter(by_band.values()))  # every system is scored on the same tasks, so the same bands
    bands = list(counts)
    lines = ["", "## Scores by size band (largest grid side of the task)", "",
             "| system | " + " | ".join(f"{b} ({counts[b]['tasks']} tasks)" for b in bands) + " |",
             "|---|" + "---|" * len(bands)]
    for name, scores in by_band.items():
        cells = [f"{_pct(scores[b]['arc_prize_score'])} ({scores[b]['tasks_solved_count']} solved, pass@1 "
                 f"{_pct(scores[b]['pass_at_1'])})" for b in bands]
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    return lines


def _student_vs_teacher_lines(record: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    svt = record["student_vs_teacher"]
    par, speed, fid, probe = svt["parameters"], svt["speed"], svt["feature_fidelity"], svt["probe"]
    lines += ["", "## Student vs GR00T N1.5", "", "| | student | GR00T N1.5 backbone | ratio |", "|---|---|---|---|"]
    lines.append(f"| parameters | {par['student']:,} | {par['teacher_backbone_without_unused_pooling_head']:,} "
                 f"({par['teacher_preset']}; {par['teacher_backbone']:,} with SigLIP's unused pooling head) | "
                 f"{par['teacher_to_student']:,.0f}x |")
    if speed.get("measured"):
        lines.append(f"| inference time per task | {_time(speed['student_seconds_per_task'])} | "
                     f"{_time(speed['teacher_seconds_per_task'])} | student {speed['speedup']:,.0f}x faster |")
    else:
        lines.append(f"| inference time per task | not measured: {speed.get('reason')} | | |")
    if probe.get("measured", True):
        lines.append(f"| ARC Prize score | {_pct(record['scores']['student']['arc_prize_score'])} | "
                     f"{_pct(probe['arc_prize_score'])} (features + probe head, 1 view) | |")
    else:
        lines.append(f"| ARC Prize score | {_pct(record['scores']['student']['arc_prize_score'])} | "
                     f"not measured: {probe['reason']} | |")
    if fid.get("measured"):
        by = ", ".join(f"{k} {v:.3f}" for k, v in fid["cosine_standardised_by_grid"].items())
        lines.append(f"| feature fidelity: cosine of the distillation head to {fid['teacher']}'s features, standardised "
                     f"units | {fid['cosine_standardised']:.3f} ({by}) | best constant in hindsight "
                     f"{fid['reference_constant_standardised']:.3f} | {fid['grids']} grids |")
        reference = fid["reference_training_mean_raw"]
        lines.append(f"| feature fidelity, the teacher's own units | {fid['cosine_raw']:.3f} | "
                     + (f"training-mean feature {reference:.3f}" if reference is not None else "no statistics saved")
                     + " | |")
    else:
        reason = " ".join(fid["reason"].split())  # one table row, whatever the message's line breaks
        lines.append(f"| feature fidelity | not measured: {reason} | | |")
    teacher = svt["teacher_of_the_run"]
    lines += ["", f"The run was configured with teacher {teacher['preset']} (view {teacher['view']}, weights "
              f"{teacher['weights']}); fidelity is measured against that teacher's cached features"
              + (f" ({fid['note']})" if fid.get("note") else "") + "."
              + (" The probe reads the teacher's features of the task as given: one view, so its attempt 2 repeats "
                 "attempt 1." if probe.get("measured", True) else "")]
    return lines


def _speed_lines(speed: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if speed.get("measured"):
        t, mach = speed["teacher"], speed["machine"]
        n = len(speed["tasks"])
        lines += ["", f"Speed: {speed['method']}. The same {n} task{'s' if n > 1 else ''} and machine for both "
                  f"({mach['device']}, {mach.get('gpu', mach['cpu'])}, {mach['cpu_threads']} CPU threads, torch "
                  f"{mach['torch']}). Teacher: {t['preset']}, weights {t['weights']}, {t['dtype']}; tokenizer "
                  f"{t['tokenizer']}. Student: {speed['student_dtype']}.", "",
                  "| task | test inputs | teacher images | teacher prompt tokens | student | teacher |",
                  "|---|---|---|---|---|---|"]
        for r in speed["tasks"]:
            lines.append(f"| {r['task']} | {r['test_inputs']} | {r['teacher_images']} | {r['teacher_prompt_tokens']:,} "
                         f"| {_time(r['student_seconds'])} | {_time(r['teacher_seconds'])} |")
    return lines


def _task_lines(record: dict[str, Any], rows: list[dict[str, Any]], pictures: list[str],
                curves: str | None, ttt_curves: str | None = None) -> list[str]:
    lines: list[str] = []
    v = record["voting"]
    lines += ["", "## Voting", "",
              f"{v['views']} views per test input; on average {v['mean_distinct_grids_per_test_input']:.2f} distinct "
              f"grids per test input, attempt 1 backed by {v['mean_votes_of_attempt_1']:.2f} votes; "
              f"{v['test_inputs_without_any_prediction']} test inputs got no grid at all (placeholder [[0]] submitted). "
              f"Student time per task with all views: {_time(record['student_seconds_per_task_all_views'])}."]
    lines += ["", "## Tasks", ""]
    for key, label in (("score", "student"), ("student_ttt_score", "student + test-time training")):
        if key not in (rows[0] if rows else {}):
            continue
        solved = [r for r in rows if r[key] > 0]
        lines.append(f"- {label}: solved (score > 0) {len(solved)} of {len(rows)} tasks"
                     + (": " + ", ".join(f"{r['task_id']} ({r[key]:.2f})" for r in solved[:40]) if solved else "")
                     + (" ..." if len(solved) > 40 else ""))
    if rows and "ttt_steps" in rows[0]:
        steps, secs = [r["ttt_steps"] for r in rows], [r["ttt_seconds"] for r in rows]
        lines.append(f"- test-time training: {sum(steps) / len(steps):.0f} steps and {sum(secs) / len(secs):.1f} s "
                     "per task on average")
    lines += ["", "Every task: `per_task.csv`."]
    if pictures:
        lines += ["", "Pictures (demonstrations, then test input, target, attempts): "
                  + ", ".join(f"[{Path(p).stem}]({p})" for p in pictures)]
    if curves:
        lines += ["", "## Training curves", "", f"![training curves]({curves})"]
    if ttt_curves:
        lines += ["", "## Test-time training curves", "",
                  "Each tuned task's answer loss on its demonstrations (numbers: `ttt_curves.json`).", "",
                  f"![test-time training curves]({ttt_curves})"]
    m = record["machine"]
    lines += ["", f"Evaluated in {record['seconds']:.1f} s on {m['device']} ({m.get('gpu', m['cpu'])}), "
              f"torch {m['torch']}, Python {m['python']}."]
    return lines


def pick_pictures(result: EvaluationResult, n: int) -> list[str]:
    """Up to n task ids: solved tasks first (up to half), the rest spread evenly over the split."""
    if n <= 0:
        return []
    student = result.systems[result.primary]
    solved = [t.id for t in result.tasks if task_score(student.scores[t.id], 2) > 0][: n // 2]
    rest = [t.id for t in result.tasks if t.id not in solved]
    k = min(n - len(solved), len(rest))
    spread = [rest[int(i * len(rest) / k)] for i in range(k)] if k else []
    return solved + spread


def check_out_dir(out_dir: Path) -> None:
    """An evaluation writes only into an empty folder, an earlier evaluation's (replaced whole), or
    one holding just the finished tasks of an interrupted one."""
    if out_dir.exists() and not (out_dir / "report.json").is_file() and any(
            p.name != "finished_tasks" for p in out_dir.iterdir()):
        raise EvaluationError(f"{out_dir}: exists and is not an earlier evaluation (no report.json); "
                              "choose another --out or empty it")


def write_ttt_curves(result: EvaluationResult, directory: Path) -> str | None:
    """ttt_curves.json and ttt_curves.png (module docstring) in `directory`; the PNG's name, or None
    when no task was tuned."""
    # A task whose budget bought no steps went through TTT with an empty curve: not a tuned task.
    curves = {task_id: stats.loss_curves for task_id, stats in result.ttt_stats.items() if any(stats.loss_curves)}
    if not curves:
        return None
    (directory / "ttt_curves.json").write_text(json.dumps({"steps_per_point": LOSS_WINDOW, "tasks": curves}))
    tuned = result.systems.get("student_ttt")
    scores = {task_id: task_score(tuned.scores[task_id], 2) for task_id in curves} if tuned else {}
    drawn = plot_ttt_curves(curves, scores, LOSS_WINDOW, directory / "ttt_curves.png",
                            title=f"{result.run}: test-time training")
    return "ttt_curves.png" if drawn else None


def write_report(result: EvaluationResult, out_dir: str | Path, pictures: int = 12) -> dict[str, Path]:
    """Write every file of the evaluation into `out_dir` (replacing an earlier evaluation there)."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "pictures").mkdir(parents=True)

    files = {"submission": "submission.json", "report_json": "report.json", "report_md": "report.md",
             "per_task": "per_task.csv"}
    (tmp / files["submission"]).write_text(json.dumps(submission(result)))
    rows = per_task_rows(result)
    with open(tmp / files["per_task"], "w", newline="") as f:
        # Every column any row has (a task answered without TTT runs has no ttt_run_last_losses).
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in rows for k in row)), restval="")
        writer.writeheader()
        writer.writerows(rows)

    by_id = {t.id: t for t in result.tasks}
    picture_files = []
    for task_id in pick_pictures(result, pictures):
        task = by_id[task_id]
        shown = result.systems[result.primary]
        score = task_score(shown.scores[task_id], 2)
        name = f"pictures/{task_id}.png"
        draw_task(tmp / name, task_id, [p.input for p in task.test], [p.output for p in task.test],
                  shown.attempts[task_id], title=f"{task_id}: task score {score:.2f}",
                  demos=[(p.input, p.output) for p in task.train])
        picture_files.append(name)

    metrics = Path(result.log_dir) / "metrics.jsonl"
    curves = "training_curves.png" if metrics.is_file() and plot_training_curves(
        metrics, tmp / "training_curves.png", title=f"{result.run} (training)") else None
    if curves is None:
        result.notes.append(f"training curves not drawn: no training records in {metrics} (the run's log)")
    ttt_curves = write_ttt_curves(result, tmp)

    record = report_record(result)
    record["files"] = {**files, "pictures": picture_files, "training_curves": curves, "ttt_curves": ttt_curves}
    (tmp / files["report_json"]).write_text(json.dumps(record, indent=2, default=str))
    (tmp / files["report_md"]).write_text(markdown(record, rows, picture_files, curves, ttt_curves))

    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out_dir)
    return {k: out_dir / v for k, v in files.items()}
