"""The training loop end to end on small real configs: artefacts, exact resume, CLI errors, learning."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sage.config import load_config
from sage.errors import CheckpointError
from sage.runlog import read_metrics
from sage.step import Autocast, training_lr
from sage.training import improves, train

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "data.train=synthetic", "data.synthetic.num_tasks=60", "data.val_fraction=0.2",
    "data.max_context_tokens=108", "model.grid_size=5", "model.max_demos=3", "model.d_model=32",
    "model.encoder_layers=1", "model.decoder_layers=1", "model.teacher_dim=16", "model.distill_hidden=16",
    "train.epochs=2", "train.batch_size=8", "train.warmup_steps=3", "train.log_every=2", "train.lr=1e-3",
    "val.batch_size=16", "checkpoint.every_epochs=1", "run.device=cpu",
]


def tiny_overrides(tmp_path, name, *extra):
    """TINY for run `name`, writing checkpoints and logs under tmp_path; `extra` overrides win."""
    return TINY + [f"run.checkpoint_dir={tmp_path / 'checkpoints'}", f"run.log_dir={tmp_path / 'logs'}",
                   f"run.name={name}", *extra]


def tiny_config(tmp_path, name, *extra):
    return load_config(REPO / "configs" / "smoke.yaml", tiny_overrides(tmp_path, name, *extra))


def tiny_command(tmp_path, name, *extra):
    """The same run as train_sage.py's command line: [python, train_sage.py, --config, ..., --set, ...]."""
    return [sys.executable, str(REPO / "train_sage.py"), "--config", str(REPO / "configs" / "smoke.yaml"),
            *[a for o in tiny_overrides(tmp_path, name, *extra) for a in ("--set", o)]]


def epoch_records(log_dir):
    return [{k: v for k, v in r.items() if k not in ("time", "seconds")}
            for r in read_metrics(Path(log_dir) / "metrics.jsonl") if r["event"] == "epoch"]


def test_short_run_writes_artefacts_and_resume_is_exact(tmp_path):
    straight = train(tiny_config(tmp_path, "straight"), echo=False)
    run = tmp_path / "checkpoints" / "straight"
    logs = tmp_path / "logs" / "straight"
    for name in ("best", "last", "epoch_1", "epoch_2"):
        assert {p.name for p in (run / name).iterdir()} == {"model.safetensors", "training_state.pt", "meta.json"}
    for name in ("train.log", "metrics.jsonl", "config.yaml", "curves.png"):
        assert (logs / name).is_file()
    log_text = (logs / "train.log").read_text()
    assert "epoch 2/2 done | train loss" in log_text and "val loss" in log_text and "lr " in log_text
    events = {r["event"] for r in read_metrics(logs / "metrics.jsonl")}
    assert events == {"start", "train", "epoch"}
    meta = json.loads((run / "last" / "meta.json").read_text())
    assert meta["train_state"]["step"] == straight["step"] and meta["config"]["run"]["name"] == "straight"
    assert set(meta["val_metrics"]) >= {"loss", "exact_match", "size_accuracy", "pixel_accuracy"}
    check_best_and_epoch_checkpoints(run, logs, straight)

    steps_per_epoch = straight["step"] // 2
    # The resumed run keeps its best by validation loss: the same epochs, another choice of best.
    by_loss = "checkpoint.best_by=loss"
    interrupted = train(tiny_config(tmp_path, "resumed", by_loss), stop_after_steps=steps_per_epoch // 2, echo=False)
    assert interrupted["stopped_early"] and interrupted["step"] == steps_per_epoch // 2
    resumed = train(tiny_config(tmp_path, "resumed", by_loss), resume=True, echo=False)
    assert resumed["step"] == straight["step"]
    assert epoch_records(tmp_path / "logs" / "resumed") == epoch_records(logs)
    check_best_and_epoch_checkpoints(tmp_path / "checkpoints" / "resumed", tmp_path / "logs" / "resumed", resumed,
                                     best_by="loss")
    a = load_file(run / "last" / "model.safetensors")
    b = load_file(tmp_path / "checkpoints" / "resumed" / "last" / "model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert "resumed from" in (tmp_path / "logs" / "resumed" / "train.log").read_text()


def check_best_and_epoch_checkpoints(run: Path, logs: Path, summary: dict, best_by: str = "exact_match") -> None:
    """Each checkpoint holds what metrics.jsonl says of its epoch: epoch_N's meta the validation
    metrics and step of epoch N; best/ the epoch with the highest validation exact match (ties: the
    lower validation loss, then the earlier epoch), or by best_by "loss" the lowest validation loss
    (ties: the higher exact match, then the earlier epoch), with that epoch's weights; the summary
    names it."""
    records = epoch_records(logs)
    assert [r["epoch"] for r in records] == list(range(1, len(records) + 1)) and records[-1]["step"] == summary["step"]
    assert records == sorted(records, key=lambda r: r["step"]) and len({r["step"] for r in records}) == len(records)
    for r in records:
        meta = json.loads((run / f"epoch_{r['epoch']}" / "meta.json").read_text())
        assert meta["train_state"]["step"] == r["step"] and meta["train_state"]["epoch"] == r["epoch"]
        assert meta["val_metrics"] == {k[len("val_"):]: v for k, v in r.items() if k.startswith("val_")}, r["epoch"]
    def rank(r: dict) -> tuple[float, float]:
        return (-r["val_loss"], r["val_exact_match"]) if best_by == "loss" else (r["val_exact_match"], -r["val_loss"])

    best = records[0]
    for r in records[1:]:
        if rank(r) > rank(best):
            best = r
    assert (summary["best_epoch"], summary["best_exact_match"]) == (best["epoch"], best["val_exact_match"])
    assert summary["best_by"] == best_by and summary["best_loss"] == best["val_loss"]
    meta = json.loads((run / "best" / "meta.json").read_text())
    assert meta["train_state"]["epoch"] == meta["train_state"]["best_epoch"] == best["epoch"]
    assert meta["train_state"]["best_exact"] == meta["val_metrics"]["exact_match"] == best["val_exact_match"]
    assert meta["val_metrics"]["loss"] == best["val_loss"]
    weights = load_file(run / "best" / "model.safetensors")
    same_epoch = load_file(run / f"epoch_{best['epoch']}" / "model.safetensors")
    assert weights.keys() == same_epoch.keys() and all(torch.equal(weights[k], same_epoch[k]) for k in weights)


def test_best_by_ranks_validations_by_exact_match_or_by_loss():
    """checkpoint.best_by: one lucky exact answer of 40 early in a run (as in arc_joined_fp32's epoch
    2) stays best by exact match against a later, far lower loss, and not by loss; ties go to the
    other figure, and an equal validation never replaces the best."""
    early, late = {"exact_match": 0.025, "loss": 1.2011}, {"exact_match": 0.0, "loss": 0.90}
    assert not improves(late, early["exact_match"], early["loss"], "exact_match")
    assert improves(late, early["exact_match"], early["loss"], "loss")
    assert improves({"exact_match": 0.0, "loss": 0.8}, 0.0, 0.9, "exact_match")
    assert improves({"exact_match": 0.1, "loss": 0.9}, 0.0, 0.9, "loss")
    assert not improves({"exact_match": 0.0, "loss": 0.9}, 0.0, 0.9, "loss")
    assert not improves({"exact_match": 0.0, "loss": 0.9}, 0.0, 0.9, "exact_match")


def test_existing_run_needs_resume_and_resume_needs_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="there is no run 'fresh' to resume"):
        train(tiny_config(tmp_path, "fresh"), resume=True, echo=False)
    # An attempt killed before its first checkpoint leaves a log and metrics, nothing to resume from.
    logs = tmp_path / "logs" / "fresh"
    logs.mkdir(parents=True)
    (logs / "train.log").write_text("2026-12-03 10:00:00 | run 'fresh' on cpu\n")
    (logs / "metrics.jsonl").write_text('{"event": "start", "step": 0, "killed_attempt": true}\n')
    with pytest.raises(CheckpointError, match="has no checkpoint to resume from: it stopped before saving its first "
                                              "one .* Start it again without --resume"):
        train(tiny_config(tmp_path, "fresh"), resume=True, echo=False)
    train(tiny_config(tmp_path, "fresh", "train.epochs=1"), echo=False)
    assert "killed_attempt" not in (logs / "metrics.jsonl").read_text()  # the new attempt's records alone
    assert "starting 'fresh' afresh: an earlier attempt left no checkpoint" in (
        logs / "train.log").read_text()
    with pytest.raises(CheckpointError, match="already has checkpoints. Continue it with --resume"):
        train(tiny_config(tmp_path, "fresh", "train.epochs=1"), echo=False)
    with pytest.raises(CheckpointError, match="model config differs from the checkpoint's"):
        train(tiny_config(tmp_path, "fresh", "model.d_model=64"), resume=True, echo=False)


def test_cli_reports_expected_mistakes_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_sise: 4\n")
    out = subprocess.run([sys.executable, "train_sage.py", "--config", str(bad)], cwd=REPO, capture_output=True,
                         text=True)
    assert out.returncode == 2
    assert "error:" in out.stderr and "unknown key 'train.batch_sise'" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "train_sage.py", "--config", "configs/smoke.yaml",
                          "--set", f"data.train={tmp_path / 'missing'}"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2 and "no such directory" in out.stderr and "Traceback" not in out.stderr


def test_learning_rate_warms_up_then_decays_to_the_floor(tmp_path):
    cfg = tiny_config(tmp_path, "lr", "train.warmup_steps=10", "train.lr=1e-3", "train.min_lr=1e-5")
    lrs = [training_lr(s, cfg.train, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-5, rel=0.05)


@pytest.mark.slow
def test_student_learns_in_context_rules_on_unseen_synthetic_tasks(tmp_path):
    """A short CPU run must solve held-out synthetic tasks far better than the trivial baselines.

    Each task paints with its own colour, read only from the demonstrations (recolour: every
    non-background cell; fill_background: every background cell), so no fixed mapping can score.
    """
    cfg = load_config(REPO / "configs" / "smoke.yaml", [
        f"run.checkpoint_dir={tmp_path / 'checkpoints'}", f"run.log_dir={tmp_path / 'logs'}", "run.device=cpu",
    ])
    assert cfg.data.synthetic.transforms == ["recolour", "fill_background"] and cfg.data.val == "holdout"
    summary = train(cfg, echo=False)
    learned = summary["best_exact_match"]
    copy = summary["baselines"]["copy_input"]["exact_match"]
    frequent = summary["baselines"]["most_frequent_colour"]["exact_match"]
    message = (f"exact match on {summary['last']['val_count']} held-out tasks: student {learned:.3f}, "
               f"copy-input {copy:.3f}, most-frequent-colour {frequent:.3f}")
    print(message)
    assert learned >= 0.5 and learned >= max(copy, frequent) + 0.4, message


@pytest.mark.slow
def test_quickstart_config_trains_on_real_arc_tasks(tmp_path):
    """The README's quickstart, cut to 3 steps: tiny-teacher extraction of ARC-AGI-1 training, then
    distillation on real data at full 30x30 size, via the CLI."""
    out = subprocess.run(
        [sys.executable, "train_sage.py", "--config", "configs/quickstart.yaml", "--stop-after-steps", "3",
         "--set", f"run.checkpoint_dir={tmp_path / 'checkpoints'}", "--set", f"run.log_dir={tmp_path / 'logs'}",
         "--set", f"teacher.cache_dir={tmp_path / 'features'}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    log = (tmp_path / "logs" / "quickstart" / "train.log").read_text()
    assert "train 360 tasks from arc-agi-1/training" in log and "validation 40 held-out tasks" in log
    assert "stopped after step 3" in log
    assert "teacher: groot-n1.5-tiny (random weights)" in log and "untrained distillation head" in log
    meta = json.loads((tmp_path / "checkpoints" / "quickstart" / "last" / "meta.json").read_text())
    assert meta["train_state"]["step"] == 3 and len(meta["val_task_ids"]) == 40


def test_bf16_precision_runs_the_matmuls_in_bf16_on_a_cpu_too(tmp_path):
    linear = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    for precision, dtype in (("auto", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16)):
        with Autocast(torch.device("cpu"), precision)():
            assert linear(x).dtype == dtype, precision
    # auto on a GPU: bf16 where the hardware has it (A100, H100), fp32 with TF32 matmuls where it is
    # emulated (V100, T4); the CUDA flags are only set here, nothing runs on a GPU.
    cuda = torch.device("cuda")
    assert (Autocast(cuda, "auto", native_bf16=True).name, Autocast(cuda, "auto", native_bf16=False).name) == (
        "bf16 autocast", "fp32 (TF32 matmuls)")
    assert torch.backends.cuda.matmul.allow_tf32 and Autocast(cuda, "bf16", native_bf16=False).enabled
    assert Autocast(torch.device("cpu"), "auto", native_bf16=True).name == "fp32"  # auto never picks bf16 on CPUs
    train(tiny_config(tmp_path, "bf16", "run.precision=bf16", "train.epochs=1"), echo=False)
    assert "on cpu (bf16 autocast)" in (tmp_path / "logs" / "bf16" / "train.log").read_text()
    (epoch,) = epoch_records(tmp_path / "logs" / "bf16")
    assert math.isfinite(epoch["train_loss"]) and math.isfinite(epoch["val_loss"])


def test_train_exact_match_counted_on_the_device_agrees_with_decoding(tmp_path):
    """The training loop counts exact answers on the device (every scored cell right: the grid and
    its border); decoding the canvases as evaluation does agrees on real ARC batches."""
    from sage.encoding import ARCExamples, collate, training_examples
    from sage.datasets import load_dataset
    from sage.step import exact_answers, score_batch

    tasks = load_dataset("arc-agi-1/training")[:10]
    data = ARCExamples(tasks, training_examples(tasks), grid_size=30, max_demos=3, max_context_tokens=4096,
                       answer_canvas="batch", fit_answer=True)
    for start in (0, 8, 16):
        batch = collate([data[i] for i in range(start, start + 8)])
        perfect = torch.nn.functional.one_hot(batch["target"], 12).float() * 5  # argmax = the target
        decoded = sum(s.exact for s in score_batch(perfect, batch, 30))
        assert int(exact_answers(perfect, batch)) == decoded == 8
        wrong = perfect.clone()
        wrong[0, 0] = wrong[0, 0].roll(1)  # example 0's first cell, a colour of the grid, now wrong
        wrong[3] = wrong[3].roll(1, dims=-1)  # every cell of example 3 wrong
        assert int(exact_answers(wrong, batch)) == sum(s.exact for s in score_batch(wrong, batch, 30)) == 6


def test_last_checkpoint_and_curves_can_skip_epochs(tmp_path, monkeypatch):
    """checkpoint.last_every_epochs and logging.curves_every_epochs thin out the per-epoch writes; the
    last epoch always writes both."""
    from sage.training import Run

    saved, plotted = [], []
    save, plot = Run.save, Run.plot
    monkeypatch.setattr(Run, "save", lambda run, name, metrics: (saved.append((run.state.epoch, name)),
                                                                 save(run, name, metrics)))
    monkeypatch.setattr(Run, "plot", lambda run: (plotted.append(run.state.epoch), plot(run)))
    train(tiny_config(tmp_path, "thin", "train.epochs=3", "checkpoint.every_epochs=0",
                      "checkpoint.last_every_epochs=2", "logging.curves_every_epochs=0"), echo=False)
    assert [e for e, name in saved if name == "last"] == [2, 3] and plotted == [3]
    assert json.loads((tmp_path / "checkpoints" / "thin" / "last" / "meta.json").read_text())["train_state"]["epoch"] == 3
