"""Teacher features for training: which prompts a run reads, making sure the cache holds them, lining
their features up with the student's context slots, and the standardisation statistics.

Every student example has its own teacher prompt, built the way evaluation builds one: the
demonstrations the student sees, in its order (the first teacher.max_demos of them), then the query
input, and nothing after it (sage/teacher/prompt.py). So a training example whose query is a
demonstration never shows the teacher its own answer, and the features of the same example are the
same in training and at evaluation.

The student's context slot of demo k's input is 2k, of its output 2k + 1, of the query input
2 * max_demos (sage/encoding.py). The cache stores one row per grid of the prompt, by role
(train/0/input, ...); `TeacherTargets` maps one onto the other. Demonstrations beyond
teacher.max_demos get mask False and no loss.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from sage.arc import Task, split_by_task
from sage.config import ExperimentConfig
from sage.datasets import training_dataset
from sage.encoding import evaluation_examples, fit_demos, training_examples
from sage.errors import FeatureCacheError
from sage.features import FeatureCache, cache_path, example_roles, open_cache, read_manifest
from sage.teacher.prompt import TeacherExample, example_key, shown_demos, view_example
from sage.teacher.settings import LEAKING_VIEWS

if TYPE_CHECKING:
    from sage.model import StudentConfig


def teacher_views(cfg: ExperimentConfig) -> int:
    """How many augmented views of each training task the run reads teacher features of
    (teacher.augmented_views, when augmented examples carry distillation targets)."""
    d = cfg.data
    return cfg.teacher.augmented_views if cfg.distills and d.augment and d.augment_probability > 0 else 0


def prompts_for_dataset(cfg: ExperimentConfig, dataset: str, tasks: Sequence[Task]) -> list[TeacherExample]:
    """The teacher prompts that a run of `cfg` reads from `dataset`'s cache, for those of its `tasks`:
    one per distinct student example. From data.train: every training example (leave-one-out over
    each training task's pairs) and, with val 'holdout', the held-out tasks' test inputs; from any
    other dataset (a validation or evaluation split): every test input. Demonstrations are those the
    student keeps (model.max_demos, data.max_context_tokens), of which the prompt shows the first
    teacher.max_demos. Training examples also get the prompts of their task's augmented views
    (`teacher_views`)."""
    d, m, t = cfg.data, cfg.model, cfg.teacher
    if dataset == d.train:
        every = training_dataset(d)  # the split is over the whole dataset
        if d.val == "holdout":
            train, val = split_by_task(every, d.val_fraction, cfg.run.seed)
        else:
            train, val = every, []
        wanted = {task.id for task in tasks}
        train, val = [x for x in train if x.id in wanted], [x for x in val if x.id in wanted]
        groups = [(train, training_examples(train, d.use_test_pairs), teacher_views(cfg)),
                  (val, evaluation_examples(val), 0)]
    else:
        groups = [(list(tasks), evaluation_examples(tasks), 0)]
    prompts: dict[str, TeacherExample] = {}
    for group, refs, views in groups:
        for ref in refs:
            task = group[ref.task_index]
            kept = fit_demos(task.train + task.test, ref.demos, ref.query, m.max_demos, d.max_context_tokens)
            for k in range(views + 1):
                prompt = view_example(task, kept, ref.query, t.view, t.max_demos, augmented_view=k)
                prompts.setdefault(prompt.key, prompt)
    return list(prompts.values())


def ensure_teacher_cache(
    cfg: ExperimentConfig, dataset: str, tasks: Sequence[Task], log: Callable[[str], None]
) -> FeatureCache:
    """The configured teacher's cache for `dataset`, holding every prompt the run reads
    (`prompts_for_dataset`); what is missing is extracted first (resuming where an earlier
    extraction stopped). A cache made by another teacher, view or dataset is refused, never
    overwritten."""
    teacher = dataclasses.replace(cfg.teacher, dataset=dataset)
    directory = cache_path(teacher, dataset, tasks)
    allow_leaking = cfg.model.kind != "probe"  # a probe that reads the answer would score nothing real
    if not allow_leaking and teacher.view in LEAKING_VIEWS:  # refuse before spending time on extraction
        raise FeatureCacheError(f"{directory}: the {teacher.view} view shows the teacher the answer; "
                                "a probe may not read it (use teacher.view=task_context)")
    prompts = prompts_for_dataset(cfg, dataset, tasks)
    manifest = directory / "manifest.json"
    missing = [p.key for p in prompts]
    if manifest.is_file() and read_manifest(manifest)["complete"]:  # a damaged one is named, never overwritten
        missing = open_cache(teacher, dataset, tasks, allow_leaking=allow_leaking).missing(missing)
    if missing:
        from sage.extraction import run_extraction  # torch + transformers: only when needed

        log(f"teacher features for {dataset}: {len(missing)} of the run's {len(prompts)} prompts are not cached; "
            f"extracting with {teacher.preset} into {directory}")
        result = run_extraction(teacher, cfg.data, prompts, progress=True, log=log, device=cfg.run.device)
        if result.computed:
            log(f"extracted {result.computed} prompts in {result.seconds:.1f}s "
                f"({result.prompts_per_second:.2f} prompts/s)")
    cache = open_cache(teacher, dataset, tasks, allow_leaking=allow_leaking)
    if cache.leaks_answer:
        log(f"WARNING: teacher view '{teacher.view}' shows the teacher the answers (privileged information); "
            "this run's results are not a fair ARC score")
    return cache


class TeacherTargets:
    """Per-example teacher features in the student's slot order: pooled ([slots, dim]), or with
    `token_side` the image tokens pooled to token_side^2 per grid ([slots, token_side^2, dim]) for a
    probe that reads tokens."""

    def __init__(self, cache: FeatureCache, num_slots: int, token_side: int | None = None) -> None:
        self.cache, self.num_slots, self.dim, self.token_side = cache, num_slots, cache.dim, token_side
        self.field = "teacher_features" if token_side is None else "teacher_tokens"  # the batch key
        self.shape = (num_slots, cache.dim) if token_side is None else (num_slots, token_side**2, cache.dim)

    def key(self, task: Task, demos: Sequence[int], query: int, augmented_view: int = 0) -> str:
        """The cache key of the prompt made for this example, of the task as given or of its augmented
        view k (sage.teacher.prompt.example_key)."""
        identity = self.cache.identity
        shown = shown_demos(identity["view"], demos, identity["prompt"]["max_demos"])
        return example_key(task.id, shown, query, augmented_view)

    def require(self, keys: Sequence[str]) -> None:
        """Refuse, naming one, if the cache lacks any of these prompts."""
        missing = self.cache.missing(keys)
        if missing:
            raise FeatureCacheError(
                f"{self.cache.directory}: {len(missing)} of the {len(set(keys))} teacher prompts this run reads are not "
                f"cached (e.g. {missing[0]}: task/query pair/demonstrations shown); extract them with "
                "`python extract_groot_features.py --config <this run's config>` (training does it by itself)")

    def for_example(self, task: Task, demos: Sequence[int], query: int, max_demos: int,
                    augmented_view: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(features of `self.shape`, float32; [num_slots] bool) for the context of one example,
        from the prompt made for exactly this example (in augmented view k: of that view's grids)."""
        roles = example_roles(demos, query, len(task.train))
        key = self.key(task, demos, query, augmented_view)
        if self.token_side is None:
            features, seen = self.cache.lookup(key, roles)
        else:
            features, seen = self.cache.lookup_tokens(key, roles, self.token_side)
        slots = [s for k in range(len(demos)) for s in (2 * k, 2 * k + 1)] + [2 * max_demos]
        out = np.zeros(self.shape, dtype=np.float32)
        mask = np.zeros(self.num_slots, dtype=bool)
        out[slots] = features.float().numpy()
        mask[slots] = seen.numpy()
        return out, mask

    def empty(self) -> tuple[np.ndarray, np.ndarray]:
        """No teacher features (an augmented view the teacher never saw)."""
        return np.zeros(self.shape, dtype=np.float32), np.zeros(self.num_slots, dtype=bool)


def teacher_targets(cache: FeatureCache, model: "StudentConfig") -> TeacherTargets:
    """What the model reads or is trained against: token features for a token-reading probe,
    pooled features otherwise."""
    if model.kind == "probe" and model.probe_input == "tokens":
        if not cache.has_tokens:
            raise FeatureCacheError(f"{cache.directory}: model.probe_input=tokens needs token features; "
                                    "set teacher.token_features=true (they are extracted on first use)")
        return TeacherTargets(cache, model.num_grid_slots, token_side=model.probe_token_side)
    return TeacherTargets(cache, model.num_grid_slots)


def feature_statistics(cache: FeatureCache, keys: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of the pooled teacher features of prompts `keys` (the training
    examples': validation tasks must not shape the targets), over every row of every prompt."""
    rows = [cache.pooled(key).float() for key in dict.fromkeys(keys)]
    if not rows:
        raise FeatureCacheError(f"{cache.directory}: no features of the training tasks in the cache")
    features = torch.cat(rows)
    return features.mean(0), features.std(0).clamp(min=1e-6)
