"""logging.tensorboard and logging.wandb: metrics.jsonl's scalars in TensorBoard event files and a
W&B run, nothing repeated after --resume, and a clear stop at start when the optional package is
missing."""

import importlib.util
import json
import sys
import types

import pytest
from tiny import run_main, tiny_argv, tiny_config

import train_sage
from sage import metric_sinks, runlog
from sage.errors import ConfigError
from sage.metric_sinks import WandbSettings
from sage.runlog import RunLog, read_metrics
from sage.training import train

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
HAS_WANDB = importlib.util.find_spec("wandb") is not None


class FakeWriter:
    """Records what RunLog hands a SummaryWriter (runs whether or not tensorboard is installed)."""

    opened: list["FakeWriter"] = []

    def __init__(self, log_dir, flush_secs=120):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        FakeWriter.opened.append(self)

    def add_scalar(self, tag, value, global_step=None, walltime=None):
        self.scalars.append((tag, value, global_step))

    def close(self):
        self.closed = True


def test_runlog_forwards_every_number_and_replays_the_kept_records_on_resume(tmp_path, monkeypatch):
    FakeWriter.opened = []
    monkeypatch.setattr(runlog, "summary_writer_class", lambda: FakeWriter)
    log = RunLog(tmp_path, echo=False, tensorboard=True)
    log.metrics("start", step=0, run="r", teacher=None, baselines={"copy_input": {"exact_match": 0.25}})
    log.metrics("train", step=2, epoch=1, loss=1.5, lr=1e-3)
    log.metrics("train", step=4, epoch=1, loss=1.25, lr=1e-3)
    first = FakeWriter.opened[0]
    assert first.log_dir == str(tmp_path / "tensorboard")
    assert first.scalars == [("start/baselines/copy_input/exact_match", 0.25, 0),
                             ("train/epoch", 1.0, 2), ("train/loss", 1.5, 2), ("train/lr", 1e-3, 2),
                             ("train/epoch", 1.0, 4), ("train/loss", 1.25, 4), ("train/lr", 1e-3, 4)]
    log.truncate_metrics_after(2)  # a resume from the checkpoint at step 2
    second = FakeWriter.opened[1]
    assert first.closed and second.scalars == first.scalars[:4]  # the kept records, once
    log.close()
    assert second.closed and [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 2]


def test_missing_tensorboard_stops_the_run_at_start(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what `import` meets without the package
    with pytest.raises(ConfigError, match=r"pip install tensorboard.*logging.tensorboard=false"):
        train(tiny_config(tmp_path, "tb", "logging.tensorboard=true"), echo=False)
    assert not (tmp_path / "logs").exists() and not (tmp_path / "checkpoints").exists()  # nothing written


def test_missing_tensorboard_is_a_one_line_error_from_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    code = run_main(train_sage.main, tiny_argv(tmp_path, "tb", "logging.tensorboard=true"))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "error: " in err and "pip install tensorboard" in err and "Traceback" not in err


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="the optional `tensorboard` package is not installed "
                                                "(pip install tensorboard); the fake-writer test covers RunLog")
def test_event_files_hold_the_metrics_scalars_once_after_a_crash_and_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    def config():
        return tiny_config(tmp_path, "tb", "logging.tensorboard=true", "train.epochs=1")

    train(config(), stop_after_steps=5, echo=False)
    logs = tmp_path / "logs" / "tb"
    # A crash after the checkpoint at step 5 leaves points of steps 6.. in both streams: resume drops them.
    with open(logs / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"event": "train", "time": 0.0, "step": 6, "epoch": 1, "loss": 123.0}) + "\n")
    stray = SummaryWriter(str(logs / "tensorboard"))
    stray.add_scalar("train/loss", 123.0, global_step=6)
    stray.close()
    train(config(), resume=True, echo=False)

    events = EventAccumulator(str(logs / "tensorboard"))
    events.Reload()
    records = read_metrics(logs / "metrics.jsonl")
    expected: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for tag, value in metric_sinks.scalars(r, r["event"]):
            expected.setdefault(tag, []).append((r["step"], value))
    assert {"train/loss", "epoch/val_loss", "epoch/val_exact_match", "start/parameters"} <= set(expected)
    assert set(events.Tags()["scalars"]) == set(expected)
    for tag, points in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points], tag  # every step once, in order
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), tag  # float32 in the files
    assert 123.0 not in [e.value for e in events.Scalars("train/loss")]


class FakeWandb:
    """Records what RunLog hands the wandb package (runs whether or not wandb is installed)."""

    def __init__(self):
        self.runs = []

    def init(self, **kwargs):
        run = types.SimpleNamespace(kwargs=kwargs, logged=[], finished=False)
        run.log = lambda values, step=None: run.logged.append((step, values))
        run.finish = lambda: setattr(run, "finished", True)
        self.runs.append(run)
        return run


def test_wandb_run_mirrors_the_records_and_a_resume_starts_one_with_the_kept_records(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setattr(runlog, "wandb_module", lambda: fake)
    settings = WandbSettings("r", "sage", "offline", {"train": {"lr": 1e-3}})
    log = RunLog(tmp_path, echo=False, wandb=settings)
    log.metrics("start", step=0, run="r", baselines={"copy_input": {"exact_match": 0.25}})
    log.metrics("train", step=2, epoch=1, loss=1.5)
    log.metrics("train", step=4, epoch=1, loss=1.25)
    (first,) = fake.runs
    assert first.kwargs == dict(project="sage", name="r", group="r", dir=str(tmp_path / "wandb"), mode="offline",
                                config={"train": {"lr": 1e-3}})
    assert first.logged == [(0, {"start/baselines/copy_input/exact_match": 0.25}),
                            (2, {"train/epoch": 1.0, "train/loss": 1.5}), (4, {"train/epoch": 1.0, "train/loss": 1.25})]
    log.truncate_metrics_after(2)  # a resume from the checkpoint at step 2
    second = fake.runs[1]
    assert first.finished and second.logged == first.logged[:2]
    log.close()
    assert second.finished and len(fake.runs) == 2


def test_missing_wandb_stops_the_run_at_start(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"pip install wandb.*logging.wandb=false"):
        train(tiny_config(tmp_path, "wb", "logging.wandb=true"), echo=False)
    assert not (tmp_path / "logs").exists() and not (tmp_path / "checkpoints").exists()
    with pytest.raises(ConfigError, match=r"logging.wandb_mode must be one of offline, online, got 'cloud'"):
        tiny_config(tmp_path, "wb", "logging.wandb=true", "logging.wandb_mode=cloud")


@pytest.mark.skipif(not HAS_WANDB, reason="the optional `wandb` package is not installed (pip install wandb); "
                                          "the fake-package test covers RunLog")
def test_offline_wandb_runs_are_written_for_a_run_and_its_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    def config():
        return tiny_config(tmp_path, "wb", "logging.wandb=true", "train.epochs=1")

    train(config(), stop_after_steps=5, echo=False)
    train(config(), resume=True, echo=False)
    runs = sorted((tmp_path / "logs" / "wb" / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(list(run.glob("run-*.wandb")) for run in runs)
