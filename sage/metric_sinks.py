"""Where a run's metrics go besides metrics.jsonl: TensorBoard and Weights & Biases, both optional.

metrics.jsonl is the source of truth; a sink mirrors its records, every number as
'<event>/<key>' (nested keys joined by '/') at the record's step. On --resume the run log
restarts each sink and replays the records it kept, so a sink never shows a step twice nor misses
one a crash left in a buffer: TensorBoard's event files are rewritten; W&B gets a new run (in the
same group, named after the run) holding the kept records, since a W&B run cannot forget steps.

A missing optional package stops the run before it writes anything, with the install command.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from sage.errors import ConfigError

NOT_SCALARS = ("step", "time")  # the x axis and the wall time, which the sinks record themselves
WANDB_MODES = ("offline", "online")


def scalars(values: dict[str, Any], prefix: str) -> Iterator[tuple[str, float]]:
    """Every number of a record as (tag, value), nested dicts flattened into the tag."""
    for key, value in values.items():
        if isinstance(value, dict):
            yield from scalars(value, f"{prefix}/{key}")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key not in NOT_SCALARS:
            yield f"{prefix}/{key}", float(value)


def summary_writer_class() -> type:
    """torch's SummaryWriter; it needs the optional `tensorboard` package, and says so as a ConfigError
    (exit code 2 from train_sage.py) when that is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError(f"logging.tensorboard is true but TensorBoard is not available ({e}): install it with "
                          "`pip install tensorboard`, or set logging.tensorboard=false") from None
    return SummaryWriter


def wandb_module() -> Any:
    """The optional `wandb` package, or a ConfigError saying how to get it."""
    try:
        import wandb
    except ImportError as e:
        raise ConfigError(f"logging.wandb is true but Weights & Biases is not available ({e}): install it with "
                          "`pip install wandb`, or set logging.wandb=false") from None
    return wandb


class TensorBoardSink:
    """Event files in `directory` for `tensorboard --logdir logs`."""

    def __init__(self, directory: Path, writer_class: type) -> None:
        self.directory, self._writer_class = directory, writer_class
        self._writer = writer_class(str(directory), flush_secs=30)

    def add(self, record: dict[str, Any]) -> None:
        for tag, value in scalars(record, record["event"]):
            self._writer.add_scalar(tag, value, global_step=record.get("step"), walltime=record.get("time"))

    def restart(self) -> None:
        """Forget everything written (the event files too) and start empty."""
        self._writer.close()
        shutil.rmtree(self.directory, ignore_errors=True)
        self._writer = self._writer_class(str(self.directory), flush_secs=30)

    def close(self) -> None:
        self._writer.close()


@dataclass(frozen=True)
class WandbSettings:
    """logging.wandb's settings, with the run's name and its config (recorded in the W&B run)."""

    name: str
    project: str
    mode: str  # offline (`wandb sync` later; clusters without network need nothing else) or online
    config: dict[str, Any]


class WandbSink:
    """A W&B run named after the training run, its files in `directory`; started at the first
    record, so a resume that replays records starts exactly one."""

    def __init__(self, directory: Path, settings: WandbSettings, wandb: Any) -> None:
        self.directory, self.settings, self._wandb = directory, settings, wandb
        self._run: Any = None

    def _start(self) -> Any:
        self.directory.mkdir(parents=True, exist_ok=True)
        s = self.settings
        return self._wandb.init(project=s.project, name=s.name, group=s.name, dir=str(self.directory), mode=s.mode,
                                config=s.config)

    def add(self, record: dict[str, Any]) -> None:
        values = dict(scalars(record, record["event"]))
        if values:
            self._run = self._run or self._start()
            self._run.log(values, step=record.get("step"))

    def restart(self) -> None:
        """The next record goes to a new W&B run (the old one keeps steps this run no longer has)."""
        self.close()

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None
