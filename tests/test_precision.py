"""fp16 with loss scaling (run.precision=fp16, and `auto` on GPUs without native bf16): training
and test-time training follow fp32, steps whose gradients overflow the loss scale are skipped and
counted apart from non-finite ones, and --resume restores the scale. fp16 autocast and
torch.amp.GradScaler run on the CPU too, so all of it is tested here."""

import copy
import json
import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from tiny import adam_steps, epoch_records, tiny_config, unseen_tasks

import sage.step
import sage.task_batched_ttt
from sage.model import build_model
from sage.predict import blind
from sage.recovery import FaultInjection
from sage.runlog import read_metrics
from sage.step import Autocast
from sage.task_batched_ttt import TaskBatchedTrainer, plan_jobs
from sage.training import train
from sage.ttt import Tuning, finetune

CPU = torch.device("cpu")


def test_auto_picks_bf16_where_native_fp16_on_older_gpus_and_fp32_on_cpus():
    cuda = torch.device("cuda")  # only the flags are set here: nothing runs on a GPU
    assert Autocast(cuda, "auto", native_bf16=True).name == "bf16 autocast"  # A100, H100
    older = Autocast(cuda, "auto", native_bf16=False)  # V100, T4, RTX 20xx
    assert (older.name, older.dtype, older.scales_loss) == ("fp16 autocast, loss scaling", torch.float16, True)
    assert Autocast(CPU, "auto", native_bf16=True).name == "fp32" and Autocast(CPU, "auto").loss_scaler() is None
    forced = Autocast(CPU, "fp16")
    with forced():
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float16
    assert forced.loss_scaler().get_scale() == sage.step.INITIAL_LOSS_SCALE


def overflow_events(log_dir):
    return [r["step"] for r in read_metrics(log_dir / "metrics.jsonl") if r["event"] == "overflow"]


def test_fp16_training_follows_fp32(tmp_path):
    """One epoch of the tiny run in fp16 and in fp32 from the same seed: losses within 1%; the log
    says fp16, and its overflowed steps (here the first, at the starting scale) are counted."""
    summaries = {p: train(tiny_config(tmp_path, p, f"run.precision={p}", "train.epochs=1"), echo=False)
                 for p in ("fp16", "fp32")}
    (fp16,), (fp32,) = (epoch_records(tmp_path / "logs" / p) for p in ("fp16", "fp32"))
    for key in ("train_loss", "val_loss"):
        assert fp16[key] == pytest.approx(fp32[key], rel=1e-2), key
    assert "on cpu (fp16 autocast, loss scaling, " in (tmp_path / "logs" / "fp16" / "train.log").read_text()
    meta = json.loads((tmp_path / "checkpoints" / "fp16" / "last" / "meta.json").read_text())["train_state"]
    overflows = overflow_events(tmp_path / "logs" / "fp16")
    assert meta["overflow_steps"] == len(overflows) and meta["skipped_steps"] == 0
    assert adam_steps(tmp_path / "checkpoints" / "fp16" / "last") == {summaries["fp16"]["step"] - len(overflows)}


@pytest.fixture
def huge_initial_scale(monkeypatch):
    """fp16's loss scale starting at 2^30: the first ~15 steps overflow until it has halved enough."""
    for module in (sage.step, sage.task_batched_ttt):
        monkeypatch.setattr(module, "INITIAL_LOSS_SCALE", 2.0**30)


def test_overflowing_steps_are_skipped_and_counted_apart_and_never_stop_a_run(tmp_path, huge_initial_scale):
    """Overflows skip their steps (no update: AdamW counts only the others) and halve the scale;
    they are not non-finite steps: a run with train.max_nonfinite_steps=2 goes on through a dozen
    of them in a row, while a NaN loss (injected at step 20) is still a non-finite step."""
    cfg = tiny_config(tmp_path, "overflow", "run.precision=fp16", "train.epochs=1", "train.max_nonfinite_steps=2")
    summary = train(cfg, echo=False, faults=FaultInjection.parse(["nan:train:20"]))
    logs, last = tmp_path / "logs" / "overflow", tmp_path / "checkpoints" / "overflow" / "last"
    overflows = overflow_events(logs)
    assert len(overflows) >= 10 and overflows == list(range(1, len(overflows) + 1))  # the first steps, in a row
    assert [r["step"] for r in read_metrics(logs / "metrics.jsonl") if r["event"] == "skipped"] == [20]
    state = json.loads((last / "meta.json").read_text())["train_state"]
    assert (state["overflow_steps"], state["skipped_steps"]) == (len(overflows), 1)
    assert adam_steps(last) == {summary["step"] - len(overflows) - 1}
    assert all(torch.isfinite(w).all() for w in load_file(last / "model.safetensors").values())
    scale = torch.load(last / "training_state.pt", weights_only=True)["loss_scaler"]["scale"]
    assert scale == 2.0 ** (30 - len(overflows) - 1)  # halved for each overflow and for the NaN step, never grown


def test_resume_restores_the_loss_scale(tmp_path, huge_initial_scale):
    """A run stopped after its overflows, then resumed, ends with the weights of an uninterrupted
    one: the resumed run goes on at the saved scale (a fresh scaler would start at 2^30 again and
    skip another dozen steps)."""
    fp16 = ("run.precision=fp16", "train.epochs=2")
    straight = train(tiny_config(tmp_path, "straight", *fp16), echo=False)
    train(tiny_config(tmp_path, "resumed", *fp16), stop_after_steps=20, echo=False)
    resumed = train(tiny_config(tmp_path, "resumed", *fp16), resume=True, echo=False)
    assert resumed["step"] == straight["step"]
    assert overflow_events(tmp_path / "logs" / "resumed") == overflow_events(tmp_path / "logs" / "straight")
    a, b = (load_file(tmp_path / "checkpoints" / run / "last" / "model.safetensors") for run in ("straight", "resumed"))
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_fp16_test_time_training_skips_overflows_alike_one_task_or_many_at_once(tmp_path, huge_initial_scale):
    """TTT in fp16: each task's loss scale starts afresh (so a task tunes alike wherever it runs);
    its overflowing steps are skipped and counted, one task at a time and with 3 in flight, where
    each slot has its own scale: the same steps and overflows, losses within fp16's noise."""
    cfg = tiny_config(tmp_path, "ttt16", "run.precision=fp16", "ttt.steps=25", "ttt.batch_size=4", "ttt.lr=3e-3")
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    tuning = Tuning.of(cfg)
    tasks = [blind(t) for t in unseen_tasks()][:4]
    alone = {t.id: finetune(copy.deepcopy(model), t, tuning, CPU) for t in tasks}
    assert all(s.steps == 25 and 10 <= s.overflow_steps < 25 for s in alone.values())
    many = replace(tuning, ttt=replace(tuning.ttt, tasks_in_flight=3))
    trainer = TaskBatchedTrainer(model, many, CPU)
    for job, stats in trainer.tune(plan_jobs(tasks, many)):
        expected = alone[job.task.id]
        assert (stats.steps, stats.overflow_steps) == (expected.steps, expected.overflow_steps), job.task.id
        assert stats.last_loss == pytest.approx(expected.last_loss, rel=1e-2) and math.isfinite(stats.last_loss)
