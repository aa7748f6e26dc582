"""Memory before the run: the peak of one training step and one validation pass on the run's
largest batches, measured by a probe on the device the run uses, against what the device has free.

    largest_batch(dataset, batches)   the batch with the most examples x (padded context + canvas cells)
    PeakMeter                         a phase's peak: CUDA's max_memory_allocated, or on a CPU the
                                      process's resident-set high-water mark (Linux's VmHWM, reset first)
    TensorPeakMeter                   the peak bytes of live tensors, counted op by op on any device: on
                                      a CPU, what a GPU's allocator would hold for the same ops (planning
                                      a card's recipe without the card)
    available_memory(device)          (free, total) bytes: the card's, or the machine's MemAvailable
    probe_training(...)               one real training step on the largest batch, then the weights,
                                      optimiser, loss scale and RNG put back as they were, so the run is
                                      the run it would have been; and one validation pass
    probe_ttt(...)                    before an evaluation's test-time training: one step of its costliest
                                      task (ttt.tasks_in_flight copies of it), on the structures TTT uses

The figures are what one process needs for its largest step with today's micro-batching: an
out-of-memory error later is still recovered by halving (sage/recovery.py), but the log says before
the first step whether the run fits.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sage.config import ExperimentConfig
from sage.device import release_cached_memory
from sage.encoding import ARCExamples, collate, uses_shape_buckets
from sage.arc import Task
from sage.model import build_model
from sage.recovery import FaultInjection, MicroBatch
from sage.step import Autocast, make_optimizer, to_device, train_step
from sage.task_batched_ttt import TaskBatchedTrainer, plan_jobs
from sage.token_batches import TokenBudgetSampler
from sage.ttt import TaskBudget, TestTimeTrainer, Tuning
from sage.validation import validate


def batch_size_in_tokens(dataset: object, indices: Sequence[int]) -> int:
    """What a batch's activations scale with: examples x (context padded to 8 + answer canvas cells)."""
    rows, cols = dataset.shapes[list(indices)].max(0)
    longest = int(np.max(dataset.lengths[list(indices)]))
    return len(indices) * (-(-longest // 8) * 8 + int(rows) * int(cols))


def largest_batch(dataset: object, batches: Sequence[Sequence[int]]) -> list[int]:
    """The batch of `batches` with the largest activations (`batch_size_in_tokens`)."""
    return list(max(batches, key=lambda b: batch_size_in_tokens(dataset, b)))


def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMeter:
    """The peak memory of what runs inside the block (`peak`, bytes; None where it cannot be read):
    on CUDA the allocator's high-water mark, on a CPU the process's resident set (VmHWM, reset
    when the block starts)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, None
        self.measures = "CUDA memory allocated" if device.type == "cuda" else "process resident memory"

    def __enter__(self) -> PeakMeter:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the current RSS
            except OSError:
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = _status_bytes("VmHWM")


CUDA_ALLOCATION_BLOCK = 512  # bytes: CUDA's caching allocator rounds every allocation up to this


class TensorPeakMeter(TorchDispatchMode):
    """The peak bytes of live tensor storages while the block runs (`peak`; `current` at its end),
    counted from every operator's outputs (forward, backward and optimiser alike) and each rounded up
    to CUDA's allocation block, plus the tensors named in `held` (weights, gradients, optimiser state,
    the batch) that are alive when it starts. The same ops on a CPU give about what
    torch.cuda.max_memory_allocated reports on a card; not counted: kernels' internal workspaces
    (cuBLAS's, attention's scratch) and the allocator's fragmentation. A storage is freed when its
    last tensor is (a weak reference's callback). Slow: one Python call per operator."""

    def __init__(self, held: object = ()) -> None:
        super().__init__()
        self.held = held
        self.live: dict[int, int] = {}  # storage address -> bytes counted
        self.current = self.peak = 0

    def _count(self, tensor: object) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        address, size = storage.data_ptr(), -(-storage.nbytes() // CUDA_ALLOCATION_BLOCK) * CUDA_ALLOCATION_BLOCK
        if address == 0 or size == 0:
            return
        counted = self.live.get(address)
        if counted is None:
            weakref.finalize(storage, self._free, address).atexit = False  # nothing to count at exit
        self.live[address] = max(size, counted or 0)  # a storage resized in place counts at its largest
        self.current += self.live[address] - (counted or 0)
        self.peak = max(self.peak, self.current)

    def _free(self, address: int) -> None:
        self.current -= self.live.pop(address, 0)

    def __enter__(self) -> TensorPeakMeter:
        for tensor in tree_flatten(self.held)[0]:
            self._count(tensor)
        self.peak = self.current
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's signature)
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            self._count(tensor)
        return out


def available_memory(device: torch.device) -> tuple[int | None, int | None]:
    """(bytes this process can use, total bytes): the card's free memory plus what this process
    already holds in it, within its torch.cuda.set_per_process_memory_fraction cap; or on a CPU the
    machine's MemAvailable plus this process's resident set; and the card's or the machine's total."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _: 1.0)(device)
        return min(free + torch.cuda.memory_reserved(device), int(total * fraction)), total
    values = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, rest = line.split(":", 1)
            values[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError):
        return None, None
    own = _status_bytes("VmRSS") or 0
    return (values["MemAvailable"] + own if "MemAvailable" in values else None), values.get("MemTotal")


@dataclass
class Probe:
    phase: str
    examples: int
    tokens: int  # batch_size_in_tokens
    peak: int | None  # bytes
    measures: str
    micro_batch: int = 0  # examples per forward pass, when the probe itself ran out of memory and halved


def restoring(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              scaler: torch.amp.GradScaler | None) -> Callable[[], None]:
    """A snapshot of everything a training step changes (weights, optimiser state, loss scale, RNG):
    call the returned function to put it back."""
    weights = copy.deepcopy(model.state_dict())
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    scaler_state = None if scaler is None else copy.deepcopy(scaler.state_dict())
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def put_back() -> None:
        model.load_state_dict(weights)
        optimizer.load_state_dict(optimizer_state)
        if scaler is not None:
            scaler.load_state_dict(scaler_state)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        optimizer.zero_grad(set_to_none=True)

    return put_back


TOO_BIG_FOR_TRAINING = ("steps will halve their examples per pass (slower), or lower train.tokens_per_step / "
                        "train.batch_size")


def describe(probes: Sequence[Probe], device: torch.device, too_big: str = TOO_BIG_FOR_TRAINING) -> str:
    """The log's line: each phase's peak against the device's free memory."""
    free, total = available_memory(device)
    gib = 2.0**30
    parts = []
    for p in probes:
        figure = f"{p.peak / gib:.2f} GiB" if p.peak is not None else "not measurable here"
        halved = f", only at {p.micro_batch} examples a pass" if p.micro_batch else ""
        parts.append(f"{p.phase} {figure} ({p.examples} examples, {p.tokens:,} tokens{halved})")
    where = ("the card" if device.type == "cuda" else "this machine")
    against = (f" of {free / gib:.1f} GiB this process can use on {where} ({total / gib:.1f} GiB)"
               if free is not None and total else "")
    largest = max((p.peak for p in probes if p.peak is not None), default=None)
    verdict = ""
    if largest is not None and free is not None:
        verdict = "; fits" if largest <= free else f"; does NOT fit: {too_big}"
    return (f"memory probe ({probes[0].measures if probes else ''}, peak of the largest batch): "
            + ", ".join(parts) + against + verdict)


def probe_run(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
              cfg: ExperimentConfig, device: torch.device, autocast: Autocast, train_set: ARCExamples,
              train_batches: Sequence[Sequence[int]], val_set: ARCExamples,
              val_batches: Sequence[Sequence[int]]) -> list[Probe]:
    """One training step on the largest training batch and one validation pass on the largest
    validation batch, each measured (`PeakMeter`); the step's changes are then undone (`restoring`)."""
    buckets = uses_shape_buckets(device)
    probes = []
    for phase, dataset, batches in (("training step", train_set, train_batches),
                                    ("validation", val_set, val_batches)):
        if not batches:
            continue
        indices = largest_batch(dataset, batches)
        batch = to_device(collate([dataset[(0, i)] for i in indices], shape_buckets=buckets), device)
        micro = MicroBatch("the memory probe", len(indices), None, lambda _: None, accumulates=True)
        if phase == "training step":
            put_back = restoring(model, optimizer, scaler)
            model.train()
            try:
                with PeakMeter(device) as meter:
                    train_step(model, optimizer, batch, cfg, autocast, micro, FaultInjection(), 0, scaler=scaler)
            finally:
                put_back()
        else:
            with PeakMeter(device) as meter:
                validate(model, [batch], device, autocast, cfg.model.grid_size, micro, distill_slots=cfg.distill.slots)
        probes.append(Probe(phase, len(indices), batch_size_in_tokens(dataset, indices), meter.peak, meter.measures,
                            micro.size if micro.size < len(indices) else 0))
        del batch
        release_cached_memory(device, f"the {phase} probe", lambda _: None)
    return probes


# ----------------------------------------------------------------------------- train.tokens_per_step: auto

AUTO_TOKENS_HEADROOM = 0.2  # of the memory this process can use, left free by tokens_per_step=auto
AUTO_PROBE_TOKENS = (2048, 8192)  # the two budgets whose peaks fit the line: peak = fixed + per token x budget
AUTO_TOKENS_STEP = 1024  # the choice is a multiple of this
AUTO_TOKENS_MAX = 262144


def training_step_peak(cfg: ExperimentConfig, train_set: ARCExamples, device: torch.device, tokens: int) -> Probe:
    """The peak of one training step on the largest batch `tokens` tokens a step makes, on a fresh
    model of the run's config (its weights do not matter), freed afterwards. The RNG is left as it was."""
    rng = torch.get_rng_state()
    model = build_model(cfg.model).to(device)
    optimizer = make_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.betas)
    autocast = Autocast(device, cfg.run.precision)
    sampler = TokenBudgetSampler(train_set.lengths, train_set.sides, tokens, cfg.run.seed)
    try:
        (probe,) = probe_run(model, optimizer, autocast.loss_scaler(), cfg, device, autocast, train_set,
                             sampler.batches(), train_set, [])
    finally:
        del model, optimizer
        release_cached_memory(device, "a memory probe", lambda _: None)
        torch.set_rng_state(rng)
    return probe


def choose_tokens_per_step(cfg: ExperimentConfig, train_set: ARCExamples, device: torch.device,
                           log: Callable[[str], None]) -> int:
    """train.tokens_per_step=auto: the largest multiple of AUTO_TOKENS_STEP whose largest training
    step fits the memory this process can use, less AUTO_TOKENS_HEADROOM. Two probe steps fit the
    peak as a line in the budget; the choice is then probed itself and lowered until it fits."""
    usable, _ = available_memory(device)
    peaks = [training_step_peak(cfg, train_set, device, t) for t in AUTO_PROBE_TOKENS]
    if usable is None or any(p.peak is None for p in peaks):
        log(f"train.tokens_per_step auto: memory cannot be measured on {device}: "
            f"{AUTO_PROBE_TOKENS[0]:,} tokens a step")
        return AUTO_PROBE_TOKENS[0]
    budget = usable * (1 - AUTO_TOKENS_HEADROOM)
    (t1, p1), (t2, p2) = zip(AUTO_PROBE_TOKENS, (p.peak for p in peaks))
    per_token = max((p2 - p1) / max(t2 - t1, 1), 1.0)
    tokens = int((budget - (p2 - per_token * t2)) / per_token)
    tokens = min(max(tokens // AUTO_TOKENS_STEP * AUTO_TOKENS_STEP, AUTO_TOKENS_STEP), AUTO_TOKENS_MAX)
    checked = training_step_peak(cfg, train_set, device, tokens)
    while checked.peak > budget and tokens > AUTO_TOKENS_STEP:
        tokens = max(int(tokens * budget / checked.peak) // AUTO_TOKENS_STEP * AUTO_TOKENS_STEP, AUTO_TOKENS_STEP)
        checked = training_step_peak(cfg, train_set, device, tokens)
    gib = 2.0**30
    log(f"train.tokens_per_step auto: {tokens:,} tokens a step, its largest step peaking at {checked.peak / gib:.2f} "
        f"GiB of {usable / gib:.1f} GiB this process can use less {AUTO_TOKENS_HEADROOM:.0%} headroom "
        f"({checked.measures}; probes at {t1:,} and {t2:,} tokens: {p1 / gib:.2f} and {p2 / gib:.2f} GiB)")
    return tokens


# ----------------------------------------------------------------------------- test-time training

TOO_BIG_FOR_TTT = ("an out-of-memory error will halve its examples per pass after a failed step; set "
                   "ttt.examples_per_pass (the same steps) or lower ttt.tasks_in_flight")


def ttt_step(model: torch.nn.Module, tuning: Tuning, task: Task, device: torch.device,
             faults: FaultInjection | None = None) -> int:
    """One test-time training step of `task` (blind) as an evaluation takes it: ttt.tasks_in_flight
    copies of it at once through the trainer the evaluation uses (the model's own weights, put back
    after, or the task-batched trainer's copies). Returns the examples per pass that out-of-memory
    halving came down to (0: none)."""
    one_step = replace(tuning, ttt=replace(tuning.ttt, steps=1, flops=0.0, min_steps=0, runs=1))
    if tuning.ttt.tasks_in_flight == 1:
        with TestTimeTrainer(model, one_step, device, faults).tuned(task) as stats:
            return stats.micro_batch
    trainer = TaskBatchedTrainer(model, one_step, device, faults)
    copies = [replace(task, id=f"{task.id}/{slot}") for slot in range(tuning.ttt.tasks_in_flight)]
    return max(stats.micro_batch for _, stats in trainer.tune(plan_jobs(copies, one_step)))


def costliest_ttt_task(tasks: Sequence[Task], budgets: dict[str, TaskBudget]) -> tuple[Task, TaskBudget] | None:
    """Of the tasks that get test-time training steps, the one whose step costs the most (their
    sage.ttt.task_budget by id), and its budget; None when no task gets a step."""
    return max(((t, budgets[t.id]) for t in tasks if budgets[t.id].steps), key=lambda tb: tb[1].step_flops,
               default=None)


def probe_ttt(model: torch.nn.Module, tuning: Tuning, tasks: Sequence[Task], budgets: dict[str, TaskBudget],
              device: torch.device, faults: FaultInjection | None = None) -> tuple[str, Tuning]:
    """The evaluation log's line on test-time training's memory: `ttt_step` on the costliest of
    `tasks` (blind: sage.predict.blind) that get steps (`budgets`: their task_budget by id), its first batch, measured (`PeakMeter`)
    against what this process can use; and the tuning to run with: where the probe itself ran out of
    memory and halved its examples per pass, ttt.examples_per_pass from the start (the same steps,
    without a failed step to find it again). The RNG is left as it was."""
    costliest = costliest_ttt_task(tasks, budgets)
    if costliest is None:
        return "memory probe: no task gets a test-time training step", tuning
    task, budget = costliest
    in_flight, rng = tuning.ttt.tasks_in_flight, torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        with PeakMeter(device) as meter:
            halved = ttt_step(model, tuning, task, device, faults)
    finally:
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        release_cached_memory(device, "the test-time training probe", lambda _: None)
    cells, tokens = budget.first_batch_shape
    examples = tuning.ttt.batch_size  # draws of the task's leave-one-out examples, cycled
    what = f"test-time training step of task {task.id}" + (f", {in_flight} in flight" if in_flight > 1 else "")
    line = describe([Probe(what, in_flight * examples, in_flight * examples * (tokens + cells), meter.peak,
                           meter.measures, halved)], device, TOO_BIG_FOR_TTT)
    if not halved:
        return line, tuning
    return (line + f"; test-time training runs {halved} examples a pass from the start",
            replace(tuning, ttt=replace(tuning.ttt, examples_per_pass=halved)))
