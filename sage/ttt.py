"""Test-time training (TTT): before answering a task, a copy of the model is fine-tuned on that
task's demonstrations, then the original weights come back.

    task, test outputs removed (sage.predict.blind)
      -> leave-one-out examples over its DEMONSTRATIONS only: each in turn is the query, the others
         its context (`ttt_examples`)
      -> `ttt.steps` AdamW steps, or fewer where the task's compute budget `ttt.flops` runs out
         first (estimated from the first step's shapes, sage.model.forward_flops: large tasks get
         fewer steps; none when that is under `ttt.min_steps`), each on `ttt.batch_size` draws of
         those examples, every draw under its own random dihedral transform, colour permutation
         and demonstration order (the same encoding and canvases as training, sage/encoding.py);
         counted in steps, so the same on any machine; out of memory halves the examples per
         forward pass for the rest of the task (gradients accumulated: the same steps)
      -> every parameter tuned, the context re-encoded at every step; `ttt.context_demos` caps how
         many demonstrations a tuning example's context shows (a fresh random subset per draw)
      -> the tuned model answers the test inputs with the usual augmentation voting
      -> `TestTimeTrainer.tuned` puts the original weights back, whatever happened
      -> `ttt.runs` > 1: the task's step budget is shared out between that many runs from the
         original weights, each on its own stream of draws (`run`); sage.predict keeps the answers
         of the run that fitted the demonstrations best

The ARC rules allow any use of a test task's demonstration pairs at test time; its test outputs
are off limits, and `finetune` refuses a task that still carries one.
"""

from __future__ import annotations

import contextlib
import math
import time
import zlib
from dataclasses import dataclass
from typing import Iterator

import torch

from sage.arc import Task
from sage.config import ExperimentConfig, TTTConfig
from sage.encoding import ARCExamples, ExampleRef, collate, uses_shape_buckets
from sage.errors import TestOutputVisible
from sage.model import StudentConfig, forward_flops
from sage.recovery import FaultInjection, MicroBatch
from sage.step import Autocast, make_optimizer, set_lr, to_device, tuning_step, warmup_cosine

LOSS_WINDOW = 10  # a run's last loss and each point of its loss curve: the mean of this many steps


@dataclass
class TTTStats:
    """What fine-tuning on one task did (per_task.csv shows it)."""

    steps: int  # optimiser steps taken
    seconds: float
    examples: int  # leave-one-out examples the task offers (0: fewer than two demonstrations, no TTT)
    first_loss: float  # answer loss of the first step (nan without steps)
    last_loss: float  # mean answer loss of the last min(10, steps) steps
    micro_batch: int = 0  # examples per forward pass after out-of-memory halvings (0: never halved)
    # fp16 (run.precision): steps skipped because their gradients overflowed the loss scale, which
    # starts afresh for every task (step.INITIAL_LOSS_SCALE), so a task tunes alike wherever it runs.
    overflow_steps: int = 0
    run_last_losses: tuple[float, ...] = ()  # with ttt.runs > 1: each run's last_loss (last_loss is their mean)
    # Each run's loss curve: the mean answer loss of every LOSS_WINDOW steps in order (the report draws them).
    loss_curves: tuple[tuple[float, ...], ...] = ()


def ttt_examples(task: Task) -> list[ExampleRef]:
    """Leave-one-out over the demonstrations: each demonstration once as the query, the others as
    its context. Test pairs are never used, not even their inputs."""
    n = len(task.train)
    if n < 2:
        return []
    return [ExampleRef(0, tuple(d for d in range(n) if d != q), q, None) for q in range(n)]


def step_examples(data: ARCExamples, step: int, batch_size: int) -> list[dict]:
    """Step `step`'s batch: draws step * batch_size onwards of an endless stream that takes the
    task's leave-one-out examples in turn, each draw under its own augmentation and demonstration
    order (keyed by the draw's number). A task with fewer examples than the batch gets them more
    than once, but never twice the same way."""
    return [data[(draw, draw % len(data))] for draw in range(step * batch_size, (step + 1) * batch_size)]


def ttt_lr(step: int, ttt: TTTConfig, steps: int | None = None) -> float:
    """Linear warmup, then cosine decay to zero at the task's `steps` (default ttt.steps), so that a
    task whose compute budget grants fewer steps still ends on a small learning rate."""
    return warmup_cosine(step, ttt.lr, 0.0, ttt.warmup_steps, ttt.steps if steps is None else steps)


def describe_budget(ttt: TTTConfig) -> str:
    """A task's budget in words, for the evaluation log and report."""
    text = f"{ttt.steps} AdamW steps"
    if ttt.flops:
        text += (f", or as many as {ttt.flops:.3g} estimated FLOPs buy where fewer"
                 + (f" (none under {ttt.min_steps})" if ttt.min_steps else ""))
    return text


def describe_tuning(ttt: TTTConfig) -> str:
    """What a task's steps tune and on what contexts, in words, for the evaluation log and report."""
    text = "all parameters"
    if ttt.context_demos == 0:
        text += ", no demonstrations in the context (the query input alone)"
    elif ttt.context_demos is not None:
        text += f", contexts of at most {ttt.context_demos} demonstration(s)"
    if ttt.runs > 1:
        text += (f"; {ttt.runs} runs per task from the pretrained weights, sharing its steps, the answers of the "
                 "run with the lowest loss")
    return text


def step_flops(batch: dict[str, torch.Tensor], model: StudentConfig) -> float:
    """Estimated FLOPs of one TTT step on `batch`: forward and backward count as three forward passes."""
    examples, context_tokens = batch["context_mask"].shape
    return 3 * forward_flops(model, examples, context_tokens, batch["query"].shape[1])


def budgeted_steps(ttt: TTTConfig, first_step_flops: float) -> int:
    """The task's step budget: ttt.steps, or fewer where ttt.flops runs out first (module docstring)."""
    steps = min(ttt.steps, int(ttt.flops // first_step_flops)) if ttt.flops else ttt.steps
    return steps if steps >= ttt.min_steps else 0


@dataclass(frozen=True)
class Tuning:
    """What test-time training reads: the ttt settings, and from the checkpoint's config how its
    examples are encoded, how its loss averages and how it computes."""

    ttt: TTTConfig
    model: StudentConfig
    max_context_tokens: int  # data.max_context_tokens
    loss_normalization: str  # train.loss_normalization
    betas: tuple[float, float]  # train.betas, AdamW's
    precision: str  # run.precision (evaluate.py --precision may have changed it)

    @classmethod
    def of(cls, cfg: ExperimentConfig) -> Tuning:
        return cls(cfg.ttt, cfg.model, cfg.data.max_context_tokens, cfg.train.loss_normalization,
                   (cfg.train.betas[0], cfg.train.betas[1]), cfg.run.precision)


def tuning_data(task: Task, refs: list[ExampleRef], tuning: Tuning, run: int = 0) -> ARCExamples:
    """Run `run`'s stream of the task's augmented leave-one-out examples (`step_examples` reads it
    by draw)."""
    ttt, m = tuning.ttt, tuning.model
    # Each draw's augmentation depends on (seed, task, run, draw) only: a task tunes the same way
    # wherever it runs. Run 0 keeps the key it had before ttt.runs existed.
    seed = zlib.crc32((f"{ttt.seed}/{task.id}" + (f"/run{run}" if run else "")).encode())
    return ARCExamples([task], refs, m.grid_size, m.max_demos, tuning.max_context_tokens, augment=True,
                       seed=seed, augment_probability=ttt.augment_probability, answer_canvas=m.answer_canvas,
                       fit_answer=True, shuffle_demos=ttt.shuffle_demos, context_demos=ttt.context_demos,
                       resample_demos=bool(ttt.context_demos))


@dataclass(frozen=True)
class TaskBudget:
    """What a task's TTT budget grants before any stop, known without training (benchmarks/ttt_budget.py)."""

    steps: int  # budgeted_steps: 0 when the task has no leave-one-out examples or too few steps
    step_flops: float  # estimated FLOPs of its first step (0.0 without examples)
    # Its first batch's (answer canvas cells, context tokens): the order sage/task_batched_ttt.py tunes tasks in.
    first_batch_shape: tuple[int, int] = (0, 0)


def task_budget(task: Task, tuning: Tuning) -> TaskBudget:
    """The steps `finetune` will take on `task` at most (all its ttt.runs together), from the same
    first batch it reads."""
    refs = ttt_examples(task)
    if not refs or tuning.ttt.steps == 0:
        return TaskBudget(0, 0.0)
    first = collate(step_examples(tuning_data(task, refs, tuning), 0, tuning.ttt.batch_size))
    flops = step_flops(first, tuning.model)
    return TaskBudget(budgeted_steps(tuning.ttt, flops), flops, (first["target"].shape[1], first["tokens"].shape[1]))


def finetune(model: torch.nn.Module, task: Task, tuning: Tuning, device: torch.device,
             faults: FaultInjection | None = None, run: int = 0) -> TTTStats:
    """Fine-tune `model` in place on `task`'s demonstrations as tuning.ttt says (module docstring):
    run `run` of ttt.runs, with its share of the task's steps. `faults` simulates out-of-memory
    errors (tests; sage/recovery.py)."""
    if any(p.output is not None for p in task.test):
        raise TestOutputVisible(f"task {task.id}: test-time training was given the task's test outputs; "
                                "pass it through sage.predict.blind first")
    started = time.perf_counter()
    ttt = tuning.ttt
    refs = ttt_examples(task)
    if not refs or ttt.steps == 0:
        return TTTStats(0, time.perf_counter() - started, len(refs), math.nan, math.nan)
    data = tuning_data(task, refs, tuning, run)
    autocast = Autocast(device, tuning.precision)
    micro = MicroBatch("test-time training", ttt.batch_size, ttt.examples_per_pass, lambda _: None, accumulates=True,
                       scope=f"task {task.id}")
    model.train()
    optimizer = make_optimizer(model, ttt.lr, ttt.weight_decay, tuning.betas)
    # Losses stay on the device until the task ends: reading one is a host sync, and a GPU is never
    # kept waiting for the next batch.
    losses: list[torch.Tensor] = []
    overflowed: list[torch.Tensor] = []
    scaler = autocast.loss_scaler()  # fp16 only
    buckets = uses_shape_buckets(device)  # padding is masked: the same steps, fewer shapes on CUDA
    first = collate(step_examples(data, 0, ttt.batch_size))  # the budget counts the unpadded batch
    # Every run gets the same share, of the budget that run 0's first batch sets.
    steps = (budgeted_steps(ttt, step_flops(first, tuning.model)) if run == 0
             else task_budget(task, tuning).steps) // ttt.runs
    for step in range(steps):
        set_lr(optimizer, ttt_lr(step, ttt, steps))
        examples = (first if step == 0 and not buckets
                    else collate(step_examples(data, step, ttt.batch_size), shape_buckets=buckets))
        batch = to_device(pinned(examples, device), device)
        loss, skipped = tuning_step(model, optimizer, batch, autocast, tuning.loss_normalization, ttt.grad_clip,
                                    micro, faults, scaler)
        losses.append(loss)
        overflowed.append(skipped)
    model.eval()
    return run_stats(losses, overflowed, time.perf_counter() - started, len(refs), micro.halved_size)


def run_stats(losses: list[torch.Tensor], overflowed: list[torch.Tensor], seconds: float, examples: int,
              micro_batch: int) -> TTTStats:
    """One tuning run's stats from its steps' losses and overflow flags, still on the device (read
    here, at once): sage.ttt.finetune's and sage.task_batched_ttt's."""
    values = torch.stack(losses).tolist() if losses else []
    tail = values[-LOSS_WINDOW:]
    return TTTStats(len(values), seconds, examples, values[0] if values else math.nan,
                    sum(tail) / len(tail) if tail else math.nan, micro_batch,
                    overflow_steps=int(torch.stack(overflowed).sum()) if overflowed else 0,
                    loss_curves=(window_means(values),))


def window_means(values: list[float]) -> tuple[float, ...]:
    """The mean of every LOSS_WINDOW values in order (the last window may be shorter), rounded: a
    loss curve small enough to keep with each task's answers."""
    windows = (values[i:i + LOSS_WINDOW] for i in range(0, len(values), LOSS_WINDOW))
    return tuple(round(sum(w) / len(w), 5) for w in windows)


def pinned(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """On CUDA, the batch in page-locked memory, so that its copy to the GPU does not block the host."""
    return {k: v.pin_memory() for k, v in batch.items()} if device.type == "cuda" else batch


class TestTimeTrainer:
    """Fine-tunes one model task after task, restoring its original weights after each."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, model: torch.nn.Module, tuning: Tuning, device: torch.device,
                 faults: FaultInjection | None = None) -> None:
        self.model, self.tuning, self.device, self.faults = model, tuning, device, faults
        self.original = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @contextlib.contextmanager
    def tuned(self, task: Task, run: int = 0) -> Iterator[TTTStats]:
        """`model` fine-tuned on `task` (test outputs removed) by run `run` of ttt.runs inside the
        block; the original after."""
        try:
            with torch.inference_mode(False), torch.enable_grad():
                stats = finetune(self.model, task, self.tuning, self.device, self.faults, run)
            yield stats
        finally:
            self.model.load_state_dict(self.original)
            self.model.eval()


def pooled_stats(runs: list[TTTStats]) -> TTTStats:
    """One task's stats over its ttt.runs runs: steps and seconds summed, the first run's first loss,
    the mean of the runs' last losses (each kept in run_last_losses), every run's loss curve."""
    if len(runs) == 1:
        return runs[0]
    tuned = [r.last_loss for r in runs if not math.isnan(r.last_loss)]
    halved = [r.micro_batch for r in runs if r.micro_batch]
    return TTTStats(sum(r.steps for r in runs), sum(r.seconds for r in runs), runs[0].examples, runs[0].first_loss,
                    sum(tuned) / len(tuned) if tuned else math.nan, min(halved) if halved else 0,
                    sum(r.overflow_steps for r in runs), tuple(r.last_loss for r in runs),
                    tuple(c for r in runs for c in r.loss_curves))
