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
         fewer steps when the loss converges (`ttt.stop_loss`, checked every STOP_WINDOW steps:
         the same on any machine) or when the optional safety clock `ttt.seconds` runs out (then
         the steps taken, and the answers, depend on the machine and its load); out of memory
         halves the examples per forward pass for the rest of the task (gradients accumulated:
         the same steps)
      -> `ttt.tune`: all parameters (the context re-encoded at every step), or the decoder alone,
         the encoder frozen and `ttt.pool` augmented examples encoded once (`EncodedPool`; pool 0:
         each step's examples encoded as they come, forward only); `ttt.context_demos` caps how
         many demonstrations a tuning example's context shows (a fresh random subset per draw)
      -> the tuned model answers the test inputs with the usual augmentation voting
      -> `TestTimeTrainer.tuned` puts the original weights back, whatever happened
      -> `ttt.runs` > 1: the task's step budget is shared out between that many runs from the
         original weights, each on its own stream of draws (`run`); sage.predict pools their
         views' votes into one pair of attempts, or keeps the answers of the run that fitted the
         demonstrations best (`ttt.runs_choice`)

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
from sage.encoding import ARCExamples, ExampleRef, collate
from sage.errors import TestOutputVisible
from sage.model import StudentConfig, forward_flops
from sage.recovery import FaultInjection, MicroBatch
from sage.step import Autocast, make_optimizer, set_lr, to_device, tuning_step, warmup_cosine

STOP_WINDOW = 10  # ttt.stop_loss compares the mean loss of this many latest steps


@dataclass
class TTTStats:
    """What fine-tuning on one task did (per_task.csv shows it)."""

    steps: int  # optimiser steps taken
    seconds: float
    examples: int  # leave-one-out examples the task offers (0: fewer than two demonstrations, no TTT)
    first_loss: float  # answer loss of the first step (nan without steps)
    last_loss: float  # mean answer loss of the last min(10, steps) steps
    micro_batch: int = 0  # examples per forward pass after out-of-memory halvings (0: never halved)
    run_last_losses: tuple[float, ...] = ()  # with ttt.runs > 1: each run's last_loss (last_loss is their mean)
    # Each run's loss curve: the mean answer loss of every STOP_WINDOW steps in order (the report draws them).
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


def ttt_lr(step: int, seconds: float, ttt: TTTConfig, steps: int | None = None) -> float:
    """Linear warmup, then cosine decay to zero at the task's `steps` (default ttt.steps) or, with a
    time budget, at whichever of those and ttt.seconds comes first (`seconds`: time spent so far), so
    that a task cut short by a budget still ends on a small learning rate."""
    clock = seconds / ttt.seconds if ttt.seconds else 0.0
    return warmup_cosine(step, ttt.lr, 0.0, ttt.warmup_steps, ttt.steps if steps is None else steps,
                         progress_at_least=clock)


def describe_budget(ttt: TTTConfig) -> str:
    """A task's budget in words, for the evaluation log and report."""
    text = f"{ttt.steps} AdamW steps"
    if ttt.flops:
        text += (f", or as many as {ttt.flops:.3g} estimated FLOPs buy where fewer"
                 + (f" (none under {ttt.min_steps})" if ttt.min_steps else ""))
    if ttt.seconds:
        text += f", or {ttt.seconds:g} s where that ends first"
    return text


def describe_tuning(ttt: TTTConfig) -> str:
    """What a task's steps tune and on what contexts, in words, for the evaluation log and report."""
    if ttt.tune == "all":
        text = "all parameters"
    elif ttt.pool:
        text = f"the decoder alone (encoder frozen, a pool of {ttt.pool} examples encoded once)"
    else:
        text = "the decoder alone (encoder frozen, each step's examples encoded as they come)"
    if ttt.context_demos == 0:
        text += ", no demonstrations in the context (the query input alone)"
    elif ttt.context_demos is not None:
        text += f", contexts of at most {ttt.context_demos} demonstration(s)"
    if ttt.runs > 1:
        choice = "their votes pooled" if ttt.runs_choice == "votes" else "the answers of the run with the lowest loss"
        text += f"; {ttt.runs} runs per task from the pretrained weights, sharing its steps, {choice}"
    if ttt.answer_context_demos is not None:
        text += (f"; answers on contexts of at most {ttt.answer_context_demos} demonstration(s), "
                 "view v from demonstration v mod n")
    return text


def step_flops(batch: dict[str, torch.Tensor], model: StudentConfig, ttt: TTTConfig) -> float:
    """Estimated FLOPs of one TTT step on `batch`: forward and backward count as three forward
    passes; with tune: decoder only the decoder's, the encoder's states cached (plus one encoder
    forward pass a step with pool 0, which encodes each step's examples as they come)."""
    examples, context_tokens = batch["context_mask"].shape
    shapes = (model, examples, context_tokens, batch["query"].shape[1])
    if ttt.tune == "all":
        return 3 * forward_flops(*shapes)
    decoder = forward_flops(*shapes, encoder=False)
    return 3 * decoder + (forward_flops(*shapes) - decoder if ttt.pool == 0 else 0.0)


def budgeted_steps(ttt: TTTConfig, first_step_flops: float) -> int:
    """The task's step budget: ttt.steps, or fewer where ttt.flops runs out first (module docstring)."""
    steps = min(ttt.steps, int(ttt.flops // first_step_flops)) if ttt.flops else ttt.steps
    return steps if steps >= ttt.min_steps else 0


def tuning_data(task: Task, refs: list[ExampleRef], cfg: ExperimentConfig, run: int = 0) -> ARCExamples:
    """Run `run`'s stream of the task's augmented leave-one-out examples (`step_examples` reads it
    by draw)."""
    ttt, m = cfg.ttt, cfg.model
    # Each draw's augmentation depends on (seed, task, run, draw) only: a task tunes the same way
    # wherever it runs. Run 0 keeps the key it had before ttt.runs existed.
    seed = zlib.crc32((f"{ttt.seed}/{task.id}" + (f"/run{run}" if run else "")).encode())
    return ARCExamples([task], refs, m.grid_size, m.max_demos, cfg.data.max_context_tokens, augment=True,
                       seed=seed, augment_probability=ttt.augment_probability, answer_canvas=m.answer_canvas,
                       fit_answer=True, shuffle_demos=ttt.shuffle_demos, context_demos=ttt.context_demos,
                       resample_demos=bool(ttt.context_demos))


@dataclass(frozen=True)
class TaskBudget:
    """What a task's TTT budget grants before any stop, known without training (benchmarks/ttt_budget.py)."""

    steps: int  # budgeted_steps: 0 when the task has no leave-one-out examples or too few steps
    step_flops: float  # estimated FLOPs of its first step (0.0 without examples)


def task_budget(task: Task, cfg: ExperimentConfig) -> TaskBudget:
    """The steps `finetune` will take on `task` at most (all its ttt.runs together), from the same
    first batch it reads."""
    refs = ttt_examples(task)
    if not refs or cfg.ttt.steps == 0:
        return TaskBudget(0, 0.0)
    first = collate(step_examples(tuning_data(task, refs, cfg), 0, cfg.ttt.batch_size))
    flops = step_flops(first, cfg.model, cfg.ttt)
    return TaskBudget(budgeted_steps(cfg.ttt, flops), flops)


def finetune(model: torch.nn.Module, task: Task, cfg: ExperimentConfig, device: torch.device,
             faults: FaultInjection | None = None, run: int = 0) -> TTTStats:
    """Fine-tune `model` in place on `task`'s demonstrations as cfg.ttt says (module docstring):
    run `run` of ttt.runs, with its share of the task's steps. `faults` simulates out-of-memory
    errors (tests; sage/recovery.py)."""
    if any(p.output is not None for p in task.test):
        raise TestOutputVisible(f"task {task.id}: test-time training was given the task's test outputs; "
                                "pass it through sage.predict.blind first")
    started = time.perf_counter()
    ttt, m = cfg.ttt, cfg.model
    refs = ttt_examples(task)
    if not refs or ttt.steps == 0:
        return TTTStats(0, time.perf_counter() - started, len(refs), math.nan, math.nan)
    data = tuning_data(task, refs, cfg, run)
    autocast = Autocast(device, cfg.run.precision)
    micro = MicroBatch("test-time training", ttt.batch_size, None, lambda _: None, accumulates=True,
                       scope=f"task {task.id}")
    model.train()
    with tuned_parameters(model, ttt.tune):
        optimizer = make_optimizer(model, ttt.lr, ttt.weight_decay, cfg.train.betas, ttt.fused_adamw)
        pool = EncodedPool(model, data, ttt.pool, ttt.batch_size, device, autocast) if ttt.tune == "decoder" else None
        # Losses stay on the device: reading one is a host sync, done only every STOP_WINDOW steps
        # when ttt.stop_loss asks, so a GPU is never kept waiting for the next batch.
        losses: list[torch.Tensor] = []
        # Step 0's batch, read first for the budget, then trained on.
        first = collate(step_examples(data, 0, ttt.batch_size)) if pool is None else pool.batch(0)
        # Every run gets the same share, of the budget that run 0's first batch sets.
        steps = (budgeted_steps(ttt, step_flops(first if pool is None else first[0], m, ttt)) if run == 0
                 else task_budget(task, cfg).steps) // ttt.runs
        for step in range(steps):
            spent = time.perf_counter() - started
            if ttt.seconds and spent >= ttt.seconds:
                break
            set_lr(optimizer, ttt_lr(step, spent, ttt, steps))
            if pool is None:
                examples = first if step == 0 else collate(step_examples(data, step, ttt.batch_size))
                batch, context = to_device(pinned(examples, device), device), None
            else:
                batch, context = first if step == 0 else pool.batch(step)
            losses.append(tuning_step(model, optimizer, batch, autocast, cfg.train.loss_normalization,
                                      ttt.grad_clip, context, micro, faults))
            if len(losses) % STOP_WINDOW == 0 and converged(losses, ttt.stop_loss):
                break  # counted in steps: the same on any machine
    model.eval()
    values = torch.stack(losses).tolist() if losses else []
    tail = values[-STOP_WINDOW:]
    return TTTStats(len(values), time.perf_counter() - started, len(refs), values[0] if values else math.nan,
                    sum(tail) / len(tail) if tail else math.nan, micro.size if micro.size < ttt.batch_size else 0,
                    loss_curves=(window_means(values),))


def window_means(values: list[float]) -> tuple[float, ...]:
    """The mean of every STOP_WINDOW values in order (the last window may be shorter), rounded: a
    loss curve small enough to keep with each task's answers."""
    windows = (values[i:i + STOP_WINDOW] for i in range(0, len(values), STOP_WINDOW))
    return tuple(round(sum(w) / len(w), 5) for w in windows)


def converged(losses: list[torch.Tensor], stop_loss: float) -> bool:
    """ttt.stop_loss: the mean loss of the last STOP_WINDOW steps is below it (0: never)."""
    return bool(stop_loss) and len(losses) >= STOP_WINDOW and float(torch.stack(losses[-STOP_WINDOW:]).mean()) < stop_loss


def pinned(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """On CUDA, the batch in page-locked memory, so that its copy to the GPU does not block the host."""
    return {k: v.pin_memory() for k, v in batch.items()} if device.type == "cuda" else batch


# What ttt.tune: decoder tunes: the decoder and what reads the task for it. Everything else, the
# encoder and the embeddings it shares with the decoder included, stays as pretrained, so the
# context states cached while tuning are exactly those the tuned model computes when it answers.
DECODER_PARTS = ("decoder.", "decoder_norm.", "cell_head.", "distill_head.", "task_to_canvas.")


@contextlib.contextmanager
def tuned_parameters(model: torch.nn.Module, tune: str) -> Iterator[None]:
    """Inside the block, only the parameters `tune` names require gradients (all: every one)."""
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        for name, p in model.named_parameters():
            p.requires_grad_(tune == "all" or name.startswith(DECODER_PARTS))
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(before[name])


class EncodedPool:
    """ttt.tune: decoder's batches, the encoder frozen. ttt.pool > 0: the first `pool` draws of the
    task's stream (`step_examples`), collated and encoded once; step s trains on batch s mod (pool /
    batch size): no numpy encoding and no encoder pass in the steps themselves, but the same few
    augmented views over and over. ttt.pool = 0: each step's own draws, encoded as they come (an
    encoder forward pass a step, no backward): every step sees fresh views, as the full path does."""

    def __init__(self, model: torch.nn.Module, data: ARCExamples, size: int, batch_size: int, device: torch.device,
                 autocast: Autocast) -> None:
        self.model, self.data, self.batch_size, self.device, self.autocast = model, data, batch_size, device, autocast
        self.batches = [self.encoded(index) for index in range(max(size // batch_size, 1))] if size else []

    def encoded(self, index: int) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        batch = to_device(pinned(collate(step_examples(self.data, index, self.batch_size)), self.device), self.device)
        with torch.no_grad(), self.autocast():
            context, mask = self.model.encode(batch)
        return batch, (context, mask)

    def batch(self, step: int) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        return self.batches[step % len(self.batches)] if self.batches else self.encoded(step)


class TestTimeTrainer:
    """Fine-tunes one model task after task, restoring its original weights after each."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, model: torch.nn.Module, cfg: ExperimentConfig, device: torch.device,
                 faults: FaultInjection | None = None) -> None:
        self.model, self.cfg, self.device, self.faults = model, cfg, device, faults
        self.original = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @contextlib.contextmanager
    def tuned(self, task: Task, run: int = 0) -> Iterator[TTTStats]:
        """`model` fine-tuned on `task` (test outputs removed) by run `run` of ttt.runs inside the
        block; the original after."""
        try:
            with torch.inference_mode(False), torch.enable_grad():
                stats = finetune(self.model, task, self.cfg, self.device, self.faults, run)
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
                    tuple(r.last_loss for r in runs), tuple(c for r in runs for c in r.loss_curves))
