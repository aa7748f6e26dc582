"""Test-time training (sage/ttt.py, evaluate.py --ttt): it learns from a task's demonstrations, it
cannot see the task's test outputs, and the checkpoint's weights come back after every task."""

import csv
import json
import math
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import REPO, independent_arc_prize_score, run_main, unseen_tasks, write_tasks

import evaluate as evaluate_cli
from sage.arc import Pair, load_task_dir
from sage.config import with_overrides
from sage.encoding import context_grid_tokens
from sage.errors import ConfigError, TestOutputVisible
from sage.evaluation import EvalSettings, evaluate
from sage.predict import blind, load_model
from sage.recovery import FaultInjection
from sage.ttt import TestTimeTrainer, Tuning, finetune, task_budget, ttt_examples

TTT = ["ttt.steps=25", "ttt.batch_size=4", "ttt.lr=3e-3", "ttt.warmup_steps=2"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_run):
    """A tiny student trained one epoch on synthetic tasks (conftest.py's tiny_run, read only), and a
    directory of 6 unseen ones (3 up to 4x4, 3 of 4x4 to 5x5) in this module's own folder."""
    root = tmp_path_factory.mktemp("ttt")
    tasks = unseen_tasks()
    return {"root": root, "checkpoint": tiny_run.checkpoints / "best", "tasks": tasks,
            "split": write_tasks(tasks, root / "unseen")}


def loaded_with(checkpoint: Path, *overrides: str):
    loaded = load_model(checkpoint, CPU)
    return loaded, Tuning.of(with_overrides(loaded.cfg, list(overrides), sections=("ttt",)))


def test_examples_are_leave_one_out_over_the_demonstrations_only(workspace):
    task = workspace["tasks"][0]
    refs = ttt_examples(task)
    n = len(task.train)
    assert sorted(r.query for r in refs) == list(range(n))  # every demonstration once as the query
    for r in refs:
        assert set(r.demos) == set(range(n)) - {r.query} and r.test_index is None
    assert max(i for r in refs for i in (*r.demos, r.query)) < n  # test pairs (index >= n) never appear
    one_demo = replace(task, train=task.train[:1])
    assert ttt_examples(one_demo) == []


def test_refuses_a_task_that_still_has_its_test_outputs(workspace):
    loaded, cfg = loaded_with(workspace["checkpoint"], *TTT)
    task = workspace["tasks"][0]
    with pytest.raises(TestOutputVisible, match=task.id):
        finetune(loaded.model, task, cfg, CPU)


def test_tuning_learns_the_demonstrations_and_the_original_weights_come_back(workspace):
    # Without augmentations the loss on the demonstrations is comparable from step to step.
    loaded, cfg = loaded_with(workspace["checkpoint"], *TTT, "ttt.steps=40", "ttt.augment_probability=0",
                              "ttt.shuffle_demos=false")
    model = loaded.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = TestTimeTrainer(model, cfg, CPU)
    task = blind(workspace["tasks"][1])
    with trainer.tuned(task) as stats:
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        assert "cell_head.weight" in changed and not model.training
    assert stats.steps == 40 and stats.examples == len(task.train)
    assert stats.last_loss < 0.5 * stats.first_loss, stats  # it fits the demonstrations
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    with pytest.raises(RuntimeError, match="boom"):  # restored on the way out of a failure too
        with trainer.tuned(task):
            raise RuntimeError("boom")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_no_batch_holds_the_same_example_twice(workspace, monkeypatch):
    """A task with 2 demonstrations has 2 leave-one-out examples; a batch of 4 takes each twice, but
    under different augmentations and orders: never the same tokens and target twice in one batch."""
    import sage.ttt

    batches = []
    real_collate = sage.ttt.collate
    monkeypatch.setattr(sage.ttt, "collate", lambda items, **kw: batches.append(items) or real_collate(items, **kw))
    task = replace(workspace["tasks"][3], train=workspace["tasks"][3].train[:2])
    loaded, cfg = loaded_with(workspace["checkpoint"], *TTT, "ttt.steps=3")
    finetune(loaded.model, blind(task), cfg, CPU)
    assert len(batches) == 3 and all(len(items) == 4 for items in batches)
    for items in batches:
        seen = {(item["tokens"].tobytes(), item["target"].tobytes()) for item in items}
        assert len(seen) == len(items), "a batch repeats an example exactly"


@pytest.mark.parametrize("cap", [1, 0])
def test_context_demos_caps_each_context_and_draws_another_subset_each_time(workspace, monkeypatch, cap):
    """ttt.context_demos=1: every tuning example shows one demonstration pair besides its query (the
    query keeps the segment id it has in a full context), and over the draws every other
    demonstration of the query's task turns up as that pair. 0: the query input alone."""
    import sage.ttt

    batches = []
    real_collate = sage.ttt.collate
    monkeypatch.setattr(sage.ttt, "collate", lambda items, **kw: batches.append(items) or real_collate(items, **kw))
    task = workspace["tasks"][4]
    loaded, cfg = loaded_with(workspace["checkpoint"], *TTT, "ttt.steps=6", f"ttt.context_demos={cap}",
                              "ttt.augment_probability=0")
    query_segment = 2 * cfg.model.max_demos
    stats = finetune(loaded.model, blind(task), cfg, CPU)
    assert stats.steps == 6 and len(batches) == 6
    shown: dict[bytes, set[bytes]] = {}  # query input -> the demonstration inputs seen beside it
    for item in (item for items in batches for item in items):
        segments = item["segments"]
        assert set(np.unique(segments)) == ({0, 1, query_segment} if cap else {query_segment})
        query = item["tokens"][segments == query_segment].tobytes()
        shown.setdefault(query, set()).add(item["tokens"][segments == 0].tobytes())
    inputs = [context_grid_tokens(p.input)["tokens"].tobytes() for p in task.train]
    assert set(shown) == set(inputs)
    for query, demos in shown.items():
        assert demos == (set(inputs) - {query} if cap else {b""}), "each other demonstration is drawn as the context"


def test_flops_budget_gives_larger_tasks_fewer_steps_and_none_below_the_minimum(workspace):
    """ttt.flops: a task takes as many steps as its budget buys at its first step's estimated cost
    (capped at ttt.steps), so a larger task gets fewer; under ttt.min_steps it gets none and its
    weights stay as pretrained. `task_budget` (benchmarks/ttt_budget.py plans a run with it) says
    beforehand how many steps finetune takes."""
    loaded, cfg = loaded_with(workspace["checkpoint"], *TTT)

    def first_step_flops(task):
        return task_budget(task, cfg).step_flops

    by_cost = sorted((blind(t) for t in workspace["tasks"]), key=first_step_flops)
    small, large = by_cost[0], by_cost[-1]
    assert first_step_flops(large) > 1.2 * first_step_flops(small)
    budget = 12.5 * first_step_flops(small)
    loaded, cfg = loaded_with(workspace["checkpoint"], *TTT, "ttt.steps=1000", f"ttt.flops={budget}")
    assert finetune(loaded.model, small, cfg, CPU).steps == task_budget(small, cfg).steps == 12
    assert finetune(loaded.model, large, cfg, CPU).steps == task_budget(large, cfg).steps
    whole_contexts = task_budget(large, cfg).steps
    assert whole_contexts == int(budget // first_step_flops(large)) < 12
    # Shorter contexts make a step cheaper: the same budget buys more steps, and the plan still agrees.
    loaded, cfg = loaded_with(workspace["checkpoint"], *TTT, "ttt.steps=1000", f"ttt.flops={budget}",
                              "ttt.context_demos=1")
    assert finetune(loaded.model, large, cfg, CPU).steps == task_budget(large, cfg).steps > whole_contexts
    loaded, cfg = loaded_with(workspace["checkpoint"], *TTT, "ttt.steps=1000", f"ttt.flops={budget}", "ttt.min_steps=13")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    assert finetune(loaded.model, small, cfg, CPU).steps == 0
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_budget_plan_counts_each_bands_steps_and_compares_a_finished_run(workspace, tmp_path, capsys):
    """benchmarks/ttt_budget.py: per size band, the tasks tuned and the steps their budgets grant
    (as finetune will take them), a time estimate from real calibration steps, and a finished
    evaluation's steps beside the plan."""
    from benchmarks import ttt_budget

    _, cfg = loaded_with(workspace["checkpoint"], *TTT)
    cheapest = min(task_budget(t, cfg).step_flops for t in workspace["tasks"])
    settings = [*TTT, "ttt.steps=21", f"ttt.flops={22 * cheapest}", "ttt.min_steps=20"]
    _, cfg = loaded_with(workspace["checkpoint"], *settings)
    plan = {t.id: task_budget(t, cfg) for t in workspace["tasks"]}
    assert 0 < sum(p.steps > 0 for p in plan.values()) < len(plan)  # the minimum leaves the costlier tasks out
    finished = tmp_path / "per_task.csv"
    finished.write_text("task_id,ttt_steps,ttt_seconds\n" + "".join(f"{i},{p.steps},6.0\n" for i, p in plan.items()))
    argv = ["--checkpoint", str(workspace["checkpoint"]), "--split", str(workspace["split"]), "--calibrate", "2",
            "--calibration-steps", "2", "--workers", "2", "--against", str(finished)]
    assert run_main(ttt_budget.main, argv + [f"--set={s}" for s in settings]) == 0  # it sets torch's threads to 1
    out = capsys.readouterr().out
    total = next(line for line in out.splitlines() if line.startswith("| all |")).strip("| ").split(" | ")
    tuned = [p.steps for p in plan.values() if p.steps]
    assert total[:6] == ["all", "6", str(len(tuned)), str(sum(s == 21 for s in tuned)), f"{np.median(tuned):.0f}",
                         str(sum(tuned))]
    assert total[-2:] == [str(sum(tuned)), "0.6"]  # six tasks' 6 s, in minutes
    assert float(total[-3]) >= 0 and "seconds a step = " in out and "with 2 workers" in out  # estimated minutes
    # Another device, from its figures: every step 38 ms plus its FLOPs at 1e-6 TFLOP/s (1 MFLOP/s).
    argv = ["--checkpoint", str(workspace["checkpoint"]), "--split", str(workspace["split"]), "--tflops", "1e-6",
            "--step-ms", "38", "--workers", "1"]
    assert run_main(ttt_budget.main, argv + [f"--set={s}" for s in settings]) == 0
    out = capsys.readouterr().out
    expected = sum(p.steps * (0.038 + p.step_flops / 1e6) for p in plan.values()) / 60
    total = next(line for line in out.splitlines() if line.startswith("| all |")).strip("| ").split(" | ")
    assert float(total[-1]) == pytest.approx(expected, abs=0.05) and "1e-06 TFLOP/s and 38 ms a step, as given" in out
    assert f"{expected:.1f} min with 1 workers" in out


def test_the_evaluation_progress_weighs_each_task_by_its_planned_work(workspace):
    """evaluate.py's bar with TTT counts TFLOPs planned by each task's budget (its ETA then follows
    the work, which varies ~150x between ARC tasks); a task answered untuned still counts a little."""
    from sage.evaluation import planned_work

    _, cfg = loaded_with(workspace["checkpoint"], *TTT)
    cheapest = min(task_budget(t, cfg).step_flops for t in workspace["tasks"])
    _, cfg = loaded_with(workspace["checkpoint"], *TTT, "ttt.steps=21", f"ttt.flops={22 * cheapest}",
                         "ttt.min_steps=20")
    plans = {t.id: task_budget(t, cfg) for t in workspace["tasks"]}
    weights = planned_work(workspace["tasks"], plans)
    tuned = {k for k, b in plans.items() if b.steps}
    assert 0 < len(tuned) < len(plans)
    for k in tuned:
        assert weights[k] == pytest.approx(plans[k].steps * plans[k].step_flops / 1e12)
    floor = sum(weights[k] for k in tuned) / len(plans) / 100
    assert all(weights[k] == pytest.approx(floor) for k in plans.keys() - tuned)
    assert set(planned_work(workspace["tasks"], None).values()) == {1.0}  # without TTT: tasks


def test_out_of_memory_in_ttt_halves_the_pieces_and_takes_the_same_steps(workspace):
    """An out-of-memory error in test-time training halves the examples per forward pass for the
    rest of the task and retries the step; accumulated gradients make the tuned weights the same."""
    weights, stats = [], []
    for faults in ([], ["oom:ttt:3", "oom:ttt:6"]):  # step 3 (pieces of 2), then a piece of step 4 (pieces of 1)
        loaded, cfg = loaded_with(workspace["checkpoint"], *TTT, "ttt.steps=6", "ttt.batch_size=4")
        stats.append(finetune(loaded.model, blind(workspace["tasks"][0]), cfg, CPU, FaultInjection.parse(faults)))
        weights.append({k: v.clone() for k, v in loaded.model.state_dict().items()})
    assert (stats[0].steps, stats[0].micro_batch) == (6, 0) and (stats[1].steps, stats[1].micro_batch) == (6, 1)
    assert stats[1].first_loss == pytest.approx(stats[0].first_loss, rel=1e-6)
    assert stats[1].last_loss == pytest.approx(stats[0].last_loss, rel=1e-4)
    for k in weights[0]:
        torch.testing.assert_close(weights[1][k], weights[0][k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
def test_the_same_command_gives_the_same_submission_on_a_busy_machine_and_after_a_kill(workspace, tmp_path):
    """TTT budgets are counted in steps, and each finished task is kept as it finishes: the same
    evaluate.py command, run beside a CPU-burning process, killed mid-way and continued with
    --resume (which answers only the rest), writes the submission.json of a quiet uninterrupted run."""
    args = ["--checkpoint", str(workspace["checkpoint"]), "--split", str(workspace["split"]), "--ttt", "--views", "2",
            "--speed-tasks", "0", "--pictures", "0", "--no-progress", "--set", "ttt.steps=20",
            "--set", "ttt.batch_size=4", "--set", "ttt.lr=3e-3"]
    # At lr 3e-3 the draws matter: another ttt.seed changes the answers of 3 of the 6 tasks (at 3e-4, none
    # in 20 or 40 steps), so a resumed task that drew other examples than in the straight run shows.
    assert run_main(evaluate_cli.main, args + ["--out", tmp_path / "straight"]) == 0  # quiet, in this process
    command = [sys.executable, "evaluate.py", *args]
    out = tmp_path / "killed"
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        victim = subprocess.Popen(command + ["--out", str(out)], cwd=REPO, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and victim.poll() is None and len(list(out.glob("finished_tasks/*.pt"))) < 2:
            time.sleep(0.02)
        assert victim.poll() is None, "the evaluation ended before it could be killed: give its tasks more TTT steps"
        victim.kill()
        victim.wait()
        done = len(list(out.glob("finished_tasks/*.pt")))
        assert 2 <= done < len(workspace["tasks"]) and not (out / "submission.json").exists()
        resumed = subprocess.run(command + ["--out", str(out), "--resume"], cwd=REPO, capture_output=True, text=True)
    finally:
        burner.kill()
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {done} of {len(workspace['tasks'])} tasks already answered" in resumed.stdout
    assert (out / "submission.json").read_bytes() == (tmp_path / "straight" / "submission.json").read_bytes()
    assert not (out / "finished_tasks").exists()  # the report holds it all now
    steps = [[row["ttt_steps"] for row in csv.DictReader(open(tmp_path / run / "per_task.csv"))]
             for run in ("straight", "killed")]
    assert steps[0] == steps[1] == ["20"] * len(workspace["tasks"])


def test_shape_buckets_change_neither_answers_nor_tuning(workspace, monkeypatch):
    """On CUDA prediction and test-time training pad their batches to shape buckets, as training
    does (sage.encoding.uses_shape_buckets). Forced here on the CPU: the padding is masked, so the
    same steps are taken (the budget counts the unpadded batch) with the same losses, and the same
    answers come out."""
    import sage.predict
    import sage.ttt

    settings = EvalSettings(split=str(workspace["split"]), views=2, speed_tasks=0, ttt=True, ttt_overrides=TTT,
                            limit=3)
    plain = evaluate(workspace["checkpoint"], settings, progress=False, log=lambda _: None)
    for module in (sage.predict, sage.ttt):
        monkeypatch.setattr(module, "uses_shape_buckets", lambda device: True)
    padded = evaluate(workspace["checkpoint"], settings, progress=False, log=lambda _: None)
    for system in ("student", "student_ttt"):
        for task_id, attempts in plain.systems[system].attempts.items():
            for a, b in zip(attempts, padded.systems[system].attempts[task_id]):
                assert all(np.array_equal(x, y) for x, y in zip(a, b)), (system, task_id)
    for task_id, stats in plain.ttt_stats.items():
        other = padded.ttt_stats[task_id]
        assert other.steps == stats.steps == 25
        assert other.first_loss == pytest.approx(stats.first_loss, rel=1e-5)
        assert other.last_loss == pytest.approx(stats.last_loss, rel=1e-4)


def test_runs_share_the_steps_draw_their_own_examples_and_keep_each_loss(workspace, tmp_path):
    """ttt.runs=2: each run tunes from the pretrained weights on its own stream of draws with half
    the task's steps; per_task.csv keeps each run's loss. Run 0 draws exactly what a single run
    draws, so runs=1 answers as before."""
    from sage.report import write_report
    from sage.ttt import tuning_data

    _, one = loaded_with(workspace["checkpoint"], *TTT)
    _, two = loaded_with(workspace["checkpoint"], *TTT, "ttt.runs=2")
    task = blind(workspace["tasks"][1])
    refs = ttt_examples(task)
    draw = (0, 0)  # the first draw of each stream: its augmentation differs between runs, not between configs
    first = [tuning_data(task, refs, cfg, run)[draw] for cfg, run in ((one, 0), (two, 0), (two, 1))]
    same = [all(np.array_equal(first[0][k], other[k]) for k in first[0]) for other in first[1:]]
    assert same == [True, False]

    settings = EvalSettings(split=str(workspace["split"]), views=2, speed_tasks=0, ttt=True, ttt_overrides=TTT,
                            limit=2)
    single = evaluate(workspace["checkpoint"], settings, progress=False, log=lambda _: None)
    pooled = evaluate(workspace["checkpoint"], replace(settings, ttt_overrides=[*TTT, "ttt.runs=2"]),
                      progress=False, log=lambda _: None)
    for task_id, stats in pooled.ttt_stats.items():
        assert (stats.steps, single.ttt_stats[task_id].steps) == (24, 25)  # 25 // 2 = 12 a run
        assert len(stats.run_last_losses) == 2 and stats.last_loss == pytest.approx(sum(stats.run_last_losses) / 2)
        assert [len(curve) for curve in stats.loss_curves] == [2, 2]  # 12 steps a run: windows of 10 and 2
    per_task = write_report(pooled, tmp_path / "report", pictures=0)["per_task"]
    rows = list(csv.DictReader(per_task.read_text().splitlines()))
    assert all(len(r["ttt_run_last_losses"].split(";")) == 2 for r in rows)
    # ttt_curves.json holds each tuned task's two curves; a task whose budget bought no steps (an
    # empty curve) is left out, not written as a curve of nothing.
    untuned = next(iter(pooled.ttt_stats))
    pooled.ttt_stats[untuned] = replace(pooled.ttt_stats[untuned], steps=0, loss_curves=((),))
    write_report(pooled, tmp_path / "report", pictures=0)
    curves = json.loads((tmp_path / "report" / "ttt_curves.json").read_text())["tasks"]
    assert set(curves) == set(pooled.ttt_stats) - {untuned} and all(len(c) == 2 for c in curves.values())


def test_lowest_loss_keeps_the_answers_of_the_run_that_fitted_best(workspace):
    """ttt.runs=2: the answers are one run's views, those of the run with the lower last loss; where
    that is run 0, they are exactly a single run's (run 0 draws what it draws)."""
    settings = EvalSettings(split=str(workspace["split"]), views=2, speed_tasks=0, ttt=True,
                            ttt_overrides=[*TTT, "ttt.steps=24"])
    single = evaluate(workspace["checkpoint"], replace(settings, ttt_overrides=[*TTT, "ttt.steps=12"]),
                      progress=False, log=lambda _: None)
    chosen = evaluate(workspace["checkpoint"], replace(settings, ttt_overrides=[
        *TTT, "ttt.steps=24", "ttt.runs=2"]), progress=False, log=lambda _: None)
    winners = []
    for task in workspace["tasks"]:
        losses = chosen.ttt_stats[task.id].run_last_losses
        assert len(losses) == 2 and losses[0] == single.ttt_stats[task.id].last_loss
        assert all(test.views == 2 for test in chosen.ttt_predictions[task.id].tests)  # one run's views
        winners.append(0 if losses[0] <= losses[1] else 1)
        same = all(np.array_equal(a, b) for x, y in zip(chosen.systems["student_ttt"].attempts[task.id],
                                                        single.systems["student_ttt"].attempts[task.id])
                   for a, b in zip(x, y))
        assert same or winners[-1] == 1
    assert 0 in winners


def test_resume_refuses_answers_made_with_other_settings(tmp_path):
    from sage.errors import EvaluationError
    from sage.finished_tasks import FinishedTasks

    FinishedTasks(tmp_path, {"views": 8, "ttt": {"steps": 600}}).start(resume=False)
    assert FinishedTasks(tmp_path, {"views": 8, "ttt": {"steps": 600}}).start(resume=True) == {}
    with pytest.raises(EvaluationError, match=r"other settings \(ttt differ\)"):
        FinishedTasks(tmp_path, {"views": 8, "ttt": {"steps": 2000}}).start(resume=True)


def test_changing_test_outputs_changes_nothing_but_the_score(workspace):
    """The whole --ttt path from disk: a split whose test outputs are replaced yields bit-identical
    attempts from the tuned student, so nothing it did depended on them."""
    tasks = workspace["tasks"]
    altered = [replace(t, test=tuple(Pair(p.input, (p.output + 1) % 10) for p in t.test)) for t in tasks]
    other = write_tasks(altered, workspace["root"] / "unseen-altered")
    settings = EvalSettings(split=str(workspace["split"]), views=2, speed_tasks=0, ttt=True, ttt_overrides=TTT)
    first = evaluate(workspace["checkpoint"], settings, progress=False, log=lambda _: None)
    second = evaluate(workspace["checkpoint"], replace(settings, split=str(other)), progress=False, log=lambda _: None)
    for t in tasks:
        for a, b in zip(first.systems["student_ttt"].attempts[t.id], second.systems["student_ttt"].attempts[t.id]):
            assert all(np.array_equal(x, y) for x, y in zip(a, b))
        assert first.ttt_stats[t.id] == replace(second.ttt_stats[t.id], seconds=first.ttt_stats[t.id].seconds)


def test_cli_scores_with_and_without_ttt_side_by_side(workspace, capsys):
    out = workspace["root"] / "report-ttt"
    args = ["--checkpoint", workspace["checkpoint"], "--split", workspace["split"], "--views", 2, "--speed-tasks", 0,
            "--ttt", *[a for o in TTT for a in ("--set", o)], "--max-grid-side", 4, "--pictures", 0, "--out", out,
            "--no-progress"]
    code = run_main(evaluate_cli.main, args)  # evaluate.py's command line runs as a process in the kill test below
    done = capsys.readouterr()
    assert code == 0, done.err
    assert "with test-time training" in done.out
    small = [t for t in load_task_dir(workspace["split"]) if all(max(g.shape) <= 4 for g in t.grids())]
    assert len(small) == 3  # --max-grid-side kept only the tasks whose every grid fits 4x4
    report = json.loads((out / "report.json").read_text())
    assert report["scores"]["student"]["tasks"] == report["scores"]["student_ttt"]["tasks"] == len(small)
    assert report["settings"]["ttt_config"]["steps"] == 25 and report["protocol"]["max_grid_side"] == 4
    rows = list(csv.DictReader(open(out / "per_task.csv")))
    assert {r["task_id"] for r in rows} == {t.id for t in small}
    assert all(int(r["ttt_steps"]) == 25 and float(r["ttt_seconds"]) > 0 for r in rows)
    assert "SAGE student + test-time training" in (out / "report.md").read_text()
    # The ceiling of any ranking: no ranking of the same candidates can score above it.
    for name in ("student", "student_ttt"):
        ceiling = report["voting"]["candidate_ceiling"][name]
        assert ceiling["test_outputs"] == sum(len(t.test) for t in small)
        assert ceiling["score"] >= max(m["arc_prize_score"] for m in report["voting"]["scores_by_rank"][name].values())
    assert "The right grid among all the distinct grids the views gave" in (out / "report.md").read_text()
    # Each task's loss curve: a point per 10 steps (windows of 10, 10 and 5 of its 25 steps), drawn.
    curves = json.loads((out / "ttt_curves.json").read_text())
    assert curves["steps_per_point"] == 10 and set(curves["tasks"]) == {t.id for t in small}
    for r in rows:
        [curve] = curves["tasks"][r["task_id"]]
        assert len(curve) == 3 and all(math.isfinite(v) and v > 0 for v in curve)
    assert (out / "ttt_curves.png").stat().st_size > 0 and "ttt_curves.png" in (out / "report.md").read_text()
    # The submission holds the tuned student's attempts: rescored from the rules, it gives its score.
    submission = json.loads((out / "submission.json").read_text())
    solutions = {t.id: [p.output.tolist() for p in t.test] for t in small}
    assert independent_arc_prize_score(submission, solutions) == pytest.approx(
        report["scores"]["student_ttt"]["arc_prize_score"], abs=1e-12)


def test_ttt_overrides_are_checked(workspace, capsys):
    loaded = load_model(workspace["checkpoint"], CPU)
    with pytest.raises(ConfigError, match="only ttt"):
        with_overrides(loaded.cfg, ["model.d_model=8"], sections=("ttt",))
    with pytest.raises(ConfigError, match="ttt.batch_size"):
        with_overrides(loaded.cfg, ["ttt.batch_size=0"], sections=("ttt",))
    with pytest.raises(ConfigError, match="ttt.runs"):
        with_overrides(loaded.cfg, ["ttt.runs=0"], sections=("ttt",))
    with pytest.raises(ConfigError, match="'ttt.tune' was removed after commit 702e718"):
        with_overrides(loaded.cfg, ["ttt.tune=decoder"], sections=("ttt",))
    code = run_main(evaluate_cli.main, ["--checkpoint", workspace["checkpoint"], "--set", "ttt.steps=3"])
    assert code == 2 and "add --ttt" in capsys.readouterr().err


@pytest.mark.slow
def test_worker_processes_give_the_same_answers(workspace):
    """--workers 2 spreads tasks over two processes; with the same thread count per process the
    answers and the tuning are the same as one process's, task by task and in task order. Both run
    in bf16 (--precision), which the checkpoint was not trained in: the workers must take it too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # workers get 2 // 2 = 1 thread each; the single process gets 1 below
    settings = EvalSettings(split=str(workspace["split"]), views=2, speed_tasks=0, ttt=True, ttt_overrides=TTT,
                            workers=2, precision="bf16")
    try:
        parallel = evaluate(workspace["checkpoint"], settings, progress=False, log=lambda _: None)
        torch.set_num_threads(1)
        single = evaluate(workspace["checkpoint"], replace(settings, workers=1), progress=False, log=lambda _: None)
        fp32 = evaluate(workspace["checkpoint"], replace(settings, workers=1, precision="fp32", limit=1),
                        progress=False, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    assert list(parallel.predictions) == [t.id for t in workspace["tasks"]]
    for name in ("student", "student_ttt"):
        assert parallel.systems[name].summary == single.systems[name].summary
        for t in workspace["tasks"]:
            for a, b in zip(parallel.systems[name].attempts[t.id], single.systems[name].attempts[t.id]):
                assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert [s.last_loss for s in parallel.ttt_stats.values()] == [s.last_loss for s in single.ttt_stats.values()]
    assert parallel.settings["precision"] == "bf16 autocast"
    assert fp32.settings["precision"] == "fp32"  # and it computes otherwise:
    assert fp32.ttt_stats[workspace["tasks"][0].id].last_loss != single.ttt_stats[workspace["tasks"][0].id].last_loss


def test_workers_spread_over_the_visible_gpus():
    from sage.predict import worker_devices

    assert worker_devices(torch.device("cuda"), 5, 2) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert worker_devices(torch.device("cuda:1"), 3, 2) == ["cuda:1"] * 3  # a device named: all on it
    assert worker_devices(CPU, 2, 0) == ["cpu", "cpu"]


def test_learning_rate_decays_to_zero_at_the_tasks_last_step():
    from sage.config import TTTConfig
    from sage.ttt import ttt_lr

    by_steps = TTTConfig(steps=100, lr=1.0, warmup_steps=10)
    assert ttt_lr(0, by_steps) == pytest.approx(0.1) and ttt_lr(9, by_steps) == pytest.approx(1.0)
    assert ttt_lr(55, by_steps) == pytest.approx(0.5)  # halfway through the steps
    assert ttt_lr(100, by_steps) == pytest.approx(0.0, abs=1e-12)
    assert ttt_lr(30, by_steps, steps=30) == pytest.approx(0.0, abs=1e-12)  # a task's budget ends sooner


def test_finished_outcomes_round_trip_exactly_without_pickle(tmp_path):
    """What --resume reads back is what was stored: arrays with their dtype (flipped views too, as
    voting makes them), tuples, numbers, tensors; loaded with weights_only=True."""
    from sage.finished_tasks import FinishedTasks
    from sage.predict import OutputPrediction, TaskOutcome, TaskPrediction
    from sage.ttt import TTTStats
    from sage.voting import Candidate

    grid = np.arange(3, dtype=np.uint8).reshape(3, 1)[:, ::-1]  # a flipped 3x1 grid: a negative stride numpy
    assert grid.flags.c_contiguous and grid.strides[1] < 0  # still calls contiguous (voting makes these)
    test = OutputPrediction([Candidate(grid, 3, np.float32(0.25), 1)], [grid, grid.T], True, 8,
                            torch.randn(2, 4), torch.tensor([True, False]), (0, 2))
    outcome = TaskOutcome(TaskPrediction("abc", [test], 0.5), TaskPrediction("abc", [test], 0.7),
                          TTTStats(10, 1.5, 3, 2.0, 0.5, loss_curves=((2.0, 0.75), (1.5,))))
    store = FinishedTasks(tmp_path, {"views": 8})
    store.start(resume=False)
    store.add("abc", outcome)
    back = FinishedTasks(tmp_path, {"views": 8}).start(resume=True)["abc"]
    got, want = back.tuned.tests[0], outcome.tuned.tests[0]
    assert back.ttt == outcome.ttt and back.plain.seconds == 0.5 and got.kept_demos == (0, 2)
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(got.attempts, want.attempts))
    assert torch.equal(got.grid_features, want.grid_features) and got.candidates[0].votes == 3
    assert np.array_equal(got.candidates[0].grid, grid) and got.candidates[0].confidence == 0.25
