"""SAGE performance benchmark: one run on this machine measures, for a model config,

    peak     dense matmul FLOP/s (a torch.mm loop in run.precision's autocast dtype, bf16, fp16 or fp32): the MFU
             denominator,
             measured before and after training (the higher one is used: the machine may be shared)
    train    training throughput (context + answer tokens/s, examples/s) and MFU: FLOPs of every
             timed step counted by torch.utils.flop_counter.FlopCounterMode (forward + backward on
             the real model, data and loss), over wall time, over the peak; the share of step time
             spent blocked in next(loader) with data.num_workers workers
    memory   peak memory of one training step (at train.tokens_per_step or train.batch_size, AdamW
             state allocated), of one validation batch (at val.batch_size, inference mode) and of one
             TTT step (the costliest ARC-AGI-1 evaluation task's, ttt.tasks_in_flight copies of it,
             through the trainer an evaluation uses), each on its largest batch in a fresh process:
             CPU RSS high-water mark (VmHWM), or torch.cuda.max_memory_allocated on a GPU; and
             everywhere the peak of live tensors counted op by op (sage.memory_probe.TensorPeakMeter):
             on a CPU, about what a card's allocator would hold for the same step in the same precision
    cache    teacher feature cache bytes per prompt (= per example: one cache entry per task test
             input), pooled and token features: a small cache extracted with the tiny teacher (random
             weights) with and without token features, scaled to the configured teacher's width, and a
             pooled cache of every prompt written at the real width (random values) through
             sage.features.CacheWriter, then read through sage.distill.TeacherTargets (examples/s)
    speed    inference time per task, student vs the full-size GR00T N1.5 backbone with RANDOM weights
             (no real weights here; speed does not depend on them): sage.speed.measure_speed
    profile  (opt-in) torch.profiler over a few training steps: the top ops and the time per phase

Everything reuses the sage package: real ARC tasks and splits (sage.splits.load_splits), the
dataset, collate and LengthBucketSampler of sage.encoding, build_model, and the training loop's own
step (sage.step.train_step) and validation (sage.validation.validate).
With distillation on (distill.weight > 0) the examples carry RANDOM teacher targets of the real
shape (no teacher is run); the output says so. Student weights are random too (speed and memory
do not depend on them). Each target is marked PASS or FAIL.

    python -m benchmarks.bench                                        # configs/sage_44m.yaml, all sections
    python -m benchmarks.bench --only train --steps 10                # one section
    python -m benchmarks.bench --config configs/quickstart.yaml --set train.batch_size=16
    python -m benchmarks.bench --only profile --profile-steps 2       # where a training step's time goes

Prints progress to stderr, the table to stdout, and writes JSON (--json, default
benchmarks/results/<config>-<device>.json). On the 2-core CPU VM a sage-44m training step takes
30-60 s (about 4 minutes for the largest batch, which the memory section runs), so the CPU defaults
are small (1 warm-up + 3 timed steps, 1 speed task); the whole run takes about 10 minutes there.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch.profiler import record_function
from torch.utils.flop_counter import (
    FlopCounterMode,
    flop_registry,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/bench.py` works as well as `python -m benchmarks.bench`
    sys.path.insert(0, str(REPO))

from sage.config import ExperimentConfig, from_dict, load_config  # noqa: E402
from sage.datasets import load_dataset  # noqa: E402
from sage.device import resolve_device  # noqa: E402
from sage.distill import TeacherTargets  # noqa: E402
from sage.encoding import PAD, ARCExamples, LengthBucketSampler, collate, uses_shape_buckets  # noqa: E402
from sage.model import attention_kernel, build_model  # noqa: E402
from sage.recovery import FaultInjection, MicroBatch  # noqa: E402
from sage.memory_probe import TensorPeakMeter, costliest_ttt_task, largest_batch, ttt_step  # noqa: E402
from sage.step import (  # noqa: E402
    Autocast,
    compute_losses,
    make_optimizer,
    read_steps,
    to_device,
    train_step,
    unwrap,
)
from sage.teacher.settings import TeacherConfig  # noqa: E402
from sage.token_batches import training_sampler  # noqa: E402
from sage.splits import Splits, load_splits, make_datasets  # noqa: E402
from sage.validation import validate  # noqa: E402

SECTIONS = ("train", "memory", "cache", "speed")  # run by default, in this order
OPTIONAL_SECTIONS = ("profile",)

# The targets beside the figures (each marked PASS/FAIL).
TARGET_MFU = 0.40  # of the matmul peak measured in the same run
TARGET_DATA_WAIT = 0.05  # share of training wall time blocked in next(loader)
TARGET_POOLED_BYTES = 64 * 1024  # pooled teacher features per example (cache entry), mean
TARGET_SPEEDUP = 30.0  # student vs full-size backbone, per task

Log = Callable[[str], None]


# ----------------------------------------------------------------------------- FLOP counting

# torch's FlopCounterMode has formulas for the CUDA attention kernels only: on a CPU,
# scaled_dot_product_attention runs _scaled_dot_product_flash_attention_for_cpu and would count as
# 0 FLOPs. Same maths, so the same formulas (dense: masked keys are computed too).
_aten = torch.ops.aten
if _aten._scaled_dot_product_flash_attention_for_cpu not in flop_registry:
    register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu)(
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v))
    register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu_backward)(
        lambda grad_out, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad_out, q, k, v))


def forward_flops_by_component(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                               autocast: Autocast) -> dict[str, int]:
    """Forward FLOPs per model component (encoder/decoder by sub-block: attn, self_attn, cross_attn,
    mlp; other top-level modules whole). Forward only: FlopCounterMode's module attribution is
    reliable there, while in backward it charges ops to whichever module's hook fired last."""
    with torch.no_grad(), autocast(), FlopCounterMode(display=False) as counter:
        model(batch)
    out: dict[str, int] = {}
    for name, ops in counter.get_flop_counts().items():
        parts = name.split(".")
        if len(parts) == 4 and parts[2].isdigit():  # SageStudent.decoder.3.cross_attn
            key = f"{parts[1]}.{parts[3]}"
        elif len(parts) == 2 and parts[1] not in ("encoder", "decoder"):  # SageStudent.cell_head
            key = parts[1]
        else:
            continue
        out[key] = out.get(key, 0) + sum(ops.values())
    out["outside modules"] = counter.get_total_flops() - sum(out.values())
    return out


# ----------------------------------------------------------------------------- data and steps


class RandomTeacherCache:
    """Stands in for sage.features.FeatureCache when the config distils: random features of the
    configured teacher's width for the grids its task_context prompt shows (the demonstrations up
    to teacher.max_demos and the query input), so sage.distill.TeacherTargets lines them up with
    the student's slots as in training. Only shapes and loading cost matter here."""

    def __init__(self, dim: int, view: str, max_demos: int, dtype: torch.dtype = torch.float16) -> None:
        self.dim, self.max_demos, self.dtype = dim, max_demos, dtype
        self.identity = {"view": view, "prompt": {"max_demos": max_demos}}

    def missing(self, keys: Any) -> list[str]:
        return []

    def lookup(self, key: str, roles: list) -> tuple[torch.Tensor, torch.Tensor]:
        # roles in slot order: (input, output) of each demonstration, then the query input
        seen = torch.tensor([i < 2 * self.max_demos or i == len(roles) - 1 for i in range(len(roles))])
        return torch.randn(len(roles), self.dim).to(self.dtype) * seen[:, None], seen


@dataclass
class Data:
    splits: Splits
    train_set: ARCExamples
    val_set: ARCExamples
    teacher: str  # what the examples carry as teacher features


def build_data(cfg: ExperimentConfig) -> Data:
    """Training and validation examples from sage.splits.make_datasets, as training builds them,
    with random teacher targets in place of the cache when the config uses a teacher."""
    splits, m = load_splits(cfg), cfg.model
    targets, teacher = None, "none (distill.weight 0)"
    if cfg.uses_teacher:
        if m.kind == "probe" and m.probe_input == "tokens":
            raise SystemExit("error: the benchmark has no stand-in for token-reading probes (model.probe_input=tokens)")
        stand_in = RandomTeacherCache(m.teacher_dim, cfg.teacher.view, cfg.teacher.max_demos)
        targets = TeacherTargets(stand_in, m.num_grid_slots)
        teacher = (f"RANDOM {m.teacher_dim}-d targets of the real shape (distill.weight {cfg.distill.weight}; "
                   f"no teacher was run)")
    train_set, val_set = make_datasets(cfg, splits, targets, targets)
    return Data(splits, train_set, val_set, teacher)


def epoch_batches(cfg: ExperimentConfig, data: Data) -> list[list[int]]:
    """Epoch 0's batches of training example indices, as sage.training.train's sampler draws them."""
    return training_sampler(data.train_set.lengths, data.train_set.sides, cfg.train.batch_size,
                            cfg.train.tokens_per_step, cfg.run.seed).batches()


def training_setup(cfg: ExperimentConfig, device: torch.device, data: Data,
                   batches: list[list[int]] | None = None) -> tuple[Any, Any, Any]:
    """(model, AdamW, loader) as sage.training.train makes them (random init); the loader serves
    `batches` (example indices) or else epoch 0's batches."""
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model).to(device).train()
    sampler = epoch_batches(cfg, data) if batches is None else batches
    batch_of = functools.partial(collate, shape_buckets=uses_shape_buckets(device))  # as training pads them
    loader = torch.utils.data.DataLoader(data.train_set, batch_sampler=sampler, collate_fn=batch_of,
                                         num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")
    optimizer = make_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.betas)
    # Measured wherever asked (training itself compiles on CUDA only): the CPU figure is the reason.
    return (torch.compile(model, dynamic=True) if cfg.train.compile else model), optimizer, loader


def real_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
              cfg: ExperimentConfig, autocast: Autocast, scaler: torch.amp.GradScaler | None = None) -> None:
    """One optimiser step exactly as the training loop takes it (sage.step.train_step: forward,
    loss, backward, [fp16: unscale,] clip, fused AdamW), whole batch at once, and its numbers read
    back (the loop reads them once per log line; here once per step, which the timing waits for
    anyway). An fp16 step skipped for its loss scale counts as a step, as in training."""
    micro = MicroBatch("training", batch["tokens"].shape[0], None, lambda message: None)
    numbers = read_steps([train_step(model, optimizer, batch, cfg, autocast, micro, FaultInjection(), 0,
                                     scaler=scaler)])[0]
    if numbers.skipped and not numbers.overflowed:
        raise SystemExit("error: non-finite loss or gradient in a benchmark step")


def forward_backward_flops(model: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: ExperimentConfig,
                           autocast: Autocast) -> int:
    """FLOPs of forward + loss + backward on `batch` (FlopCounterMode); gradients are dropped after."""
    with FlopCounterMode(display=False) as counter:
        with autocast():
            out = model(batch)
            losses, _ = compute_losses(out, batch, model, cfg)
        losses["loss"].backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def first_example(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Example 0 of a batch, keeping the batch's padded context length."""
    return {k: v[:1] for k, v in batch.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- sections


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 4.0) -> dict[str, Any]:
    """Dense matmul FLOP/s: the best of 5 trials of back-to-back torch.mm on n x n operands, in the
    dtype training runs its matmuls in (run.precision's autocast: bf16, fp16, or fp32)."""
    n = 8192 if device.type == "cuda" else 2048
    if device.type == "cpu" and dtype == torch.float16:  # without fp16 hardware ~0.4 GFLOP/s: one 2048^3 mm, 40 s
        n = 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=c)
    sync(device)
    t0 = time.perf_counter()
    torch.mm(a, b, out=c)
    sync(device)
    reps = max(1, int(seconds / 5 / max(time.perf_counter() - t0, 1e-6)))
    best = 0.0
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=c)
        sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return {"flops_per_second": best, "n": n, "dtype": str(dtype).replace("torch.", ""), "reps_per_trial": reps}


@dataclass
class TimedSteps:
    """What the training section's loop records: one row per timed step with that step's example 0,
    and the first warm-up step's batch with its FLOPs counted in full."""
    rows: list[dict[str, Any]]
    first_examples: list[dict[str, torch.Tensor]]
    check_batch: dict[str, torch.Tensor]
    check_batch_flops: int


def train_section(cfg: ExperimentConfig, device: torch.device, data: Data, steps: int, warmup: int,
                  log: Log, batches: list[list[int]] | None = None) -> dict[str, Any]:
    model, optimizer, loader = training_setup(cfg, device, data, batches)
    autocast = Autocast(device, cfg.run.precision)
    if warmup < 1 or warmup + steps > len(loader):
        raise SystemExit(f"error: need 1 <= --warmup and --warmup + --steps <= {len(loader)} (one epoch)")
    log(f"train: {warmup} warm-up + {steps} timed steps, batch {cfg.train.batch_size}, "
        f"{cfg.data.num_workers} data workers, teacher targets: {data.teacher}")
    run = take_timed_steps(model, optimizer, loader, cfg, device, autocast, steps, warmup, log)
    components, check = count_timed_step_flops(run, unwrap(model), cfg, autocast, log)
    return {**train_figures(cfg, data, steps, warmup, run.rows, components, check),
            "attention_kernel": attention_kernel(cfg.model, device, autocast.dtype)}


def take_timed_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: Any, cfg: ExperimentConfig,
                     device: torch.device, autocast: Autocast, steps: int, warmup: int, log: Log) -> TimedSteps:
    """`warmup` + `steps` real training steps off the loader, each timed (data wait and step apart)."""
    batches = iter(loader)
    timed: list[dict[str, Any]] = []
    slices: list[dict[str, torch.Tensor]] = []
    seen_shapes: set[tuple[int, ...]] = set()  # a first-time shape may cost far more (kernel plans, allocator)
    scaler = autocast.loss_scaler()  # fp16: the loss scale, as training keeps it
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with record_function("data"):
            batch = next(batches)
        t1 = time.perf_counter()
        batch = to_device(batch, device)
        if i == 0:  # the first warm-up step is the "one real step" counted in full (its time is not used)
            with FlopCounterMode(display=False) as counter:  # counted on the plain model: compile
                real_step(unwrap(model), optimizer, batch, cfg, autocast, scaler)  # would not run under the counter
            full_batch_flops, check_batch = counter.get_total_flops(), batch
        else:
            real_step(model, optimizer, batch, cfg, autocast, scaler)
        sync(device)
        t2 = time.perf_counter()
        B, L = batch["tokens"].shape
        shape = (B, L, *batch["query"].shape[1:])
        new_shape = shape not in seen_shapes
        seen_shapes.add(shape)
        if i >= warmup:
            timed.append({
                "examples": B, "padded_context": L, "context_tokens": int(batch["context_mask"].sum()),
                "answer_cells": B * batch["query"].shape[1], "loss_cells": int((batch["target"] != PAD).sum()),
                "data_s": t1 - t0, "step_s": t2 - t1, "new_shape": new_shape,
            })
            slices.append(first_example(batch))
        log(f"train: step {i + 1}/{warmup + steps} ({'warm-up' if i < warmup else 'timed'}) {B}x{L} context: "
            f"{t2 - t0:.2f}s (data {t1 - t0:.3f}s)")
    del batches  # stop the workers
    return TimedSteps(timed, slices, check_batch, full_batch_flops)


def count_timed_step_flops(run: TimedSteps, model: torch.nn.Module, cfg: ExperimentConfig, autocast: Autocast,
                           log: Log) -> tuple[dict[str, int], dict[str, Any]]:
    """Sets each timed row's "flops"; returns the forward FLOPs by component and the count's check.

    FLOPs of a step are linear in the batch size at a fixed padded length (every counted op is a
    matmul or attention over the batch), so each timed step is counted exactly on its example 0,
    times its batch size; the full count of the first step checks this."""
    log("train: counting the FLOPs of the timed steps (FlopCounterMode)")
    per_shape: dict[tuple[int, int], int] = {}  # (padded context, answer cells) -> FLOPs of one example
    for row, one in zip(run.rows, run.first_examples):
        shape = (row["padded_context"], row["answer_cells"] // row["examples"])
        if shape not in per_shape:
            per_shape[shape] = forward_backward_flops(model, one, cfg, autocast)
        row["flops"] = row["examples"] * per_shape[shape]
    full = run.check_batch_flops
    scaled = run.check_batch["tokens"].shape[0] * forward_backward_flops(model, first_example(run.check_batch), cfg,
                                                                         autocast)
    components = forward_flops_by_component(model, first_example(run.check_batch), autocast)
    return components, {"full_first_step": full, "batch_size_x_example_0": scaled,
                        "relative_difference": abs(scaled - full) / max(full, 1)}


def train_figures(cfg: ExperimentConfig, data: Data, steps: int, warmup: int, timed: list[dict[str, Any]],
                  components: dict[str, int], flop_count_check: dict[str, Any]) -> dict[str, Any]:
    """The training section's figures from its timed steps' rows (FLOPs counted)."""
    total_s = sum(r["data_s"] + r["step_s"] for r in timed)
    flops = sum(r["flops"] for r in timed)
    tokens = sum(r["context_tokens"] + r["answer_cells"] for r in timed)
    examples = sum(r["examples"] for r in timed)
    repeated = [r for r in timed if not r["new_shape"]]
    repeated_s = sum(r["data_s"] + r["step_s"] for r in repeated)
    return {
        "steps": steps, "warmup": warmup, "batch_size": cfg.train.batch_size, "num_workers": cfg.data.num_workers,
        "teacher_targets": data.teacher,
        "step_seconds_mean": total_s / steps,
        "tokens_per_second": tokens / total_s,
        "examples_per_second": examples / total_s,
        "flops_per_step_mean": flops / steps,
        "achieved_flops_per_second": flops / total_s,
        "compute_only_flops_per_second": flops / sum(r["step_s"] for r in timed),
        "data_wait_share": sum(r["data_s"] for r in timed) / total_s,
        "new_shape_steps": steps - len(repeated),
        "repeated_shape_step_seconds_mean": repeated_s / len(repeated) if repeated else None,
        "new_shape_step_seconds_mean": ((total_s - repeated_s) / (steps - len(repeated))
                                        if steps > len(repeated) else None),
        "repeated_shape_flops_per_second": sum(r["flops"] for r in repeated) / repeated_s if repeated else None,
        "context_padding_share": 1 - sum(r["context_tokens"] for r in timed) / sum(
            r["examples"] * r["padded_context"] for r in timed),
        "answer_cells_with_loss_share": sum(r["loss_cells"] for r in timed) / sum(r["answer_cells"] for r in timed),
        "forward_flops_by_component_first_step": components,
        "flop_count_check": flop_count_check,
        "tokens_counted": "real (unpadded) context tokens + the batch's answer canvas cells per example",
        "flops_counted": "FlopCounterMode, forward + loss + backward (matmuls and attention, incl. padding); "
                         "the optimiser's elementwise work is not counted",
        "per_step": timed,
    }


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def memory_phase(cfg_dict: dict[str, Any], phase: str, threads: int) -> dict[str, Any]:
    """Peak memory of one training step, one validation batch or one TTT step on its largest batch
    (sage.memory_probe.largest_batch; training's by train.tokens_per_step when set; TTT's: the first
    batch of the ARC-AGI-1 evaluation task with the costliest step, ttt.tasks_in_flight copies of it
    in flight, through the trainer an evaluation uses: its copies of the weights and AdamW's state
    count). Runs in a fresh process (the peak then belongs to this phase alone); the high-water mark
    is reset once model, optimiser state and batch are in place, so it is the step's steady-state
    peak."""
    torch.set_num_threads(threads)
    cfg = from_dict(ExperimentConfig, cfg_dict, "<benchmark>")
    device = resolve_device(cfg.run.device)
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model).to(device)
    autocast = Autocast(device, cfg.run.precision)
    if phase == "ttt":
        step, held, shape = ttt_phase_step(cfg, model, device)
    else:
        step, held, shape = one_step(cfg, phase, model, device, autocast)
    gc.collect()
    before_kib = _status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        rss_method = "VmHWM of the phase's process, reset after setup"
    except OSError:
        rss_method = "VmHWM of the phase's process (includes setup: it could not be reset)"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    with TensorPeakMeter(held) as tensors:
        step()
        sync(device)
    peak_kib = _status_kib("VmHWM")
    if peak_kib is None:  # no /proc (not Linux): the process's lifetime maximum
        import resource

        peak_kib, rss_method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss (includes setup)"
    out = {
        "phase": phase, "batch": shape, "seconds": time.perf_counter() - started,
        "rss_before_bytes": None if before_kib is None else before_kib * 1024, "rss_peak_bytes": peak_kib * 1024,
        "rss_method": rss_method, "tensor_peak_bytes": tensors.peak, "precision": autocast.name,
        "tasks_in_flight": cfg.ttt.tasks_in_flight if phase == "ttt" else None,
    }
    if device.type == "cuda":
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def one_step(cfg: ExperimentConfig, phase: str, model: torch.nn.Module, device: torch.device,
             autocast: Autocast) -> tuple[Callable[[], None], list[Any], list[int]]:
    """The phase's step on its largest batch (to run), the tensors alive before it, the batch's shape."""
    optimizer = None
    data = build_data(cfg)
    dataset = data.train_set if phase == "train" else data.val_set
    sampler = (training_sampler(dataset.lengths, dataset.sides, cfg.train.batch_size, cfg.train.tokens_per_step,
                                cfg.run.seed) if phase == "train" else
               LengthBucketSampler(dataset.lengths, cfg.val.batch_size, shuffle=False, sides=dataset.sides))
    idx = largest_batch(dataset, sampler.batches())
    batch = to_device(collate([dataset[i] for i in idx], shape_buckets=uses_shape_buckets(device)), device)
    if phase == "train":
        optimizer = make_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.betas)
        for p in model.parameters():  # AdamW allocates its state on the first step; zero gradients
            p.grad = torch.zeros_like(p)  # make that step a near no-op
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def step() -> None:
        if phase == "train":
            real_step(model, optimizer, batch, cfg, autocast, autocast.loss_scaler())
        else:  # inference mode, as in training; the whole batch at once
            validate(model, [batch], device, autocast, cfg.model.grid_size, MicroBatch("validation", len(idx), None,
                                                                                      lambda message: None))

    held = [list(model.parameters()), list(optimizer.state.values()) if optimizer else [], batch]
    return step, held, [len(idx), int(batch["tokens"].shape[1])]


def ttt_phase_step(cfg: ExperimentConfig, model: torch.nn.Module,
                   device: torch.device) -> tuple[Callable[[], None], list[Any], list[int]]:
    """One TTT step of the costliest ARC-AGI-1 evaluation task as an evaluation takes it
    (sage.memory_probe.ttt_step: ttt.tasks_in_flight copies, the trainer's own state counted), the
    tensors alive before it (the model), the shape of all the tasks' batches."""
    from sage.predict import blind
    from sage.ttt import Tuning, task_budget

    tuning = Tuning.of(cfg)
    tasks = [blind(t) for t in load_dataset("arc-agi-1/evaluation")]
    costliest = costliest_ttt_task(tasks, {t.id: task_budget(t, tuning) for t in tasks})
    if costliest is None:
        raise SystemExit("error: no ARC-AGI-1 evaluation task gets a TTT step under this config's ttt: budget")
    task, budget = costliest
    return (lambda: ttt_step(model, tuning, task, device)), [list(model.parameters())], [
        cfg.ttt.tasks_in_flight * cfg.ttt.batch_size, budget.first_batch_shape[1]]


def memory_section(cfg: ExperimentConfig, device: torch.device, log: Log) -> dict[str, Any]:
    result: dict[str, Any] = {"scope": "main process only (DataLoader workers are separate processes)"}
    context = multiprocessing.get_context("spawn")  # a fresh interpreter per phase
    for phase in ("train", "val", "ttt"):
        log(f"memory: {phase} phase on its largest batch in a fresh process")
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            try:
                result[phase] = pool.submit(memory_phase, cfg.to_dict(), phase, torch.get_num_threads()).result()
            except BrokenProcessPool:  # killed: on Linux most likely by the kernel's out-of-memory killer
                raise SystemExit(f"error: the memory section's {phase} phase died (out of memory? `dmesg` says); "
                                 f"lower its batch (ttt.tasks_in_flight, ttt.batch_size, train.tokens_per_step)")
        r = result[phase]
        log(f"memory: {phase} {r['batch'][0]}x{r['batch'][1]}: peak RSS {fmt_bytes(r['rss_peak_bytes'])}, "
            f"tensors {fmt_bytes(r['tensor_peak_bytes'])} ({r['seconds']:.1f}s)")
    key = "cuda_max_allocated_bytes" if device.type == "cuda" else "rss_peak_bytes"
    result["compared"] = key
    return result


def cache_section(cfg: ExperimentConfig, data: Data, n_tasks: int, log: Log) -> dict[str, Any]:
    from sage.distill import prompts_for_dataset
    from sage.teacher.presets import get_preset

    tc = cfg.teacher
    dataset, tasks = cfg.data.train, data.splits.train_dataset
    real_dim = get_preset(tc.preset).feature_dim
    value_bytes = torch.empty((), dtype=getattr(torch, tc.feature_dtype)).element_size()
    result: dict[str, Any] = {"teacher": tc.preset, "feature_dim": real_dim, "feature_dtype": tc.feature_dtype,
                              "per": "prompt = cache entry = one student example (what one example reads)"}
    with tempfile.TemporaryDirectory(prefix="sage-bench-cache-") as tmp:
        tiny = replace(tc, preset="groot-n1.5-tiny", checkpoint_dir=None, tokenizer_dir=None, cache_dir=tmp,
                       dataset=dataset, token_features=False)
        measured = result["tiny_measured"] = tiny_cache_sizes(cfg, tiny, tasks, n_tasks, value_bytes, log)
        prompts = prompts_for_dataset(cfg, dataset, tasks)
        result["scaled"] = scaled_cache_sizes(cfg, prompts, measured, real_dim, value_bytes)
        result["real_width_pooled"] = real_width_pooled_cache(cfg, data, tiny, tasks, prompts, Path(tmp) / "real-width",
                                                              log)
    return result


def tiny_cache_sizes(cfg: ExperimentConfig, tiny: TeacherConfig, tasks: list, n_tasks: int, value_bytes: int,
                     log: Log) -> dict[str, Any]:
    """Caches of the first `n_tasks` tasks extracted by the tiny teacher, pooled features only and
    with token features: their file and tensor bytes, and so each entry's overhead (headers, manifest)."""
    from sage.distill import prompts_for_dataset
    from sage.extraction import run_extraction

    dataset = cfg.data.train
    measured = {}
    for tokens in (False, True):
        what = "pooled + token features" if tokens else "pooled features"
        log(f"cache: extracting the tiny teacher's {what} of the first {n_tasks} tasks of {dataset}")
        run = replace(cfg, teacher=replace(tiny, token_features=tokens))
        prompts = prompts_for_dataset(run, dataset, tasks[:n_tasks])
        ex = run_extraction(run.teacher, run.data, prompts, limit=n_tasks, progress=False, log=lambda s: None,
                            device=run.run.device)
        manifest = json.loads((ex.directory / "manifest.json").read_text())
        dim = manifest["spec"]["identity"]["features"]["dim"]
        entries = manifest["entries"].values()
        data_bytes = sum((len(e["roles"]) + (e["n_tokens"] if tokens else 0)) * dim * value_bytes for e in entries)
        file_bytes = sum(p.stat().st_size for p in ex.directory.rglob("*") if p.is_file())
        measured["tokens" if tokens else "pooled"] = {
            "entries": len(manifest["entries"]), "dim": dim, "file_bytes": file_bytes, "tensor_bytes": data_bytes,
            "overhead_bytes_per_entry": (file_bytes - data_bytes) / len(manifest["entries"]),
            "tokens_per_entry_mean": statistics.mean(e["n_tokens"] for e in entries),
            "extraction_seconds": ex.seconds,
        }
    return measured


def scaled_cache_sizes(cfg: ExperimentConfig, prompts: list, measured: dict[str, Any], real_dim: int,
                       value_bytes: int) -> dict[str, Any]:
    """Every prompt of the dataset at the configured teacher's width: tensor bytes from the prompt's
    grids (pooled) and tokens, plus the per-entry overhead `measured` on the tiny teacher's caches
    (headers, manifest: independent of the width)."""
    from sage.teacher.groot import Teacher
    from sage.teacher.presets import get_preset
    from sage.teacher.prompt import instruction_for
    from sage.teacher.tokenizer import load_tokenizer

    tc = cfg.teacher
    real_tokenizer = tc.tokenizer_dir is not None and Path(tc.tokenizer_dir).expanduser().is_dir()
    tokenizer = load_tokenizer(tc.tokenizer_dir if real_tokenizer else None, allow_builtin=True)
    arch = get_preset(tc.preset)
    # Teacher.prompt_ids needs only the tokenizer: no backbone is built for counting tokens.
    counter = Teacher(arch, None, tokenizer, instruction_for(tc.view), torch.device("cpu"))
    grids = [len(p.grids) for p in prompts]
    n_tokens = [len(counter.prompt_ids(g)) for g in grids]
    pooled = [measured["pooled"]["overhead_bytes_per_entry"] + g * real_dim * value_bytes for g in grids]
    token = [measured["tokens"]["overhead_bytes_per_entry"] + (g + t) * real_dim * value_bytes
             for g, t in zip(grids, n_tokens)]
    return {
        "prompts": len(prompts),
        "grids_per_prompt_mean": statistics.mean(grids), "grids_per_prompt_max": max(grids),
        "tokens_per_prompt_mean": statistics.mean(n_tokens),
        "tokenizer": "the real one" if real_tokenizer else
                     "built-in byte-level (instruction spelt one token per byte: a few hundred tokens more per "
                     "prompt than the real tokenizer; 256 per image either way)",
        "pooled_bytes_per_prompt_mean": statistics.mean(pooled), "pooled_bytes_per_prompt_max": max(pooled),
        "tokens_bytes_per_prompt_mean": statistics.mean(token), "tokens_bytes_per_prompt_max": max(token),
        "tokens_bytes_total": sum(token),
    }


def real_width_pooled_cache(cfg: ExperimentConfig, data: Data, tiny: TeacherConfig, tasks: list, prompts: list,
                            directory: Path, log: Log) -> dict[str, Any]:
    """The pooled cache of every prompt at the real width (random values), written through the cache
    writer into `directory`, then read back through TeacherTargets over the training examples. The
    tiny teacher's spec stands in (the real preset's needs its weights) with the width set."""
    from sage.features import CacheWriter, EntryFeatures, FeatureCache, build_spec, finalize
    from sage.teacher.presets import get_preset

    tc, m = cfg.teacher, cfg.model
    real_dim = get_preset(tc.preset).feature_dim
    log(f"cache: writing a {real_dim}-d {tc.feature_dtype} pooled cache of all {len(prompts)} prompts "
        "(random values) and reading it back")
    spec = build_spec(tiny, cfg.data.train, tasks)
    spec["identity"]["features"].update(dim=real_dim, dtype=tc.feature_dtype)
    writer = CacheWriter(directory, spec, shard_entries=tc.shard_entries)
    for p in prompts:
        writer.add(EntryFeatures(p.key, p.task_id, p.query, p.demos, p.roles, torch.randn(len(p.grids), real_dim)))
    writer.flush()
    finalize(directory, spec, [p.key for p in prompts])
    file_bytes = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    targets = TeacherTargets(FeatureCache(directory), m.num_grid_slots)
    examples = data.train_set
    started = time.perf_counter()
    for ref, demos in zip(examples.refs, examples.kept_demos):
        targets.for_example(examples.tasks[ref.task_index], demos, ref.query, m.max_demos)
    read_s = time.perf_counter() - started
    return {
        "prompts": len(prompts), "file_bytes": file_bytes, "bytes_per_prompt_mean": file_bytes / len(prompts),
        "read_examples": len(examples), "read_seconds": read_s, "read_examples_per_second": len(examples) / read_s,
        "read_path": "sage.distill.TeacherTargets.for_example over the training examples (memory-mapped "
                     "safetensors, page cache warm: the files were just written)",
    }


def speed_section(cfg: ExperimentConfig, device: torch.device, n_tasks: int, split: str, teacher: str,
                  log: Log) -> dict[str, Any]:
    from sage.predict import LoadedModel
    from sage.speed import measure_speed

    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model).to(device).eval()  # random weights: the time does not depend on them
    loaded = LoadedModel(Path("<random init>"), cfg, {}, model, sum(p.numel() for p in model.parameters()))
    log(f"speed: student ({loaded.parameters:,} parameters, random weights) vs the {teacher} backbone on "
        f"{n_tasks} task(s) of {split}")
    result = measure_speed(loaded, load_dataset(split), n_tasks, teacher, device, log)
    result["student_weights"] = "random (speed does not depend on weight values)"
    result["split"] = split
    return result


def profile_section(cfg: ExperimentConfig, device: torch.device, data: Data, steps: int, log: Log) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    model, optimizer, loader = training_setup(cfg, device, data)
    autocast = Autocast(device, cfg.run.precision)
    batches = iter(loader)
    forward = model.forward
    scaler = autocast.loss_scaler()

    def labelled_forward(batch: dict[str, torch.Tensor]) -> Any:  # train_step's forward passes, named
        with record_function("forward"):
            return forward(batch)

    model.forward = labelled_forward

    def step() -> None:
        with record_function("data"):
            batch = next(batches)
        real_step(model, optimizer, to_device(batch, device), cfg, autocast, scaler)

    log("profile: 1 warm-up step")
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    log(f"profile: {steps} profiled step(s)")
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    wall = time.perf_counter() - started
    averages = prof.key_averages()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    # CPU-side time per phase: the autograd engine runs one evaluate_function per backward node.
    seconds = {e.key: e.cpu_time_total / 1e6 for e in averages}
    phases = {name: seconds.get(key, 0.0) for name, key in (
        ("data", "data"), ("forward", "forward"), ("optimizer step", "Optimizer.step#AdamW.step"))}
    phases["backward"] = sum(v for k, v in seconds.items() if k.startswith("autograd::engine::evaluate_function"))
    phases["rest (clip, .item(), zero_grad, ...)"] = wall - sum(phases.values())
    return {"steps": steps, "wall_seconds": wall, "phase_seconds": phases,
            "table": averages.table(sort_by=sort, row_limit=25)}


# ----------------------------------------------------------------------------- report


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def fmt_flops(x: float) -> str:
    return f"{x / 1e12:.2f} TFLOP/s" if x >= 1e12 else f"{x / 1e9:.1f} GFLOP/s"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


Row = tuple[str, str, str, str, str]  # section, metric, value, target, PASS/FAIL


def summary_rows(results: dict[str, Any]) -> tuple[list[Row], dict[str, Any]]:
    """(section, metric, value, target, PASS/FAIL) rows, and the targets' verdicts for the JSON."""
    rows, targets = [], {}
    s = results["sections"]
    for section, rows_of in (("peak", peak_rows), ("train", train_rows), ("memory", memory_rows),
                             ("cache", cache_rows), ("speed", speed_rows)):
        if section in s:
            more, verdicts = rows_of(s)
            rows += more
            targets.update(verdicts)
    return rows, targets


def peak_rows(s: dict[str, Any]) -> tuple[list[Row], dict[str, Any]]:
    p = s["peak"]
    return [("peak", f"dense matmul ({p['dtype']}, {p['n']}^3, best)", fmt_flops(p["flops_per_second"]), "", "")], {}


def train_rows(s: dict[str, Any]) -> tuple[list[Row], dict[str, Any]]:
    t = s["train"]
    mfu = t["achieved_flops_per_second"] / s["peak"]["flops_per_second"]
    targets = {"mfu": {"value": mfu, "target": f">= {TARGET_MFU:.0%}", "pass": mfu >= TARGET_MFU},
               "data_wait": {"value": t["data_wait_share"], "target": f"<= {TARGET_DATA_WAIT:.0%}",
                             "pass": t["data_wait_share"] <= TARGET_DATA_WAIT}}
    rows = [
        ("train", "teacher targets", t["teacher_targets"].split(" (")[0], "", ""),
        ("train", f"step time (mean of {t['steps']}, batch {t['batch_size']})",
         f"{t['step_seconds_mean']:.2f} s", "", ""),
        ("train", "steps with a shape not seen before in the run", f"{t['new_shape_steps']} of {t['steps']}",
         "", ""),
        ("train", "step time, shapes seen before (mean)", f"{t['repeated_shape_step_seconds_mean']:.2f} s"
         if t["repeated_shape_step_seconds_mean"] is not None else "none", "", ""),
        ("train", "throughput, context + answer tokens", f"{t['tokens_per_second']:,.0f} tokens/s", "", ""),
        ("train", "throughput, examples", f"{t['examples_per_second']:.2f} examples/s", "", ""),
        ("train", "FLOPs per step (counted, mean)", f"{t['flops_per_step_mean'] / 1e12:.2f} TFLOP", "", ""),
        ("train", "achieved (wall time)", fmt_flops(t["achieved_flops_per_second"]), "", ""),
        ("train", "MFU (of measured matmul peak)", f"{mfu:.1%}", f">= {TARGET_MFU:.0%}",
         verdict(mfu >= TARGET_MFU)),
        ("train", "MFU, without data wait",
         f"{t['compute_only_flops_per_second'] / s['peak']['flops_per_second']:.1%}", "", ""),
        ("train", f"data wait ({t['num_workers']} workers)", f"{t['data_wait_share']:.2%}",
         f"<= {TARGET_DATA_WAIT:.0%}", verdict(t["data_wait_share"] <= TARGET_DATA_WAIT)),
        ("train", "answer cells with a loss (of grid^2)", f"{t['answer_cells_with_loss_share']:.1%}", "", ""),
        ("train", "context padding", f"{t['context_padding_share']:.1%}", "", ""),
        ("train", "FLOP count check (B x ex. 0 vs full)",
         f"{t['flop_count_check']['relative_difference']:.1e} rel. diff", "", ""),
    ]
    parts = t["forward_flops_by_component_first_step"]
    top = sorted(parts.items(), key=lambda kv: -kv[1])[:4]
    rows.append(("train", "forward FLOPs by component (1st step)",
                 ", ".join(f"{k} {v / sum(parts.values()):.0%}" for k, v in top), "", ""))
    return rows, targets


def memory_rows(s: dict[str, Any]) -> tuple[list[Row], dict[str, Any]]:
    mem, key = s["memory"], s["memory"]["compared"]
    what = "CUDA max allocated" if key.startswith("cuda") else "peak RSS"
    rows = []
    for phase in ("train", "val", "ttt"):
        r = mem[phase]
        flight = r.get("tasks_in_flight") or 1
        tasks = "" if phase != "ttt" else f", {flight} tasks in flight" if flight > 1 else ", one task"
        shape = f"(batch {r['batch'][0]}x{r['batch'][1]}{tasks})"
        rows.append(("memory", f"{phase} {what} {shape}", fmt_bytes(r[key]), "<= train" if phase == "val" else "",
                     verdict(r[key] <= mem["train"][key]) if phase == "val" else ""))
        rows.append(("memory", f"{phase} live tensors, {r['precision']} (what a GPU's allocator holds)",
                     fmt_bytes(r["tensor_peak_bytes"]), "", ""))
    ok = mem["val"][key] <= mem["train"][key]
    return rows, {"val_memory_le_train": {"value": mem["val"][key], "target": "<= train peak", "pass": ok}}


def cache_rows(s: dict[str, Any]) -> tuple[list[Row], dict[str, Any]]:
    c = s["cache"]
    sc, rw = c["scaled"], c["real_width_pooled"]
    pooled = rw["bytes_per_prompt_mean"]
    targets = {"pooled_cache": {"value": pooled, "target": f"<= {fmt_bytes(TARGET_POOLED_BYTES)}",
                                "pass": pooled <= TARGET_POOLED_BYTES}}
    w = f"{c['feature_dim']}-d {c['feature_dtype']}"
    mean_max = lambda kind: (f"{fmt_bytes(sc[f'{kind}_bytes_per_prompt_mean'])}, "  # noqa: E731
                             f"max {fmt_bytes(sc[f'{kind}_bytes_per_prompt_max'])}")
    return [
        ("cache", f"pooled per prompt, {w} (written)", fmt_bytes(pooled), f"<= {fmt_bytes(TARGET_POOLED_BYTES)}",
         verdict(pooled <= TARGET_POOLED_BYTES)),
        ("cache", f"pooled per prompt, {w} (scaled), max", mean_max("pooled"), "", ""),
        ("cache", f"tokens per prompt, {w} (scaled), max", mean_max("tokens"), "", ""),
        ("cache", f"tokens, all {sc['prompts']} prompts (scaled)", fmt_bytes(sc["tokens_bytes_total"]), "", ""),
        ("cache", "pooled read (TeacherTargets)", f"{rw['read_examples_per_second']:,.0f} examples/s", "", ""),
    ], targets


def speed_rows(s: dict[str, Any]) -> tuple[list[Row], dict[str, Any]]:
    sp = s["speed"]
    if not sp.get("measured"):
        return [("speed", "not measured", sp.get("reason", ""), "", "")], {}
    ok = sp["speedup"] >= TARGET_SPEEDUP
    return [
        ("speed", f"student per task (random weights, {len(sp['tasks'])} task)",
         f"{sp['student_seconds_per_task'] * 1e3:.1f} ms", "", ""),
        ("speed", f"{sp['teacher']['preset']} backbone per task (RANDOM weights)",
         f"{sp['teacher_seconds_per_task']:.2f} s", "", ""),
        ("speed", "student speed-up", f"{sp['speedup']:,.0f}x", f">= {TARGET_SPEEDUP:.0f}x", verdict(ok)),
    ], {"speedup": {"value": sp["speedup"], "target": f">= {TARGET_SPEEDUP:.0f}x", "pass": ok}}


def render(rows: list[tuple[str, ...]], header: str) -> str:
    head = ("section", "metric", "value", "target", "")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([header, line(head), "  ".join("-" * w for w in widths), *map(line, rows)])


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args, sections = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    if cfg.train.tokens_per_step == "auto":
        raise SystemExit("error: bench.py measures a given train.tokens_per_step; auto is chosen when a run starts "
                         "(its log states the number): set that number")
    device = resolve_device(cfg.run.device)
    if args.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", file=sys.stderr, flush=True)

    machine = describe_machine(device)
    log(f"{args.config} on {device} ({machine['cpu']}, {torch.get_num_threads()} threads, torch {torch.__version__}); "
        f"sections: {', '.join(sections)}")
    results: dict[str, Any] = {"config": args.config, "overrides": args.overrides, "run": cfg.run.name,
                               "machine": machine, "sections": run_sections(sections, args, cfg, device, log)}
    machine["load_average_end"] = os.getloadavg()
    results["seconds"] = time.perf_counter() - started
    rows, results["targets"] = summary_rows(results)
    print_report(results, rows, device)
    path = write_json(results, args.json, device)
    print(f"\nJSON: {path}")
    return 0


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The command line, and the sections it asks for (in its order)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/sage_44m.yaml", help="experiment YAML (default: sage-44m)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, as train_sage.py (repeatable)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections of {', '.join(SECTIONS + OPTIONAL_SECTIONS)} "
                             f"(default: {','.join(SECTIONS)})")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (default 20 on CUDA, 3 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps, >= 1 (default 5 on CUDA, 1 on CPU)")
    parser.add_argument("--speed-tasks", type=int, default=None, help="tasks timed (default 3 on CUDA, 1 on CPU)")
    parser.add_argument("--speed-split", default="arc-agi-1/evaluation", help="tasks the speed section draws from")
    parser.add_argument("--speed-teacher", default="groot-n1.5",
                        help="backbone timed against the student: groot-n1.5 (full size) or groot-n1.5-tiny")
    parser.add_argument("--cache-tasks", type=int, default=8, help="tasks the tiny teacher extracts (cache section)")
    parser.add_argument("--profile-steps", type=int, default=None, help="profiled steps (default 10 on CUDA, 2 on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--peak-seconds", type=float, default=4.0,
                        help="seconds of matmuls per peak measurement, before and after training (default 4)")
    parser.add_argument("--json", default=None, help="output JSON (default benchmarks/results/<config>-<device>.json)")
    parser.add_argument("--no-cudnn-attention", action="store_true",
                        help="keep torch's attention off cuDNN's kernel (it builds a plan per new shape): the "
                             "GPU check's attention stage compares the two")
    args = parser.parse_args(argv)
    sections = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = sorted(set(sections) - set(SECTIONS + OPTIONAL_SECTIONS))
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(unknown)}")
    return args, sections


def describe_machine(device: torch.device) -> dict[str, Any]:
    """sage.speed's description of the machine, with torch's threads and the load average at the start."""
    from sage.speed import machine_description

    return {**machine_description(device), "interop_threads": torch.get_num_interop_threads(),
            "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"), "load_average_start": os.getloadavg()}


def run_sections(sections: list[str], args: argparse.Namespace, cfg: ExperimentConfig, device: torch.device,
                 log: Log) -> dict[str, Any]:
    """Each section asked for, in the fixed order of SECTIONS then OPTIONAL_SECTIONS (training adds "peak")."""
    cuda = device.type == "cuda"
    s: dict[str, Any] = {}
    data = build_data(cfg) if {"train", "cache", "profile"} & set(sections) else None
    if "train" in sections:
        steps = args.steps or (20 if cuda else 3)
        warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
        s["train"], s["peak"] = train_between_peaks(cfg, device, data, steps, warmup, args.peak_seconds, log)
    if "memory" in sections:
        s["memory"] = memory_section(cfg, device, log)
    if "cache" in sections:
        s["cache"] = cache_section(cfg, data, args.cache_tasks, log)
    if "speed" in sections:
        n = args.speed_tasks if args.speed_tasks is not None else (3 if cuda else 1)
        s["speed"] = speed_section(cfg, device, n, args.speed_split, args.speed_teacher, log)
    if "profile" in sections:
        s["profile"] = profile_section(cfg, device, data, args.profile_steps or (10 if cuda else 2), log)
    return s


def train_between_peaks(cfg: ExperimentConfig, device: torch.device, data: Data, steps: int, warmup: int,
                        peak_seconds: float, log: Log) -> tuple[dict[str, Any], dict[str, Any]]:
    """The training section between two matmul peak measurements: (train, the higher peak), MFU set."""
    log("peak: dense matmul loop")
    dtype = Autocast(device, cfg.run.precision).dtype
    before = matmul_peak(device, dtype, peak_seconds)
    log(f"peak: {fmt_flops(before['flops_per_second'])}")
    train = train_section(cfg, device, data, steps, warmup, log)
    after = matmul_peak(device, dtype, peak_seconds)
    log(f"peak again after training: {fmt_flops(after['flops_per_second'])}")
    peak = max(before, after, key=lambda p: p["flops_per_second"])
    peak["before_and_after_training"] = [before["flops_per_second"], after["flops_per_second"]]
    train["mfu"] = train["achieved_flops_per_second"] / peak["flops_per_second"]
    return train, peak


def print_report(results: dict[str, Any], rows: list[Row], device: torch.device) -> None:
    """The table of figures and targets under a header naming the run, then the profile if one was taken."""
    machine = results["machine"]
    command = " ".join([results["config"], *(f"--set {o}" for o in results["overrides"])])
    header = (f"SAGE benchmark: {command} on {device} ({machine.get('gpu', machine['cpu'])}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}); "
              f"load average {machine['load_average_start'][0]:.2f} at start, "
              f"{machine['load_average_end'][0]:.2f} at end; {results['seconds'] / 60:.1f} min")
    if rows:
        print(render(rows, header))
    if "profile" in results["sections"]:
        p = results["sections"]["profile"]
        print(f"\nprofile: {p['steps']} training step(s), {p['wall_seconds']:.1f}s; time per phase (s): "
              + ", ".join(f"{k} {v:.2f}" for k, v in sorted(p["phase_seconds"].items(), key=lambda kv: -kv[1])))
        print(p["table"])


def write_json(results: dict[str, Any], json_path: str | None, device: torch.device) -> Path:
    """Writes the results to --json, or by default to benchmarks/results/<config>-<device>.json."""
    default = REPO / "benchmarks" / "results" / f"{Path(results['config']).stem}-{device.type}.json"
    path = Path(json_path) if json_path else default
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str))
    return path


if __name__ == "__main__":
    sys.exit(main())
