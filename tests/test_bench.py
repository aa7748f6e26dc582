"""benchmarks/bench.py runs end to end (on the quickstart config, one timed step, the shortest matmul
peak: 5 trials of one product before and after training, not 4 s of them each) and reports every
figure with its target; the figures themselves are for an idle machine, not for a test. It runs in
this process; the GPU check's --cpu-smoke (tests/test_gpu_check.py) runs it as a command."""

import json

import pytest
from tiny import REPO, run_main


def test_benchmark_prints_a_table_and_json(tmp_path, capsys):
    from benchmarks.bench import main

    out = tmp_path / "bench.json"
    code = run_main(main, ["--config", REPO / "configs" / "quickstart.yaml", "--only", "train,cache", "--steps", "1",
                           "--cache-tasks", "1", "--peak-seconds", "0.05", "--json", out])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:]
    assert "MFU (of measured matmul peak)" in printed.out and "pooled per prompt" in printed.out
    report = json.loads(out.read_text())
    train = report["sections"]["train"]
    assert train["flops_per_step_mean"] > 0 and 0 < train["mfu"] < 1.5 and 0 <= train["data_wait_share"] < 1
    assert set(report["targets"]) == {"mfu", "data_wait", "pooled_cache"}
    # Each verdict is its figure against its target (not a constant, not the other way round).
    from benchmarks.bench import TARGET_DATA_WAIT, TARGET_MFU, TARGET_POOLED_BYTES

    targets = report["targets"]
    assert targets["mfu"]["value"] == pytest.approx(train["mfu"])
    assert targets["data_wait"]["value"] == train["data_wait_share"]
    assert targets["pooled_cache"]["value"] == report["sections"]["cache"]["real_width_pooled"]["bytes_per_prompt_mean"]
    assert targets["pooled_cache"]["value"] > 0
    for name, holds in (("mfu", targets["mfu"]["value"] >= TARGET_MFU),
                        ("data_wait", targets["data_wait"]["value"] <= TARGET_DATA_WAIT),
                        ("pooled_cache", targets["pooled_cache"]["value"] <= TARGET_POOLED_BYTES)):
        assert targets[name]["pass"] is holds, name


def test_early_choice_scores_the_run_each_fraction_would_keep(tmp_path, capsys):
    """benchmarks/early_choice.py: run 1 leads early and run 0 ends lower on task a, which only run 0
    solves: a choice at 10% keeps run 1 (score 0), at the end run 0 (score 1). Task b is tuned in run
    1 only, so run 1 is kept for it at every fraction; task c was tuned in neither."""
    from benchmarks.early_choice import main

    runs = {"seed0": ({"a": [[1.0] * 5 + [0.1] * 5], "c": [[]]}, {"a": 1.0, "b": 0.0, "c": 0.0}),
            "seed1": ({"a": [[0.5] * 5 + [0.4] * 5], "b": [[0.3] * 10]}, {"a": 0.0, "b": 1.0, "c": 0.0})}
    for name, (curves, scores) in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "ttt_curves.json").write_text(json.dumps({"steps_per_point": 10, "tasks": curves}))
        rows = "".join(f"{task},{score}\n" for task, score in scores.items())
        (tmp_path / name / "per_task.csv").write_text("task_id,student_ttt_score\n" + rows)
    main([str(tmp_path / "seed0"), str(tmp_path / "seed1")])
    out = capsys.readouterr().out
    assert "each run alone: 33.33%, 33.33%; the best run per task (reads the scores): 66.67%" in out
    assert "| 10% | 33.33% | 1 of 2 |" in out and "| 100% | 66.67% | 2 of 2 |" in out
