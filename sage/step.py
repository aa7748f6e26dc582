"""One optimiser step, shared by training, test-time training and the benchmarks: autocast (bf16,
or fp16 with loss scaling), AdamW, the learning-rate schedule, the loss of one batch, and the step.

- `train_step`: the training objective (task cross-entropy + weighted feature distillation,
  `compute_losses`) on one batch, pushed through the model in pieces when out of memory halved
  them (gradients accumulated so the step still sees the whole batch), under torchrun with the
  gradients averaged over processes once every process has finished its pieces; skipped when the
  loss or a gradient is not finite (in fp16, gradients that overflowed the loss scale: `overflowed`).
- `tuning_step`: test-time training's step, the task cross-entropy alone on one small batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from sage.config import ExperimentConfig, TrainConfig
from sage.device import has_native_bf16
from sage.distributed import DistributedContext
from sage.encoding import PAD, answer_canvases, canvas_to_grid
from sage.losses import (
    answer_cross_entropy,
    distillation_losses,
    distillation_slot_count,
    distillation_slots,
    loss_units,
)
from sage.metrics import score_canvas
from sage.model import SageStudent
from sage.recovery import FaultInjection, MicroBatch, free_memory

# ----------------------------------------------------------------------------- precision, devices


# fp16's loss scale at the start of a run and of each task's test-time training (torch's default),
# halved after every step whose gradients overflow, doubled after GROWTH_INTERVAL steps without one.
INITIAL_LOSS_SCALE = 2.0**16
GROWTH_INTERVAL = 2000


class Autocast:
    """The precision matmuls and attention run in, as run.precision asks: "auto" picks bf16 on GPUs
    with native bf16 (`has_native_bf16`), fp16 on older GPUs (compute capability below 8.0: V100,
    T4, RTX 20xx), fp32 on CPUs; "bf16", "fp16" and "fp32" force one on any device. Weights,
    optimiser state and losses stay fp32. fp16's narrow range needs its loss scaled
    (`loss_scaler`): a step whose scaled gradients overflow is skipped and the scale halved. fp32 on
    CUDA lets matmuls use TF32 tensor cores (10-bit mantissa inputs, fp32 accumulation)."""

    def __init__(self, device: torch.device, precision: str = "auto", native_bf16: bool | None = None) -> None:
        native = has_native_bf16(device) if native_bf16 is None else native_bf16
        if precision == "auto":
            precision = "fp32" if device.type != "cuda" else "bf16" if native else "fp16"
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        self.enabled = self.dtype != torch.float32
        self.scales_loss = self.dtype == torch.float16
        self.device_type = device.type
        self.tf32 = device.type == "cuda" and not self.enabled
        if self.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    @property
    def name(self) -> str:  # for logs and reports
        if self.enabled:
            return "fp16 autocast, loss scaling" if self.scales_loss else "bf16 autocast"
        return "fp32 (TF32 matmuls)" if self.tf32 else "fp32"

    def loss_scaler(self) -> torch.amp.GradScaler | None:
        """A fresh loss scaler for fp16, None otherwise (nothing to scale)."""
        if not self.scales_loss:
            return None
        return torch.amp.GradScaler(self.device_type, init_scale=INITIAL_LOSS_SCALE, growth_interval=GROWTH_INTERVAL)

    def __call__(self):  # noqa: ANN204 - a context manager
        return torch.autocast(self.device_type, dtype=self.dtype if self.enabled else torch.bfloat16,
                              enabled=self.enabled)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself, inside data-parallel and torch.compile wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def score_batch(logits: torch.Tensor, batch: dict[str, torch.Tensor], grid_size: int) -> list:
    """Per-example GridScores of a batch: decode each example's argmax canvas and compare with its
    whole target grid (also where the target did not fit the canvas: then it cannot be right)."""
    predicted = answer_canvases(logits.argmax(-1), batch, grid_size)
    targets = batch.get("target_full", batch["target"]).view(-1, grid_size, grid_size).cpu().numpy()
    return [score_canvas(p, canvas_to_grid(t)) for p, t in zip(predicted, targets)]

# ----------------------------------------------------------------------------- optimiser and schedule


def warmup_cosine(step: int, peak: float, floor: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to `peak`, then cosine decay to `floor` at `total_steps`."""
    warmup = min(warmup_steps, max(total_steps - 1, 0))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(total_steps - warmup, 1)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def training_lr(step: int, train: TrainConfig, total_steps: int) -> float:
    """Linear warmup to train.lr, then cosine decay to train.min_lr at the last step."""
    return warmup_cosine(step, train.lr, train.min_lr, train.warmup_steps, total_steps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                   betas: tuple[float, float] | list[float]) -> torch.optim.AdamW:
    """AdamW over the parameters that require gradients, with weight decay on matrices and embeddings
    only (not on biases and norm gains). Fused: one kernel for all parameters (on this project's CPU
    4-6x faster than the default per step), and a step can be skipped on the device (`_update`)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=True)


# ----------------------------------------------------------------------------- the loss and the step


def compute_losses(out: Any, batch: dict[str, torch.Tensor], model: SageStudent, cfg: ExperimentConfig,
                   task_share: float | torch.Tensor = 1.0, slot_share: float | torch.Tensor = 1.0,
                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor | int]:
    """The training objective and its terms (loss = task CE [+ weight * feature loss]), and the
    number of grid slots that had a teacher target (0: the feature terms count for nothing and
    the caller leaves them out; a tensor, so that nothing waits for the device). When `batch` is a
    piece of the optimiser's batch, the shares (its loss units (sage.losses.loss_units) and
    teacher slots over the whole batch's) weight the two mean-reduced terms in "loss" so that the
    pieces' gradients add up to the whole batch's; the terms themselves stay this piece's means."""
    task = answer_cross_entropy(out.logits, batch["target"], cfg.train.loss_normalization)
    # Without a feature term the distillation head still joins the graph, with zero gradient:
    # data-parallel training needs every parameter to get a gradient on every rank.
    unused = 0.0 if out.grid_features is None else out.grid_features.sum() * 0.0
    if cfg.distill.weight == 0 or out.grid_features is None:
        return {"loss": task * task_share + unused}, 0
    mse, cosine, slots = distillation_losses(*distillation_slots(
        out.grid_features, model.standardise(batch["teacher_features"]), batch["teacher_mask"] & out.grid_mask,
        out.task_features, cfg.distill.slots))
    d = cfg.distill
    # Every example of the batch augmented: nothing to distil, the feature term is exactly 0.
    feature = (d.cosine_weight * (1.0 - cosine) + d.mse_weight * mse) * (slots > 0)
    loss = task * task_share + d.weight * feature * slot_share + unused
    return {"loss": loss, "task_loss": task, "distill_mse": mse, "distill_cosine": cosine}, slots


@dataclass
class StepResult:
    """One optimiser step's numbers, left on the device: reading them is a host sync, so the
    training loop reads a log line's worth of steps at once (`read_steps`)."""

    terms: dict[str, torch.Tensor]  # loss and its terms, means over the whole (global) batch
    grad_norm: torch.Tensor  # of the averaged gradient, before clipping
    counts: torch.Tensor  # [exact answers, examples, grid slots with a teacher target] of the global batch
    skipped: torch.Tensor  # true when the loss or a gradient was not finite: nothing was updated
    # fp16: true when the skip was the loss scale's (finite loss, gradients overflowed): the scale
    # was halved, and the step is not a sign of divergence.
    overflowed: torch.Tensor


@dataclass
class StepNumbers:
    """A StepResult read on the host."""

    values: dict[str, float]  # loss and its terms (the feature terms only when the batch had teacher targets)
    grad_norm: float
    exact: int  # examples whose argmax answer has every scored cell right (a running train metric)
    examples: int
    distill_slots: int
    skipped: bool
    overflowed: bool  # skipped because fp16 gradients overflowed the loss scale


def read_steps(results: list[StepResult]) -> list[StepNumbers]:
    """The steps' numbers on the host, in one device-to-host transfer."""
    if not results:
        return []
    keys = list(results[0].terms)
    rows = torch.stack([torch.cat([torch.stack([r.terms[k].float() for k in keys] + [r.grad_norm.float()]),
                                   r.counts.float(), r.skipped.float().reshape(1), r.overflowed.float().reshape(1)])
                         for r in results]).tolist()
    numbers = []
    for row in rows:
        values = dict(zip(keys, row[: len(keys)]))
        grad_norm, exact, examples, slots, skipped, overflowed = row[len(keys):]
        if slots == 0:  # no teacher target anywhere in the batch: no feature terms
            values = {k: v for k, v in values.items() if not k.startswith("distill_")}
        numbers.append(StepNumbers(values, grad_norm, int(exact), int(examples), int(slots), bool(skipped),
                                   bool(overflowed)))
    return numbers


def exact_answers(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """How many examples have every scored answer cell right (the grid and the border that fixes
    its size) and their whole target on the canvas: counted on the device, no decoding."""
    target = batch["target"]
    scored = target != PAD
    right = ((logits.argmax(-1) == target) | ~scored).all(1)
    if "target_full" in batch:  # canvases cut to the batch: a target larger than its canvas cannot be right
        right &= (batch["target_full"] != PAD).sum(1) == scored.sum(1)
    return right.sum()


@dataclass
class _LocalSums:
    """What this process's forward and backward passes of one step added up, on the device."""

    totals: dict[str, torch.Tensor]
    exact: torch.Tensor
    examples: int
    distill_slots: torch.Tensor


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
               cfg: ExperimentConfig, autocast: Autocast, micro: MicroBatch, faults: FaultInjection,
               step: int, ctx: DistributedContext = DistributedContext(),
               scaler: torch.amp.GradScaler | None = None) -> StepResult:
    """One optimiser step on `batch` (this process's part of the global batch), pushed through the
    model `micro.size` examples at a time (gradients accumulated). Out of memory on any process
    halves `micro.size` on every process and retries the batch. A step whose loss or gradient is
    not finite updates nothing (`skipped`). With fp16's `scaler` the loss is scaled before the
    backward pass and the gradients unscaled before clipping (`Autocast.loss_scaler`). Nothing is read
    back to the host, except under torchrun whether a process ran out of memory."""
    global_counts = None
    while True:
        # The global batch's loss units and teacher slots, which weight the pieces (a whole batch in
        # one process needs no weights: shares of exactly 1).
        if global_counts is None and (micro.size < len(batch["target"]) or ctx.enabled):
            slots = (distillation_slot_count(batch["teacher_mask"], cfg.distill.slots, cfg.model.task_slot)
                     if "teacher_mask" in batch else torch.zeros((), device=batch["target"].device))
            global_counts = ctx.sum_(torch.stack([loss_units(batch["target"], cfg.train.loss_normalization),
                                                  slots]).double())
        try:
            sums = _forward_backward(model, optimizer, batch, cfg, autocast, micro, faults, ctx, global_counts, scaler)
        except torch.OutOfMemoryError:
            sums = None
        # Outside the except block: its traceback, which holds the interrupted pass's activations, is gone.
        out_of_memory = ctx.ranks_where(sums is None)
        if not out_of_memory:
            return _update(model, optimizer, sums, cfg, ctx, scaler)
        optimizer.zero_grad(set_to_none=True)
        free_memory(batch["target"].device)
        micro.halve(f"step {step}" + (f" on rank {', '.join(map(str, out_of_memory))}" if ctx.enabled else ""))


def _forward_backward(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
                      cfg: ExperimentConfig, autocast: Autocast, micro: MicroBatch, faults: FaultInjection,
                      ctx: DistributedContext, global_counts: torch.Tensor | None,
                      scaler: torch.amp.GradScaler | None) -> _LocalSums:
    """This process's gradients of the global batch's loss, accumulated over pieces of `micro.size`."""
    core = unwrap(model)
    optimizer.zero_grad(set_to_none=True)
    pieces = micro.pieces(batch)
    device = batch["target"].device
    keys = ["loss"] + (["task_loss", "distill_mse", "distill_cosine"] if cfg.distills else [])
    zero = torch.zeros((), device=device)
    sums = _LocalSums(dict.fromkeys(keys, zero), zero, len(batch["target"]), zero)
    for piece in pieces:
        make_nan = faults.forward_pass("train")
        task_share = slot_share = 1.0  # the plain, bit-reproducible path: a whole batch in one process
        if global_counts is not None:  # this piece's share of the global batch's units and slots
            task_share = loss_units(piece["target"], cfg.train.loss_normalization) * ctx.world / global_counts[0]
            if "teacher_mask" in piece:
                piece_slots = distillation_slot_count(piece["teacher_mask"], cfg.distill.slots, cfg.model.task_slot)
                slot_share = piece_slots * ctx.world / global_counts[1].clamp(min=1)
        with autocast():
            out = model(piece)
            losses, slots = compute_losses(out, piece, core, cfg, task_share, slot_share)
        loss = losses["loss"] * math.nan if make_nan else losses["loss"]
        (loss if scaler is None else scaler.scale(loss)).backward()
        sums.distill_slots = sums.distill_slots + slots
        sums.totals["loss"] = sums.totals["loss"] + loss.detach()  # already weighted by the shares
        for k, v in losses.items():  # the batch's means: each piece's mean weighted by its share
            if k != "loss":
                sums.totals[k] = sums.totals[k] + v.detach() * (slot_share if k.startswith("distill_") else task_share)
        sums.exact = sums.exact + exact_answers(out.logits.detach(), piece)
    return sums


def _update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, sums: _LocalSums, cfg: ExperimentConfig,
            ctx: DistributedContext, scaler: torch.amp.GradScaler | None = None) -> StepResult:
    """Average the gradients over processes, unscale them (fp16), clip, and step, unless the loss or
    gradient is not finite: with fused AdamW that is decided on the device (`found_inf`), without a
    host sync. The scaler sees the averaged gradients, so every process halves its scale alike."""
    core = unwrap(model)
    ctx.average_gradients(core.parameters())
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(core.parameters(), cfg.train.grad_clip)
    keys = list(sums.totals)
    local = torch.stack([*(sums.totals[k].float() for k in keys), sums.exact.float(),
                         torch.full((), float(sums.examples), device=norm.device), sums.distill_slots.float()])
    ctx.sum_(local)
    terms = {k: local[i] / ctx.world for i, k in enumerate(keys)}
    skipped = ~(torch.isfinite(terms["loss"]) & torch.isfinite(norm))
    if all(group.get("fused") for group in optimizer.param_groups):
        optimizer.found_inf = skipped.float()  # fused AdamW leaves everything as it was when this is 1
        optimizer.step()
    elif not bool(skipped):  # other optimisers: decided on the host
        optimizer.step()
    overflowed = skipped & torch.isfinite(terms["loss"]) if scaler is not None else torch.zeros_like(skipped)
    if scaler is not None:
        scaler.update()  # halved after an overflow (found by unscale_), else grown now and then
    return StepResult(terms, norm.detach(), local[len(keys):], skipped, overflowed)


def tuning_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
                autocast: Autocast, loss_normalization: str, grad_clip: float, micro: MicroBatch | None = None,
                faults: FaultInjection | None = None,
                scaler: torch.amp.GradScaler | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step of test-time training on `batch`: the answer's cross-entropy alone (no
    distillation: a task at test time has no teacher features), clipped, AdamW. The batch goes
    through `micro.size` examples at a time (gradients accumulated: the same step); out of memory
    halves `micro.size` and retries. With fp16's `scaler` a step whose gradients overflow is
    skipped. Returns the loss and whether the step was skipped, still on the device (reading them
    is a host sync the caller may not need)."""
    micro = micro or MicroBatch("test-time training", len(batch["target"]), None, lambda _: None)
    faults = faults or FaultInjection()
    while True:
        try:
            loss = _tuning_gradients(model, optimizer, batch, autocast, loss_normalization, micro, faults, scaler)
        except torch.OutOfMemoryError:
            loss = None
        if loss is not None:
            break
        optimizer.zero_grad(set_to_none=True)  # outside the except block: its traceback holds the activations
        free_memory(batch["target"].device)
        micro.halve("a step")
    if scaler is None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        return loss, torch.zeros((), dtype=torch.bool, device=loss.device)
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)  # fused AdamW skips on the device when unscale_ found an inf or a nan
    scaler.update()
    return loss, ~torch.isfinite(norm)


def _tuning_gradients(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
                      autocast: Autocast, loss_normalization: str, micro: MicroBatch,
                      faults: FaultInjection, scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
    """The batch's loss gradients, accumulated over pieces weighted by their share of its loss units."""
    optimizer.zero_grad(set_to_none=True)
    n = len(batch["target"])
    starts = range(0, n, micro.size)
    whole_units = loss_units(batch["target"], loss_normalization) if len(starts) > 1 else None
    total = torch.zeros((), device=batch["target"].device)
    for start in starts:
        piece = {k: v[start : start + micro.size] for k, v in batch.items()} if whole_units is not None else batch
        faults.forward_pass("ttt")
        with autocast():
            loss = answer_cross_entropy(model(piece).logits, piece["target"], loss_normalization)
        if whole_units is not None:  # this piece's share of the whole batch's mean
            loss = loss * loss_units(piece["target"], loss_normalization) / whole_units
        (loss if scaler is None else scaler.scale(loss)).backward()
        total = total + loss.detach()
    return total
