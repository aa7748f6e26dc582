"""Experiment configuration: one YAML file describes a run completely.

The schema is the dataclasses below; their defaults are the full `sage-44m` recipe. Loading checks
every key and type and names the file and key path of any mistake. `--set a.b=value` overrides
(values parsed as YAML) are checked the same way. The resolved config is saved with every run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from sage.encoding import ANSWER_CANVASES, min_context_tokens
from sage.errors import ConfigError
from sage.losses import DISTILL_SLOTS, LOSS_NORMALIZATIONS
from sage.model import StudentConfig
from sage.teacher.presets import PRESETS as TEACHER_PRESETS
from sage.teacher.presets import TEACHER_NAMES, feature_dim
from sage.teacher.settings import LEAKING_VIEWS, TeacherConfig, teacher_problems

PRECISIONS = ("auto", "bf16", "fp32")  # run.precision


@dataclass
class RunConfig:
    name: str | None = None  # checkpoints/<name>/ and logs/<name>/; default: the config file's stem
    seed: int = 0
    device: str = "auto"  # auto (CUDA if available), cpu, cuda, cuda:N
    # Matmuls and attention under bf16 autocast (weights, optimiser and losses stay fp32). auto: on
    # CUDA only; bf16: on any device (a CPU with AVX-512 BF16 or AMX runs them faster); fp32: never.
    precision: str = "auto"
    checkpoint_dir: str = "checkpoints"
    log_dir: str = "logs"


@dataclass
class SyntheticConfig:
    num_tasks: int = 1000
    seed: int = 0
    transforms: list[str] = field(
        default_factory=lambda: ["flip_lr", "flip_ud", "rot90", "rot180", "transpose", "colour_swap", "recolour"]
    )
    min_side: int = 3
    max_side: int = 6
    demos: int = 3


@dataclass
class DataConfig:
    train: str = "arc-agi-1/training"  # arc-agi-{1,2}/{training,evaluation}, synthetic, or a directory
    val: str = "holdout"  # 'holdout': val_fraction of the training tasks, held out whole; or a dataset
    val_fraction: float = 0.1
    use_test_pairs: bool = True  # training tasks' test pairs also serve as training queries
    augment: bool = True  # a random dihedral transform + colour permutation per training example
    # Share of training examples augmented (when augment is true). The teacher saw the tasks as given,
    # so distillation targets exist only for the un-augmented rest.
    augment_probability: float = 1.0
    max_context_tokens: int = 8704  # context cap (policy: sage/encoding.py); fits every ARC-AGI-1 task
    # Train only on the tasks whose every grid is at most N x N (30: all of them): a CPU-sized run.
    max_grid_side: int = 30
    # Augmented examples also show their demonstrations in a random order (the un-augmented ones keep
    # the order the teacher saw): the answer must not depend on which demonstration comes first.
    shuffle_demos: bool = False
    num_workers: int = 0  # DataLoader worker processes
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 8
    lr: float = 1e-4
    min_lr: float = 1e-6  # cosine floor
    warmup_steps: int = 500
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    log_every: int = 20  # optimiser steps between train.log lines
    # How the answer cross-entropy averages: "cell" (over every answer cell of the batch: a 30x30
    # answer weighs 100 times a 3x3 one) or "example" (each example's mean over its own cells, then
    # the mean over examples, as HRM/TRM do).
    loss_normalization: str = "cell"
    compile: bool = False  # run the training forward/backward through torch.compile (CUDA only)
    max_nonfinite_steps: int = 5  # stop after this many steps in a row with a NaN/inf loss or gradient


@dataclass
class TTTConfig:
    """Test-time training (`evaluate.py --ttt`, sage/ttt.py): per task, a copy of the model is
    fine-tuned on examples built from that task's demonstrations only (each demonstration in turn
    as the query, the others as its context), each under a fresh random augmentation."""

    steps: int = 200  # optimiser steps per task (at most)
    seconds: float = 0.0  # per-task time budget; stops early when spent (0: no limit)
    batch_size: int = 8  # leave-one-out examples per step (the task's demonstrations, cycled)
    lr: float = 3.0e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    augment_probability: float = 1.0  # share of examples under a dihedral transform + colour permutation
    shuffle_demos: bool = True  # context demonstrations in a random order
    seed: int = 0


@dataclass
class ValConfig:
    batch_size: int = 4
    every_epochs: int = 1


@dataclass
class CheckpointConfig:
    every_epochs: int = 10  # keep an epoch_N snapshot this often (0: never)
    every_steps: int = 0  # also refresh `last` every N steps, for long epochs (0: only at epoch ends)


@dataclass
class DistillConfig:
    """Feature distillation: loss = task CE + weight * (cosine_weight * (1 - cos) + mse_weight * MSE),
    between the student's distillation head and the teacher's cached per-grid features, standardised
    with statistics of the training tasks' features (saved in the model)."""

    weight: float = 0.0  # 0: no distillation, the teacher is not used
    cosine_weight: float = 1.0
    mse_weight: float = 1.0
    # grids: each context grid's pooled state against that grid's teacher feature; task: the task
    # token's (model.task_slot) against the mean of the example's grid features; both.
    slots: str = "grids"


@dataclass
class LoggingConfig:
    # Also write metrics.jsonl's scalars to logs/<run>/tensorboard/ (needs the optional `pip install tensorboard`).
    tensorboard: bool = False


@dataclass
class ExperimentConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: StudentConfig = field(default_factory=StudentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    val: ValConfig = field(default_factory=ValConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    ttt: TTTConfig = field(default_factory=TTTConfig)

    @property
    def distills(self) -> bool:
        """Whether the student is trained against teacher features (a distillation term in the loss)."""
        return self.model.kind == "student" and self.distill.weight > 0

    @property
    def uses_teacher(self) -> bool:
        """Whether training reads the teacher's feature cache."""
        return self.distill.weight > 0 or self.model.kind == "probe"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- loading


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML config (or start from the defaults when path is None), apply `a.b=value`
    overrides, check everything, and fill in the run name."""
    raw: dict[str, Any] = {}
    where = "<defaults>"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found (see configs/ for examples)")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key.path=value, e.g. --set train.epochs=5")
        _set_path(raw, key.strip().split("."), yaml.safe_load(value), f"--set {item}")
    cfg = from_dict(ExperimentConfig, raw, where)
    if cfg.run.name is None:
        cfg.run.name = Path(path).stem if path is not None else "default"
    if cfg.teacher.max_demos is None:  # the teacher sees what the student sees
        cfg.teacher.max_demos = cfg.model.max_demos
    check(cfg, where)
    return cfg


def with_overrides(cfg: ExperimentConfig, overrides: Sequence[str], sections: Sequence[str]) -> ExperimentConfig:
    """A copy of `cfg` with `a.b=value` overrides applied, only to keys of `sections` (e.g. an
    evaluation may change a checkpoint's ttt settings, never the model it was trained as)."""
    raw = cfg.to_dict()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key.path=value, e.g. --set ttt.steps=100")
        path = key.strip().split(".")
        if path[0] not in sections:
            raise ConfigError(f"--set {item}: only {', '.join(s + '.*' for s in sections)} can be changed here")
        _set_path(raw, path, yaml.safe_load(value), f"--set {item}")
    out = from_dict(ExperimentConfig, raw, "--set")
    check(out, "--set")
    return out


def from_dict(cls: type, raw: Any, where: str, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, refusing unknown keys and wrong types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.') or 'config'}' must be a mapping, got {_show(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key '{prefix}{unknown[0]}' (known keys here: {', '.join(sorted(fields))})"
        )
    values = {name: _convert(hints[name], value, where, prefix + name) for name, value in raw.items()}
    return cls(**values)


def _convert(hint: Any, value: Any, where: str, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where, key + ".")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: '{key}' must be a list, got {_show(value)}")
        return [_convert(args[0], v, where, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: '{key}' must be true or false, got {_show(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: '{key}' must be an integer, got {_show(value)}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: '{key}' must be a number, got {_show(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: '{key}' must be a string, got {_show(value)}")
        return value
    raise TypeError(f"config schema: unsupported type {hint} for {key}")


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _set_path(raw: dict, keys: list[str], value: Any, where: str) -> None:
    node = raw
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: '{k}' is not a section")
    node[keys[-1]] = value


class _Problems(list):
    """What is wrong with a config, in the order the checks found it."""

    def need(self, ok: bool, message: str) -> None:
        if not ok:
            self.append(message)


def check(cfg: ExperimentConfig, where: str) -> None:
    """Value checks the types alone cannot express; one ConfigError lists every problem."""
    problems = _Problems()
    _check_model_and_distillation(cfg, problems)
    if cfg.model.kind == "probe":
        _check_probe(cfg, problems)
    if cfg.uses_teacher:
        _check_teacher(cfg, problems)
    _check_training(cfg, problems)
    problems.extend(teacher_problems(cfg.teacher, TEACHER_NAMES))
    name = cfg.run.name or ""
    problems.need(bool(name) and "/" not in name and name not in (".", ".."),
                  f"run.name must be a plain name, got {name!r}")
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))


def _check_model_and_distillation(cfg: ExperimentConfig, problems: _Problems) -> None:
    need, m, d = problems.need, cfg.model, cfg.data
    need(cfg.run.precision in PRECISIONS, f"run.precision must be one of {', '.join(PRECISIONS)}, got {cfg.run.precision!r}")
    need(m.d_model % m.n_heads == 0, f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads})")
    need(1 <= m.grid_size <= 30, f"model.grid_size must be 1..30, got {m.grid_size}")
    need(m.max_demos >= 1, f"model.max_demos must be >= 1, got {m.max_demos}")
    need(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}")
    least = min_context_tokens(m.grid_size)
    need(
        d.max_context_tokens >= least,
        f"data.max_context_tokens must be >= {least} (one demonstration pair and a test input of the largest "
        f"grids at model.grid_size={m.grid_size}), got {d.max_context_tokens}",
    )
    need(0.0 < d.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
    need(0.0 <= d.augment_probability <= 1.0, f"data.augment_probability must be in [0, 1], got {d.augment_probability}")
    need(m.kind in ("student", "probe"), f"model.kind must be 'student' or 'probe', got {m.kind!r}")
    need(m.answer_canvas in ANSWER_CANVASES,
         f"model.answer_canvas must be one of {', '.join(ANSWER_CANVASES)}, got {m.answer_canvas!r}")
    need(cfg.distill.weight >= 0, f"distill.weight must be >= 0, got {cfg.distill.weight}")
    need(cfg.distill.slots in DISTILL_SLOTS,
         f"distill.slots must be one of {', '.join(DISTILL_SLOTS)}, got {cfg.distill.slots!r}")
    need(cfg.distill.slots == "grids" or m.task_slot,
         f"distill.slots={cfg.distill.slots} distils the task token: set model.task_slot=true")
    need(not (m.task_slot and m.kind == "probe"), "model.task_slot is the student's: a probe reads teacher features")
    need(not (m.demo_views and m.kind == "probe"), "model.demo_views is the student's: a probe reads teacher features")
    need(not m.view_agreement or m.task_slot, "model.view_agreement starts the task token: set model.task_slot=true")


def _check_probe(cfg: ExperimentConfig, problems: _Problems) -> None:
    need, m, d = problems.need, cfg.model, cfg.data
    need(cfg.distill.weight == 0, "a probe reads teacher features, it does not distil them: set distill.weight=0")
    need(not (d.augment and d.augment_probability > 0),
         "a probe reads the teacher's features of the tasks as given: set data.augment=false")
    need(m.probe_input in ("pooled", "tokens"), f"model.probe_input must be 'pooled' or 'tokens', got {m.probe_input!r}")
    if m.probe_input == "tokens":
        need(cfg.teacher.token_features,
             "model.probe_input=tokens reads the teacher's image tokens: set teacher.token_features=true")
        if cfg.teacher.preset in TEACHER_PRESETS:
            side = math.isqrt(TEACHER_PRESETS[cfg.teacher.preset].tokens_per_image)
            need(1 <= m.probe_token_side <= side,
                 f"model.probe_token_side must be 1..{side} (teacher {cfg.teacher.preset} sees each grid as "
                 f"{side}x{side} image tokens), got {m.probe_token_side}")


def _check_teacher(cfg: ExperimentConfig, problems: _Problems) -> None:
    need, m, d, tc = problems.need, cfg.model, cfg.data, cfg.teacher
    if tc.view in LEAKING_VIEWS:
        if m.kind == "probe":
            problems.append(f"teacher.view={tc.view} shows the teacher the answer: a probe may not read it "
                            "(use teacher.view=task_context)")
        else:
            need(tc.allow_answer_view,
                 f"teacher.view={tc.view} shows the teacher each example's answer (privileged information): "
                 "distil from it only in an explicit experiment, with teacher.allow_answer_view=true")
    need(tc.max_demos == m.max_demos,
         f"teacher.max_demos ({tc.max_demos}) must equal model.max_demos ({m.max_demos}) when the student reads "
         "teacher features: each prompt shows the demonstrations its student example shows (fewer would leave "
         "slots without targets, more are never shown)")
    need(not (m.kind == "student" and cfg.distill.weight > 0 and d.augment and d.augment_probability == 1.0
              and tc.augmented_views == 0),
         f"distill.weight={cfg.distill.weight} with data.augment=true and data.augment_probability=1.0 distils "
         "nothing: the teacher saw the tasks as given, so only un-augmented examples carry targets. Cache "
         "augmented views too (e.g. teacher.augmented_views=8), lower data.augment_probability (e.g. 0.5) "
         "or set distill.weight=0")
    if tc.preset in TEACHER_NAMES:
        width = feature_dim(tc.preset)
        need(m.teacher_dim == width,
             f"model.teacher_dim ({m.teacher_dim}) must equal the width of teacher {tc.preset}'s features "
             f"({width}): set model.teacher_dim={width}")


def _check_training(cfg: ExperimentConfig, problems: _Problems) -> None:
    need, d, t = problems.need, cfg.data, cfg.train
    need(1 <= d.max_grid_side <= 30, f"data.max_grid_side must be 1..30, got {d.max_grid_side}")
    need(t.loss_normalization in LOSS_NORMALIZATIONS, f"train.loss_normalization must be one of "
         f"{', '.join(LOSS_NORMALIZATIONS)}, got {t.loss_normalization!r}")
    tt = cfg.ttt
    need(tt.steps >= 0 and tt.seconds >= 0, f"ttt.steps and ttt.seconds must be >= 0, got {tt.steps}, {tt.seconds}")
    need(tt.batch_size >= 1, f"ttt.batch_size must be >= 1, got {tt.batch_size}")
    need(tt.lr > 0 and tt.grad_clip > 0 and tt.warmup_steps >= 0 and tt.weight_decay >= 0,
         "ttt.lr and ttt.grad_clip must be > 0, ttt.warmup_steps and ttt.weight_decay >= 0")
    need(0.0 <= tt.augment_probability <= 1.0,
         f"ttt.augment_probability must be in [0, 1], got {tt.augment_probability}")
    need(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    need(t.epochs >= 1, f"train.epochs must be >= 1, got {t.epochs}")
    need(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
    need(cfg.val.batch_size >= 1, f"val.batch_size must be >= 1, got {cfg.val.batch_size}")
    need(cfg.val.every_epochs >= 1, f"val.every_epochs must be >= 1, got {cfg.val.every_epochs}")
    need(t.lr > 0 and 0 <= t.min_lr <= t.lr, f"need 0 <= train.min_lr <= train.lr and lr > 0, got {t.min_lr}, {t.lr}")
    need(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    need(len(t.betas) == 2, f"train.betas must have two values, got {t.betas}")
    need(t.grad_clip > 0, f"train.grad_clip must be > 0, got {t.grad_clip}")
    need(t.log_every >= 1, f"train.log_every must be >= 1, got {t.log_every}")
    need(cfg.checkpoint.every_epochs >= 0, "checkpoint.every_epochs must be >= 0")
    need(cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps must be >= 0")
    need(t.max_nonfinite_steps >= 1, f"train.max_nonfinite_steps must be >= 1, got {t.max_nonfinite_steps}")


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    """Write the resolved config (temporary file + rename: a crash never leaves half of it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    os.replace(tmp, path)
