"""benchmarks/gpu_check.sh, the script that proves the GPU path when a GPU is lent, cannot rot: its
--cpu-smoke runs every stage at toy sizes on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_every_stage_runs_at_toy_sizes_on_a_cpu(tmp_path):
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu-smoke", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary) == ["device", "throughput", "attention", "extraction", "train", "ttt", "teacher_speed",
                             "teacher_precision", "oom", "compile", "memory_caps", "recipe"]
    assert all(stage["status"] == "ok" for stage in summary.values()), summary
    assert summary["throughput"]["examples_per_second"] > 0 and summary["extraction"]["prompts"] > 0
    assert summary["throughput"]["by_tokens_per_step"]["2048"]["examples_per_second"] > 0  # batches by tokens
    attention = summary["attention"]  # the CPU has no cuDNN: both arms pick torch's CPU flash kernel
    assert attention["default"]["attention_kernel"] == attention["no_cudnn"]["attention_kernel"] == "flash"
    compiled = summary["compile"]
    assert compiled["shape_buckets"]["graphs_compiled"] <= compiled["free_shapes"]["graphs_compiled"]
    assert summary["train"]["epochs"] == 2 and summary["oom"]["halvings"] == ["4"]  # batch 8 went through in 4s
    assert summary["train"]["memory_released"] == []  # a CPU has no caching allocator to flush (CUDA: 2 lines)
    ttt = summary["ttt"]  # one task at a time, two worker processes, two tasks in one pass
    assert [ttt[arm]["tasks"] for arm in ("one_at_a_time", "workers_2", "in_flight_2")] == [2, 2, 2]
    assert ttt["in_flight_2"]["ttt_examples_per_second"] > 0
    assert ttt["in_flight_2"]["same_answers_as_one_at_a_time"] and ttt["workers_2"]["same_answers_as_one_at_a_time"]
    assert summary["teacher_speed"]["teacher"]["preset"] == "groot-n1.5-tiny"
    precision = summary["teacher_precision"]  # the tiny backbone in fp16 against fp32
    assert precision["min_cosine"] >= 0.999 and precision["overflowing_layers"] == []
    assert "| oom | ok |" in (tmp_path / "summary.md").read_text()
    caps = summary["memory_caps"]  # the small-card recipe in fp16 and bf16 (uncapped on a CPU)
    runs = {k: v for k, v in caps.items() if k.startswith("cap")}
    assert sorted(runs) == ["cap16_bf16", "cap16_fp16", "cap8_bf16", "cap8_fp16"]
    assert all(r["out_of_memory_halvings"] == 0 and r["ttt_steps"] > 0 for r in runs.values())
    assert all(caps["throughput_by_precision"][p]["examples_per_second"] > 0 for p in ("bf16", "fp16"))
    counted = caps["counted_against_allocated"]  # on a CPU only the count: no CUDA allocator to hold it against
    assert all(counted[phase]["counted_mib"] > 0 and counted[phase]["cuda_allocated_mib"] is None
               for phase in ("train", "val", "ttt"))
    recipe = summary["recipe"]  # configs/sage_44m_1gpu.yaml end to end, at toy sizes
    assert recipe["tasks"] == 2 and 0 <= recipe["student_ttt_arc_prize_score"] <= 1
    assert json.loads((tmp_path / "recipe_report" / "submission.json").read_text())


def test_the_check_reads_back_the_memory_lines_training_logs():
    """On CUDA training logs what each phase left reserved (sage.device.release_cached_memory); the
    GPU check's train stage reads those lines back with MEMORY_LINE: format and pattern must agree."""
    from sage.device import MEMORY_LINE, memory_line

    log = "\n".join(f"2026-12-05 10:00:00 | {line}" for line in (
        memory_line("the teacher cache", 6 * 2**30, 2**28, 2**27), memory_line("training", 12 * 2**30, 0, 0)))
    assert MEMORY_LINE.findall(log) == [("the teacher cache", "6.00", "0.25"), ("training", "12.00", "0.00")]
