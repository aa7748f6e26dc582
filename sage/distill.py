"""Teacher features for training: make sure the cache exists, line its features up with the
student's context slots, and compute the standardisation statistics.

The student's context slot of demo k's input is 2k, of its output 2k + 1, of the query input
2 * max_demos (sage/encoding.py). The cache stores one row per grid the teacher saw, by role
(train/0/input, ...); `TeacherTargets` maps one onto the other. Grids the teacher never saw
(a test pair's output used as a demonstration in leave-one-out training, demonstrations beyond
teacher.max_demos) get mask False and no loss.
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from sage.arc import Task
from sage.config import ExperimentConfig
from sage.features import FeatureCache, FeatureCacheError, cache_path, example_roles, open_cache
from sage.teacher.config import LEAKING_VIEWS

if TYPE_CHECKING:
    from sage_student_model import StudentConfig


def ensure_teacher_cache(
    cfg: ExperimentConfig, dataset: str, tasks: Sequence[Task], log: Callable[[str], None]
) -> FeatureCache:
    """The configured teacher's cache for `dataset`, extracted first if it is missing or unfinished
    (resuming where an earlier extraction stopped). A cache made by another teacher, view or dataset
    is refused, never overwritten."""
    teacher = dataclasses.replace(cfg.teacher, dataset=dataset)
    directory = cache_path(teacher, dataset)
    allow_leaking = cfg.model.kind != "probe"  # a probe that reads the answer would score nothing real
    if not allow_leaking and teacher.view in LEAKING_VIEWS:  # refuse before spending time on extraction
        raise FeatureCacheError(f"{directory}: the {teacher.view} view shows the teacher the answer; "
                                "a probe may not read it (use teacher.view=task_context)")
    manifest = directory / "manifest.json"
    if not (manifest.is_file() and json.loads(manifest.read_text()).get("complete")):
        from sage.teacher.extract import run_extraction  # torch + transformers: only when needed

        log(f"teacher features for {dataset} not cached yet: extracting with {teacher.preset} into {directory}")
        result = run_extraction(dataclasses.replace(cfg, teacher=teacher), progress=True, log=log)
        if result.computed:
            log(f"extracted {result.computed} prompts in {result.seconds:.1f}s "
                f"({result.prompts_per_second:.2f} prompts/s)")
    cache = open_cache(teacher, dataset, tasks, allow_leaking=allow_leaking)
    if cache.leaks_answer:
        log(f"WARNING: teacher view '{teacher.view}' shows the teacher the test answers (privileged information); "
            "this run's results are not a fair ARC score")
    return cache


class TeacherTargets:
    """Per-example teacher features in the student's slot order: pooled ([slots, dim]), or with
    `token_side` the image tokens pooled to token_side^2 per grid ([slots, token_side^2, dim]) for a
    probe that reads tokens."""

    def __init__(self, cache: FeatureCache, num_slots: int, token_side: int | None = None) -> None:
        self.cache, self.num_slots, self.dim, self.token_side = cache, num_slots, cache.dim, token_side
        self.key = "teacher_features" if token_side is None else "teacher_tokens"
        self.shape = (num_slots, cache.dim) if token_side is None else (num_slots, token_side**2, cache.dim)

    def for_example(self, task: Task, demos: Sequence[int], query: int, test_index: int | None,
                    max_demos: int) -> tuple[np.ndarray, np.ndarray]:
        """(features of `self.shape`, float32; [num_slots] bool) for the context of one example."""
        roles = example_roles(demos, query, len(task.train))
        # A test-pair query reads its own prompt; a demonstration query any prompt of the task
        # (all show every demonstration input), the first one.
        if self.token_side is None:
            features, seen = self.cache.lookup(task.id, test_index or 0, roles)
        else:
            features, seen = self.cache.lookup_tokens(task.id, test_index or 0, roles, self.token_side)
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


def feature_statistics(cache: FeatureCache, tasks: Sequence[Task]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of the pooled teacher features of `tasks` (the training tasks:
    validation tasks must not shape the targets). Every distinct grid counts once."""
    rows = []
    for task in tasks:
        for test_index in range(len(task.test)):
            if cache.has(task.id, test_index):
                rows.append(cache.pooled(task.id, test_index).float())
    if not rows:
        raise ValueError(f"{cache.directory}: no features of the training tasks in the cache")
    features = torch.cat(rows)
    return features.mean(0), features.std(0).clamp(min=1e-6)
