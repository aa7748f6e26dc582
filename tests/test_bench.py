"""benchmarks/bench.py runs end to end (on the quickstart config, one timed step) and reports every
figure with its target; the figures themselves are for an idle machine, not for a test."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_prints_a_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench", "--config", str(REPO / "configs" / "quickstart.yaml"),
         "--only", "train,cache", "--steps", "1", "--cache-tasks", "2", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MFU (of measured matmul peak)" in result.stdout and "pooled per prompt" in result.stdout
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
