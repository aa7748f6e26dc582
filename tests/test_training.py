"""The training loop end to end on small real configs: artefacts, exact resume, CLI errors, learning."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from tiny import REPO, check_best_and_epoch_checkpoints, epoch_records, run_main, tiny_config

import train_sage
from sage.config import load_config
from sage.errors import CheckpointError
from sage.runlog import read_metrics
from sage.step import Autocast, training_lr
from sage.training import describe_duration, improves, train


def test_short_run_writes_artefacts_and_resume_is_exact(tmp_path, two_epoch_run):
    straight = two_epoch_run.summary  # conftest.py's run of TINY as it is: 2 epochs, a checkpoint each
    run = two_epoch_run.checkpoints
    logs = two_epoch_run.logs
    for name in ("best", "last", "epoch_1", "epoch_2"):
        assert {p.name for p in (run / name).iterdir()} == {"model.safetensors", "training_state.pt", "meta.json"}
    for name in ("train.log", "metrics.jsonl", "config.yaml", "curves.png"):
        assert (logs / name).is_file()
    log_text = (logs / "train.log").read_text()
    assert "epoch 2/2 done | train loss" in log_text and "val loss" in log_text and "lr " in log_text
    first, last = [line for line in log_text.splitlines() if " done | train loss" in line]
    assert first.endswith(" s left") and "left" not in last  # the rest at epoch 1's pace, for whoever tails it
    assert [describe_duration(s) for s in (44.6, 720, 11100)] == ["45 s", "12 min", "3 h 05 min"]
    events = {r["event"] for r in read_metrics(logs / "metrics.jsonl")}
    assert events == {"start", "train", "epoch"}
    meta = json.loads((run / "last" / "meta.json").read_text())
    assert meta["train_state"]["step"] == straight["step"] and meta["config"]["run"]["name"] == two_epoch_run.name
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


def test_shape_buckets_leave_training_and_validation_as_they_were(tmp_path, tiny_run, monkeypatch):
    """On CUDA training and validation batches are padded to shape buckets. Forced on the CPU, the
    tiny run's epoch (losses, exact match, size and pixel accuracy) comes out as without them."""
    import sage.training

    monkeypatch.setattr(sage.training, "uses_shape_buckets", lambda device: True)
    train(tiny_config(tmp_path, "tiny", "train.epochs=1"), echo=False)
    (padded,), (plain,) = epoch_records(tmp_path / "logs" / "tiny"), epoch_records(tiny_run.logs)
    assert padded.keys() == plain.keys()
    for k, v in plain.items():
        assert padded[k] == (pytest.approx(v, rel=1e-4, abs=1e-6) if isinstance(v, float) else v), k


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


def test_cli_reports_expected_mistakes_without_traceback(tmp_path, capsys):
    """train_sage.main in this process (test_corruption.py runs train_sage.py's command line for an exit 2)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_sise: 4\n")
    code = run_main(train_sage.main, ["--config", bad])
    err = capsys.readouterr().err
    assert code == 2
    assert "error:" in err and "unknown key 'train.batch_sise'" in err and "Traceback" not in err
    code = run_main(train_sage.main, ["--config", REPO / "configs" / "smoke.yaml", "--set",
                                      f"data.train={tmp_path / 'missing'}"])
    err = capsys.readouterr().err
    assert code == 2 and "no such directory" in err and "Traceback" not in err


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
    One epoch of the config's three: 113 steps, measured 0.72-0.91 exact over seeds 0-2 and 0.00
    at lr 1e-9; shorter runs have not learnt it yet (0.14 after 57 steps, 0.26 after 90).
    """
    cfg = load_config(REPO / "configs" / "smoke.yaml", [
        f"run.checkpoint_dir={tmp_path / 'checkpoints'}", f"run.log_dir={tmp_path / 'logs'}", "run.device=cpu",
        "train.epochs=1",
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
def test_quickstart_config_trains_on_real_arc_tasks(tmp_path, capsys):
    """The README's quickstart, cut to 3 steps: tiny-teacher extraction of ARC-AGI-1 training, then
    distillation on real data at full 30x30 size, via the CLI. One demonstration per example instead
    of the config's two: the extraction of all 1592 prompts is most of the time, and 3 images a
    prompt instead of 5 take about 60% of it (configs/quickstart.yaml as it is: the GPU check's
    --cpu-smoke, on the tasks up to 3x3). In this process: tests/test_recovery.py runs train_sage.py
    as a command."""
    code = run_main(train_sage.main, [
        "--config", REPO / "configs" / "quickstart.yaml", "--stop-after-steps", "3",
        "--set", f"run.checkpoint_dir={tmp_path / 'checkpoints'}", "--set", f"run.log_dir={tmp_path / 'logs'}",
        "--set", f"teacher.cache_dir={tmp_path / 'features'}", "--set", "model.max_demos=1",
        "--set", "teacher.max_demos=1"])
    assert code == 0, capsys.readouterr().err[-3000:]
    log = (tmp_path / "logs" / "quickstart" / "train.log").read_text()
    assert "train 360 tasks from arc-agi-1/training" in log and "validation 40 held-out tasks" in log
    assert "stopped after step 3" in log
    assert "teacher: groot-n1.5-tiny (random weights)" in log and "untrained distillation head" in log
    assert "extracted 1592 prompts" in log  # every example of the 400 tasks: 1549 training, 43 validation
    meta = json.loads((tmp_path / "checkpoints" / "quickstart" / "last" / "meta.json").read_text())
    assert meta["train_state"]["step"] == 3 and len(meta["val_task_ids"]) == 40


def test_bf16_precision_runs_the_matmuls_in_bf16_on_a_cpu_too(tmp_path):
    linear = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    for precision, dtype in (("auto", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16)):
        with Autocast(torch.device("cpu"), precision)():
            assert linear(x).dtype == dtype, precision
    # On a GPU (auto's choices: tests/test_precision.py) fp32 means TF32 matmuls; the CUDA flags are
    # only set here, nothing runs on a GPU.
    cuda = torch.device("cuda")
    assert Autocast(cuda, "fp32").name == "fp32 (TF32 matmuls)" and torch.backends.cuda.matmul.allow_tf32
    assert Autocast(cuda, "bf16", native_bf16=False).enabled
    assert Autocast(torch.device("cpu"), "auto", native_bf16=True).name == "fp32"  # auto never picks bf16 on CPUs
    train(tiny_config(tmp_path, "bf16", "run.precision=bf16", "train.epochs=1"), echo=False)
    assert "on cpu (bf16 autocast, " in (tmp_path / "logs" / "bf16" / "train.log").read_text()
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


def test_the_memory_probe_states_the_largest_batches_needs_and_changes_nothing(tmp_path, monkeypatch):
    """Before the first step the log states the peak memory of one training step and one validation
    pass on the largest batches, against what this machine offers; the probe's step is undone, so a
    run without the probe trains to the same epochs and weights."""
    import re

    import sage.training

    train(tiny_config(tmp_path, "probed", "train.epochs=1", "train.tokens_per_step=400"), echo=False)
    (line,) = [x for x in (tmp_path / "logs" / "probed" / "train.log").read_text().splitlines() if "memory probe" in x]
    assert re.search(r"memory probe \(process resident memory, peak of the largest batch\): training step "
                     r"\d+\.\d\d GiB \(\d+ examples, [\d,]+ tokens\), validation \d+\.\d\d GiB \(\d+ examples, "
                     r"[\d,]+ tokens\) of \d+\.\d GiB this process can use on this machine \(\d+\.\d GiB\); fits$",
                     line), line
    monkeypatch.setattr(sage.training, "log_memory_probe", lambda run: None)
    train(tiny_config(tmp_path, "unprobed", "train.epochs=1", "train.tokens_per_step=400"), echo=False)
    assert epoch_records(tmp_path / "logs" / "probed") == epoch_records(tmp_path / "logs" / "unprobed")
    probed, unprobed = (load_file(tmp_path / "checkpoints" / run / "last" / "model.safetensors")
                        for run in ("probed", "unprobed"))
    for key in probed:
        assert torch.equal(probed[key], unprobed[key]), key
