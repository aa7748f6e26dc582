"""The training loop: data -> student -> loss -> AdamW, with validation, checkpoints and logs.

Read top to bottom: `train()` wires everything, `train_one_epoch()` and `validate()` do the work.
Resuming restores model, optimiser, step, position inside the epoch, RNG and best metric; data
order and augmentations depend only on (seed, epoch, index), so a resumed run sees exactly the
batches an uninterrupted one would have.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from sage.arc import Task, assert_task_disjoint, load_dataset, split_by_task
from sage.checkpoint import CheckpointError, load_checkpoint, load_weights_into, save_checkpoint
from sage.config import ExperimentConfig, save_config
from sage.encoding import ARCExamples, LengthBucketSampler, canvas_to_grid, collate, evaluation_examples, training_examples
from sage.losses import answer_cross_entropy
from sage.metrics import score_baselines, score_canvas, summarize
from sage.runlog import RunLog, plot_training_curves, read_metrics
from sage_student_model import SageStudent, StudentConfig, parameter_breakdown


# ----------------------------------------------------------------------------- setup helpers


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"run.device is '{name}' but no CUDA device is available (use run.device=cpu or auto)")
    return device


def load_splits(cfg: ExperimentConfig) -> tuple[list[Task], list[Task]]:
    """(train, val) task lists, disjoint by task. 'holdout' keeps whole training tasks aside."""
    synthetic = asdict(cfg.data.synthetic)
    tasks = load_dataset(cfg.data.train, synthetic)
    if cfg.data.val == "holdout":
        train, val = split_by_task(tasks, cfg.data.val_fraction, cfg.run.seed)
    else:
        train, val = tasks, load_dataset(cfg.data.val, synthetic)
    assert_task_disjoint(train, val)
    return train, val


def lr_at(step: int, cfg: ExperimentConfig, total_steps: int) -> float:
    """Linear warmup to train.lr, then cosine decay to train.min_lr at the last step."""
    t = cfg.train
    warmup = min(t.warmup_steps, max(total_steps - 1, 0))
    if step < warmup:
        return t.lr * (step + 1) / warmup
    progress = (step - warmup) / max(total_steps - warmup, 1)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model: torch.nn.Module, cfg: ExperimentConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only (not on biases and norm gains)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=tuple(cfg.train.betas))


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


class Autocast:
    """bf16 autocast on CUDA, nothing elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.enabled = device.type == "cuda"
        self.device_type = device.type

    def __call__(self):  # noqa: ANN204 - a context manager
        return torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.enabled)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def score_batch(logits: torch.Tensor, target: torch.Tensor, grid_size: int) -> list:
    """Per-example GridScores of a batch: decode argmax canvases and compare with target grids."""
    predicted = logits.argmax(-1).view(-1, grid_size, grid_size).cpu().numpy()
    targets = target.view(-1, grid_size, grid_size).cpu().numpy()
    return [score_canvas(p, canvas_to_grid(t)) for p, t in zip(predicted, targets)]


# ----------------------------------------------------------------------------- the loop


def train(
    cfg: ExperimentConfig,
    resume: bool = False,
    stop_after_steps: int | None = None,
    echo: bool = True,
) -> dict[str, Any]:
    """Train (or resume) the run described by `cfg`; returns the final summary record."""
    run_name = cfg.run.name
    ckpt_dir = Path(cfg.run.checkpoint_dir) / run_name
    log_dir = Path(cfg.run.log_dir) / run_name
    if not resume and (ckpt_dir / "last").exists():
        raise CheckpointError(
            f"{ckpt_dir}: run '{run_name}' already has checkpoints. Continue it with --resume, "
            f"or start a new run with --set run.name=NEW_NAME (or delete {ckpt_dir} and {log_dir})"
        )
    device = resolve_device(cfg.run.device)
    torch.manual_seed(cfg.run.seed)

    # Resume first: a bad checkpoint should fail before minutes of data loading.
    checkpoint = load_checkpoint(ckpt_dir / "last") if resume else None
    if checkpoint is not None:
        saved_model = checkpoint.meta["config"]["model"]
        if saved_model != asdict(cfg.model):
            diff = {k: (saved_model.get(k), v) for k, v in asdict(cfg.model).items() if saved_model.get(k) != v}
            raise CheckpointError(f"{checkpoint.path}: model config differs from the checkpoint's: {diff}")

    log = RunLog(log_dir, echo=echo)
    train_tasks, val_tasks = load_splits(cfg)
    m = cfg.model
    train_set = ARCExamples(
        train_tasks, training_examples(train_tasks, cfg.data.use_test_pairs), m.grid_size, m.max_demos,
        cfg.data.max_context_tokens, augment=cfg.data.augment, seed=cfg.run.seed,
    )
    val_set = ARCExamples(val_tasks, evaluation_examples(val_tasks), m.grid_size, m.max_demos, cfg.data.max_context_tokens)
    train_sampler = LengthBucketSampler(train_set.lengths, cfg.train.batch_size, shuffle=True, seed=cfg.run.seed)
    val_sampler = LengthBucketSampler(val_set.lengths, cfg.val.batch_size, shuffle=False)
    loader_args = dict(collate_fn=collate, num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")
    train_loader = torch.utils.data.DataLoader(train_set, batch_sampler=train_sampler, **loader_args)
    val_loader = torch.utils.data.DataLoader(val_set, batch_sampler=val_sampler, **loader_args)

    model = SageStudent(m).to(device)
    optimizer = make_optimizer(model, cfg)
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
    save_config(cfg, log_dir / "config.yaml")

    n_params = sum(p.numel() for p in model.parameters())
    log.info(f"run '{run_name}' on {device}: student {n_params:,} parameters "
             f"({', '.join(f'{k} {v:,}' for k, v in parameter_breakdown(model).items())})")
    log.info(f"data: train {len(train_tasks)} tasks from {cfg.data.train} ({len(train_set)} examples, "
             f"augment={cfg.data.augment}); validation {len(val_tasks)} held-out tasks "
             f"({'holdout of ' + cfg.data.train if cfg.data.val == 'holdout' else cfg.data.val}, "
             f"{len(val_set)} test outputs); splits are by task")
    log.info(f"batches: train {cfg.train.batch_size} x {steps_per_epoch} steps/epoch, val {cfg.val.batch_size}; "
             f"{cfg.train.epochs} epochs = {total_steps} steps; logs in {log_dir}, checkpoints in {ckpt_dir}")
    baselines = score_baselines(val_tasks)
    log.info("validation baselines (exact match): "
             + ", ".join(f"{k} {v['exact_match']:.3f}" for k, v in baselines.items()))
    if state.step == 0:
        log.metrics("start", step=0, run=run_name, device=str(device), parameters=n_params,
                    train_tasks=len(train_tasks), val_tasks=len(val_tasks), baselines=baselines)

    autocast = Autocast(device)
    interactive = echo and sys.stderr.isatty()
    stopped_early = False

    def save(name: str, val_metrics: dict[str, Any] | None) -> None:
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
                with autocast():
                    out = model(batch)
                    loss = answer_cross_entropy(out.logits, batch["target"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                optimizer.step()
                state.step += 1
                state.batch_in_epoch += 1

                scores = score_batch(out.logits.detach(), batch["target"], m.grid_size)
                sums = state.epoch_sums
                n = len(scores)
                sums["loss"] = sums.get("loss", 0.0) + loss.item() * n
                sums["exact"] = sums.get("exact", 0.0) + sum(s.exact for s in scores)
                sums["examples"] = sums.get("examples", 0.0) + n
                if state.step % cfg.train.log_every == 0:
                    log.info(f"epoch {epoch + 1}/{cfg.train.epochs} step {state.step}/{total_steps} | "
                             f"loss {loss.item():.4f} | grad_norm {grad_norm.item():.3f} | lr {lr:.2e}")
                    log.metrics("train", step=state.step, epoch=epoch + 1, loss=loss.item(),
                                grad_norm=grad_norm.item(), lr=lr)
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}")
                if cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0:
                    save("last", None)
                if stop_after_steps is not None and state.step >= stop_after_steps:
                    stopped_early = True
                    break
            bar.close()
            if stopped_early:
                save("last", None)
                log.info(f"stopped after step {state.step} as asked; continue with --resume")
                break

            # ---- end of epoch: validate, log, checkpoint
            state.epoch += 1
            state.batch_in_epoch = 0
            sums, state.epoch_sums = state.epoch_sums, {}
            record: dict[str, Any] = {
                "step": state.step, "epoch": state.epoch, "lr": lr,
                "train_loss": sums["loss"] / sums["examples"], "train_exact_match": sums["exact"] / sums["examples"],
            }
            val_metrics = None
            if state.epoch % cfg.val.every_epochs == 0 or state.epoch == cfg.train.epochs:
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # release training activations before validation
                val_metrics = validate(model, val_loader, device, autocast, m.grid_size)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                record.update({f"val_{k}": v for k, v in val_metrics.items()})
            record["seconds"] = round(time.time() - started, 2)
            improved = val_metrics is not None and (
                val_metrics["exact_match"] > state.best_exact
                or (val_metrics["exact_match"] == state.best_exact and val_metrics["loss"] < state.best_loss)
            )
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


@torch.inference_mode()
def validate(
    model: SageStudent, loader: torch.utils.data.DataLoader, device: torch.device, autocast: Autocast, grid_size: int
) -> dict[str, float]:
    """Loss and exact match / output size / pixel accuracy (target cells only) on held-out tasks."""
    model.eval()
    loss_sum, count, scores = 0.0, 0, []
    for batch in loader:
        batch = to_device(batch, device)
        with autocast():
            out = model(batch)
            loss = answer_cross_entropy(out.logits, batch["target"])
        n = batch["target"].shape[0]
        loss_sum += loss.item() * n
        count += n
        scores += score_batch(out.logits, batch["target"], grid_size)
    model.train()
    return {"loss": loss_sum / max(count, 1), **summarize(scores)}


def epoch_summary(record: dict[str, Any], epochs: int, state: TrainState) -> str:
    text = (f"epoch {record['epoch']}/{epochs} done | train loss {record['train_loss']:.4f} "
            f"exact {record['train_exact_match']:.3f}")
    if "val_loss" in record:
        text += (f" | val loss {record['val_loss']:.4f} exact {record['val_exact_match']:.3f} "
                 f"size {record['val_size_accuracy']:.3f} pixel {record['val_pixel_accuracy']:.3f}")
    return text + (f" | lr {record['lr']:.2e} | best exact {state.best_exact:.3f} (epoch {state.best_epoch}) "
                   f"| {record['seconds']:.1f}s")
