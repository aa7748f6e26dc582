"""The training loop: data -> student -> loss -> AdamW, with validation, checkpoints and logs.

Read top to bottom: `train()` wires everything, `train_one_epoch()` and `validate()` do the work.
Resuming restores model, optimiser, step, position inside the epoch, RNG and best metric; data
order and augmentations depend only on (seed, epoch, index), so a resumed run sees exactly the
batches an uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from sage.arc import Task, split_by_task
from sage.checkpoint import CheckpointError, load_checkpoint, load_weights_into, save_checkpoint
from sage.config import ExperimentConfig, save_config
from sage.datasets import load_dataset, training_dataset
from sage.device import resolve_device
from sage.distributed import (DistributedContext, RankBatchSampler, examples_of_rank, init_distributed,
                              shutdown_distributed)
from sage.distill import TeacherTargets, ensure_teacher_cache, feature_statistics, teacher_targets, teacher_views
from sage.encoding import (PAD, ARCExamples, LengthBucketSampler, answer_canvases, canvas_to_grid, collate,
                           evaluation_examples, training_examples)
from sage.losses import (answer_cross_entropy, distillation_losses, distillation_slot_count, distillation_slots,
                         loss_units)
from sage.metrics import GridScore, score_baselines, score_canvas, summarize
from sage.overlap import TaskOverlap, describe, drop_trained_tasks
from sage.recovery import FaultInjection, MicroBatch, TrainingError, all_finite, free_memory
from sage.runlog import RunLog, SilentLog, plot_training_curves, read_metrics
from sage.teacher.config import ORACLE_PRESET
from sage_student_model import PREDATING_DEFAULTS, SageStudent, StudentConfig, build_model, parameter_breakdown


# ----------------------------------------------------------------------------- setup helpers


@dataclass
class Splits:
    train: list[Task]  # training tasks
    val: list[Task]  # held-out tasks, disjoint from train
    train_dataset: list[Task]  # every task of data.train (the teacher cache covers them all)
    val_dataset: list[Task]  # every task of the validation dataset (== train_dataset for 'holdout')
    shared: dict[str, str]  # validation tasks left out, their test outputs being trained on (id -> training ids)
    overlap: list[TaskOverlap]  # validation tasks kept that share demonstrations or test inputs with training


def load_splits(cfg: ExperimentConfig) -> Splits:
    """Train and validation tasks, disjoint by task. 'holdout' keeps whole training tasks aside; a
    validation dataset is checked pair by pair against training (sage/overlap.py)."""
    synthetic = asdict(cfg.data.synthetic)
    tasks = training_dataset(cfg)
    if cfg.data.val == "holdout":
        train, val = split_by_task(tasks, cfg.data.val_fraction, cfg.run.seed)
        val_dataset = tasks
    else:
        train, val = tasks, load_dataset(cfg.data.val, synthetic)
        val_dataset = val
    # Held-out tasks whose test pairs training holds (another id, reordered, rotated) are no test.
    val, left_out, kept = drop_trained_tasks(train, val, "validation")
    return Splits(train, val, tasks, val_dataset, {o.task: ", ".join(o.training_tasks) for o in left_out}, kept)


def make_datasets(
    cfg: ExperimentConfig, splits: Splits, train_teacher: TeacherTargets | None = None,
    val_teacher: TeacherTargets | None = None, ctx: DistributedContext = DistributedContext(),
) -> tuple[ARCExamples, ARCExamples]:
    """Training examples (each pair of a training task once as the query, augmented as configured)
    and validation examples (the held-out tasks' test outputs; under torchrun, this rank's tasks)."""
    m, d = cfg.model, cfg.data
    train_set = ARCExamples(
        splits.train, training_examples(splits.train, d.use_test_pairs), m.grid_size, m.max_demos,
        d.max_context_tokens, augment=d.augment, seed=cfg.run.seed, augment_probability=d.augment_probability,
        teacher=train_teacher, answer_canvas=m.answer_canvas, fit_answer=True, shuffle_demos=d.shuffle_demos,
        teacher_views=teacher_views(cfg),
    )
    # Validation sizes each canvas as evaluation does: from the context, never from the answer.
    val_set = ARCExamples(splits.val, examples_of_rank(evaluation_examples(splits.val), ctx), m.grid_size,
                          m.max_demos, d.max_context_tokens, teacher=val_teacher, answer_canvas=m.answer_canvas)
    return train_set, val_set


def warmup_cosine(step: int, peak: float, floor: float, warmup_steps: int, total_steps: int,
                  progress_at_least: float = 0.0) -> float:
    """Linear warmup to `peak`, then cosine decay to `floor` at `total_steps`; `progress_at_least`
    lets another budget (test-time training's clock) move the decay on faster."""
    warmup = min(warmup_steps, max(total_steps - 1, 0))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = max((step - warmup) / max(total_steps - warmup, 1), progress_at_least)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def lr_at(step: int, cfg: ExperimentConfig, total_steps: int) -> float:
    """Linear warmup to train.lr, then cosine decay to train.min_lr at the last step."""
    t = cfg.train
    return warmup_cosine(step, t.lr, t.min_lr, t.warmup_steps, total_steps)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                   betas: tuple[float, float] | list[float]) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only (not on biases and norm gains)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))


@dataclass
class TrainState:
    """Everything besides weights and optimiser that a resumed run needs."""

    step: int = 0
    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # batches of the current epoch already trained
    best_exact: float = -1.0
    best_loss: float = math.inf
    best_epoch: int = 0
    epoch_sums: dict[str, float] = field(default_factory=dict)  # running train sums of this epoch
    train_micro_batch: int = 0  # examples per forward pass after out-of-memory halvings (0: the batch size)
    val_micro_batch: int = 0
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient, in all
    nonfinite_in_row: int = 0


class Autocast:
    """bf16 autocast where run.precision asks for it: "auto" on CUDA only, "bf16" on any device,
    "fp32" never."""

    def __init__(self, device: torch.device, precision: str = "auto") -> None:
        self.enabled = precision == "bf16" or (precision == "auto" and device.type == "cuda")
        self.device_type = device.type

    @property
    def name(self) -> str:  # for logs and reports
        return "bf16 autocast" if self.enabled else "fp32"

    def __call__(self):  # noqa: ANN204 - a context manager
        return torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.enabled)


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


# ----------------------------------------------------------------------------- the loop


def train(
    cfg: ExperimentConfig,
    resume: bool = False,
    stop_after_steps: int | None = None,
    echo: bool = True,
    faults: FaultInjection | None = None,
) -> dict[str, Any]:
    """Train (or resume) the run described by `cfg`; returns the final summary record. `faults`
    simulates out-of-memory errors and NaN losses (tests; see sage/recovery.py). Under torchrun,
    trains data-parallel (sage/distributed.py)."""
    device = resolve_device(cfg.run.device)
    ctx = init_distributed(device.type)
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    try:
        return _train(cfg, device, ctx, resume, stop_after_steps, echo, faults or FaultInjection())
    finally:
        shutdown_distributed(ctx)


def _train(cfg: ExperimentConfig, device: torch.device, ctx: DistributedContext, resume: bool,
           stop_after_steps: int | None, echo: bool, faults: FaultInjection) -> dict[str, Any]:
    run_name = cfg.run.name
    ckpt_dir = Path(cfg.run.checkpoint_dir) / run_name
    log_dir = Path(cfg.run.log_dir) / run_name
    if not resume and (ckpt_dir / "last").exists():
        raise CheckpointError(
            f"{ckpt_dir}: run '{run_name}' already has checkpoints. Continue it with --resume, "
            f"or start a new run with --set run.name=NEW_NAME (or delete {ckpt_dir} and {log_dir})"
        )
    torch.manual_seed(cfg.run.seed)

    # Resume first: a bad checkpoint should fail before minutes of data loading.
    checkpoint = load_checkpoint(ckpt_dir / "last") if resume else None
    if checkpoint is not None:
        # Keys added since the checkpoint was written take their defaults, or what it was trained with.
        saved_model = {**asdict(StudentConfig()), **PREDATING_DEFAULTS, **checkpoint.meta["config"]["model"]}
        if saved_model != asdict(cfg.model):
            diff = {k: (saved_model.get(k), v) for k, v in asdict(cfg.model).items() if saved_model.get(k) != v}
            raise CheckpointError(f"{checkpoint.path}: model config differs from the checkpoint's: {diff}")

    splits = load_splits(cfg)  # bad data fails here, before the run leaves anything on disk
    log = RunLog(log_dir, echo=echo, tensorboard=cfg.logging.tensorboard) if ctx.is_main else SilentLog()
    train_tasks, val_tasks = splits.train, splits.val
    if splits.shared:
        log.info("left out of validation, their test pairs being training pairs: "
                 + ", ".join(f"{k} (= {v})" for k, v in splits.shared.items()))
    if splits.overlap:
        log.info("validation tasks that share demonstrations or test inputs with training (kept): "
                 + describe(splits.overlap))
    m = cfg.model
    train_teacher = val_teacher = None
    if cfg.uses_teacher:
        t = cfg.teacher
        weights = ("the synthetic tasks' hidden rules, noise " + str(t.noise) if t.preset == ORACLE_PRESET else
                   "weights from " + t.checkpoint_dir if t.checkpoint_dir else "random weights")
        log.info(f"teacher: {t.preset} ({weights}), "
                 f"view {t.view}; " + (f"distillation weight {cfg.distill.weight}" if m.kind == "student"
                                     else f"probe input: {m.probe_input}"))
        with ctx.main_first():  # one process extracts a missing cache, the others then read it
            train_cache = ensure_teacher_cache(cfg, cfg.data.train, splits.train_dataset, log.info)
            val_cache = train_cache if cfg.data.val == "holdout" else ensure_teacher_cache(
                cfg, cfg.data.val, splits.val_dataset, log.info)
        train_teacher, val_teacher = teacher_targets(train_cache, m), teacher_targets(val_cache, m)
    train_set, val_set = make_datasets(cfg, splits, train_teacher, val_teacher, ctx)
    global_batch = cfg.train.batch_size * ctx.world
    train_sampler = LengthBucketSampler(train_set.lengths, global_batch, shuffle=True, seed=cfg.run.seed,
                                        sides=train_set.sides)
    if ctx.enabled:
        train_sampler = RankBatchSampler(train_sampler, ctx)
    val_sampler = LengthBucketSampler(val_set.lengths, cfg.val.batch_size, shuffle=False, sides=val_set.sides)
    loader_args = dict(collate_fn=collate, num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")
    train_loader = torch.utils.data.DataLoader(train_set, batch_sampler=train_sampler, **loader_args)
    val_loader = torch.utils.data.DataLoader(val_set, batch_sampler=val_sampler, **loader_args)

    model = build_model(m).to(device)  # `net` below: the same model, wrapped for data-parallel training
    distilling = cfg.distills
    if distilling and checkpoint is None:
        mean, std = feature_statistics(train_teacher.cache, train_set.teacher_keys())
        model.teacher_mean.copy_(mean)
        model.teacher_std.copy_(std)
    optimizer = make_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.betas)
    state = TrainState()
    steps_per_epoch = len(train_sampler)
    total_steps = cfg.train.epochs * steps_per_epoch

    if checkpoint is not None:
        load_weights_into(model, checkpoint)
        optimizer.load_state_dict(checkpoint.training_state["optimizer"])
        state = TrainState(**checkpoint.meta["train_state"])
        torch.set_rng_state(checkpoint.training_state["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in checkpoint.training_state:
            torch.cuda.set_rng_state(checkpoint.training_state["cuda_rng"], device)
        log.truncate_metrics_after(state.step)
        log.info(f"resumed from {checkpoint.path} at step {state.step} (epoch {state.epoch + 1}, "
                 f"batch {state.batch_in_epoch}/{steps_per_epoch})")
        del checkpoint
    net = model
    if cfg.train.compile:
        if device.type == "cuda":
            # dynamic: context lengths and answer canvases change from batch to batch.
            net = torch.compile(model, dynamic=True)
        else:
            log.info("train.compile: skipped on the CPU, where it measured slower (README: Performance)")
    if ctx.enabled:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if ctx.is_main:
        save_config(cfg, log_dir / "config.yaml")

    n_params = sum(p.numel() for p in model.parameters())
    autocast = Autocast(device, cfg.run.precision)
    log.info(f"run '{run_name}' on {device} ({autocast.name}): {m.kind} {n_params:,} parameters "
             f"({', '.join(f'{k} {v:,}' for k, v in parameter_breakdown(model).items())})")
    log.info(f"data: train {len(train_tasks)} tasks from {cfg.data.train} ({len(train_set)} examples, "
             f"augment={cfg.data.augment} p={train_set.augment_probability}); validation {len(val_tasks)} held-out tasks "
             f"({'holdout of ' + cfg.data.train if cfg.data.val == 'holdout' else cfg.data.val}, "
             f"{len(val_set)} test outputs); splits are by task")
    log.info(f"demonstrations: training: {train_set.demonstration_cuts().describe()}; "
             f"validation: {val_set.demonstration_cuts().describe()}")
    if train_teacher is not None:
        with_targets = train_set.with_teacher_view_in_epoch(0)
        which = (f"as given or in one of the teacher's {train_set.teacher_views} augmented views per task"
                 if train_set.teacher_views else "the un-augmented ones")
        log.info(f"teacher targets: {with_targets} of {len(train_set)} training examples in epoch 1 ({which}, "
                 f"data.augment_probability={train_set.augment_probability}); every validation example")
    parallel = f" per process x {ctx.world} processes = {global_batch} per step" if ctx.enabled else ""
    log.info(f"batches: train {cfg.train.batch_size}{parallel} x {steps_per_epoch} steps/epoch, "
             f"val {cfg.val.batch_size}{' per process' if ctx.enabled else ''}; "
             f"{cfg.train.epochs} epochs = {total_steps} steps; logs in {log_dir}, checkpoints in {ckpt_dir}")
    baselines = score_baselines(val_tasks)
    log.info("validation baselines (exact match): "
             + ", ".join(f"{k} {v['exact_match']:.3f}" for k, v in baselines.items()))
    train_micro = MicroBatch("training", cfg.train.batch_size, state.train_micro_batch, log.info)
    val_micro = MicroBatch("validation", cfg.val.batch_size, state.val_micro_batch, log.info)
    if state.step == 0:
        start_record = dict(step=0, run=run_name, device=str(device), parameters=n_params,
                            train_tasks=len(train_tasks), val_tasks=len(val_tasks), baselines=baselines,
                            teacher=cfg.teacher.preset if cfg.uses_teacher else None)
        if distilling:  # the reference point: how close an untrained head is to the teacher
            untrained = validate(model, val_loader, device, autocast, m.grid_size, val_micro, faults, ctx,
                                 cfg.distill.slots)
            start_record["val_feature_cosine"] = untrained["feature_cosine"]
            log.info(f"untrained distillation head: validation feature cosine {untrained['feature_cosine']:.4f}")
        log.metrics("start", **start_record)

    interactive = echo and sys.stderr.isatty()
    stopped_early = False

    def save(name: str, val_metrics: dict[str, Any] | None) -> None:
        if not ctx.is_main:  # every rank holds the same weights; one writes them
            return
        state.train_micro_batch, state.val_micro_batch = train_micro.size, val_micro.size
        training_state = {"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}
        if device.type == "cuda":
            training_state["cuda_rng"] = torch.cuda.get_rng_state(device)
        meta = {
            "config": cfg.to_dict(),
            "train_state": asdict(state),
            "val_metrics": val_metrics,
            "parameters": n_params,
            "val_task_ids": [t.id for t in val_tasks],
            "protocol": {"train": cfg.data.train, "val": cfg.data.val, "split_by": "task"},
        }
        save_checkpoint(ckpt_dir / name, model.state_dict(), training_state, meta)

    try:
        while state.epoch < cfg.train.epochs:
            epoch = state.epoch  # 0-based; logged 1-based
            started = time.time()
            train_set.set_epoch(epoch)
            train_sampler.set_epoch(epoch, skip_batches=state.batch_in_epoch)
            model.train()
            lr = lr_at(state.step, cfg, total_steps)
            bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", total=len(train_sampler),
                       disable=not interactive, leave=False, dynamic_ncols=True)
            for batch in bar:
                lr = lr_at(state.step, cfg, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                batch = to_device(batch, device)
                result = train_step(net, optimizer, batch, cfg, autocast, train_micro, faults, state.step + 1, ctx)
                state.step += 1
                state.batch_in_epoch += 1
                if result is None:  # non-finite loss or gradient: no update from this batch
                    state.skipped_steps += 1
                    state.nonfinite_in_row += 1
                    log.info(f"step {state.step}: non-finite loss or gradient, step skipped "
                             f"({state.nonfinite_in_row} in a row, {state.skipped_steps} in all)")
                    log.metrics("skipped", step=state.step, epoch=epoch + 1, in_a_row=state.nonfinite_in_row)
                    if state.nonfinite_in_row >= cfg.train.max_nonfinite_steps:
                        save("last", None)  # the weights are still the last finite ones
                        raise TrainingError(
                            f"{state.nonfinite_in_row} steps in a row had a non-finite loss or gradient (up to step "
                            f"{state.step}, train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}): training "
                            f"diverged. Lower train.lr or raise train.warmup_steps; the weights before it are in "
                            f"{ckpt_dir / 'last'} (continue with --resume)")
                    continue
                state.nonfinite_in_row = 0
                sums, values, n = state.epoch_sums, result.values, result.examples
                for k, v in values.items():  # feature terms: means over the slots that had a target
                    weight = result.distill_slots if k.startswith("distill_") else n
                    sums[k] = sums.get(k, 0.0) + v * weight
                sums["distill_slots"] = sums.get("distill_slots", 0.0) + result.distill_slots
                sums["exact"] = sums.get("exact", 0.0) + result.exact
                sums["examples"] = sums.get("examples", 0.0) + n
                loss = values["loss"]
                if state.step % cfg.train.log_every == 0:
                    terms = "".join(f" | {k} {v:.4f}" for k, v in values.items() if k != "loss")
                    log.info(f"epoch {epoch + 1}/{cfg.train.epochs} step {state.step}/{total_steps} | "
                             f"loss {loss:.4f}{terms} | grad_norm {result.grad_norm:.3f} | lr {lr:.2e}")
                    log.metrics("train", step=state.step, epoch=epoch + 1, **values, grad_norm=result.grad_norm, lr=lr)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}")
                if cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0:
                    save("last", None)
                if stop_after_steps is not None and state.step >= stop_after_steps:
                    stopped_early = True
                    break
            bar.close()
            if stopped_early:
                save("last", None)
                log.info(f"stopped after step {state.step} as asked; continue with --resume")
                if ctx.is_main:  # the steps so far, also when no epoch has ended
                    plot_training_curves(log.metrics_path, log_dir / "curves.png", title=run_name)
                break

            # ---- end of epoch: validate, log, checkpoint
            state.epoch += 1
            state.batch_in_epoch = 0
            sums, state.epoch_sums = state.epoch_sums, {}
            record: dict[str, Any] = {"step": state.step, "epoch": state.epoch, "lr": lr}
            for k, v in sums.items():
                if k not in ("exact", "examples", "distill_slots"):
                    record[f"train_{k}"] = v / (sums["distill_slots"] if k.startswith("distill_") else sums["examples"])
            record["train_exact_match"] = sums["exact"] / sums["examples"]
            val_metrics = None
            if state.epoch % cfg.val.every_epochs == 0 or state.epoch == cfg.train.epochs:
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # release training activations before validation
                val_metrics = validate(model, val_loader, device, autocast, m.grid_size, val_micro, faults, ctx,
                                       cfg.distill.slots)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                record.update({f"val_{k}": v for k, v in val_metrics.items()})
            record["seconds"] = round(time.time() - started, 2)
            improved = val_metrics is not None and (
                val_metrics["exact_match"] > state.best_exact
                or (val_metrics["exact_match"] == state.best_exact and val_metrics["loss"] < state.best_loss)
            )
            if improved and not (math.isfinite(val_metrics["loss"]) and all_finite(model.state_dict().values())):
                log.info(f"epoch {state.epoch}: non-finite validation loss or weights; not saved as best")
                improved = False
            if improved:
                state.best_exact, state.best_loss = val_metrics["exact_match"], val_metrics["loss"]
                state.best_epoch = state.epoch
            log.metrics("epoch", **record)
            log.info(epoch_summary(record, cfg.train.epochs, state))
            save("last", val_metrics)
            if improved:
                save("best", val_metrics)
            if cfg.checkpoint.every_epochs and state.epoch % cfg.checkpoint.every_epochs == 0:
                save(f"epoch_{state.epoch}", val_metrics)
            if ctx.is_main:
                plot_training_curves(log.metrics_path, log_dir / "curves.png", title=run_name)
        if not stopped_early:
            log.info(f"finished: best validation exact match {state.best_exact:.4f} at epoch {state.best_epoch} "
                     f"-> {ckpt_dir / 'best'}")
    finally:
        log.close()

    records = [r for r in read_metrics(log_dir / "metrics.jsonl") if r.get("event") == "epoch"]
    summary = {"run": run_name, "step": state.step, "epochs_done": state.epoch, "stopped_early": stopped_early,
               "best_exact_match": state.best_exact, "best_epoch": state.best_epoch,
               "last": records[-1] if records else None, "baselines": baselines,
               "checkpoint_dir": str(ckpt_dir), "log_dir": str(log_dir)}
    return summary


def compute_losses(out: Any, batch: dict[str, torch.Tensor], model: SageStudent, cfg: ExperimentConfig,
                   task_share: float = 1.0, slot_share: float = 1.0) -> tuple[dict[str, torch.Tensor], int]:
    """The training objective and its terms (loss = task CE [+ weight * feature loss]), and the
    number of grid slots that had a teacher target (0: the feature terms are left out). When `batch`
    is a piece of the optimiser's batch, the shares (its loss units (sage.losses.loss_units) and
    teacher slots over the whole batch's) weight the two mean-reduced terms in "loss" so that the pieces' gradients add up
    to the whole batch's; the terms themselves stay this piece's means."""
    task = answer_cross_entropy(out.logits, batch["target"], cfg.train.loss_normalization)
    # Without a feature term the distillation head still joins the graph, with zero gradient:
    # data-parallel training needs every parameter to get a gradient on every rank.
    unused = 0.0 if out.grid_features is None else out.grid_features.sum() * 0.0
    if cfg.distill.weight == 0 or out.grid_features is None:
        return {"loss": task * task_share + unused}, 0
    mse, cosine, slots = distillation_losses(*distillation_slots(
        out.grid_features, model.standardise(batch["teacher_features"]), batch["teacher_mask"] & out.grid_mask,
        out.task_features, cfg.distill.slots))
    if slots == 0:  # every example of the batch was augmented: nothing to distil
        return {"loss": task * task_share + unused, "task_loss": task}, 0
    d = cfg.distill
    feature = d.cosine_weight * (1.0 - cosine) + d.mse_weight * mse
    loss = task * task_share + d.weight * feature * slot_share
    return {"loss": loss, "task_loss": task, "distill_mse": mse, "distill_cosine": cosine}, slots


@dataclass
class StepResult:
    values: dict[str, float]  # loss and its terms, means over the whole (global) batch
    grad_norm: float
    examples: int  # in the global batch
    exact: int  # examples whose argmax answer is exactly right (a running train metric)
    distill_slots: int  # grid slots with a teacher target


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
               cfg: ExperimentConfig, autocast: Autocast, micro: MicroBatch, faults: FaultInjection,
               step: int, ctx: DistributedContext = DistributedContext()) -> StepResult | None:
    """One optimiser step on `batch` (this process's part of the global batch), pushed through the
    model `micro.size` examples at a time (gradients accumulated). Out of memory halves
    `micro.size` and retries the batch. Returns None, without updating anything, when the loss or
    the gradients are not finite."""
    global_units = global_slots = None
    while True:
        # The normalisers of the global batch's means, needed only to weight pieces (each count is a
        # device sync before the forward pass; a whole batch in one process has shares of exactly 1).
        if global_units is None and (micro.size < len(batch["target"]) or ctx.enabled):
            units = loss_units(batch["target"], cfg.train.loss_normalization).item()
            teacher_slots = (distillation_slot_count(batch["teacher_mask"], cfg.distill.slots,
                                                     cfg.model.task_slot).item() if "teacher_mask" in batch else 0)
            global_units, global_slots = ctx.sum([units, teacher_slots])
        try:
            return _accumulate_and_step(model, optimizer, batch, cfg, autocast, micro, faults, ctx,
                                        global_units or 0.0, global_slots or 0.0)
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            free_memory(batch["target"].device)
            micro.halve(f"step {step}")


def _accumulate_and_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
                         cfg: ExperimentConfig, autocast: Autocast, micro: MicroBatch, faults: FaultInjection,
                         ctx: DistributedContext, global_units: float, global_slots: float) -> StepResult | None:
    core = unwrap(model)
    data_parallel = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    optimizer.zero_grad(set_to_none=True)
    pieces = micro.pieces(batch)
    whole = len(pieces) == 1 and not ctx.enabled  # shares of exactly 1: the plain, bit-reproducible path
    distilling = cfg.distills
    totals = dict.fromkeys(["loss"] + (["task_loss", "distill_mse", "distill_cosine"] if distilling else []), 0.0)
    exact, distill_slots = 0, 0
    for i, piece in enumerate(pieces):
        make_nan = faults.forward_pass("train")
        units = 1.0 if whole else loss_units(piece["target"], cfg.train.loss_normalization).item()
        task_share = 1.0 if whole else units * ctx.world / global_units
        piece_slots = (distillation_slot_count(piece["teacher_mask"], cfg.distill.slots, cfg.model.task_slot).item()
                       if global_slots and not whole else 0)
        slot_share = 1.0 if whole else piece_slots * ctx.world / global_slots if global_slots else 0.0
        # DDP averages gradients over ranks when the last piece's backward runs; earlier pieces only accumulate.
        sync = model.no_sync() if data_parallel and i < len(pieces) - 1 else contextlib.nullcontext()
        with sync:
            with autocast():
                out = model(piece)
                losses, slots = compute_losses(out, piece, core, cfg, task_share, slot_share)
            loss = losses["loss"] * math.nan if make_nan else losses["loss"]
            loss.backward()
        distill_slots += slots
        totals["loss"] += loss.detach()  # already weighted by the shares
        for k, v in losses.items():  # the batch's means: each piece's mean weighted by its share
            if k != "loss":
                totals[k] += v.detach() * (slot_share if k.startswith("distill_") else task_share)
        exact += sum(s.exact for s in score_batch(out.logits.detach(), piece, cfg.model.grid_size))
    norm = torch.nn.utils.clip_grad_norm_(core.parameters(), cfg.train.grad_clip)
    keys = list(totals)
    # One device-to-host transfer for the loss terms and the gradient norm, not one per number.
    numbers = torch.stack([torch.as_tensor(totals[k], dtype=torch.float32, device=norm.device) for k in keys]
                          + [norm.float()]).tolist()
    grad_norm = numbers.pop()
    reduced = ctx.sum(numbers + [exact, len(batch["target"]), distill_slots])
    values = {k: v / ctx.world for k, v in zip(keys, reduced)}
    exact, examples, distill_slots = (int(x) for x in reduced[len(keys):])
    if distilling and distill_slots == 0:  # no teacher target anywhere in the batch: no feature terms
        values = {k: v for k, v in values.items() if not k.startswith("distill_")}
    if not (math.isfinite(values["loss"]) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        return None
    optimizer.step()
    return StepResult(values, grad_norm, examples, exact, distill_slots)


@torch.inference_mode()
def validate(
    model: SageStudent, loader: torch.utils.data.DataLoader, device: torch.device, autocast: Autocast,
    grid_size: int, micro: MicroBatch | None = None, faults: FaultInjection | None = None,
    ctx: DistributedContext = DistributedContext(), distill_slots: str = "grids",
) -> dict[str, float]:
    """Task loss and exact match / output size / pixel accuracy (target cells only) on held-out
    tasks; with teacher features, also the distillation head's cosine to them (feature fidelity).
    Out of memory halves `micro.size` and retries the batch (metrics are sums: unchanged)."""
    model.eval()
    faults = faults or FaultInjection()
    micro = micro or MicroBatch("validation", loader.batch_sampler.batch_size, None,
                                lambda message: print(message, file=sys.stderr))

    def measure(piece: dict[str, torch.Tensor]) -> tuple[float, int, list[GridScore], float, int]:
        faults.forward_pass("val")
        with autocast():
            out = model(piece)
        # Sums over target cells, like the training loss's mean, so that piece sizes do not matter.
        n_cells = (piece["target"] != PAD).sum().item()
        loss = answer_cross_entropy(out.logits, piece["target"]).item() * n_cells
        cosine, count = 0.0, 0
        if out.grid_features is not None and "teacher_features" in piece:
            _, mean_cosine, count = distillation_losses(*distillation_slots(
                out.grid_features, model.standardise(piece["teacher_features"]), piece["teacher_mask"] & out.grid_mask,
                out.task_features, distill_slots))
            cosine = mean_cosine.item() * count
        return loss, n_cells, score_batch(out.logits, piece, grid_size), cosine, count

    loss_sum, cells, scores, cosine_sum, slots = 0.0, 0, [], 0.0, 0
    for batch in loader:
        batch = to_device(batch, device)
        while True:  # a batch counts only once all its pieces went through
            try:
                results = [measure(piece) for piece in micro.pieces(batch)]
                break
            except torch.OutOfMemoryError:
                free_memory(device)
                micro.halve("a validation batch")
        for loss, n_cells, piece_scores, cosine, count in results:
            loss_sum, cells, scores = loss_sum + loss, cells + n_cells, scores + piece_scores
            cosine_sum, slots = cosine_sum + cosine, slots + count
    loss_sum, cells, cosine_sum, slots = ctx.sum([loss_sum, cells, cosine_sum, slots])  # over ranks' tasks
    scores = ctx.gather(scores)
    model.train()
    metrics = {"loss": loss_sum / max(cells, 1), **summarize(scores)}
    if slots:
        metrics["feature_cosine"] = cosine_sum / slots
    return metrics


def epoch_summary(record: dict[str, Any], epochs: int, state: TrainState) -> str:
    text = f"epoch {record['epoch']}/{epochs} done | train loss {record['train_loss']:.4f}"
    if "train_distill_mse" in record:
        text += (f" (task {record['train_task_loss']:.4f}, distill mse {record['train_distill_mse']:.4f}, "
                 f"cosine {record['train_distill_cosine']:.4f})")
    text += f" exact {record['train_exact_match']:.3f}"
    if "val_loss" in record:
        text += (f" | val loss {record['val_loss']:.4f} exact {record['val_exact_match']:.3f} "
                 f"size {record['val_size_accuracy']:.3f} pixel {record['val_pixel_accuracy']:.3f}")
        if "val_feature_cosine" in record:
            text += f" feature cosine {record['val_feature_cosine']:.4f}"
    return text + (f" | lr {record['lr']:.2e} | best exact {state.best_exact:.3f} (epoch {state.best_epoch}) "
                   f"| {record['seconds']:.1f}s")
