"""Evaluation: a checkpoint scored on a named split under the official ARC Prize rules, beside the
trivial baselines, and measured against the GR00T N1.5 teacher.

    checkpoint -> model + the config it was trained with
    split      -> tasks (sage/splits.py); any whose test outputs the checkpoint trained on (checked
                  pair by pair, sage/overlap.py) is left out and named, a split made mostly of them
                  is refused, and trained-on demonstrations or test inputs are named in the protocol
    per task   -> test outputs removed (the model never sees them) -> augmented views
               -> student -> decode -> undo each view's augmentation -> vote -> attempts 1 and 2
               [--ttt: the same again after test-time training on the task's demonstrations
                (sage/ttt.py), then the original weights back: "student" and "student_ttt"]
    scoring    -> sage.metrics (pure functions) for the student, the baselines and the probe alike
    GR00T      -> feature fidelity against the cached teacher features and parameters
                  (sage/student_vs_teacher.py), inference time per task of student and teacher
                  backbone on the same inputs and machine (sage/speed.py)

`evaluate()` returns an EvaluationResult; sage/report.py writes it out. Nothing here trains the
checkpoint: test-time training tunes a task's copy and forgets it.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from sage.arc import Task, tasks_up_to_side
from sage.config import PRECISIONS, TTTConfig, with_overrides
from sage.device import release_cached_memory, resolve_device
from sage.encoding import ARCExamples, evaluation_examples
from sage.errors import ConfigError, EvaluationError
from sage.finished_tasks import FinishedTasks
from sage.memory_probe import probe_ttt
from sage.metrics import OutputScore, baseline_attempts, score_attempts, summarize_tasks, task_score
from sage.overlap import describe
from sage.predict import LoadedModel, TaskOutcome, TaskPrediction, blind, load_model, solve_tasks
from sage.splits import DEFAULT_SPLIT, scored_tasks
from sage.speed import machine_description, measure_speed
from sage.step import Autocast
from sage.student_vs_teacher import feature_fidelity, is_probe, load_probe, parameter_counts, probe_attempts
from sage.ttt import TaskBudget, TTTStats, Tuning, describe_budget, describe_tuning, task_budget
from sage.voting import RANKINGS, ranked
from sage.voting import attempts as top_attempts



@dataclass
class EvalSettings:
    split: str = DEFAULT_SPLIT  # a dataset name (sage.datasets.load_dataset) or 'holdout'
    views: int = 8  # augmented views voted over per test input (1: the task as given only)
    # How a test input's distinct predicted grids become its two attempts (sage.voting.RANKINGS):
    # votes, or the log-likelihood summed over the views. The report scores both either way.
    rank: str = "votes"
    seed: int = 0  # colour permutations of the views
    batch_size: int | None = None  # examples per forward pass; None: the checkpoint's val.batch_size
    device: str = "auto"
    limit: int | None = None  # only the first N tasks of the split (a quick look; the report says so)
    # Tasks timed for student vs teacher (0: skip). None: 3 on a GPU, 1 on a CPU, where the full-size
    # backbone takes minutes per task (175 s for a 9-image prompt on a 2-core EPYC VM).
    speed_tasks: int | None = None
    speed_teacher: str = "groot-n1.5"  # teacher architecture timed: full size, or groot-n1.5-tiny
    feature_cache_dir: str | None = None  # where the teacher feature cache is; None: the config's
    extract_features: bool = False  # extract the split's teacher features when they are not cached
    teacher_probe: str | None = None  # a probe checkpoint to score beside the student
    workers: int = 1  # processes answering tasks in parallel (each with its share of the CPU threads)
    # Also score the checkpoint after test-time training on each task's demonstrations (sage/ttt.py),
    # with the checkpoint's ttt settings and these `ttt.KEY=VALUE` overrides.
    ttt: bool = False
    ttt_overrides: list[str] = field(default_factory=list)
    max_grid_side: int | None = None  # only the tasks whose every grid is at most N x N
    # Autocast for prediction (student and probe) and test-time training (run.precision's values);
    # None: each checkpoint's own.
    # fp32 is the choice on a CPU without bf16 hardware, where bf16 autocast is slow.
    precision: str | None = None


# ----------------------------------------------------------------------------- scoring


@dataclass
class SystemResult:
    """One system's attempts and their scores, task by task, in split order."""

    name: str
    attempts: dict[str, list[list[np.ndarray]]]  # task id -> per test input -> attempts (best first)
    scores: dict[str, list[OutputScore]]
    summary: dict[str, float]


def score_system(name: str, attempts: dict[str, list[list[np.ndarray]]], tasks: Sequence[Task]) -> SystemResult:
    """Score any system's attempts with sage.metrics; a task without attempts is an error, not a zero."""
    missing = [t.id for t in tasks if t.id not in attempts]
    if missing:
        raise ValueError(f"{name}: no attempts for tasks {missing[:3]}")
    scores = {t.id: [score_attempts(a, p.output) for a, p in zip(attempts[t.id], t.test, strict=True)]
              for t in tasks}
    return SystemResult(name, attempts, scores, summarize_tasks([scores[t.id] for t in tasks]))


# ----------------------------------------------------------------------------- the whole evaluation


@dataclass
class EvaluationResult:
    checkpoint: str
    run: str
    tasks: list[Task]
    protocol: dict[str, Any]
    settings: dict[str, Any]
    systems: dict[str, SystemResult]  # "student", the baselines, and "teacher_probe" when given
    predictions: dict[str, TaskPrediction]  # the student's, per task id
    fidelity: dict[str, Any]
    parameters: dict[str, Any]
    speed: dict[str, Any]
    machine: dict[str, Any]
    seconds: float
    log_dir: str  # the run's logs (metrics.jsonl for the training curves)
    teacher: dict[str, Any]  # the teacher the run was configured with (reports always name it)
    notes: list[str] = field(default_factory=list)
    # With --ttt: the tuned student's predictions and what tuning did, per task id.
    ttt_predictions: dict[str, TaskPrediction] = field(default_factory=dict)
    ttt_stats: dict[str, TTTStats] = field(default_factory=dict)
    rankings: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # ranking_scores

    @property
    def primary(self) -> str:
        """The system the submission and the pictures show: the student, after TTT when it ran."""
        return "student_ttt" if "student_ttt" in self.systems else "student"


def evaluate(
    checkpoint: str | Path,
    settings: EvalSettings,
    progress: bool = True,
    log: Callable[[str], None] = print,
    finished_dir: str | Path | None = None,
    resume: bool = False,
) -> EvaluationResult:
    """Score a checkpoint as `settings` ask (see the module docstring). With `finished_dir`, each
    task's outcome is kept there as it finishes, and `resume` continues from those of an earlier
    run of the same evaluation (sage/finished_tasks.py)."""
    started = time.perf_counter()
    check_settings(settings)
    try:
        device = resolve_device(settings.device)
    except ConfigError as e:
        raise EvaluationError(str(e).replace("run.device", "--device")) from None
    loaded, probe = load_models(checkpoint, settings, device)
    tasks, protocol = scored_tasks(loaded.cfg, loaded.meta, settings.split)
    if probe is not None:
        refuse_probe_trained_on(probe, tasks, settings.split)
    tuning = Tuning.of(with_overrides(loaded.cfg, settings.ttt_overrides, sections=("ttt",))) if settings.ttt else None
    tasks, notes = select_tasks(loaded, tasks, protocol, settings)
    batch_size = settings.batch_size or loaded.cfg.val.batch_size
    precision = Autocast(device, loaded.cfg.run.precision).name
    log(f"evaluating {loaded.path} ({loaded.parameters:,} parameters) on {len(tasks)} tasks of {settings.split}, "
        f"{settings.views} views per test input, on {device} ({precision})")
    run_tuning, budgets = prepare_ttt(loaded, tuning, tasks, device, log)
    if settings.workers > 1:
        log(f"{settings.workers} worker processes, {max(1, torch.get_num_threads() // settings.workers)} "
            "CPU thread(s) each")

    finished = None
    if finished_dir is not None:
        finished = FinishedTasks(finished_dir, {
            "checkpoint": str(loaded.path), "step": loaded.meta.get("train_state", {}).get("step"),
            "split": settings.split, "views": settings.views, "seed": settings.seed, "batch_size": batch_size,
            "device": device.type, "precision": precision,
            "ttt": asdict(tuning.ttt) if tuning is not None else None})
    outcomes = answer_tasks(loaded, device, tasks, settings, batch_size, run_tuning, budgets, progress, finished,
                            resume, log)
    release_cached_memory(device, "answering the tasks", log)  # before the probe, fidelity and speed phases
    predictions = {t.id: o.plain for t, o in zip(tasks, outcomes)}
    ttt_predictions = {t.id: o.tuned for t, o in zip(tasks, outcomes) if o.tuned is not None}
    ttt_stats = {t.id: o.ttt for t, o in zip(tasks, outcomes) if o.ttt is not None}
    systems = score_systems(tasks, predictions, ttt_predictions if tuning is not None else None,
                            probe, settings, device, batch_size)
    log("scores: " + ", ".join(f"{k} {v.summary['arc_prize_score']:.4f}" for k, v in systems.items()))
    rankings = ranking_scores(tasks, predictions, ttt_predictions if tuning is not None else None)

    fidelity = feature_fidelity(loaded, settings.split, tasks, predictions, settings.feature_cache_dir,
                                settings.extract_features, log)
    parameters = parameter_counts(loaded, settings.speed_teacher)
    speed_tasks = settings.speed_tasks if settings.speed_tasks is not None else (3 if device.type == "cuda" else 1)
    speed = measure_speed(loaded, tasks, speed_tasks, settings.speed_teacher, device, log)
    return EvaluationResult(
        checkpoint=str(loaded.path),
        run=loaded.cfg.run.name or loaded.path.parent.name,
        tasks=tasks,
        protocol=protocol,
        settings={**asdict(settings), "batch_size": batch_size, "speed_tasks": speed_tasks, "precision": precision,
                  "ttt_config": asdict(tuning.ttt) if tuning is not None else None},
        systems=systems,
        predictions=predictions,
        fidelity=fidelity,
        parameters=parameters,
        speed=speed,
        machine=machine_description(device),
        seconds=time.perf_counter() - started,
        log_dir=str(Path(loaded.cfg.run.log_dir) / (loaded.cfg.run.name or "")),
        teacher={"preset": loaded.cfg.teacher.preset, "view": loaded.cfg.teacher.view,
                 "weights": loaded.cfg.teacher.checkpoint_dir or f"random (seed {loaded.cfg.teacher.seed})"},
        notes=notes,
        ttt_predictions=ttt_predictions,
        ttt_stats=ttt_stats,
        rankings=rankings,
    )


def check_settings(settings: EvalSettings) -> None:
    """Refuse settings that cannot mean anything, before any loading."""
    if settings.views < 1:
        raise EvaluationError(f"--views must be >= 1, got {settings.views}")
    if settings.limit is not None and settings.limit < 1:
        raise EvaluationError(f"--limit must be >= 1, got {settings.limit}")
    if settings.speed_tasks is not None and settings.speed_tasks < 0:
        raise EvaluationError(f"--speed-tasks must be >= 0, got {settings.speed_tasks}")
    if settings.max_grid_side is not None and not 1 <= settings.max_grid_side <= 30:
        raise EvaluationError(f"--max-grid-side must be 1..30, got {settings.max_grid_side}")
    if settings.workers < 1:
        raise EvaluationError(f"--workers must be >= 1, got {settings.workers}")
    if settings.rank not in RANKINGS:
        raise EvaluationError(f"--rank must be one of {', '.join(RANKINGS)}, got {settings.rank!r}")
    if settings.ttt_overrides and not settings.ttt:
        raise EvaluationError("--set ttt.KEY=VALUE changes test-time training: add --ttt")
    if settings.precision is not None and settings.precision not in PRECISIONS:
        raise EvaluationError(f"--precision must be one of {', '.join(PRECISIONS)}, got {settings.precision!r}")


def load_models(checkpoint: str | Path, settings: EvalSettings,
                device: torch.device) -> tuple[LoadedModel, LoadedModel | None]:
    """The student and, with --teacher-probe, the probe, computing in --precision when given."""
    loaded = load_model(checkpoint, device)
    if is_probe(loaded.cfg):
        raise EvaluationError(f"{loaded.path} is a probe checkpoint (it reads teacher features): pass it as "
                              "--teacher-probe next to a student checkpoint")
    probe = load_probe(settings.teacher_probe, device) if settings.teacher_probe else None
    if settings.precision is not None:  # how they compute, not what they are: a setting of this evaluation
        for model in [m for m in (loaded, probe) if m is not None]:
            model.cfg.run.precision = settings.precision
    return loaded, probe


def refuse_probe_trained_on(probe: LoadedModel, tasks: Sequence[Task], split: str) -> None:
    """The probe must not have trained on the scored tasks either."""
    allowed = {t.id for t in scored_tasks(probe.cfg, probe.meta, split)[0]}
    trained = [t.id for t in tasks if t.id not in allowed]
    if trained:
        raise EvaluationError(
            f"--teacher-probe {probe.path}: the probe trained on {len(trained)} of the tasks scored for the "
            f"student (e.g. '{trained[0]}'), so the two cannot be compared on {split}"
        )


def select_tasks(loaded: LoadedModel, tasks: list[Task], protocol: dict[str, Any],
                 settings: EvalSettings) -> tuple[list[Task], list[str]]:
    """The tasks scored (--max-grid-side, --limit) and the report's notes on what that means;
    records the demonstrations the context cap cuts in `protocol`."""
    notes = list(loaded.notes)
    protocol["tasks_in_split"] = len(tasks)  # after leaving out trained tasks, before --max-grid-side and --limit
    if settings.max_grid_side is not None:
        before = len(tasks)
        tasks = tasks_up_to_side(tasks, settings.max_grid_side)
        protocol["max_grid_side"] = settings.max_grid_side
        notes.append(f"--max-grid-side {settings.max_grid_side}: the {len(tasks)} of {before} tasks of "
                     f"{settings.split} whose every grid is at most {settings.max_grid_side}x{settings.max_grid_side}")
        if not tasks:
            raise EvaluationError(f"--max-grid-side {settings.max_grid_side}: no task of {settings.split} is that small")
    if settings.limit is not None and settings.limit < len(tasks):
        notes.append(f"partial evaluation: the first {settings.limit} of {len(tasks)} tasks of {settings.split}; "
                     "not comparable with full-split figures")
        tasks = tasks[: settings.limit]
    if protocol["excluded_as_trained"]:
        notes.append(f"{len(protocol['excluded_as_trained'])} task(s) of {settings.split} left out because the "
                     "checkpoint trained on their test outputs: " + describe(protocol["excluded_as_trained"]))
    if protocol["evaluation_overlap"]:
        notes.append(f"{len(protocol['evaluation_overlap'])} scored task(s) share demonstration pairs or test inputs "
                     "with the training data (scored: their test outputs were not trained on): "
                     + describe(protocol["evaluation_overlap"]))
    if protocol["split_selected_the_checkpoint"]:
        notes.append(f"{settings.split} is also the split that picked this checkpoint (best validation exact match): "
                     "its score is optimistic")
    protocol["tasks_scored"] = len(tasks)
    m, d = loaded.cfg.model, loaded.cfg.data
    cuts = ARCExamples(tasks, evaluation_examples(tasks), m.grid_size, m.max_demos,
                       d.max_context_tokens).demonstration_cuts()
    protocol["demonstrations_cut"] = {**asdict(cuts), "context": cuts.describe()}
    if cuts.by_context_cap:
        notes.append(f"context cap (data.max_context_tokens={d.max_context_tokens}): "
                     f"{protocol['demonstrations_cut']['context']}")
    too_big = sum(max(p.input.shape) > m.grid_size for t in tasks for p in t.test)
    if too_big:
        notes.append(f"{too_big} test inputs are larger than the student's {m.grid_size}x"
                     f"{m.grid_size} answer canvas: no prediction, scored as wrong")
    return tasks, notes


def answer_tasks(loaded: LoadedModel, device: torch.device, tasks: Sequence[Task], settings: EvalSettings,
                 batch_size: int, tuning: Tuning | None, budgets: dict[str, TaskBudget] | None, progress: bool,
                 finished: FinishedTasks | None = None, resume: bool = False,
                 log: Callable[[str], None] = print) -> list[TaskOutcome]:
    """Every task answered (and with TTT, answered again after tuning), in task order, under a
    progress bar that shows the running scores (sums of task scores), each task weighed by its TTT
    budget (`budgets`, None without TTT). Each outcome goes to `finished` as the task finishes; with `resume`,
    the tasks found there are not answered again."""
    from tqdm import tqdm

    earlier = finished.start(resume) if finished is not None else {}
    earlier = {t.id: earlier[t.id] for t in tasks if t.id in earlier}
    if resume:
        log(f"resuming: {len(earlier)} of {len(tasks)} tasks already answered in {finished.directory}")
    weights = planned_work(tasks, budgets)
    bar = tqdm(total=sum(weights.values()), desc="tasks", unit="TFLOP" if tuning else "task", disable=not progress,
               file=sys.stderr, dynamic_ncols=True, bar_format=None if tuning is None else
               "{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} TFLOP [{elapsed}<{remaining}{postfix}]")
    solved = {"score": 0.0, "ttt_score": 0.0}

    def done(task: Task, outcome: TaskOutcome) -> None:
        if task.id not in earlier:  # answered now, not read back from an earlier run
            if finished is not None:
                finished.add(task.id, outcome)
            if outcome.ttt is not None and outcome.ttt.overflow_steps:
                log(f"task {task.id}: {outcome.ttt.overflow_steps} of its {outcome.ttt.steps} test-time training "
                    "steps were skipped: their fp16 gradients overflowed the loss scale (then halved)")
            if outcome.ttt is not None and outcome.ttt.micro_batch:
                log(f"task {task.id}: out of memory in test-time training: it ran {outcome.ttt.micro_batch} "
                    f"examples per forward pass instead of {tuning.ttt.batch_size} (gradients accumulated: "
                    "the same steps)")
        solved["score"] += _task_score(outcome.plain, task)
        if outcome.tuned is not None:
            solved["ttt_score"] += _task_score(outcome.tuned, task)
        bar.set_postfix({k: f"{v:.1f}" for k, v in solved.items() if k == "score" or tuning}, refresh=False)
        bar.update(weights[task.id])

    for task in tasks:
        if task.id in earlier:
            done(task, earlier[task.id])
    todo = [t for t in tasks if t.id not in earlier]
    fresh = iter(solve_tasks(loaded, device, todo, settings.views, settings.seed, batch_size, tuning,
                             settings.workers, done))
    bar.close()
    return [earlier[t.id] if t.id in earlier else next(fresh) for t in tasks]


def describe_ttt(t: TTTConfig) -> str:
    """The evaluation log's line on test-time training."""
    per_pass = t.examples_per_pass or t.batch_size
    passes = f" in passes of {per_pass}" if per_pass < t.batch_size else ""
    return (f"test-time training per task: {describe_budget(t)}, batch {t.batch_size}{passes}, lr {t.lr:g}, "
            f"tuning {describe_tuning(t)}, on the task's demonstrations only; then the original weights"
            + (f"; {t.tasks_in_flight} tasks tuned at once, each on its own weights" if t.tasks_in_flight > 1 else ""))


def prepare_ttt(loaded: LoadedModel, tuning: Tuning | None, tasks: Sequence[Task], device: torch.device,
                log: Callable[[str], None]) -> tuple[Tuning | None, dict[str, TaskBudget] | None]:
    """With TTT: its settings and its memory probe (sage.memory_probe.probe_ttt) in the log; the
    tuning to run with (the probe's examples per pass: the same steps; the report names `tuning`)
    and every task's budget, planned once for the probe and the progress bar (seconds for 400 tasks)."""
    if tuning is None:
        return None, None
    log(describe_ttt(tuning.ttt))
    budgets = {t.id: task_budget(t, tuning) for t in tasks}
    line, run_tuning = probe_ttt(loaded.model, tuning, [blind(t) for t in tasks], budgets, device)
    log(line)
    return run_tuning, budgets


def planned_work(tasks: Sequence[Task], budgets: dict[str, TaskBudget] | None) -> dict[str, float]:
    """What each task weighs in the progress bar, so that its ETA means something: with TTT the
    TFLOPs its budget plans (steps x a step's FLOPs, sage.ttt.task_budget: 0.3 to 45 TFLOP a step on
    ARC-AGI-1), at least a hundredth of the mean for the tasks answered untuned; else 1 a task."""
    if budgets is None:
        return {t.id: 1.0 for t in tasks}
    planned = {t.id: (budgets[t.id].steps * budgets[t.id].step_flops) / 1e12 for t in tasks}
    floor = max(sum(planned.values()) / max(len(planned), 1) / 100, 1e-9)
    return {k: max(v, floor) for k, v in planned.items()}


def score_systems(tasks: Sequence[Task], predictions: dict[str, TaskPrediction],
                  ttt_predictions: dict[str, TaskPrediction] | None, probe: LoadedModel | None,
                  settings: EvalSettings, device: torch.device, batch_size: int) -> dict[str, SystemResult]:
    """The student (and with TTT, the tuned student), the probe, and the baselines, on the same tasks."""
    systems = {"student": score_system("student", ranked_attempts(predictions, settings.rank), tasks)}
    if ttt_predictions is not None:
        systems["student_ttt"] = score_system("student_ttt", ranked_attempts(ttt_predictions, settings.rank), tasks)
    if probe is not None:
        attempts = probe_attempts(probe, settings.split, tasks, device, batch_size, settings.seed,
                                  settings.feature_cache_dir, settings.extract_features)
        systems["teacher_probe"] = score_system("teacher_probe", attempts, tasks)
    for name, attempts in baseline_attempts(tasks).items():
        systems[name] = score_system(name, attempts, tasks)
    return systems


def ranked_attempts(predictions: dict[str, TaskPrediction], rank: str) -> dict[str, list[list[np.ndarray]]]:
    """Each test input's two attempts: its candidates' best two by `rank` (sage.voting.RANKINGS)."""
    return {k: [top_attempts(ranked(t.candidates, rank)) if t.candidates else t.attempts for t in p.tests]
            for k, p in predictions.items()}


def ranking_scores(tasks: Sequence[Task], predictions: dict[str, TaskPrediction],
                   ttt_predictions: dict[str, TaskPrediction] | None) -> dict[str, dict[str, dict[str, float]]]:
    """{system: {rank: summary}}: the same predictions scored under every ranking, so one run
    measures what the ranking does (pass@1 and pass@2)."""
    systems = {"student": predictions, **({"student_ttt": ttt_predictions} if ttt_predictions else {})}
    return {name: {rank: score_system(name, ranked_attempts(preds, rank), tasks).summary for rank in RANKINGS}
            for name, preds in systems.items()}


def candidate_ceiling(tasks: Sequence[Task], predictions: dict[str, TaskPrediction]) -> dict[str, float]:
    """How often the right grid is among a system's candidates at all (any view's answer): the
    ceiling of every ranking of those candidates, task-weighted as the ARC Prize score is. Far above
    pass@2, ranking is the lever; near it, the views must answer right more often."""
    per_task, hits = [], 0
    for task in tasks:
        found = [any(np.array_equal(c.grid, pair.output) for c in test.candidates)
                 for test, pair in zip(predictions[task.id].tests, task.test, strict=True)]
        per_task.append(sum(found) / len(found))
        hits += sum(found)
    return {"score": float(np.mean(per_task)) if per_task else 0.0, "outputs_found": hits,
            "test_outputs": sum(len(t.test) for t in tasks)}


def _task_score(prediction: TaskPrediction, task: Task) -> float:
    """The official task score of a prediction (for the progress bar; scoring proper is score_system's)."""
    return task_score([score_attempts(t.attempts, p.output) for t, p in zip(prediction.tests, task.test)], 2)
