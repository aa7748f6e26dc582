"""Run logging: a human log you can `tail -f`, a JSONL metrics stream, PNG training curves and,
optionally, TensorBoard and Weights & Biases (sage/metric_sinks.py).

    logs/<run>/train.log       one timestamped line per event, flushed as written
    logs/<run>/metrics.jsonl   one JSON object per logged event ({"event": "start"|"train"|"epoch"|"skipped", ...}):
                               the source of truth for everything below
    logs/<run>/curves.png      training loss and its terms at every logged step, validation metrics at the
                               steps where validation ran (redrawn after each epoch)
    logs/<run>/tensorboard/    with logging.tensorboard: true, the same scalars for `tensorboard --logdir logs`
    logs/<run>/wandb/          with logging.wandb: true, the same scalars in a W&B run (offline unless asked)
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from sage.errors import RunLogError
from sage.files import FileKind, atomic_write
from sage.metric_sinks import TensorBoardSink, WandbSettings, WandbSink, summary_writer_class, wandb_module

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# Resuming rewrites metrics.jsonl with the records up to its checkpoint: a damaged record is not dropped unseen.
METRICS_FILE = FileKind("the run's metrics", RunLogError,
                        "the checkpoints are intact: delete the damaged lines (those points leave the curves) or the "
                        "whole file (the curves then start at the checkpoint), and rerun with --resume")


class RunLog:
    def __init__(self, directory: str | Path, echo: bool = True, tensorboard: bool = False,
                 wandb: WandbSettings | None = None) -> None:
        self.dir = Path(directory)
        self.log_path = self.dir / "train.log"
        self.metrics_path = self.dir / "metrics.jsonl"
        self.tensorboard_dir = self.dir / "tensorboard"
        # Before anything is written: a missing optional package stops the run at start, not after an epoch.
        writer_class = summary_writer_class() if tensorboard else None
        wandb_package = wandb_module() if wandb is not None else None
        self.dir.mkdir(parents=True, exist_ok=True)
        self._sinks: list[TensorBoardSink | WandbSink] = []
        if writer_class is not None:
            self._sinks.append(TensorBoardSink(self.tensorboard_dir, writer_class))
        if wandb is not None:
            self._sinks.append(WandbSink(self.dir / "wandb", wandb, wandb_package))
        self.echo = echo
        self._log = open(self.log_path, "a", buffering=1)
        self._metrics = open(self.metrics_path, "a", buffering=1)

    def info(self, message: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} | {message}"
        self._log.write(line + "\n")
        if self.echo:
            tqdm.write(line)  # prints above any progress bar instead of breaking it

    def metrics(self, event: str, **values: Any) -> None:
        record = {"event": event, "time": round(time.time(), 3), **values}
        self._metrics.write(json.dumps(record, allow_nan=True) + "\n")
        for sink in self._sinks:
            sink.add(record)

    def drop_metrics(self) -> bool:
        """Start the metrics stream afresh (a run starting over); True when it held records."""
        held = self.metrics_path.stat().st_size > 0
        if held:
            self._rewrite_metrics([])
        return held

    def truncate_metrics_after(self, step: int) -> None:
        """On resume: drop records logged after the checkpoint we restart from, so the stream reads
        as one uninterrupted run. The sinks start over with the kept records: points after the
        checkpoint would otherwise appear twice, and points a crash kept in a writer's buffer would
        be missing. A damaged record (other than a torn last line) raises RunLogError first."""
        self._rewrite_metrics([r for r in read_metrics(self.metrics_path, strict=True) if r.get("step", 0) <= step])

    def _rewrite_metrics(self, kept: list[dict[str, Any]]) -> None:
        self._metrics.close()
        atomic_write(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        self._metrics = open(self.metrics_path, "a", buffering=1)
        for sink in self._sinks:
            sink.restart()
            for record in kept:
                sink.add(record)

    def close(self) -> None:
        self._log.close()
        self._metrics.close()
        for sink in self._sinks:
            sink.close()


def read_metrics(path: str | Path, strict: bool = False) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl; a torn last line (a crash mid-write: the start of a record, no
    newline) is skipped. Other lines that are not JSON records are skipped too (curves, summaries),
    or with `strict` raise RunLogError naming the file and line (resuming, which rewrites the file)."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.splitlines()
    torn = len(lines) if lines and not data.endswith(b"\n") and lines[-1].startswith(b"{") else 0
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line.decode("utf-8"))
        except ValueError:  # not UTF-8, or not JSON
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif strict and number != torn:
            raise METRICS_FILE.damaged(path, f"line {number} of {len(lines)} is not a JSON record "
                                             "(truncated or corrupted)")
    return records


# ----------------------------------------------------------------------------- curves


def _values(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that have `key` (feature terms are absent on steps without teacher targets)."""
    pairs = [(r["step"], r[key]) for r in records if r.get(key) is not None and "step" in r]
    return [s for s, _ in pairs], [float(v) for _, v in pairs]


def _line(ax: Axes, steps: list[int], values: list[float], label: str, **style: Any) -> None:
    """A per-step series; past 60 points the raw line is faded under an exponential moving average,
    as TensorBoard does, since single steps are noisy."""
    if not steps:
        return
    if len(steps) <= 60:
        ax.plot(steps, values, label=label, marker="." if len(steps) <= 30 else None, **style)
        return
    raw = ax.plot(steps, values, alpha=0.25, linewidth=0.8, **style)[0]
    smooth, ema = [], values[0]
    for v in values:
        ema = 0.9 * ema + 0.1 * v if math.isfinite(v) else ema
        smooth.append(ema)
    ax.plot(steps, smooth, label=f"{label} (smoothed)", **{"color": raw.get_color(), **style})


def _points(ax: Axes, steps: list[int], values: list[float], label: str, **style: Any) -> None:
    """Values measured at validation: markers joined by a line, visible even for a single epoch."""
    if steps:
        ax.plot(steps, values, label=label, marker="o", markersize=5, **style)


def training_curves_figure(records: list[dict[str, Any]], title: str = "") -> Figure | None:
    """The run's curves on one step axis: loss (training at every logged step, validation where it
    ran), distillation (when the run distils: training terms, validation feature cosine and the
    untrained head's at step 0) and validation accuracies. None when nothing was logged yet."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    train = [r for r in records if r.get("event") == "train"]
    epochs = [r for r in records if r.get("event") == "epoch"]
    start = next((r for r in records if r.get("event") == "start"), {})
    skipped = [r["step"] for r in records if r.get("event") == "skipped" and "step" in r]
    if not train and not epochs:
        return None
    distils = any(k in r for r in train + epochs for k in ("distill_mse", "val_feature_cosine"))
    fig = Figure(figsize=(5.2 * (3 if distils else 2), 4.2))
    axes = fig.subplots(1, 3 if distils else 2, sharex=True)
    ax_loss, ax_acc = axes[0], axes[-1]

    if train:
        _line(ax_loss, *_values(train, "loss"), "train loss", color="C0")
        _line(ax_loss, *_values(train, "task_loss"), "train task loss", color="C1")
    else:  # train.log_every longer than the run: the epochs' means are all there is
        _points(ax_loss, *_values(epochs, "train_loss"), "train loss (epoch mean)", color="C0")
    _points(ax_loss, *_values(epochs, "val_loss"), "validation loss (task)", color="C3")
    for i, step in enumerate(skipped):  # a NaN/inf step changed nothing: show where
        ax_loss.axvline(step, color="red", linewidth=0.6, linestyle=":", label="skipped step" if i == 0 else None)
    ax_loss.set(xlabel="step", ylabel="loss", title="loss (task: answer cross-entropy)")

    if distils:
        ax_d = axes[1]
        _line(ax_d, *_values(train, "distill_mse"), "train distill MSE", color="C4")
        _line(ax_d, *_values(train, "distill_cosine"), "train distill cosine", color="C2")
        steps, values = _values(epochs, "val_feature_cosine")
        if start.get("val_feature_cosine") is not None:  # the untrained head: the reference point
            steps, values = [start.get("step", 0)] + steps, [float(start["val_feature_cosine"])] + values
            ax_d.annotate("untrained head", (steps[0], values[0]), textcoords="offset points", xytext=(5, 5),
                          fontsize=7, color="C3")
        _points(ax_d, steps, values, "validation feature cosine", color="C3")
        ax_d.set(xlabel="step", title="distillation (standardised teacher features)")

    for key, label, colour in (("val_exact_match", "exact match", "C3"), ("val_size_accuracy", "output size", "C0"),
                               ("val_pixel_accuracy", "pixels (target cells)", "C2")):
        _points(ax_acc, *_values(epochs, key), label, color=colour)
    baselines = start.get("baselines") or {}
    if baselines:
        best = max(b.get("exact_match", 0.0) for b in baselines.values())
        ax_acc.axhline(best, color="grey", linestyle="--", linewidth=0.8, label="best baseline exact match")
    ax_acc.set(xlabel="step", ylabel="fraction of validation test outputs", ylim=(-0.02, 1.02), title="validation")

    last = max(r.get("step", 0) for r in train + epochs)
    for ax in axes:
        ax.set_xlim(left=0, right=max(last, 1) * 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_training_curves(metrics_path: str | Path, png_path: str | Path, title: str = "") -> Path | None:
    """Draw training_curves_figure of a metrics.jsonl to a PNG (written whole, then renamed into
    place); None when the log has no training records yet."""
    fig = training_curves_figure(read_metrics(metrics_path), title)
    if fig is None:
        return None
    png_path = Path(png_path)
    tmp = png_path.with_name(png_path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(png_path)
    return png_path


def ttt_curves_figure(curves: dict[str, tuple[tuple[float, ...], ...]], scores: dict[str, float],
                      steps_per_point: int, title: str = "") -> Figure | None:
    """Each tuned task's test-time training loss on its demonstrations, one line per run (a point per
    `steps_per_point` steps, log scale): tasks that `scores` marks solved (> 0) in colour with their
    ids, the rest grey, so that a reader sees how far the solved tasks' losses went and the others'
    did not. `curves` holds tuned tasks only. None when there are none."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    if not curves:
        return None
    fig = Figure(figsize=(9, 5))
    ax = fig.subplots()
    solved = sorted(task for task in curves if scores.get(task, 0.0) > 0)
    for task, runs in curves.items():
        colour = solved.index(task) if task in solved else None
        for r, run in enumerate(runs):
            style = ({"color": "grey", "alpha": 0.3, "linewidth": 0.7} if colour is None else  # solved ones on top
                     {"color": f"C{colour % 10}", "linewidth": 1.3, "zorder": 3,
                      "label": f"{task} (score {scores[task]:.2f})" if r == 0 else None})
            ax.plot([steps_per_point * (i + 0.5) for i in range(len(run))], run, **style)
    ax.set_yscale("log")
    ax.set(xlabel="TTT step", ylabel="answer loss on the demonstrations (nats per cell)",
           title=f"{len(curves)} tasks tuned; grey: not solved" + (f"; {len(solved)} solved, in colour" if solved else ""))
    ax.grid(alpha=0.3, which="both")
    if solved:
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_ttt_curves(curves: dict[str, tuple[tuple[float, ...], ...]], scores: dict[str, float], steps_per_point: int,
                    png_path: str | Path, title: str = "") -> Path | None:
    """Draw ttt_curves_figure to a PNG; None when no task was tuned."""
    fig = ttt_curves_figure(curves, scores, steps_per_point, title)
    if fig is None:
        return None
    fig.savefig(png_path, dpi=100)
    return Path(png_path)


class SilentLog(RunLog):
    """The log of a data-parallel rank other than 0: rank 0 writes for everyone."""

    def __init__(self) -> None:  # noqa: D107 - opens nothing
        self.echo = False

    def info(self, message: str) -> None:
        pass

    def metrics(self, event: str, **values: Any) -> None:
        pass

    def drop_metrics(self) -> bool:
        return False

    def truncate_metrics_after(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass
