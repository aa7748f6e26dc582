"""The student against its teacher, GR00T N1.5, on the evaluated tasks (evaluate.py's report,
"Student vs GR00T N1.5"): how close the student's distillation head comes to the teacher's cached
features (`feature_fidelity`), how many parameters each has (`parameter_counts`), and the probe, GR00T's
features with a trained head, answering the same tasks (`probe_attempts`). Inference time is
sage/speed.py's. A plain scoring run never needs any of this: each part says why it was not
measured when the teacher's cache is missing.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from sage.arc import Task
from sage.config import ExperimentConfig
from sage.datasets import run_tasks
from sage.distill import TeacherTargets, teacher_targets
from sage.errors import EvaluationError
from sage.model import parameter_breakdown
from sage.predict import LoadedModel, Predictor, TaskPrediction, load_model
from sage.splits import HOLDOUT


def is_probe(cfg: ExperimentConfig) -> bool:
    return cfg.model.kind == "probe"


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


def parameter_counts(loaded: LoadedModel, teacher_preset: str = "groot-n1.5") -> dict[str, Any]:
    from sage.teacher.presets import GROOT_N15_BACKBONE_PARAMS, GROOT_N15_SIGLIP_HEAD_PARAMS, get_preset

    # The real preset's counts are the published ones (tests/test_teacher.py checks the architecture
    # against them): no transformers import (~2 s) in an evaluation that needs none.
    if teacher_preset == "groot-n1.5":
        total, head = GROOT_N15_BACKBONE_PARAMS, GROOT_N15_SIGLIP_HEAD_PARAMS
    else:
        from sage.teacher.backbone import count_parameters

        counts = count_parameters(get_preset(teacher_preset), with_pooling_head=True)  # built on meta: free
        total, head = counts.total, counts.pooling_head
    runs = total - head
    return {
        "student": loaded.parameters,
        "student_breakdown": parameter_breakdown(loaded.model),
        "teacher_preset": teacher_preset,
        "teacher_backbone": total,
        "teacher_backbone_without_unused_pooling_head": runs,
        "teacher_to_student": runs / loaded.parameters,
    }


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


def probe_attempts(probe: LoadedModel, split: str, tasks: Sequence[Task], device: torch.device, batch_size: int,
                   seed: int, cache_dir: str | None, extract: bool) -> dict[str, list[list[np.ndarray]]]:
    """The probe's attempts on `tasks`, to be scored by the same code as the student's. It reads the
    teacher's cached features of the grids as given, so it answers the un-augmented task only (one
    view: attempt 2 repeats attempt 1)."""
    cache, reason = open_teacher_cache(probe.cfg, split, cache_dir, extract, device)
    if cache is None:
        raise EvaluationError(f"--teacher-probe: {reason}")
    if cache.dim != probe.cfg.model.teacher_dim:
        raise EvaluationError(f"--teacher-probe {probe.path}: reads {probe.cfg.model.teacher_dim}-d features but the "
                              f"{probe.cfg.teacher.preset} cache at {cache.directory} holds {cache.dim}-d ones")
    teacher = teacher_targets(cache, probe.cfg.model)
    predictor = Predictor(probe, device, n_views=1, seed=seed, batch_size=batch_size, teacher=teacher)
    return {t.id: [p.attempts for p in predictor.predict(t).tests] for t in tasks}
