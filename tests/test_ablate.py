"""sage.ablate: every arm x seed is a normal run, reused or resumed on a rerun, summed up in a table."""

import json
import subprocess
import sys

import pytest
from tiny import ORACLE_TINY, REPO, run_main

from sage.ablate import Arm, ablate, main, parse_arm, parse_seeds, summarise
from sage.errors import ConfigError
from sage.runlog import read_metrics
from sage.training import train

CONFIG = str(REPO / "configs" / "kd_oracle.yaml")


def common(tmp_path):
    return ORACLE_TINY + ["train.epochs=2", f"run.checkpoint_dir={tmp_path / 'ck'}",
                          f"run.log_dir={tmp_path / 'logs'}", f"teacher.cache_dir={tmp_path / 'features'}"]


def test_arms_and_seeds_parse_and_bad_ones_are_refused():
    assert parse_arm("distill.weight=1 teacher.noise=0.5").overrides == ["distill.weight=1", "teacher.noise=0.5"]
    assert parse_arm("distill.weight=1 teacher.noise=0.5").slug == "distill.weight=1+teacher.noise=0.5"
    assert parse_seeds("0,1, 2") == [0, 1, 2]
    with pytest.raises(ConfigError, match="'distill.weight' is not key.path=value"):
        parse_arm("distill.weight")
    for bad in ("0,0", "a,b", ""):
        with pytest.raises(Exception, match="--seeds"):
            parse_seeds(bad)


def test_summary_pairs_each_seed_with_the_first_arm():
    def run(seed, exact, cosine=None):
        last = {"exact": exact, "size": 1.0, "pixel": 0.5, "feature cosine": cosine}
        return {"seed": seed, "steps": 10, "last": last, "baselines": {"copy_input": 0.1, "all_zeros": 0.0}}

    arms = [Arm("a", ["distill.weight=0"]), Arm("b", ["distill.weight=1"])]
    runs = {"a": [run(0, 0.2), run(1, 0.4)], "b": [run(1, 0.7, 0.9), run(0, 0.3, 0.8)]}
    a, b = summarise(arms, runs)
    assert a["exact"]["mean"] == pytest.approx(0.3) and a["feature cosine"] is None
    assert b["exact_gain"]["mean"] == pytest.approx(0.2)  # (0.7 - 0.4 + 0.3 - 0.2) / 2, seed by seed
    assert b["exact_gain"]["min"] == pytest.approx(0.1) and b["exact_gain"]["max"] == pytest.approx(0.3)
    assert b["feature cosine"]["mean"] == pytest.approx(0.85) and b["best_baseline_exact"]["mean"] == 0.1


@pytest.mark.slow
def test_ablation_trains_each_arm_and_seed_reuses_finished_runs_and_resumes_stopped_ones(tmp_path, capsys):
    arms = [parse_arm("distill.weight=0"), parse_arm("distill.weight=1")]
    # One run stopped midway, as a crash would leave it: the ablation resumes it.
    from sage.ablate import run_config

    stopped = run_config(CONFIG, "t", arms[1], 1, common(tmp_path))
    train(stopped, stop_after_steps=2, echo=False)
    lines = []
    record = ablate(CONFIG, arms, [0, 1], common(tmp_path), name="t", out_dir=tmp_path / "reports", log=lines.append)
    out = tmp_path / "reports" / "t"
    assert {p.name for p in out.iterdir()} == {"ablation.md", "ablation.json", "exact_match.png"}
    assert any("t-distill.weight=1-s1: resumed and finished" in line for line in lines)
    for arm in ("distill.weight=0", "distill.weight=1"):
        for seed in (0, 1):
            name = f"t-{arm}-s{seed}"
            epochs = [r for r in read_metrics(tmp_path / "logs" / name / "metrics.jsonl") if r["event"] == "epoch"]
            assert len(epochs) == 2  # a resumed run is the whole run, not its second half
            run = next(r for r in record["runs"][arm] if r["seed"] == seed)
            assert run["last"]["exact"] == epochs[-1]["val_exact_match"]
            assert run["curve"] == [[r["step"], r["val_exact_match"]] for r in epochs]
    saved = json.loads((out / "ablation.json").read_text())
    assert [r["arm"] for r in saved["arms"]] == ["distill.weight=0", "distill.weight=1"]
    assert saved["arms"][0]["feature cosine"] is None and saved["arms"][1]["feature cosine"]["n"] == 2
    table = (out / "ablation.md").read_text()
    assert "| `distill.weight=1` | 2 |" in table and "feature cosine" in table
    # Rerun through the command line (sage.ablate.main in this process): every run is reused, the same
    # table comes out.
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "ck").rglob("model.safetensors")}
    argv = ["--config", CONFIG, "--arm", "distill.weight=0", "--arm", "distill.weight=1", "--seeds", "0,1", "--name",
            "t", "--out", str(tmp_path / "reports"), *[a for o in common(tmp_path) for a in ("--set", o)]]
    capsys.readouterr()
    code = run_main(main, argv)
    done = capsys.readouterr()
    assert code == 0, done.err
    assert "trained in" not in done.out and "t-distill.weight=1-s1" in done.out
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "ck").rglob("model.safetensors")} == before
    assert (out / "ablation.md").read_text() == table
    # The real command line, once: `python -m sage.ablate` exits with main's status.
    bad = subprocess.run([sys.executable, "-m", "sage.ablate", *argv[:2], "--arm", "distill.wieght=1"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown key 'distill.wieght'" in bad.stderr
    # The same names with other settings would mix two experiments: refused, nothing trained.
    code = run_main(main, argv + ["--set", "train.epochs=3"])
    err = capsys.readouterr().err
    assert code == 2 and "trained with other settings (train.epochs)" in err, err
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "ck").rglob("model.safetensors")} == before
