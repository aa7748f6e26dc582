"""Run logging: a human log you can `tail -f`, a JSONL metrics stream, and PNG training curves.

    logs/<run>/train.log       one timestamped line per event, flushed as written
    logs/<run>/metrics.jsonl   one JSON object per logged event ({"event": "train"|"epoch", ...})
    logs/<run>/curves.png      loss and validation metrics by epoch, redrawn after each epoch
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


class RunLog:
    def __init__(self, directory: str | Path, echo: bool = True) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "train.log"
        self.metrics_path = self.dir / "metrics.jsonl"
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

    def truncate_metrics_after(self, step: int) -> None:
        """On resume: drop records logged after the checkpoint we restart from, so the stream reads
        as one uninterrupted run."""
        self._metrics.close()
        records = read_metrics(self.metrics_path)
        kept = [json.dumps(r) for r in records if r.get("step", 0) <= step]
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.metrics_path)
        self._metrics = open(self.metrics_path, "a", buffering=1)

    def close(self) -> None:
        self._log.close()
        self._metrics.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl; a torn last line (crash mid-write) is skipped."""
    records = []
    path = Path(path)
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_training_curves(metrics_path: str | Path, png_path: str | Path, title: str = "") -> Path | None:
    """Loss (train and val) and validation exact match / size / pixel accuracy against epoch."""
    epochs = [r for r in read_metrics(metrics_path) if r.get("event") == "epoch"]
    if not epochs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["epoch"] for r in epochs]

    def series(key: str) -> list[float]:
        return [r.get(key, math.nan) if r.get(key) is not None else math.nan for r in epochs]

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(x, series("train_loss"), marker=".", label="train")
    ax_loss.plot(x, series("val_loss"), marker=".", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="answer cross-entropy", title="loss")
    ax_loss.legend()
    for key, label in (("val_exact_match", "exact match"), ("val_size_accuracy", "output size"),
                       ("val_pixel_accuracy", "pixels (target cells)")):
        ax_acc.plot(x, series(key), marker=".", label=label)
    ax_acc.set(xlabel="epoch", ylabel="fraction of validation test outputs", ylim=(0, 1), title="validation")
    ax_acc.legend()
    fig.suptitle(title)
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(png_path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(png_path)
    return png_path


class SilentLog(RunLog):
    """The log of a data-parallel rank other than 0: rank 0 writes for everyone."""

    def __init__(self) -> None:  # noqa: D107 - opens nothing
        self.echo = False

    def info(self, message: str) -> None:
        pass

    def metrics(self, event: str, **values: Any) -> None:
        pass

    def truncate_metrics_after(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass
