"""Data-parallel training under torchrun (gloo on the CPU) against the single-process run."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny import epoch_records, tiny_command, tiny_config

from sage.distributed import DistributedContext, RankBatchSampler
from sage.encoding import LengthBucketSampler
from sage.runlog import read_metrics
from sage.training import train


def test_ranks_split_each_global_batch():
    lengths = [5, 9, 3, 7, 7, 2, 8, 4, 6, 1, 9]
    single = LengthBucketSampler(lengths, 4, shuffle=True, seed=3)
    ranks = [RankBatchSampler(LengthBucketSampler(lengths, 4, shuffle=True, seed=3), DistributedContext(r, 2))
             for r in range(2)]
    for epoch in (0, 1):
        single.set_epoch(epoch)
        for r in ranks:
            r.set_epoch(epoch)
        whole = list(single)
        parts = [list(r) for r in ranks]
        assert [a + b for a, b in zip(*parts)] == whole  # 11 = 4 + 4 + 3: no example lost or repeated
    ranks[0].set_epoch(1, skip_batches=2)  # resuming mid-epoch skips whole global steps
    assert list(ranks[0]) == parts[0][2:]


@pytest.mark.slow
def test_two_process_gloo_training_matches_one_process_and_resumes(tmp_path):
    """2 processes x batch 4 == 1 process x batch 8, with distillation (global normalisation of the
    feature term) and a stop + --resume under torchrun in the middle. On the way: rank 0 extracts
    the teacher cache for longer than the collectives' timeout while rank 1 waits, and after the
    resume rank 1 alone runs out of memory (every rank halves; the steps are unchanged).
    Tolerance: losses to 1e-5 relative, weights to 1e-5 absolute (only the order of float sums differs).
    The teacher is the oracle (sage/teacher/oracle.py): the same cache, extraction and distillation
    path as GR00T's, in milliseconds instead of seconds."""
    settings = ["train.epochs=2", "data.num_workers=0", "distill.weight=0.5", "model.teacher_dim=64",
                "teacher.preset=oracle", f"teacher.cache_dir={tmp_path / 'features'}"]

    def torchrun(*extra: str) -> None:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   *tiny_command(tmp_path, "ddp", *settings, "train.batch_size=4")[1:], *extra]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]

    # Rank 0's extraction takes 4 s longer, a second past the 3 s a collective may wait: rank 1 reaches the
    # wait with rank 0 (the same code runs before it), so a wait under the collectives' timeout would fail.
    torchrun("--stop-after-steps", "7", "--set", "run.collective_timeout_s=3", "--inject-fault", "delay:extract:4")
    torchrun("--resume", "--inject-fault", "oom:train:3@1")  # step 10, rank 1 only
    train(tiny_config(tmp_path, "single", *settings, "train.batch_size=8"), echo=False)

    log = (tmp_path / "logs" / "ddp" / "train.log").read_text()
    assert "batches: train 4 per process x 2 processes = 8 per step" in log and "resumed from" in log
    assert ("out of memory in training at step 10 on rank 1: training now runs 2 examples per forward pass "
            "instead of 4 (batch size 4 kept by accumulating gradients)") in log
    ddp, single = epoch_records(tmp_path / "logs" / "ddp"), epoch_records(tmp_path / "logs" / "single")
    assert len(ddp) == len(single) == 2
    for a, b in zip(ddp, single):
        assert a.keys() == b.keys() and a["step"] == b["step"]
        for k in a:
            assert a[k] == (pytest.approx(b[k], rel=1e-5, abs=1e-7) if isinstance(b[k], float) else b[k]), k
    steps = [[r for r in read_metrics(tmp_path / "logs" / run / "metrics.jsonl") if r["event"] == "train"]
             for run in ("ddp", "single")]
    assert [r["distill_cosine"] for r in steps[0]] == pytest.approx([r["distill_cosine"] for r in steps[1]], rel=1e-5)
    weights = [load_file(tmp_path / "checkpoints" / run / "last" / "model.safetensors") for run in ("ddp", "single")]
    for k in weights[1]:
        torch.testing.assert_close(weights[0][k], weights[1][k], rtol=0, atol=1e-5, msg=k)


@pytest.mark.slow
def test_fp16_loss_scaling_under_torchrun_skips_the_same_steps_as_one_process(tmp_path):
    """fp16 under torchrun: the loss scaler unscales the gradients after they are averaged, so both
    processes find the same overflows and halve their scale alike; 2 processes x batch 4 skip the
    steps 1 process x batch 8 skips and end with its losses (fp16: to 1%)."""
    settings = ["train.epochs=1", "data.num_workers=0", "run.precision=fp16"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               *tiny_command(tmp_path, "ddp16", *settings, "train.batch_size=4")[1:]]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    train(tiny_config(tmp_path, "single16", *settings, "train.batch_size=8"), echo=False)
    overflows = [[r["step"] for r in read_metrics(tmp_path / "logs" / run / "metrics.jsonl")
                  if r["event"] == "overflow"] for run in ("ddp16", "single16")]
    assert overflows[0] == overflows[1] and overflows[0]  # at least the first step, at the starting scale
    (ddp,), (single,) = epoch_records(tmp_path / "logs" / "ddp16"), epoch_records(tmp_path / "logs" / "single16")
    for key in ("train_loss", "val_loss"):
        assert ddp[key] == pytest.approx(single[key], rel=1e-2), key
