"""Run a teacher over a dataset and fill the feature cache (sage/features.py).

    prompts (one per student example, sage/distill.py: prompts_for_dataset)
        -> the teacher (GR00T N1.5, sage/teacher/groot.py, or the oracle, sage/teacher/oracle.py)
        -> EntryFeatures -> safetensors shards -> the manifest once every prompt is stored

Prompts are processed shortest first (fewest images), a task's prompts side by side, so a batch pads
little and each distinct grid of a batch goes through the vision tower once. Which prompts are done
is decided by the shards on disk, so any order resumes correctly; `--shard k/n` parts share a
directory and `merge` checks them.
"""

from __future__ import annotations

import dataclasses
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

from sage.arc import Task
from sage.config import DataConfig
from sage.datasets import run_tasks
from sage.errors import FeatureCacheError
from sage.features import CacheWriter, build_spec, cache_path, finalize, prepare_directory
from sage.teacher.groot import load_teacher
from sage.teacher.oracle import load_oracle
from sage.teacher.presets import ORACLE_PRESET
from sage.teacher.prompt import TeacherExample
from sage.teacher.settings import TeacherConfig


def teacher_tasks(teacher: TeacherConfig, data: DataConfig, limit: int | None = None) -> tuple[str, list[Task]]:
    """(dataset name, tasks) the teacher extracts: teacher.dataset, else data.train (the tasks
    training uses of it: sage.datasets.run_tasks)."""
    dataset = teacher.dataset or data.train
    tasks = run_tasks(data, dataset)
    return dataset, tasks[:limit] if limit else tasks


@dataclass
class ExtractionResult:
    directory: Path
    assigned: int  # prompts of this part
    already_done: int  # found in the cache at start
    computed: int  # computed by this run
    seconds: float  # model time of this run (excl. loading)
    images: int  # images computed by this run
    status: dict[str, Any]  # from features.finalize: complete / present / expected / missing

    @property
    def prompts_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds else 0.0


def run_extraction(
    teacher: TeacherConfig,
    data: DataConfig,
    prompts: Sequence[TeacherExample],
    part: int = 0,
    parts: int = 1,
    limit: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    device: str = "auto",
) -> ExtractionResult:
    """Extract (or resume) part `part` of `parts` of `prompts` (sage.distill.prompts_for_dataset) into
    the teacher's cache of teacher.dataset (else data.train), running it on `device` (run.device)."""
    t = teacher
    dataset, tasks = teacher_tasks(t, data, limit)
    directory = cache_path(t, dataset, tasks, limit)
    spec = build_spec(t, dataset, tasks)
    created = not directory.exists()
    writer = CacheWriter(directory, spec, part, parts, t.shard_entries)
    task_index = {task.id: i for i, task in enumerate(tasks)}
    mine = [e for e in prompts if task_index[e.task_id] % parts == part]
    todo = [e for e in mine if e.key not in writer.done]
    log(
        f"feature cache {directory}: part {part + 1} of {parts} has {len(mine)} prompts, "
        f"{len(mine) - len(todo)} already stored, {len(todo)} to compute"
    )
    computed = images = 0
    seconds = 0.0
    info: dict[str, Any] = {}
    if todo:
        try:
            if t.preset == ORACLE_PRESET:
                model = load_oracle(t, dataset, dataclasses.asdict(data.synthetic))
            else:
                model = load_teacher(t, device)
        except BaseException:  # a checkpoint that fails to load leaves no empty cache behind
            if created:
                shutil.rmtree(directory, ignore_errors=True)
            raise
        if model.load_report is not None:
            log(model.load_report.summary())
        info = {
            "compute_dtype": str(model.dtype).replace("torch.", ""),
            "device": str(model.device),
            "torch": torch.__version__,
            "python": platform.python_version(),
        }
        todo.sort(key=lambda e: len(e.grids))  # stable: a task's prompts stay together, sharing images
        bar = tqdm(total=len(todo), unit="prompt", disable=not progress, file=sys.stderr, mininterval=1.0)
        start = time.perf_counter()
        for i in range(0, len(todo), t.batch_size):
            chunk = todo[i : i + t.batch_size]
            for entry in model.features(chunk, token_features=t.token_features):
                writer.add(entry)
            computed += len(chunk)
            images += sum(len(e.grids) for e in chunk)
            bar.update(len(chunk))
        writer.flush()
        seconds = time.perf_counter() - start
        bar.close()
    status = finalize(directory, spec, [e.key for e in prompts], info)
    return ExtractionResult(directory, len(mine), len(mine) - len(todo), computed, seconds, images, status)


def merge(teacher: TeacherConfig, data: DataConfig, prompts: Sequence[TeacherExample],
          limit: int | None = None) -> dict[str, Any]:
    """After all `--shard k/n` parts finished: check every prompt is stored and write the manifest."""
    dataset, tasks = teacher_tasks(teacher, data, limit)
    directory = cache_path(teacher, dataset, tasks, limit)
    spec = build_spec(teacher, dataset, tasks)
    if not (directory / "manifest.json").is_file():
        raise FeatureCacheError(f"{directory}: nothing to merge (no extraction has run for this config)")
    prepare_directory(directory, spec)  # refuses a cache made for another spec
    return {"directory": directory, **finalize(directory, spec, [e.key for e in prompts])}

