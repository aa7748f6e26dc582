"""The training loop: data -> student -> loss -> AdamW, with validation, checkpoints and logs.

Read top to bottom: `train()` sets up a `Run` (`setup`: data, teacher targets, model, optimiser,
and on --resume everything a checkpoint holds), writes the run's header to the log
(`log_header`), then repeats `train_one_epoch()` and `end_of_epoch()` (validate, keep the best,
save). One optimiser step is sage/step.py's `train_step`; validation is sage/validation.py.

Resuming restores model, optimiser, step, position inside the epoch, RNG and best metric; data
order and augmentations depend only on (seed, epoch, index), so a resumed run sees exactly the
batches an uninterrupted one would have.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from sage.checkpoint import Checkpoint, load_checkpoint, load_weights_into, save_checkpoint
from sage.config import ExperimentConfig, save_config, without_removed_keys
from sage.datasets import is_demonstrations_only
from sage.device import release_cached_memory, resolve_device
from sage.distill import TeacherTargets, ensure_teacher_cache, feature_statistics, teacher_targets
from sage.distributed import (
    DistributedContext,
    RankBatchSampler,
    init_distributed,
    shutdown_distributed,
)
from sage.encoding import (
    ARCExamples,
    EpochTaggedBatches,
    LengthBucketSampler,
    collate,
    uses_shape_buckets,
)
from sage.errors import CheckpointError, ConfigError, TrainingError
from sage.metric_sinks import WandbSettings
from sage.metrics import score_baselines
from sage.model import (
    PREDATING_DEFAULTS,
    SageStudent,
    StudentConfig,
    attention_kernel,
    build_model,
    parameter_breakdown,
)
from sage.memory_probe import describe as describe_memory
from sage.memory_probe import choose_tokens_per_step, probe_run
from sage.overlap import describe
from sage.recovery import FaultInjection, MicroBatch, all_finite
from sage.runlog import RunLog, SilentLog, plot_training_curves, read_metrics
from sage.splits import Splits, load_splits, make_datasets
from sage.step import (
    Autocast,
    StepNumbers,
    StepResult,
    make_optimizer,
    read_steps,
    set_lr,
    to_device,
    train_step,
    training_lr,
)
from sage.teacher.settings import ORACLE_PRESET
from sage.token_batches import TokenBudgetSampler, describe_batches, training_sampler
from sage.validation import validate

# ----------------------------------------------------------------------------- state


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
    # fp16: steps skipped because their gradients overflowed the loss scale (the scale halves; not
    # counted as non-finite steps: an overflow is how loss scaling finds its scale, not divergence).
    overflow_steps: int = 0


@dataclass
class Run:
    """One training run as `setup` builds it: what every phase of the loop reads and updates."""

    cfg: ExperimentConfig
    device: torch.device
    ctx: DistributedContext
    log: RunLog | SilentLog
    faults: FaultInjection
    checkpoint_dir: Path
    log_dir: Path
    splits: Splits
    train_set: ARCExamples
    val_set: ARCExamples
    train_sampler: LengthBucketSampler | TokenBudgetSampler | RankBatchSampler
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    model: SageStudent  # the model itself
    net: torch.nn.Module  # the same model as the step runs it: compiled, data-parallel
    optimizer: torch.optim.Optimizer
    state: TrainState
    autocast: Autocast
    train_micro: MicroBatch
    val_micro: MicroBatch
    interactive: bool  # a progress bar on a terminal
    steps_per_epoch: int  # the sampler's length changes while it skips a resumed epoch's first batches
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)
    lr: float = 0.0  # the learning rate of the latest step
    epoch_started: float = 0.0  # time.time() when the current epoch began
    bar: Any = None  # progress over the whole run's steps, with its ETA (on a terminal)
    scaler: torch.amp.GradScaler | None = None  # fp16's loss scale (Autocast.loss_scaler), saved with the optimiser

    @property
    def total_steps(self) -> int:
        return self.cfg.train.epochs * self.steps_per_epoch

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def save(self, name: str, val_metrics: dict[str, Any] | None) -> None:
        """checkpoints/<run>/<name>: weights, optimiser, RNG, the train state and the config."""
        if not self.ctx.is_main:  # every rank holds the same weights; one writes them
            return
        state, cfg = self.state, self.cfg
        state.train_micro_batch, state.val_micro_batch = self.train_micro.size, self.val_micro.size
        training_state = {"optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state()}
        if self.scaler is not None:
            training_state["loss_scaler"] = self.scaler.state_dict()
        if self.device.type == "cuda":
            training_state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        meta = {
            "config": cfg.to_dict(),
            "train_state": asdict(state),
            "val_metrics": val_metrics,
            "parameters": self.parameters,
            "val_task_ids": [t.id for t in self.splits.val],
            "protocol": {"train": cfg.data.train, "val": cfg.data.val, "split_by": "task"},
        }
        save_checkpoint(self.checkpoint_dir / name, self.model.state_dict(), training_state, meta)

    def plot(self) -> None:
        if self.ctx.is_main:
            plot_training_curves(self.log.metrics_path, self.log_dir / "curves.png", title=self.cfg.run.name)


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
    ctx = init_distributed(device.type, cfg.run.collective_timeout_s)
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    faults = faults or FaultInjection()
    faults.rank = ctx.rank
    try:
        run = setup(cfg, device, ctx, resume, echo, faults)
        stopped_early = False
        try:
            log_header(run)
            log_memory_probe(run)
            last_step = min(run.total_steps, stop_after_steps or run.total_steps)
            run.bar = tqdm(total=last_step, initial=min(run.state.step, last_step), unit="step",
                           disable=not run.interactive, dynamic_ncols=True)
            while run.state.epoch < cfg.train.epochs:
                stopped_early = train_one_epoch(run, stop_after_steps)
                if stopped_early:
                    stop_early(run)
                    break
                end_of_epoch(run)
            if not stopped_early:
                run.log.info(f"finished: {describe_best(run.state, cfg.checkpoint.best_by)} -> "
                             f"{run.checkpoint_dir / 'best'}")
            release_cached_memory(run.device, "training", run.log.info)  # for what runs next in this process
        finally:
            if run.bar is not None:
                run.bar.close()
            run.log.close()
        return run_summary(run, stopped_early)
    finally:
        shutdown_distributed(ctx)


# ----------------------------------------------------------------------------- setup


def setup(cfg: ExperimentConfig, device: torch.device, ctx: DistributedContext, resume: bool, echo: bool,
          faults: FaultInjection) -> Run:
    """Everything the loop needs, in the order that fails fastest: a bad checkpoint before minutes
    of data loading, bad data before the run leaves anything on disk."""
    checkpoint_dir = Path(cfg.run.checkpoint_dir) / cfg.run.name
    log_dir = Path(cfg.run.log_dir) / cfg.run.name
    if not resume and (checkpoint_dir / "last").exists():
        raise CheckpointError(
            f"{checkpoint_dir}: run '{cfg.run.name}' already has checkpoints. Continue it with --resume, "
            f"or start a new run with --set run.name=NEW_NAME (or delete {checkpoint_dir} and {log_dir})"
        )
    if resume and not (checkpoint_dir / "last").exists():
        raise CheckpointError(nothing_to_resume(cfg.run.name, checkpoint_dir, log_dir))
    torch.manual_seed(cfg.run.seed)
    checkpoint = open_checkpoint(checkpoint_dir / "last", cfg.model) if resume else None
    splits = load_splits(cfg)
    log = RunLog(log_dir, echo=echo, tensorboard=cfg.logging.tensorboard, wandb=wandb_settings(cfg)) \
        if ctx.is_main else SilentLog()
    if checkpoint is None and log.drop_metrics():  # an attempt that died before its first checkpoint
        log.info(f"starting '{cfg.run.name}' afresh: an earlier attempt left no checkpoint "
                 f"(its lines above stay in this log; its metrics.jsonl records were dropped)")
    if splits.shared:
        log.info("left out of validation, their test pairs being training pairs: "
                 + ", ".join(f"{k} (= {v})" for k, v in splits.shared.items()))
    if splits.overlap:
        log.info("validation tasks that share demonstrations or test inputs with training (kept): "
                 + describe(splits.overlap))
    train_teacher, val_teacher = (load_teacher_targets(cfg, splits, ctx, log, faults.extraction_delay)
                                  if cfg.uses_teacher else (None, None))
    if cfg.uses_teacher:  # an extraction in this process leaves the teacher's memory reserved
        release_cached_memory(device, "the teacher cache", log.info)
    train_set, val_set = make_datasets(cfg, splits, train_teacher, val_teacher, ctx)
    if cfg.train.tokens_per_step == "auto":
        cfg = with_tokens_per_step(cfg, checkpoint, train_set, device, ctx, log)
    train_sampler = training_sampler(train_set.lengths, train_set.sides, cfg.train.batch_size * ctx.world,
                                     cfg.train.tokens_per_step * ctx.world, cfg.run.seed)
    largest_batch = (train_sampler.largest_batch if isinstance(train_sampler, TokenBudgetSampler)
                     else cfg.train.batch_size * ctx.world)
    if ctx.enabled:
        train_sampler = RankBatchSampler(train_sampler, ctx)
    val_sampler = LengthBucketSampler(val_set.lengths, cfg.val.batch_size, shuffle=False, sides=val_set.sides)
    # Workers persist across epochs (no restart per epoch); the epoch travels with each index.
    loader_args = dict(num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
                       persistent_workers=cfg.data.num_workers > 0)
    batch_of = functools.partial(collate, shape_buckets=uses_shape_buckets(device))
    train_loader = torch.utils.data.DataLoader(train_set, batch_sampler=EpochTaggedBatches(train_sampler),
                                               collate_fn=batch_of, **loader_args)
    val_loader = torch.utils.data.DataLoader(val_set, batch_sampler=val_sampler, collate_fn=batch_of,
                                             **loader_args)  # shape buckets on CUDA, as training's

    model = build_model(cfg.model).to(device)
    if cfg.distills and checkpoint is None:
        mean, std = feature_statistics(train_teacher.cache, train_set.teacher_keys())
        model.teacher_mean.copy_(mean)
        model.teacher_std.copy_(std)
    optimizer = make_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.betas)
    autocast = Autocast(device, cfg.run.precision)
    scaler = autocast.loss_scaler()
    state = TrainState()
    if checkpoint is not None:
        state = restore(checkpoint, model, optimizer, device, log, steps_per_epoch=len(train_sampler), scaler=scaler)
    ctx.broadcast_from_main(model)
    net = wrap_model(model, cfg, device, log)
    if ctx.is_main:
        save_config(cfg, log_dir / "config.yaml")
    return Run(cfg, device, ctx, log, faults, checkpoint_dir, log_dir, splits, train_set, val_set, train_sampler,
               train_loader, val_loader, model, net, optimizer, state, autocast,
               MicroBatch("training", -(-largest_batch // ctx.world), state.train_micro_batch, log.info),
               MicroBatch("validation", cfg.val.batch_size, state.val_micro_batch, log.info),
               interactive=echo and sys.stderr.isatty(), steps_per_epoch=len(train_sampler), scaler=scaler)


def with_tokens_per_step(cfg: ExperimentConfig, checkpoint: Checkpoint | None, train_set: ARCExamples,
                         device: torch.device, ctx: DistributedContext, log: RunLog | SilentLog) -> ExperimentConfig:
    """train.tokens_per_step=auto made a number: measured now (sage.memory_probe.choose_tokens_per_step),
    or, resuming, the number the run chose at its start (its batches must stay the same)."""
    if checkpoint is not None:
        tokens = checkpoint.meta["config"]["train"].get("tokens_per_step")
        if not isinstance(tokens, int):
            raise ConfigError(f"{checkpoint.path}/meta.json: train.tokens_per_step=auto, but the checkpoint does not "
                              f"say what the run chose ({tokens!r}): set the number its log states")
        log.info(f"train.tokens_per_step auto: {tokens:,} tokens a step, as the run chose at its start")
    elif ctx.enabled:
        raise ConfigError("train.tokens_per_step=auto is measured by one process: run it once without torchrun "
                          "(its log states the number) and set that number under torchrun")
    else:
        tokens = choose_tokens_per_step(cfg, train_set, device, log.info)
    return replace(cfg, train=replace(cfg.train, tokens_per_step=tokens))


def wandb_settings(cfg: ExperimentConfig) -> WandbSettings | None:
    """logging.wandb's W&B run: named after the run, the resolved config recorded with it."""
    lg = cfg.logging
    return WandbSettings(cfg.run.name, lg.wandb_project, lg.wandb_mode, cfg.to_dict()) if lg.wandb else None


def nothing_to_resume(name: str, checkpoint_dir: Path, log_dir: Path) -> str:
    """What --resume without a checkpoint means, and what to do."""
    if (log_dir / "train.log").exists():
        return (f"{checkpoint_dir / 'last'}: run '{name}' has no checkpoint to resume from: it stopped before "
                f"saving its first one (its log is {log_dir / 'train.log'}). Start it again without --resume; "
                f"set checkpoint.every_steps to save within the first epoch")
    return (f"{checkpoint_dir}: there is no run '{name}' to resume (no checkpoint, no log in {log_dir}). "
            f"Start it without --resume, or check run.name and run.checkpoint_dir")


def open_checkpoint(path: Path, model_cfg: StudentConfig) -> Checkpoint:
    """The checkpoint to resume from, refused when its model differs from the config's."""
    checkpoint = load_checkpoint(path, meta_keys=("config", "train_state"), state_keys=("optimizer", "torch_rng"))
    # Keys added since the checkpoint was written take their defaults, or what it was trained with.
    saved = without_removed_keys(checkpoint.meta["config"], f"{checkpoint.path}/meta.json")[0]
    saved_model = {**asdict(StudentConfig()), **PREDATING_DEFAULTS, **saved["model"]}
    if saved_model != asdict(model_cfg):
        diff = {k: (saved_model.get(k), v) for k, v in asdict(model_cfg).items() if saved_model.get(k) != v}
        raise CheckpointError(f"{checkpoint.path}: model config differs from the checkpoint's: {diff}")
    return checkpoint


def load_teacher_targets(cfg: ExperimentConfig, splits: Splits, ctx: DistributedContext,
                         log: RunLog | SilentLog, delay: float = 0.0) -> tuple[TeacherTargets, TeacherTargets]:
    """The teacher's features for the training and validation examples, extracting a missing cache
    (`delay`: seconds added to it, to test the other processes' wait)."""
    t, m = cfg.teacher, cfg.model
    weights = ("the synthetic tasks' hidden rules, noise " + str(t.noise) if t.preset == ORACLE_PRESET else
               "weights from " + t.checkpoint_dir if t.checkpoint_dir else "random weights")
    log.info(f"teacher: {t.preset} ({weights}), "
             f"view {t.view}; " + (f"distillation weight {cfg.distill.weight}" if m.kind == "student"
                                 else f"probe input: {m.probe_input}"))
    with ctx.main_first():  # one process extracts a missing cache, the others then read it
        time.sleep(delay if ctx.is_main else 0.0)
        train_cache = ensure_teacher_cache(cfg, cfg.data.train, splits.train_dataset, log.info)
        val_cache = train_cache if cfg.data.val == "holdout" else ensure_teacher_cache(
            cfg, cfg.data.val, splits.val_dataset, log.info)
    return teacher_targets(train_cache, m), teacher_targets(val_cache, m)


def restore(checkpoint: Checkpoint, model: SageStudent, optimizer: torch.optim.Optimizer, device: torch.device,
            log: RunLog | SilentLog, steps_per_epoch: int, scaler: torch.amp.GradScaler | None = None) -> TrainState:
    """Weights, optimiser, fp16's loss scale, RNG and train state from `checkpoint`; the log forgets
    later steps."""
    load_weights_into(model, checkpoint)
    optimizer.load_state_dict(checkpoint.training_state["optimizer"])
    if scaler is not None and "loss_scaler" in checkpoint.training_state:
        scaler.load_state_dict(checkpoint.training_state["loss_scaler"])
    elif scaler is not None:  # trained in bf16 or fp32 until now
        log.info(f"{checkpoint.path} has no fp16 loss scale: it starts at {scaler.get_scale():g}")
    state = TrainState(**checkpoint.meta["train_state"])
    torch.set_rng_state(checkpoint.training_state["torch_rng"])
    if device.type == "cuda" and "cuda_rng" in checkpoint.training_state:
        torch.cuda.set_rng_state(checkpoint.training_state["cuda_rng"], device)
    log.truncate_metrics_after(state.step)
    log.info(f"resumed from {checkpoint.path} at step {state.step} (epoch {state.epoch + 1}, "
             f"batch {state.batch_in_epoch}/{steps_per_epoch})")
    return state


def compiles(cfg: ExperimentConfig, device: torch.device) -> bool:
    """train.compile takes effect on CUDA only (on the CPU it measured slower)."""
    return cfg.train.compile and device.type == "cuda"


def wrap_model(model: SageStudent, cfg: ExperimentConfig, device: torch.device,
               log: RunLog | SilentLog) -> torch.nn.Module:
    """The model as the step runs it: compiled on CUDA with train.compile. (Under torchrun the step
    averages the gradients itself, sage/distributed.py, rather than through DistributedDataParallel.)"""
    net: torch.nn.Module = model
    if cfg.train.compile:
        if compiles(cfg, device):
            # dynamic: context lengths and answer canvases change from batch to batch (within the
            # few shapes the training loader's shape buckets allow).
            net = torch.compile(model, dynamic=True)
        else:
            log.info("train.compile: skipped on the CPU, where it measured slower (docs/performance.md)")
    return net


def log_header(run: Run) -> None:
    """What the run is: device, model, data, batches, baselines; before the first step, the
    untrained distillation head's fidelity (the reference point for distillation)."""
    cfg, log, m, ctx, state = run.cfg, run.log, run.cfg.model, run.ctx, run.state
    train_set, val_set, train_tasks, val_tasks = run.train_set, run.val_set, run.splits.train, run.splits.val
    attention = attention_kernel(m, run.device, run.autocast.dtype)
    log.info(f"run '{cfg.run.name}' on {run.device} ({run.autocast.name}, {attention} attention): "
             f"{m.kind} {run.parameters:,} parameters "
             f"({', '.join(f'{k} {v:,}' for k, v in parameter_breakdown(run.model).items())})")
    log.info(f"data.train {cfg.data.train}: {run.splits.source}")
    demonstrations_only = sum(map(is_demonstrations_only, train_tasks))
    log.info(f"data: train {len(train_tasks) - demonstrations_only} tasks from {cfg.data.train}"
             + (f" + the demonstrations of {demonstrations_only} of {cfg.data.demonstrations_of}"
                if demonstrations_only else "") + f" ({len(train_set)} examples, "
             f"augment={cfg.data.augment} p={train_set.augment_probability}); validation {len(val_tasks)} held-out tasks "
             f"({'holdout of ' + cfg.data.train if cfg.data.val == 'holdout' else cfg.data.val}, "
             f"{len(val_set)} test outputs); splits are by task")
    log.info(f"demonstrations: training: {train_set.demonstration_cuts().describe()}; "
             f"validation: {val_set.demonstration_cuts().describe()}")
    if train_set.teacher is not None:
        with_targets = train_set.with_teacher_view_in_epoch(0)
        which = (f"as given or in one of the teacher's {train_set.teacher_views} augmented views per task"
                 if train_set.teacher_views else "the un-augmented ones")
        log.info(f"teacher targets: {with_targets} of {len(train_set)} training examples in epoch 1 ({which}, "
                 f"data.augment_probability={train_set.augment_probability}); every validation example")
    sampler = run.train_sampler.global_sampler if ctx.enabled else run.train_sampler
    per_step = describe_batches(sampler, cfg.train.tokens_per_step * ctx.world)
    if ctx.enabled:
        per_process = (f"{cfg.train.tokens_per_step:,} tokens" if cfg.train.tokens_per_step
                       else str(cfg.train.batch_size))
        per_step = f"{per_process} per process x {ctx.world} processes = {per_step} per step"
    log.info(f"batches: train {per_step} x {run.steps_per_epoch} steps/epoch, "
             f"val {cfg.val.batch_size}{' per process' if ctx.enabled else ''}; "
             f"{cfg.train.epochs} epochs = {run.total_steps} steps; logs in {run.log_dir}, checkpoints in "
             f"{run.checkpoint_dir}")
    run.baselines = score_baselines(val_tasks)
    log.info("validation baselines (exact match): "
             + ", ".join(f"{k} {v['exact_match']:.3f}" for k, v in run.baselines.items()))
    if state.step == 0:
        start_record = dict(step=0, run=cfg.run.name, device=str(run.device), parameters=run.parameters,
                            train_tasks=len(train_tasks), val_tasks=len(val_tasks), baselines=run.baselines,
                            teacher=cfg.teacher.preset if cfg.uses_teacher else None)
        if cfg.distills:
            untrained = run_validation(run)
            start_record["val_feature_cosine"] = untrained["feature_cosine"]
            log.info(f"untrained distillation head: validation feature cosine {untrained['feature_cosine']:.4f}")
        log.metrics("start", **start_record)


def log_memory_probe(run: Run) -> None:
    """Before the first step, the peak memory of the largest training step and validation pass
    against what the device has (sage/memory_probe.py; the step is undone). Not under torchrun,
    where every process would probe at once."""
    if run.ctx.enabled:
        return
    probes = probe_run(run.model, run.optimizer, run.scaler, run.cfg, run.device, run.autocast, run.train_set,
                       run.train_sampler.batches(), run.val_set, run.val_loader.batch_sampler.batches())
    run.log.info(describe_memory(probes, run.device))


# ----------------------------------------------------------------------------- one epoch


def train_one_epoch(run: Run, stop_after_steps: int | None) -> bool:
    """The epoch's remaining batches, one optimiser step each; True when it stopped as asked. The
    steps' numbers stay on the device until a log line, a checkpoint or the epoch's end reads them
    all at once (`record_steps`): a GPU never waits for the host between steps."""
    cfg, state = run.cfg, run.state
    epoch = state.epoch  # 0-based; logged 1-based
    run.epoch_started = time.time()
    run.train_sampler.set_epoch(epoch, skip_batches=state.batch_in_epoch)
    run.model.train()
    # The latest step's learning rate (the epoch record's, should a resumed epoch have no batch left).
    run.lr = training_lr(max(state.step - 1, 0), cfg.train, run.total_steps)
    bar = run.bar
    bar.set_description(f"epoch {epoch + 1}/{cfg.train.epochs}")
    stopped, pending = False, []
    for batch in run.train_loader:
        run.lr = training_lr(state.step, cfg.train, run.total_steps)
        set_lr(run.optimizer, run.lr)
        batch = to_device(batch, run.device)
        result = train_step(run.net, run.optimizer, batch, cfg, run.autocast, run.train_micro, run.faults,
                            state.step + 1, run.ctx, run.scaler)
        state.step += 1
        state.batch_in_epoch += 1
        bar.update()
        pending.append(PendingStep(state.step, run.lr, result))
        saving = bool(cfg.checkpoint.every_steps) and state.step % cfg.checkpoint.every_steps == 0
        stopped = stop_after_steps is not None and state.step >= stop_after_steps
        if state.step % cfg.train.log_every == 0 or saving or stopped:
            record_steps(run, pending, epoch, bar)
            pending = []
        if saving:
            run.save("last", None)
        if stopped:
            break
    record_steps(run, pending, epoch, bar)
    return stopped


@dataclass
class PendingStep:
    """A step taken whose numbers are still on the device."""

    step: int
    lr: float
    result: StepResult


def record_steps(run: Run, pending: list[PendingStep], epoch: int, bar: Any) -> None:
    """The pending steps' numbers, read in one transfer, into the epoch's sums, the skipped-step
    count and the log (a line every train.log_every steps)."""
    state, cfg = run.state, run.cfg
    for p, numbers in zip(pending, read_steps([p.result for p in pending])):
        if numbers.overflowed:  # fp16: the loss scale was too high for this step's gradients
            overflow_step(run, epoch, p.step)
            continue
        if numbers.skipped:  # non-finite loss or gradient: no update from this batch
            skip_step(run, epoch, p.step)
            continue
        state.nonfinite_in_row = 0
        add_to_epoch_sums(state.epoch_sums, numbers)
        if p.step % cfg.train.log_every == 0:
            terms = "".join(f" | {k} {v:.4f}" for k, v in numbers.values.items() if k != "loss")
            run.log.info(f"epoch {epoch + 1}/{cfg.train.epochs} step {p.step}/{run.total_steps} | "
                         f"loss {numbers.values['loss']:.4f}{terms} | grad_norm {numbers.grad_norm:.3f} | "
                         f"lr {p.lr:.2e}")
            run.log.metrics("train", step=p.step, epoch=epoch + 1, **numbers.values, grad_norm=numbers.grad_norm,
                            lr=p.lr)
        bar.set_postfix(loss=f"{numbers.values['loss']:.3f}", lr=f"{p.lr:.1e}")


def overflow_step(run: Run, epoch: int, step: int) -> None:
    """A step whose fp16 gradients overflowed the loss scale: nothing updated, the scale halved
    (torch.amp.GradScaler), counted and logged; a run does not stop for these."""
    run.state.overflow_steps += 1
    run.log.info(f"step {step}: fp16 gradients overflowed the loss scale, step skipped and the scale halved "
                 f"({run.state.overflow_steps} in all)")
    run.log.metrics("overflow", step=step, epoch=epoch + 1, in_all=run.state.overflow_steps)


def skip_step(run: Run, epoch: int, step: int) -> None:
    """A step whose loss or gradient was not finite: counted, logged, and after
    train.max_nonfinite_steps in a row the run stops with the last finite weights saved."""
    state, limit = run.state, run.cfg.train.max_nonfinite_steps
    state.skipped_steps += 1
    state.nonfinite_in_row += 1
    run.log.info(f"step {step}: non-finite loss or gradient, step skipped "
                 f"({state.nonfinite_in_row} in a row, {state.skipped_steps} in all)")
    run.log.metrics("skipped", step=step, epoch=epoch + 1, in_a_row=state.nonfinite_in_row)
    if state.nonfinite_in_row >= limit:
        run.save("last", None)  # finite weights: a skipped step updates nothing
        raise TrainingError(
            f"{state.nonfinite_in_row} steps in a row had a non-finite loss or gradient (up to step "
            f"{step}, train.max_nonfinite_steps={limit}): training "
            f"diverged. Lower train.lr or raise train.warmup_steps; the weights before it are in "
            f"{run.checkpoint_dir / 'last'} (continue with --resume)")


def add_to_epoch_sums(sums: dict[str, float], numbers: StepNumbers) -> None:
    """The running train sums of the epoch (saved with a checkpoint, so a resumed epoch's means are whole)."""
    for k, v in numbers.values.items():  # feature terms: means over the slots that had a target
        weight = numbers.distill_slots if k.startswith("distill_") else numbers.examples
        sums[k] = sums.get(k, 0.0) + v * weight
    sums["distill_slots"] = sums.get("distill_slots", 0.0) + numbers.distill_slots
    sums["exact"] = sums.get("exact", 0.0) + numbers.exact
    sums["examples"] = sums.get("examples", 0.0) + numbers.examples


def stop_early(run: Run) -> None:
    """--stop-after-steps: save where the run is, so that --resume continues from there."""
    run.save("last", None)
    run.log.info(f"stopped after step {run.state.step} as asked; continue with --resume")
    run.plot()  # the steps so far, also when no epoch has ended


# ----------------------------------------------------------------------------- end of epoch


def end_of_epoch(run: Run) -> None:
    """Validate (every val.every_epochs, and after the last epoch), log, keep the best, save."""
    cfg, state = run.cfg, run.state
    state.epoch += 1
    state.batch_in_epoch = 0
    record = epoch_record(state.epoch_sums, state.step, state.epoch, run.lr)
    state.epoch_sums = {}
    val_metrics = None
    if state.epoch % cfg.val.every_epochs == 0 or state.epoch == cfg.train.epochs:
        val_metrics = run_validation(run)
        record.update({f"val_{k}": v for k, v in val_metrics.items()})
    record["seconds"] = round(time.time() - run.epoch_started, 2)
    improved = keep_if_best(run, val_metrics)
    run.log.metrics("epoch", **record)
    run.log.info(epoch_summary(record, cfg.train.epochs, state, cfg.checkpoint.best_by))
    final = state.epoch == cfg.train.epochs
    if final or every(state.epoch, cfg.checkpoint.last_every_epochs):
        run.save("last", val_metrics)
    if improved:
        run.save("best", val_metrics)
    if every(state.epoch, cfg.checkpoint.every_epochs):
        run.save(f"epoch_{state.epoch}", val_metrics)
    if final or every(state.epoch, cfg.logging.curves_every_epochs):
        run.plot()


def every(epoch: int, period: int) -> bool:
    """Whether `epoch` (1-based) is one of every `period` epochs (0: never)."""
    return bool(period) and epoch % period == 0


def epoch_record(sums: dict[str, float], step: int, epoch: int, lr: float) -> dict[str, Any]:
    """The epoch's train means from its running sums (feature terms over the slots with a target)."""
    record: dict[str, Any] = {"step": step, "epoch": epoch, "lr": lr}
    for k, v in sums.items():
        if k not in ("exact", "examples", "distill_slots"):
            record[f"train_{k}"] = v / (sums["distill_slots"] if k.startswith("distill_") else sums["examples"])
    record["train_exact_match"] = sums["exact"] / sums["examples"]
    return record


def run_validation(run: Run) -> dict[str, float]:
    """sage.validation.validate on the held-out tasks, training's activations released around it."""
    if run.device.type == "cuda":
        torch.cuda.empty_cache()  # release training activations before validation
    metrics = validate(run.model, run.val_loader, run.device, run.autocast, run.cfg.model.grid_size, run.val_micro,
                       run.faults, run.ctx, run.cfg.distill.slots)
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
    return metrics


def improves(val_metrics: dict[str, float], best_exact: float, best_loss: float, best_by: str) -> bool:
    """Whether a validation beats the best so far under checkpoint.best_by: "exact_match" ranks by
    (exact match, -loss), "loss" by (-loss, exact match)."""
    now, best = (val_metrics["exact_match"], -val_metrics["loss"]), (best_exact, -best_loss)
    if best_by == "loss":
        now, best = now[::-1], best[::-1]
    return now > best


def keep_if_best(run: Run, val_metrics: dict[str, float] | None) -> bool:
    """True (and the state's best updated) when validation improved under checkpoint.best_by; never
    for non-finite loss or weights."""
    state = run.state
    improved = val_metrics is not None and improves(val_metrics, state.best_exact, state.best_loss,
                                                    run.cfg.checkpoint.best_by)
    if improved and not (math.isfinite(val_metrics["loss"]) and all_finite(run.model.state_dict().values())):
        run.log.info(f"epoch {state.epoch}: non-finite validation loss or weights; not saved as best")
        improved = False
    if improved:
        state.best_exact, state.best_loss = val_metrics["exact_match"], val_metrics["loss"]
        state.best_epoch = state.epoch
    return improved


def run_summary(run: Run, stopped_early: bool) -> dict[str, Any]:
    records = [r for r in read_metrics(run.log_dir / "metrics.jsonl") if r.get("event") == "epoch"]
    return {"run": run.cfg.run.name, "step": run.state.step, "epochs_done": run.state.epoch,
            "stopped_early": stopped_early, "best_by": run.cfg.checkpoint.best_by,
            "best_exact_match": run.state.best_exact, "best_loss": run.state.best_loss,
            "best_epoch": run.state.best_epoch, "last": records[-1] if records else None, "baselines": run.baselines,
            "checkpoint_dir": str(run.checkpoint_dir), "log_dir": str(run.log_dir)}


def epoch_summary(record: dict[str, Any], epochs: int, state: TrainState, best_by: str) -> str:
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
    text += f" | lr {record['lr']:.2e} | {describe_best(state, best_by)} | {record['seconds']:.1f}s"
    if record["epoch"] < epochs:  # for whoever tails the log: the rest at this epoch's pace, validation included
        text += f" | about {describe_duration((epochs - record['epoch']) * record['seconds'])} left"
    return text


def describe_duration(seconds: float) -> str:
    """"45 s", "12 min", "3 h 05 min"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def describe_best(state: TrainState, best_by: str) -> str:
    """The best validation so far, by the figure that ranks it (checkpoint.best_by)."""
    if state.best_epoch == 0:
        return "no validation yet"
    figure = f"loss {state.best_loss:.4f}" if best_by == "loss" else f"exact {state.best_exact:.3f}"
    return f"best {figure} (epoch {state.best_epoch})"
