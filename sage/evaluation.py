"""Evaluation: a checkpoint scored on a named split under the official ARC Prize rules, beside the
trivial baselines, and measured against the GR00T N1.5 teacher.

    checkpoint -> model + the config it was trained with
    split      -> tasks; any whose test outputs the checkpoint trained on (checked pair by pair,
                  sage/overlap.py) is left out and named, a split made mostly of them is refused,
                  and trained-on demonstrations or test inputs are named in the protocol
    per task   -> test outputs removed (the model never sees them) -> augmented views
               -> student -> decode -> undo each view's augmentation -> vote -> attempts 1 and 2
               [--ttt: the same again after test-time training on the task's demonstrations
                (sage/ttt.py), then the original weights back: "student" and "student_ttt"]
    scoring    -> sage.metrics (pure functions) for the student, the baselines and the probe alike
    GR00T      -> feature fidelity against the cached teacher features, parameters, and inference
                  time per task of student and teacher backbone on the same inputs and machine

`evaluate()` returns an EvaluationResult; sage/report.py writes it out. Nothing here trains the
checkpoint: test-time training tunes a task's copy and forgets it.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from sage.arc import Task, tasks_up_to_side
from sage.config import PRECISIONS, ExperimentConfig, with_overrides
from sage.datasets import demonstration_tasks, load_dataset, run_tasks, training_dataset
from sage.device import resolve_device
from sage.distill import TeacherTargets, teacher_targets
from sage.encoding import ARCExamples, evaluation_examples
from sage.errors import ARCDataError, ConfigError, EvaluationError
from sage.finished_tasks import FinishedTasks
from sage.metrics import OutputScore, baseline_attempts, score_attempts, summarize_tasks, task_score
from sage.model import parameter_breakdown
from sage.overlap import DEMONSTRATIONS, describe, drop_trained_tasks
from sage.predict import LoadedModel, Predictor, TaskOutcome, TaskPrediction, load_model, solve_tasks
from sage.speed import machine_description, measure_speed
from sage.step import Autocast
from sage.ttt import TTTStats, describe_budget, describe_tuning
from sage.voting import RANKINGS, ranked
from sage.voting import attempts as top_attempts

DEFAULT_SPLIT = "arc-agi-1/evaluation"
HOLDOUT = "holdout"  # the checkpoint's own held-out validation tasks


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


def is_probe(cfg: ExperimentConfig) -> bool:
    return cfg.model.kind == "probe"


def split_tasks(cfg: ExperimentConfig, meta: dict[str, Any], split: str) -> tuple[list[Task], dict[str, Any]]:
    """The tasks of `split` that the checkpoint never trained on, and the protocol record.

    The tasks the checkpoint trained on are data.train minus its held-out validation tasks. A score
    on answers seen in training says nothing about generalisation: evaluated tasks whose id or test
    pair is among them (sage/overlap.py) are left out and named, and a split made mostly of them is
    refused. Shared demonstrations or test inputs (the HRM/TRM protocol) are scored but recorded."""
    synthetic = asdict(cfg.data.synthetic)
    train_all = training_dataset(cfg.data)
    held_out_ids = set(meta.get("val_task_ids") or []) if cfg.data.val == HOLDOUT else set()
    held_out = [t for t in train_all if t.id in held_out_ids]
    trained = [t for t in train_all if t.id not in held_out_ids] + demonstration_tasks(cfg.data, held_out)
    if split == HOLDOUT:
        if cfg.data.val != HOLDOUT:
            raise EvaluationError(
                f"--split holdout: this checkpoint validated on {cfg.data.val!r}, not on held-out tasks of "
                f"{cfg.data.train!r}; name a split instead (e.g. --split {DEFAULT_SPLIT})"
            )
        tasks = held_out
        if not tasks:
            raise EvaluationError("--split holdout: the checkpoint's meta.json lists no held-out task ids")
    else:
        tasks = load_dataset(split, synthetic)
    try:  # a few shared tasks (a data-set quirk) are left out and named; a mostly shared split is refused
        tasks, left_out, kept = drop_trained_tasks(trained, tasks, split)
    except ARCDataError as e:
        raise EvaluationError(
            f"{e}. This checkpoint trained on {cfg.data.train}: evaluate it on tasks it never saw "
            f"(default --split {DEFAULT_SPLIT}, or --split holdout for its held-out tasks)"
        ) from None
    unscorable = [f"{t.id} test {j}" for t in tasks for j, p in enumerate(t.test) if p.output is None]
    if unscorable:
        raise EvaluationError(
            f"split {split!r}: {len(unscorable)} test inputs have no output to score against "
            f"(e.g. {', '.join(unscorable[:3])}); evaluation needs the answers"
        )
    selected_by = cfg.data.val if cfg.data.val != HOLDOUT else HOLDOUT
    protocol = {
        "split": split,
        "scored_on": "test outputs (each answered from its task's demonstration pairs)",
        "trained_on": cfg.data.train + (f" minus what shares a pair or test input with {cfg.data.exclude}"
                                        if cfg.data.exclude else "")
        + (" minus the held-out validation tasks" if held_out_ids else "")
        + (f", plus the demonstration pairs of {cfg.data.demonstrations_of}'s tasks" if cfg.data.demonstrations_of
           else ""),
        "tasks_scored": len(tasks),
        "excluded_as_trained": [o.as_dict() for o in left_out],
        "evaluation_tasks_trained_on": len(kept),  # scored tasks sharing demonstrations or test inputs
        "evaluation_overlap": [o.as_dict() for o in kept],
        "evaluation_demonstrations_trained_on": any(o.kind == DEMONSTRATIONS for o in kept),
        "disjointness": "checked pair by pair, grids up to rotation and reflection: no scored task's id or "
                        "test pair is in the training data",
        "split_selected_the_checkpoint": split == selected_by,
        "training_config": {"train": cfg.data.train, "exclude": cfg.data.exclude, "val": cfg.data.val,
                            "demonstrations_of": cfg.data.demonstrations_of,
                            "augment": cfg.data.augment,
                            "use_test_pairs": cfg.data.use_test_pairs},
    }
    return tasks, protocol


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


# ----------------------------------------------------------------------------- teacher features


def open_teacher_cache(
    cfg: ExperimentConfig,
    split: str,
    cache_dir: str | None,
    extract: bool = False,
    device: torch.device | None = None,
    log: Callable[[str], None] = print,
) -> tuple[Any, str]:
    """The teacher feature cache covering the evaluated tasks: (cache, "") or (None, why not).
    With `extract`, a missing or unfinished cache is extracted first (sage.distill.ensure_teacher_cache,
    the path training takes), with the run's teacher on the evaluation device."""
    from sage.distill import ensure_teacher_cache, prompts_for_dataset
    from sage.errors import FeatureCacheError, TeacherError
    from sage.features import cache_path, open_cache

    teacher = replace(cfg.teacher, cache_dir=cache_dir) if cache_dir else cfg.teacher
    # Held-out validation tasks are part of the training dataset's cache.
    dataset = cfg.data.train if split == HOLDOUT else split
    run_config = Path(cfg.run.log_dir) / (cfg.run.name or "") / "config.yaml"
    command = (f"python extract_groot_features.py --config {run_config} --set teacher.dataset={dataset}"
               + (f" --set teacher.cache_dir={cache_dir}" if cache_dir else ""))
    try:
        tasks = run_tasks(cfg.data, dataset)
        directory = cache_path(teacher, dataset, tasks)
        if extract:
            run = replace(cfg.run, device=str(device) if device is not None else cfg.run.device)
            cache = ensure_teacher_cache(replace(cfg, teacher=teacher, run=run), dataset, tasks, log)
            if cache.leaks_answer:
                return None, f"the {teacher.preset} cache at {directory} was made with the answer visible ({teacher.view})"
            return cache, ""
        if not (directory / "manifest.json").is_file():
            return None, (f"no {teacher.preset} feature cache of {dataset} at {directory}; rerun with "
                          f"--extract-features, or extract it with `{command}`")
        cache = open_cache(teacher, dataset, tasks, allow_leaking=False)
        missing = cache.missing(p.key for p in prompts_for_dataset(replace(cfg, teacher=teacher), dataset, tasks))
        if missing:
            return None, (f"the {teacher.preset} feature cache of {dataset} at {directory} lacks {len(missing)} of the "
                          f"prompts this checkpoint's examples need (e.g. {missing[0]}); rerun with --extract-features, "
                          f"or extract them with `{command}`")
        return cache, ""
    except (FeatureCacheError, TeacherError) as e:
        return None, f"the {teacher.preset} feature cache at {directory} cannot be used: {e}"


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-6)  # eps as in sage.losses


def feature_fidelity(
    loaded: LoadedModel,
    split: str,
    tasks: Sequence[Task],
    predictions: dict[str, TaskPrediction],
    cache_dir: str | None = None,
    extract: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """How close the student's distillation head is to the teacher's cached per-grid features, on
    the evaluated tasks' context grids (the un-augmented view, as the teacher saw them).

    Two cosines: in standardised units (what training optimises and logs as val_feature_cosine),
    and in the teacher's own units (the head's output mapped back with the model's statistics).
    Beside each, a constant reference: pooled features are anisotropic, so a cosine means something
    only above what a constant prediction gets. Returns {"measured": False, "reason": ...} when it
    cannot be measured honestly."""
    cfg = loaded.cfg
    teacher = cfg.teacher.preset
    if not cfg.distills:  # its head never saw a target: a cosine would measure initialisation
        return {"measured": False, "teacher": teacher,
                "reason": "this run did not distil (distill.weight 0): its distillation head is untrained"}
    if cfg.distill.slots == "task":  # per-grid states were never trained towards the teacher
        return {"measured": False, "teacher": teacher,
                "reason": "this run distilled only its task token (distill.slots task): per-grid fidelity would "
                          "measure a head never trained on grid states (training's validation reports the task "
                          "token's cosine)"}
    device = next(loaded.model.parameters()).device
    cache, reason = open_teacher_cache(cfg, split, cache_dir, extract, device, log)
    if cache is None:
        return {"measured": False, "teacher": teacher, "reason": reason}
    if cache.dim != cfg.model.teacher_dim:
        return {"measured": False, "teacher": teacher, "cache": str(cache.directory),
                "reason": f"the student's distillation head predicts {cfg.model.teacher_dim}-d features but the "
                          f"{teacher} cache holds {cache.dim}-d ones (model.teacher_dim does not match the teacher)"}
    m = cfg.model
    targets = TeacherTargets(cache, m.num_grid_slots)
    student, target, kinds = [], [], []
    for task in tasks:
        for j, test in enumerate(predictions[task.id].tests):
            if test.grid_features is None:
                continue
            feats, mask = targets.for_example(task, test.kept_demos, len(task.train) + j, m.max_demos)
            valid = torch.from_numpy(mask) & test.grid_mask
            for slot in torch.nonzero(valid).squeeze(1).tolist():
                student.append(test.grid_features[slot])
                target.append(torch.from_numpy(feats[slot]))
                kinds.append("test input" if slot == 2 * m.max_demos else
                             ("demo input" if slot % 2 == 0 else "demo output"))
    if not student:
        return {"measured": False, "teacher": teacher, "reason": "no evaluated grid has a cached teacher feature"}
    model = loaded.model
    mean, std = model.teacher_mean.float().cpu(), model.teacher_std.float().cpu()
    predicted, raw = torch.stack(student), torch.stack(target)
    standardised = (raw - mean) / std
    cos_std = _cosines(predicted, standardised)
    cos_raw = _cosines(predicted * std + mean, raw)
    has_statistics = not (torch.all(mean == 0) and torch.all(std == 1))
    by_kind = {k: float(cos_std[[i for i, x in enumerate(kinds) if x == k]].mean())
               for k in ("demo input", "demo output", "test input") if k in kinds}
    hindsight = standardised.mean(0, keepdim=True).expand_as(standardised)
    result = {
        "measured": True,
        "teacher": teacher,
        "cache": str(cache.directory),
        "grids": len(student),
        "cosine_standardised": float(cos_std.mean()),
        "cosine_standardised_by_grid": by_kind,
        "cosine_raw": float(cos_raw.mean()),
        # The best constant in hindsight: the mean of these very (standardised) targets.
        "reference_constant_standardised": float(_cosines(hindsight, standardised).mean()),
        # Predicting the training tasks' mean feature in the teacher's units (needs the statistics).
        "reference_training_mean_raw": float(_cosines(mean.expand_as(raw), raw).mean()) if has_statistics else None,
        "distill_weight": cfg.distill.weight,
    }
    if cfg.distill.weight == 0:
        result["note"] = "distill.weight was 0: the distillation head was never trained, these are an untrained head's figures"
    return result


# ----------------------------------------------------------------------------- speed


def parameter_counts(loaded: LoadedModel, teacher_preset: str = "groot-n1.5") -> dict[str, Any]:
    from sage.teacher.backbone import count_parameters
    from sage.teacher.presets import get_preset

    counts = count_parameters(get_preset(teacher_preset), with_pooling_head=True)  # built on meta: free
    runs = counts.total - counts.pooling_head
    return {
        "student": loaded.parameters,
        "student_breakdown": parameter_breakdown(loaded.model),
        "teacher_preset": teacher_preset,
        "teacher_backbone": counts.total,
        "teacher_backbone_without_unused_pooling_head": runs,
        "teacher_to_student": runs / loaded.parameters,
    }


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
    tasks, protocol = split_tasks(loaded.cfg, loaded.meta, settings.split)
    if probe is not None:
        refuse_probe_trained_on(probe, tasks, settings.split)
    ttt_cfg = with_overrides(loaded.cfg, settings.ttt_overrides, sections=("ttt",)) if settings.ttt else None
    tasks, notes = select_tasks(loaded, tasks, protocol, settings)
    batch_size = settings.batch_size or loaded.cfg.val.batch_size
    precision = Autocast(device, loaded.cfg.run.precision).name
    log(f"evaluating {loaded.path} ({loaded.parameters:,} parameters) on {len(tasks)} tasks of {settings.split}, "
        f"{settings.views} views per test input, on {device} ({precision})")
    if ttt_cfg is not None:
        t = ttt_cfg.ttt
        log(f"test-time training per task: {describe_budget(t)}, batch {t.batch_size}, lr {t.lr:g}, "
            f"tuning {describe_tuning(t)}, on the task's demonstrations only; then the original weights")
    if settings.workers > 1:
        log(f"{settings.workers} worker processes, {max(1, torch.get_num_threads() // settings.workers)} "
            "CPU thread(s) each")

    finished = None
    if finished_dir is not None:
        finished = FinishedTasks(finished_dir, {
            "checkpoint": str(loaded.path), "step": loaded.meta.get("train_state", {}).get("step"),
            "split": settings.split, "views": settings.views, "seed": settings.seed, "batch_size": batch_size,
            "device": device.type, "precision": precision,
            "ttt": asdict(ttt_cfg.ttt) if ttt_cfg is not None else None})
    outcomes = answer_tasks(loaded, device, tasks, settings, batch_size, ttt_cfg, progress, finished, resume, log)
    predictions = {t.id: o.plain for t, o in zip(tasks, outcomes)}
    ttt_predictions = {t.id: o.tuned for t, o in zip(tasks, outcomes) if o.tuned is not None}
    ttt_stats = {t.id: o.ttt for t, o in zip(tasks, outcomes) if o.ttt is not None}
    systems = score_systems(tasks, predictions, ttt_predictions if ttt_cfg is not None else None,
                            probe, settings, device, batch_size)
    log("scores: " + ", ".join(f"{k} {v.summary['arc_prize_score']:.4f}" for k, v in systems.items()))
    rankings = ranking_scores(tasks, predictions, ttt_predictions if ttt_cfg is not None else None)

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
                  "ttt_config": asdict(ttt_cfg.ttt) if ttt_cfg is not None else None},
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
    allowed = {t.id for t in split_tasks(probe.cfg, probe.meta, split)[0]}
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
                 batch_size: int, ttt_cfg: ExperimentConfig | None, progress: bool,
                 finished: FinishedTasks | None = None, resume: bool = False,
                 log: Callable[[str], None] = print) -> list[TaskOutcome]:
    """Every task answered (and with TTT, answered again after tuning), in task order, under a
    progress bar that shows the running scores (sums of task scores). Each outcome goes to
    `finished` as the task finishes; with `resume`, the tasks found there are not answered again."""
    from tqdm import tqdm

    earlier = finished.start(resume) if finished is not None else {}
    earlier = {t.id: earlier[t.id] for t in tasks if t.id in earlier}
    if resume:
        log(f"resuming: {len(earlier)} of {len(tasks)} tasks already answered in {finished.directory}")
    bar = tqdm(total=len(tasks), desc="tasks", unit="task", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    solved = {"score": 0.0, "ttt_score": 0.0}

    def done(task: Task, outcome: TaskOutcome) -> None:
        if task.id not in earlier:  # answered now, not read back from an earlier run
            if finished is not None:
                finished.add(task.id, outcome)
            if outcome.ttt is not None and outcome.ttt.micro_batch:
                log(f"task {task.id}: out of memory in test-time training: it ran {outcome.ttt.micro_batch} "
                    f"examples per forward pass instead of {ttt_cfg.ttt.batch_size} (gradients accumulated: "
                    "the same steps)")
        solved["score"] += _task_score(outcome.plain, task)
        if outcome.tuned is not None:
            solved["ttt_score"] += _task_score(outcome.tuned, task)
        bar.set_postfix({k: f"{v:.1f}" for k, v in solved.items() if k == "score" or ttt_cfg}, refresh=False)
        bar.update()

    for task in tasks:
        if task.id in earlier:
            done(task, earlier[task.id])
    todo = [t for t in tasks if t.id not in earlier]
    fresh = iter(solve_tasks(loaded, device, todo, settings.views, settings.seed, batch_size, ttt_cfg,
                             settings.workers, done))
    bar.close()
    return [earlier[t.id] if t.id in earlier else next(fresh) for t in tasks]


def score_systems(tasks: Sequence[Task], predictions: dict[str, TaskPrediction],
                  ttt_predictions: dict[str, TaskPrediction] | None, probe: LoadedModel | None,
                  settings: EvalSettings, device: torch.device, batch_size: int) -> dict[str, SystemResult]:
    """The student (and with TTT, the tuned student), the probe, and the baselines, on the same tasks."""
    systems = {"student": score_system("student", ranked_attempts(predictions, settings.rank), tasks)}
    if ttt_predictions is not None:
        systems["student_ttt"] = score_system("student_ttt", ranked_attempts(ttt_predictions, settings.rank), tasks)
    if probe is not None:
        systems["teacher_probe"] = score_probe(probe, settings, tasks, device, batch_size)
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


# ----------------------------------------------------------------------------- the probe


def load_probe(path: str, device: torch.device) -> LoadedModel:
    """A probe checkpoint ("GR00T + a trained head": teacher features in, the student's decoder)."""
    loaded = load_model(path, device)
    if not is_probe(loaded.cfg):
        raise EvaluationError(
            f"--teacher-probe {path}: not a probe checkpoint (its config has no model.kind: probe, it is a student); "
            "train one with model.kind: probe and pass its checkpoint directory"
        )
    return loaded


def score_probe(
    probe: LoadedModel, settings: EvalSettings, tasks: Sequence[Task], device: torch.device, batch_size: int,
) -> SystemResult:
    """The probe scored by the same code. It reads the teacher's cached features of the grids as
    given, so it answers the un-augmented task only (one view: attempt 2 repeats attempt 1)."""
    cache, reason = open_teacher_cache(probe.cfg, settings.split, settings.feature_cache_dir,
                                       settings.extract_features, device)
    if cache is None:
        raise EvaluationError(f"--teacher-probe: {reason}")
    if cache.dim != probe.cfg.model.teacher_dim:
        raise EvaluationError(f"--teacher-probe {probe.path}: reads {probe.cfg.model.teacher_dim}-d features but the "
                              f"{probe.cfg.teacher.preset} cache at {cache.directory} holds {cache.dim}-d ones")
    teacher = teacher_targets(cache, probe.cfg.model)
    predictor = Predictor(probe, device, n_views=1, seed=settings.seed, batch_size=batch_size, teacher=teacher)
    attempts = {t.id: [p.attempts for p in predictor.predict(t).tests] for t in tasks}
    return score_system("teacher_probe", attempts, tasks)
