"""Speed: how long the student and the GR00T backbone take to answer the same tasks on this
machine (evaluate.py's speed section, benchmarks/bench.py's speed section), and what the machine is.

Timing counts seconds, so it is a measurement, never a budget: nothing scored depends on it.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from sage.arc import Task
from sage.predict import LoadedModel, Predictor, blind
from sage.step import Autocast
from sage.teacher.backbone import GrootBackbone, _init_buffers, build_backbone
from sage.teacher.groot import Teacher, resolve_dtype
from sage.teacher.presets import get_preset
from sage.teacher.prompt import evaluation_prompts, instruction_for
from sage.teacher.settings import TeacherConfig
from sage.teacher.tokenizer import load_tokenizer
from sage.voting import views as make_views


def speed_sample(tasks: Sequence[Task], n: int) -> list[Task]:
    """`n` tasks spread over the split by size (grids shown), so the mean time is representative."""
    if n <= 0:
        return []
    ordered = sorted(tasks, key=lambda t: (2 * len(t.train) + 1) * len(t.test))
    n = min(n, len(ordered))
    return [ordered[int((i + 0.5) * len(ordered) / n)] for i in range(n)]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device: torch.device) -> dict[str, Any]:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "cpu": _cpu_name(), "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_backbone(arch: Any, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """The backbone with random weights drawn in place (norm gains 1, biases 0, the rest N(0, 0.02),
    the scheme of sage.teacher.backbone.random_state_dict). Speed does not depend on the values, and
    this holds one copy of the weights (5.4 GB fp32 at full size) where building from a random
    state dict holds two."""
    with torch.device("meta"):
        model = GrootBackbone(arch).to(dtype)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        _init_buffers(model, device)  # RoPE frequencies and position ids, as build_backbone does
    return model.eval().requires_grad_(False)


def measure_speed(
    loaded: LoadedModel, tasks: Sequence[Task], n_tasks: int, teacher_preset: str, device: torch.device,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Inference time per task of the student and of the teacher backbone, same tasks, same machine.

    Per task, both answer every test input of the task once (one forward pass, the task as given):
    the student from its grids, the teacher from its task_context prompt (render + tokenise +
    backbone + pooling). One untimed warm-up each. The student is timed 3 times (median)."""
    if n_tasks == 0:
        return {"measured": False, "reason": "--speed-tasks 0"}
    student = Predictor(loaded, device, n_views=1, seed=0, batch_size=64)
    # Only tasks the student can answer in full: the same work for both.
    sample = speed_sample([t for t in tasks if all(student.fits(p.input) for p in t.test)], n_tasks)
    if not sample:
        return {"measured": False, "reason": f"no task's test inputs fit the student's {student.grid_size}x"
                                             f"{student.grid_size} answer canvas"}
    student_s = time_student(student, sample, device)
    teacher_s, teacher_rows, teacher_info = time_teacher(loaded.cfg.teacher, teacher_preset, sample, device, log)
    per_task = [{**row, "student_seconds": s_time, "teacher_seconds": t_time}
                for row, s_time, t_time in zip(teacher_rows, student_s, teacher_s)]
    student_mean, teacher_mean = statistics.mean(student_s), statistics.mean(teacher_s)
    return {
        "measured": True,
        "tasks": per_task,
        "student_seconds_per_task": student_mean,
        "teacher_seconds_per_task": teacher_mean,
        "speedup": teacher_mean / student_mean,
        "teacher": teacher_info,
        "student_dtype": Autocast(device, loaded.cfg.run.precision).name,
        "machine": machine_description(device),
        "method": "per task: every test input answered once, un-augmented; student = encode + forward "
                  "(median of 3), teacher = render + tokenise + backbone + pooling (1 run); one warm-up each",
    }


def time_student(student: Predictor, sample: Sequence[Task], device: torch.device) -> list[float]:
    """Seconds per task (median of 3) for the student to answer each task's test inputs once."""
    def run_student(task: Task) -> None:
        data, _ = student.encode(blind(task), make_views(task.id, 1))
        student.forward([data[i] for i in range(len(data))])

    run_student(sample[0])  # warm-up
    student_s = []
    for task in sample:
        times = []
        for _ in range(3):
            _sync(device)
            t0 = time.perf_counter()
            run_student(task)
            _sync(device)
            times.append(time.perf_counter() - t0)
        student_s.append(statistics.median(times))
    return student_s


def time_teacher(tc: TeacherConfig, teacher_preset: str, sample: Sequence[Task], device: torch.device,
                 log: Callable[[str], None]) -> tuple[list[float], list[dict[str, Any]], dict[str, Any]]:
    """Seconds per task for the teacher backbone (its checkpoint when the run's teacher is this
    preset with its weights at hand, random weights otherwise: speed does not depend on them), the
    per-task rows, and what was timed."""
    arch = get_preset(teacher_preset)
    real = teacher_preset == tc.preset and tc.checkpoint_dir is not None and Path(tc.checkpoint_dir).expanduser().is_dir()
    dtype = resolve_dtype(tc.dtype if real else "auto", device)
    log(f"speed: building the {arch.name} backbone ({'its checkpoint' if real else 'random weights'}, "
        f"{str(dtype).replace('torch.', '')} on {device}) and timing {len(sample)} task(s)")
    model = build_backbone(arch, device, dtype, tc.checkpoint_dir)[0] if real else random_backbone(arch, device, dtype)
    tokenizer_dir = tc.tokenizer_dir if tc.tokenizer_dir and Path(tc.tokenizer_dir).expanduser().is_dir() else None
    tokenizer = load_tokenizer(tokenizer_dir, allow_builtin=True)
    teacher = Teacher(arch, model, tokenizer, instruction_for("task_context"), device)
    teacher_s, per_task = [], []
    try:
        warm = evaluation_prompts([sample[0]], "test_input", tc.max_demos)[:1]
        teacher.features(warm)  # warm-up on a one-image prompt
        for task in sample:
            examples = evaluation_prompts([task], "task_context", tc.max_demos)
            _sync(device)
            t0 = time.perf_counter()
            teacher.features(examples)
            _sync(device)
            t_time = time.perf_counter() - t0
            teacher_s.append(t_time)
            per_task.append({
                "task": task.id, "test_inputs": len(task.test), "teacher_images": sum(len(e.grids) for e in examples),
                "teacher_prompt_tokens": sum(len(teacher.prompt_ids(len(e.grids))) for e in examples),
            })
    finally:
        del teacher, model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    info = {
        "preset": arch.name,
        "weights": "the checkpoint " + str(tc.checkpoint_dir) if real else
                   "random (speed does not depend on weight values; no real weights were used)",
        "tokenizer": tokenizer.identity if tokenizer_dir else
                     "built-in byte-level (the instruction text is one token per byte, a few hundred more "
                     "tokens per prompt than the real tokenizer; images dominate the length)",
        "dtype": str(dtype).replace("torch.", ""),
    }
    return teacher_s, per_task, info
