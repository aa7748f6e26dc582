"""What a run trains on and holds out, rebuilt the same way by training, evaluation and the benchmarks.

    load_splits(cfg)       data.train (minus data.exclude, within data.max_grid_side) split BY TASK
                           into training and held-out tasks, plus data.demonstrations_of's tasks
    make_datasets(cfg, …)  their training examples (augmented as configured) and validation examples
    scored_tasks(cfg, …)   the tasks of a split that a checkpoint never trained on, and the protocol
                           record every report states (what was trained on, what overlaps, how checked)

The checkpoint's saved config and its meta.json's held-out task ids are all it takes to rebuild
either side, so an evaluation never trusts a split it cannot reconstruct.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sage.arc import Task, split_by_task
from sage.config import ExperimentConfig, demonstrations_source
from sage.datasets import demonstration_tasks, is_demonstrations_only, load_dataset, training_dataset, training_tasks
from sage.distill import TeacherTargets, teacher_views
from sage.distributed import DistributedContext, examples_of_rank
from sage.encoding import ARCExamples, evaluation_examples, training_examples
from sage.errors import ARCDataError, EvaluationError
from sage.overlap import DEMONSTRATIONS, TaskOverlap, drop_trained_tasks

DEFAULT_SPLIT = "arc-agi-1/evaluation"  # what evaluate.py scores by default
HOLDOUT = "holdout"  # the checkpoint's own held-out validation tasks


@dataclass
class Splits:
    train: list[Task]  # training tasks
    val: list[Task]  # held-out tasks, disjoint from train
    train_dataset: list[Task]  # every task of data.train (the teacher cache covers them all)
    val_dataset: list[Task]  # every task of the validation dataset (== train_dataset for 'holdout')
    shared: dict[str, str]  # validation tasks left out, their test outputs being trained on (id -> training ids)
    overlap: list[TaskOverlap]  # validation tasks kept that share demonstrations or test inputs with training
    source: str  # what data.train gave and what was left out of it (TrainingTasks.describe)


def load_splits(cfg: ExperimentConfig) -> Splits:
    """Train and validation tasks, disjoint by task. 'holdout' keeps whole training tasks aside; a
    validation dataset is checked pair by pair against training (sage/overlap.py)."""
    synthetic = asdict(cfg.data.synthetic)
    given = training_tasks(cfg.data)
    tasks = given.tasks
    if cfg.data.val == "holdout":
        train, val = split_by_task(tasks, cfg.data.val_fraction, cfg.run.seed)
        val_dataset = tasks
    else:
        train, val = tasks, load_dataset(cfg.data.val, synthetic)
        val_dataset = val
    demonstrations = demonstration_tasks(cfg.data, val)
    train = train + demonstrations
    # Held-out tasks whose test pairs training holds (another id, reordered, rotated) are no test.
    val, left_out, kept = drop_trained_tasks(train, val, "validation")
    named, times = demonstrations_source(cfg.data.demonstrations_of)
    source = given.describe(cfg.data) + (
        f"; plus the demonstration pairs of {len(demonstrations)} tasks of {named} as tasks of their own, "
        f"{times}x an epoch (data.demonstrations_of: the HRM/TRM protocol; their test pairs never)"
        if demonstrations else "")
    return Splits(train, val, tasks, val_dataset, {o.task: ", ".join(o.training_tasks) for o in left_out}, kept,
                  source)


def make_datasets(
    cfg: ExperimentConfig, splits: Splits, train_teacher: TeacherTargets | None = None,
    val_teacher: TeacherTargets | None = None, ctx: DistributedContext = DistributedContext(),
) -> tuple[ARCExamples, ARCExamples]:
    """Training examples (each pair of a training task once as the query, those of data.demonstrations_of
    as many times as its "*k" says, augmented as configured) and validation examples (the held-out
    tasks' test outputs; under torchrun, this rank's tasks)."""
    m, d = cfg.model, cfg.data
    refs = training_examples(splits.train, d.use_test_pairs)
    refs += [r for r in refs if is_demonstrations_only(splits.train[r.task_index])] * (
        demonstrations_source(d.demonstrations_of)[1] - 1)
    train_set = ARCExamples(
        splits.train, refs, m.grid_size, m.max_demos,
        d.max_context_tokens, augment=d.augment, seed=cfg.run.seed, augment_probability=d.augment_probability,
        teacher=train_teacher, answer_canvas=m.answer_canvas, fit_answer=True, shuffle_demos=d.shuffle_demos,
        resample_demos=d.resample_demos, teacher_views=teacher_views(cfg),
    )
    # Validation sizes each canvas as evaluation does: from the context, never from the answer.
    val_set = ARCExamples(splits.val, examples_of_rank(evaluation_examples(splits.val), ctx), m.grid_size,
                          m.max_demos, d.max_context_tokens, teacher=val_teacher, answer_canvas=m.answer_canvas)
    return train_set, val_set


def scored_tasks(cfg: ExperimentConfig, meta: dict[str, Any], split: str) -> tuple[list[Task], dict[str, Any]]:
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
