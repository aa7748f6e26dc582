"""Test-time training of many tasks at once (ttt.tasks_in_flight > 1): the tasks' steps share one
forward and backward pass, each task with its own weights, AdamW state, clipping and step budget.
A task's steps, losses and answers are those of sage/ttt.py's one-task path, whichever tasks share
its pass (tests/test_task_batched_ttt.py); what changes is how full a GPU's steps are.

    every (task, run): a `Job` with the step budget, the stream of draws and the learning-rate
        schedule that sage.ttt.finetune gives it (task_budget, tuning_data, ttt_lr)
    jobs in order of their first batch's shape, so that the tasks in flight share a shape bucket
    K slots of weights: the rows of one [K, P] tensor (`StackedWeights`)
    a step: each job in flight draws its batch; the batches are collated together (padded to the
        largest: the padding is masked) and torch.func.vmap runs the model once over the slots,
        each on its own weights (functional_call). Attention has no weights: the task dimension
        folds into its batch
        -> per slot its loss, its gradient-norm clip and its AdamW step (own moments, step count
           and learning rate; in fp16 its own loss scale, skipping the slot's step on an overflow);
           out of memory halves every job's examples per pass (accumulated: the same steps)
    a job whose budget ends leaves: `tune` hands it out with a model holding its tuned weights,
        and the next job takes its slot from the pretrained weights

The cost is memory: K copies of the weights, their gradients and AdamW's two moments.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch.func import functional_call, vmap

from sage.arc import Task
from sage.encoding import ARCExamples, collate, uses_shape_buckets
from sage.errors import TestOutputVisible
from sage.losses import answer_cross_entropy, loss_units
from sage.recovery import FaultInjection, MicroBatch, free_memory
from sage.step import GROWTH_INTERVAL, INITIAL_LOSS_SCALE, Autocast, to_device
from sage.ttt import (
    TTTStats,
    Tuning,
    pinned,
    run_stats,
    step_examples,
    task_budget,
    ttt_examples,
    ttt_lr,
    tuning_data,
)

ADAM_EPS = 1e-8  # torch.optim.AdamW's default, which the one-task path uses


@dataclass
class Job:
    """One tuning run of one task (ttt.runs of them per task), as sage.ttt.finetune would run it."""

    task: Task
    run: int
    steps: int  # its share of the task's step budget; 0: answered with the pretrained weights
    examples: int  # the task's leave-one-out examples
    shape: tuple[int, int] = (0, 0)  # the task's first batch's (TaskBudget.first_batch_shape): the order it joins in
    data: ARCExamples | None = None  # its stream of draws
    # While in flight:
    step: int = 0
    losses: list[torch.Tensor] = field(default_factory=list)
    overflowed: list[torch.Tensor] = field(default_factory=list)  # fp16: steps skipped for the loss scale
    started: float = 0.0


def plan_jobs(tasks: Sequence[Task], tuning: Tuning) -> list[Job]:
    """Every task's runs as jobs with their budgets, as sage.ttt.finetune plans them: each of
    ttt.runs takes 1/runs of the task's steps; a task without steps has one job, run 0."""
    ttt, jobs = tuning.ttt, []
    for task in tasks:
        if any(p.output is not None for p in task.test):
            raise TestOutputVisible(f"task {task.id}: test-time training was given the task's test outputs; "
                                    "pass it through sage.predict.blind first")
        refs = ttt_examples(task)
        budget = task_budget(task, tuning)
        steps = budget.steps // ttt.runs
        for run in range(ttt.runs if steps else 1):
            job = Job(task, run, steps, len(refs), budget.first_batch_shape)
            if steps:
                job.data = tuning_data(task, refs, tuning, run)
            jobs.append(job)
    return jobs


class StackedWeights:
    """K copies of a model's parameters as the rows of one [K, P] tensor, with AdamW's moments and
    step counts beside them: one clip and one AdamW update a step for every slot, each with its own
    norm, learning rate and step count; with fp16 (`scales_loss`) each slot also has its own loss
    scale, which behaves as torch.amp.GradScaler's does for one task. `parameters` hands out each
    parameter as a [K, ...] view."""

    def __init__(self, model: torch.nn.Module, slots: int, scales_loss: bool = False) -> None:
        named = list(model.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        with torch.no_grad():
            self.original = torch.cat([p.detach().reshape(-1).float() for _, p in named])
            self.flat = self.original.repeat(slots, 1).requires_grad_()
        device = self.flat.device
        # AdamW's weight decay, as sage.step.make_optimizer: matrices and embeddings only.
        self.decays = torch.cat([torch.full((p.numel(),), p.dim() >= 2, device=device) for _, p in named])
        self.exp_avg = torch.zeros_like(self.flat, requires_grad=False)
        self.exp_avg_sq = torch.zeros_like(self.flat, requires_grad=False)
        self.adam_steps = torch.zeros(slots, device=device)  # AdamW's count: steps taken, skipped ones not
        self.scales = torch.full((slots,), INITIAL_LOSS_SCALE, device=device) if scales_loss else None
        self.growth = torch.zeros(slots, device=device)  # steps without an overflow since the scale last changed

    def parameters(self, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Each parameter, [k, *shape], of the slots `rows` (None: all), as views the gradient flows through."""
        flat = self.flat if rows is None else self.flat[rows]
        return {n: t.view(len(flat), *shape)
                for n, t, shape in zip(self.names, flat.split(self.sizes, dim=1), self.shapes)}

    @torch.no_grad()
    def reset(self, slot: int) -> None:
        """The slot back to the pretrained weights, with fresh AdamW moments and loss scale: a job joins."""
        self.flat[slot] = self.original
        self.exp_avg[slot] = 0.0
        self.exp_avg_sq[slot] = 0.0
        self.adam_steps[slot] = 0.0
        self.growth[slot] = 0.0
        if self.scales is not None:
            self.scales[slot] = INITIAL_LOSS_SCALE

    @torch.no_grad()
    def load_into(self, model: torch.nn.Module, slot: int | None) -> None:
        """`model`'s parameters set to the slot's weights (None: the pretrained ones)."""
        row = self.original if slot is None else self.flat[slot]
        for p, value, shape in zip(model.parameters(), row.split(self.sizes), self.shapes):
            p.copy_(value.view(shape))

    @torch.no_grad()
    def clip_and_step(self, lrs: torch.Tensor, active: torch.Tensor, grad_clip: float, weight_decay: float,
                      betas: tuple[float, float]) -> torch.Tensor:
        """For each slot in `active` [K] (bool): its gradient unscaled (fp16), clipped to norm
        `grad_clip` (torch.nn.utils.clip_grad_norm_'s rule) and one AdamW step (torch.optim.AdamW's
        arithmetic) at its own learning rate `lrs` [K]. A slot whose unscaled gradient is not finite
        (fp16: it overflowed) is left as it is, its loss scale halved. Returns those slots [K]."""
        grad = self.flat.grad
        if self.scales is not None:
            grad.mul_(self.scales.reciprocal().unsqueeze(1))
        overflowed = active & ~torch.isfinite(grad).all(dim=1)
        stepping = active & ~overflowed
        norms = grad.norm(dim=1, keepdim=True)
        grad.mul_((grad_clip / (norms + 1e-6)).clamp(max=1.0))
        self.adam_steps.add_(stepping.float())
        lr, step = (lrs * stepping).unsqueeze(1), self.adam_steps.clamp(min=1).unsqueeze(1)
        beta1, beta2 = betas
        if weight_decay:  # a full pass over every slot's weights: skipped when there is none (TTT's default)
            self.flat.mul_(1 - lr * weight_decay * self.decays)
        if self.scales is None:
            self.exp_avg.lerp_(grad, 1 - beta1)
            self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        else:  # a skipped slot keeps its moments (its gradient is not finite)
            keep = stepping.unsqueeze(1)
            self.exp_avg.copy_(torch.where(keep, self.exp_avg.lerp(grad, 1 - beta1), self.exp_avg))
            self.exp_avg_sq.copy_(torch.where(keep, self.exp_avg_sq * beta2 + (1 - beta2) * grad * grad,
                                              self.exp_avg_sq))
            self._update_scales(active, overflowed)
        step_size = lr / (1 - beta1**step)
        denom = (self.exp_avg_sq.sqrt() / (1 - beta2**step).sqrt()).add_(ADAM_EPS)
        self.flat.addcdiv_(self.exp_avg * -step_size, denom)
        return overflowed

    def _update_scales(self, active: torch.Tensor, overflowed: torch.Tensor) -> None:
        """torch.amp.GradScaler.update's rule, slot by slot: halve after an overflow, double after
        GROWTH_INTERVAL steps without one."""
        self.growth.add_(active.float()).mul_(~overflowed)
        grown = self.growth >= GROWTH_INTERVAL
        self.scales.mul_(torch.where(overflowed, 0.5, torch.where(grown, 2.0, 1.0)))
        self.growth.mul_(~grown)


class TaskBatchedTrainer:
    """Tunes jobs `tuning.ttt.tasks_in_flight` at a time (module docstring). `answering` is the model
    a finished job's tuned weights are loaded into; the model given is never changed."""

    __test__ = False

    def __init__(self, model: torch.nn.Module, tuning: Tuning, device: torch.device,
                 faults: FaultInjection | None = None) -> None:
        self.tuning, self.device, self.faults = tuning, device, faults or FaultInjection()
        self.slots = tuning.ttt.tasks_in_flight
        self.template = copy.deepcopy(model).train()  # its structure runs every slot's weights (functional_call)
        self.answering = copy.deepcopy(model).eval()
        self.buffers = dict(self.template.named_buffers())
        self.linear_biases = {f"{name}.bias" for name, module in self.template.named_modules()
                              if isinstance(module, torch.nn.Linear) and module.bias is not None}
        self.autocast = Autocast(device, tuning.precision)
        with torch.inference_mode(False):  # its tensors take gradients, wherever the trainer is made
            self.weights = StackedWeights(self.template, self.slots, self.autocast.scales_loss)
        self.buckets = uses_shape_buckets(device)
        self.micro = MicroBatch("test-time training", tuning.ttt.batch_size, tuning.ttt.examples_per_pass,
                                lambda _: None, accumulates=True, scope="the rest of the evaluation")

    def tune(self, jobs: Sequence[Job]) -> Iterator[tuple[Job, TTTStats]]:
        """Each job with its stats as its budget ends (jobs without steps first), `answering`
        holding its tuned weights until the next is handed out."""
        for job in jobs:
            if not job.steps:
                self.weights.load_into(self.answering, None)
                yield job, TTTStats(0, 0.0, job.examples, math.nan, math.nan)
        queue = deque(sorted((j for j in jobs if j.steps), key=lambda j: j.shape))
        in_flight: list[Job | None] = [None] * self.slots
        while queue or any(in_flight):
            for slot, job in enumerate(in_flight):
                if job is None and queue:
                    in_flight[slot] = self._join(queue.popleft(), slot)
            with torch.inference_mode(False), torch.enable_grad():
                self._step(in_flight)
            for slot, job in enumerate(in_flight):
                if job is not None and job.step == job.steps:
                    in_flight[slot] = None
                    self.weights.load_into(self.answering, slot)
                    yield job, self._stats(job)

    def _join(self, job: Job, slot: int) -> Job:
        self.weights.reset(slot)
        job.started = time.perf_counter()
        return job

    def _step(self, in_flight: list[Job | None]) -> None:
        """One step of every job in flight: their batches through the model together, then each
        slot's clip and AdamW step at its job's learning rate."""
        ttt = self.tuning.ttt
        active = [slot for slot, job in enumerate(in_flight) if job is not None]
        jobs = [in_flight[slot] for slot in active]
        items = [it for job in jobs for it in step_examples(job.data, job.step, ttt.batch_size)]
        batch = collate(items, shape_buckets=self.buckets)
        batch = to_device(pinned({k: v.view(len(jobs), -1, *v.shape[1:]) for k, v in batch.items()}, self.device),
                          self.device)
        rows = None if len(active) == self.slots else torch.tensor(active, device=self.device)
        losses = self._gradients(rows, batch)
        lrs, stepping = torch.zeros(self.slots), torch.zeros(self.slots, dtype=torch.bool)
        for slot, job in zip(active, jobs):
            lrs[slot], stepping[slot] = ttt_lr(job.step, ttt, job.steps), True
        overflowed = self.weights.clip_and_step(lrs.to(self.device), stepping.to(self.device), ttt.grad_clip,
                                                ttt.weight_decay, self.tuning.betas)
        for i, (slot, job) in enumerate(zip(active, jobs)):
            job.losses.append(losses[i])
            job.overflowed.append(overflowed[slot])
            job.step += 1

    def _gradients(self, rows: torch.Tensor | None, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Every slot's gradient of its job's loss (`weights.flat.grad`), and the losses [jobs], on
        the device. Pieces of `micro.size` examples per job (ttt.examples_per_pass, halved by out-of-memory errors)."""
        while True:
            try:
                return self._accumulate(rows, batch)
            except torch.OutOfMemoryError:
                pass
            self.weights.flat.grad = None  # outside the except block: its traceback holds the activations
            free_memory(self.device)
            self.micro.halve("a step")

    def _accumulate(self, rows: torch.Tensor | None, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        normalization = self.tuning.loss_normalization
        self.weights.flat.grad = None
        jobs, examples = batch["target"].shape[:2]
        starts = range(0, examples, self.micro.size)
        whole = [loss_units(t, normalization) for t in batch["target"]] if len(starts) > 1 else None
        total = torch.zeros(jobs, device=self.device)
        for start in starts:
            piece = batch if whole is None else {k: v[:, start:start + self.micro.size] for k, v in batch.items()}
            self.faults.forward_pass("ttt")
            with self.autocast(), warnings.catch_warnings():
                # On the CPU, torch has no vmap rule for its flash attention and runs it task by task
                # (it warns on every pass); CUDA's attention kernels have one.
                warnings.filterwarnings("ignore", "There is a performance drop because we have not yet implemented")
                logits = vmap(self._logits, randomness="different")(self._autocast_biases(rows), piece)
            losses = torch.stack([answer_cross_entropy(logits[i], piece["target"][i], normalization)
                                  for i in range(jobs)])
            if whole is not None:  # each piece's share of its job's whole batch mean
                losses = losses * torch.stack([loss_units(t, normalization) / w
                                               for t, w in zip(piece["target"], whole)])
            scales = self.weights.scales
            scaled = losses if scales is None else losses * (scales if rows is None else scales[rows])
            scaled.sum().backward()  # the jobs' losses share no weights: each slot gets its own gradient
            total = total + losses.detach()
        return total

    def _autocast_biases(self, rows: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The slots' parameters, with each linear layer's bias in autocast's dtype. Under vmap a linear
        layer with batched weights runs as a matmul and an add: an fp32 bias would promote its output,
        and all that backward saves of it, to fp32, where autocast's addmm of one task gives bf16/fp16
        (tensor memory 1.7x one task's on the quickstart's costliest TTT step; docs/results/fp16.md)."""
        parameters = self.weights.parameters(rows)
        if not self.autocast.enabled:
            return parameters
        return {n: t.to(self.autocast.dtype) if n in self.linear_biases else t for n, t in parameters.items()}

    def _logits(self, parameters: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(self.template, (parameters, self.buffers), (batch,)).logits

    def _stats(self, job: Job) -> TTTStats:
        return run_stats(job.losses, job.overflowed, time.perf_counter() - job.started, job.examples,
                         self.micro.halved_size)
