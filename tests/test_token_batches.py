"""train.tokens_per_step: steps filled to a token budget, every example once an epoch, resumable."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny import epoch_records, tiny_config

from sage.datasets import load_dataset
from sage.distributed import DistributedContext, RankBatchSampler
from sage.encoding import ARCExamples, training_examples
from sage.errors import ConfigError
from sage.token_batches import TokenBudgetSampler, example_tokens
from sage.training import train


@pytest.fixture(scope="module")
def arc_examples() -> ARCExamples:
    """ARC-AGI-1 training's examples at full size: contexts from ~100 to 8,000 tokens, canvases 1-30."""
    tasks = load_dataset("arc-agi-1/training")[:120]
    return ARCExamples(tasks, training_examples(tasks), grid_size=30, max_demos=3, max_context_tokens=8192)


def test_every_example_once_an_epoch_one_shape_bucket_a_batch_within_the_budget(arc_examples):
    lengths, sides = arc_examples.lengths, arc_examples.sides
    bucket, cost = example_tokens(lengths, sides)
    budget = 16_384
    sampler = TokenBudgetSampler(lengths, sides, budget, seed=3)
    epochs = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # each example once
        assert len(batches) == len(sampler)  # the same number every epoch: schedules and resume count on it
        for b in batches:
            assert len({int(bucket[i]) for i in b}) == 1  # one shape: little padding, few compiled shapes
            assert len(b) == 1 or len(b) * cost[b[0]] <= budget
        epochs.append(batches)
    assert epochs[0] != epochs[1]  # another order every epoch ...
    again = TokenBudgetSampler(lengths, sides, budget, seed=3)
    again.set_epoch(1)
    assert list(again) == epochs[1]  # ... fixed by (seed, epoch)
    sizes = [len(b) for b in epochs[0]]
    # Examples cost 1,028 to 7,812 tokens here: the largest go 2 to a step, the smallest 15.
    assert max(sizes) == budget // cost.min() == 15 and budget // cost.max() == 2
    assert sampler.largest_batch == max(sizes)
    again.set_epoch(1, skip_batches=5)  # resuming mid-epoch: the rest of that epoch's batches
    assert list(again) == epochs[1][5:] and len(again) == len(epochs[1]) - 5


def test_two_processes_split_each_token_batch(arc_examples):
    lengths, sides = arc_examples.lengths, arc_examples.sides
    whole = TokenBudgetSampler(lengths, sides, 2 * 8192, seed=0)
    ranks = [RankBatchSampler(TokenBudgetSampler(lengths, sides, 2 * 8192, seed=0), DistributedContext(r, 2))
             for r in range(2)]
    parts = [list(r) for r in ranks]
    kept = [b for b in whole.batches() if len(b) >= 2]  # a one-example batch cannot be split: dropped, as today
    assert [a + b for a, b in zip(*parts)] == kept


def test_resume_mid_epoch_with_token_batches_ends_like_an_uninterrupted_run(tmp_path):
    """The tiny run with token batches (1 to 24 examples a step): stopped in its first epoch and
    resumed, it logs the same epochs and ends with the same weights as the uninterrupted run."""
    tokens = ["train.tokens_per_step=2400"]
    straight = train(tiny_config(tmp_path, "straight", *tokens), echo=False)
    log = (tmp_path / "logs" / "straight" / "train.log").read_text()
    assert "batches: train up to 2,400 tokens (" in log
    steps_per_epoch = straight["step"] // 2
    stopped = train(tiny_config(tmp_path, "resumed", *tokens), stop_after_steps=steps_per_epoch // 2, echo=False)
    assert stopped["stopped_early"]
    resumed = train(tiny_config(tmp_path, "resumed", *tokens), resume=True, echo=False)
    assert resumed["step"] == straight["step"]
    assert epoch_records(tmp_path / "logs" / "resumed") == epoch_records(tmp_path / "logs" / "straight")
    final = [load_file(tmp_path / "checkpoints" / run / "last" / "model.safetensors") for run in ("straight", "resumed")]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    with pytest.raises(ConfigError, match="train.tokens_per_step must be >= 0"):
        tiny_config(tmp_path, "bad", "train.tokens_per_step=-1")


def test_bucket_costs_count_the_answer_canvas():
    bucket, cost = example_tokens(np.array([100, 100, 700]), np.array([3, 25, 3]))
    assert list(cost) == [128 + 100, 128 + 900, 768 + 100]  # contexts to 128 and 768, canvases to 10 and 30
    assert len(set(bucket.tolist())) == 3


def test_auto_tokens_per_step_is_measured_once_and_kept_by_resume(tmp_path):
    """train.tokens_per_step=auto on this CPU (memory: the process's resident set against what the
    machine offers it): the log states the number chosen and its probe, the checkpoint keeps it,
    --resume reuses it (it does not measure again), and the run equals one given that number."""
    import re

    auto = ("train.tokens_per_step=auto", "train.epochs=2")
    train(tiny_config(tmp_path, "auto", *auto), stop_after_steps=2, echo=False)
    log = (tmp_path / "logs" / "auto" / "train.log").read_text()
    found = re.search(r"train\.tokens_per_step auto: ([\d,]+) tokens a step, its largest step peaking at "
                      r"[\d.]+ GiB of [\d.]+ GiB this process can use less 20% headroom", log)
    assert found, log
    tokens = int(found.group(1).replace(",", ""))
    assert tokens % 1024 == 0 and 1024 <= tokens <= 262144
    meta = json.loads((tmp_path / "checkpoints" / "auto" / "last" / "meta.json").read_text())
    assert meta["config"]["train"]["tokens_per_step"] == tokens
    train(tiny_config(tmp_path, "auto", *auto), resume=True, echo=False)
    log = (tmp_path / "logs" / "auto" / "train.log").read_text()
    assert f"train.tokens_per_step auto: {tokens:,} tokens a step, as the run chose at its start" in log
    train(tiny_config(tmp_path, "given", "train.epochs=2", f"train.tokens_per_step={tokens}"), echo=False)
    assert epoch_records(tmp_path / "logs" / "auto") == epoch_records(tmp_path / "logs" / "given")


def test_auto_tokens_per_step_takes_the_largest_budget_that_fits_with_headroom(monkeypatch):
    """The choice on a device whose step peaks at 100 MiB + 50 KiB a token, with 1 GiB usable: the
    two probes fit that line, the choice (a multiple of 1,024) is the largest under 80% of 1 GiB,
    and when its own probe says more (a device that is not linear) it is lowered until it fits."""
    import sage.memory_probe as memory_probe

    mib, kib = 2**20, 2**10
    probed = []

    def device(extra_above: int = 0):
        def peak(cfg, train_set, dev, tokens):
            probed.append(tokens)
            over = extra_above if tokens > 8192 else 0
            return memory_probe.Probe("training step", 1, tokens, 100 * mib + 50 * kib * tokens + over, "a test device")
        return peak

    monkeypatch.setattr(memory_probe, "available_memory", lambda dev: (1024 * mib, 2048 * mib))
    monkeypatch.setattr(memory_probe, "training_step_peak", device())
    chosen = memory_probe.choose_tokens_per_step(None, None, torch.device("cpu"), lambda line: None)
    fits = (0.8 * 1024 * mib - 100 * mib) / (50 * kib)  # 14,336.0 tokens
    assert chosen == int(fits) // 1024 * 1024 == 14336 and probed == [2048, 8192, 14336]
    probed.clear()
    monkeypatch.setattr(memory_probe, "training_step_peak", device(extra_above=200 * mib))
    chosen = memory_probe.choose_tokens_per_step(None, None, torch.device("cpu"), lambda line: None)
    assert chosen < 14336 and 100 * mib + 50 * kib * chosen + 200 * mib <= 0.8 * 1024 * mib
    assert probed[:3] == [2048, 8192, 14336] and len(probed) >= 4
