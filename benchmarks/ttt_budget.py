"""How a test-time training budget spreads over a split, and what it will cost on this machine,
before any task is tuned or answered.

    python -m benchmarks.ttt_budget --checkpoint checkpoints/<run>/best --set ttt.flops=3e12 --set ttt.min_steps=150
    python -m benchmarks.ttt_budget --checkpoint ... --set ... --calibrate 8 --workers 2
    python -m benchmarks.ttt_budget --checkpoint ... --set ... --calibrate 8 --against reports/<run>/<eval>/per_task.csv
    python -m benchmarks.ttt_budget --checkpoint ... --tflops 450 --step-ms 38 --workers 1   # a device's figures

Per size band: the tasks TTT will tune, the steps their budgets grant (`sage.ttt.task_budget`, the
same rule and first batch `finetune` uses), and the estimated FLOPs. This is how a budget is chosen
without looking at any answer. With --calibrate K it also times a few real TTT steps on K of the
tuned tasks, spread by step cost, fits seconds per step = a + b x estimated FLOPs (a: what the
FLOPs estimate leaves out, numpy encoding, small kernels, the optimiser), and estimates the run's
TTT time with --workers 1-thread workers. The estimate leaves out answering the test inputs.
--tflops and --step-ms estimate it for another device from its measured throughput and fixed cost
a step (the H200's: ~450 TFLOP/s for the work plus ~38 ms a step, docs/results/gpu_check_h200.md);
with ttt.tasks_in_flight = K the fixed cost is shared by K tasks (a best case: full slots, free padding).
--against compares the plan with a finished evaluation's per_task.csv (steps and TTT seconds).
Time is a measurement: it holds for this machine at this load, never across machines.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sage.arc import Task, tasks_up_to_side  # noqa: E402
from sage.config import ExperimentConfig, with_overrides  # noqa: E402
from sage.datasets import load_dataset  # noqa: E402
from sage.metrics import SIZE_BANDS, size_band  # noqa: E402
from sage.predict import blind, load_model  # noqa: E402
from sage.ttt import TaskBudget, TestTimeTrainer, Tuning, task_budget  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="the checkpoint evaluate.py will tune (its ttt section)")
    parser.add_argument("--split", default="arc-agi-1/evaluation")
    parser.add_argument("--max-grid-side", type=int, default=30)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="ttt.KEY=VALUE",
                        help="a ttt setting, as evaluate.py --set takes it (repeatable)")
    parser.add_argument("--calibrate", type=int, default=0, metavar="K",
                        help="time real steps on K tuned tasks spread by step cost, and estimate the TTT time")
    parser.add_argument("--calibration-steps", type=int, default=10, help="steps timed per calibration task")
    parser.add_argument("--workers", type=int, default=2, help="1-thread worker processes of the run (default 2)")
    parser.add_argument("--precision", default="fp32", help="autocast of the calibration steps (default fp32)")
    parser.add_argument("--tflops", type=float, default=0.0, metavar="T",
                        help="instead of --calibrate: a device's measured TFLOP/s in TTT steps (e.g. from "
                             "benchmarks/gpu_check.sh), for the time the split's TTT would take there")
    parser.add_argument("--step-ms", type=float, default=0.0, metavar="MS",
                        help="with --tflops: the fixed cost of a step on that device in ms (the H200: ~38)")
    parser.add_argument("--against", default=None, metavar="PER_TASK_CSV",
                        help="an evaluation's per_task.csv: its steps and TTT time beside the plan")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as each of evaluate.py's workers runs
    loaded = load_model(args.checkpoint, torch.device("cpu"))
    cfg = with_overrides(loaded.cfg, args.overrides, sections=("ttt",))
    cfg = replace(cfg, run=replace(cfg.run, precision=args.precision))
    tasks = tasks_up_to_side(load_dataset(args.split), args.max_grid_side)
    tuning = Tuning.of(cfg)
    budgets = {t.id: task_budget(t, tuning) for t in tasks}
    rate, source = None, ""
    if args.calibrate:
        rate = calibrate(loaded.model, cfg, tasks, budgets, args.calibrate, args.calibration_steps)
        source = "calibrated on this machine, now"
    elif args.tflops:
        # Tasks tuned at once share a step's fixed cost (sage/task_batched_ttt.py), as long as the
        # slots stay full and padding the tasks to one shape costs nothing: an estimate's best case.
        in_flight = cfg.ttt.tasks_in_flight
        rate = (args.step_ms / 1000 / in_flight, 1 / (args.tflops * 1e12))
        source = (f"{args.tflops:g} TFLOP/s and {args.step_ms:g} ms a step, as given"
                  + (f", that fixed cost shared by {in_flight} tasks in flight" if in_flight > 1 else ""))
    measured = read_per_task(args.against) if args.against else {}
    print(f"{len(tasks)} tasks of {args.split}; ttt: steps {cfg.ttt.steps}, flops {cfg.ttt.flops:.3g}, "
          f"min_steps {cfg.ttt.min_steps}, context_demos {cfg.ttt.context_demos}")
    print_plan(tasks, budgets, cfg, rate, source, args.workers, measured)
    return 0


def calibrate(model: torch.nn.Module, cfg: ExperimentConfig, tasks: Sequence[Task], budgets: dict[str, TaskBudget],
              k: int, steps: int) -> tuple[float, float]:
    """Seconds per step = a + b x step FLOPs, fitted on `steps` real steps of k tuned tasks spread by step cost."""
    tuned = sorted((t for t in tasks if budgets[t.id].steps), key=lambda t: budgets[t.id].step_flops)
    if not tuned:
        raise SystemExit("no task is tuned under these settings: nothing to calibrate")
    sample = [tuned[round(i * (len(tuned) - 1) / max(k - 1, 1))] for i in range(min(k, len(tuned)))]
    timed = with_overrides(cfg, [f"ttt.steps={steps}", "ttt.flops=0", "ttt.min_steps=0"], sections=("ttt",))
    trainer = TestTimeTrainer(model, Tuning.of(timed), torch.device("cpu"))
    with trainer.tuned(blind(sample[-1])):  # untimed: the first steps of a process pay one-off costs
        pass
    points = []
    for task in sample:
        with trainer.tuned(blind(task)) as stats:
            pass
        points.append((budgets[task.id].step_flops, stats.seconds / stats.steps))
        print(f"  calibration {task.id}: {points[-1][0] / 1e9:7.2f} GFLOPs a step, {points[-1][1]:.3f} s a step")
    return fit_line(points)


def fit_line(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (a, b) of y = a + b x; b alone through the origin when the x are all equal."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread == 0:
        return 0.0, mean_y / mean_x
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread
    return mean_y - slope * mean_x, slope


def read_per_task(path: str) -> dict[str, tuple[int, float]]:
    """task id -> (TTT steps, TTT seconds) of a finished evaluation."""
    with open(path, newline="") as f:
        return {row["task_id"]: (int(row["ttt_steps"]), float(row["ttt_seconds"])) for row in csv.DictReader(f)}


def print_plan(tasks: Sequence[Task], budgets: dict[str, TaskBudget], cfg: ExperimentConfig,
               rate: tuple[float, float] | None, source: str, workers: int,
               measured: dict[str, tuple[int, float]]) -> None:
    """One row per size band and a total: tuned tasks, steps, FLOPs, and the estimated (and measured) time."""
    header = "| band | tasks | tuned | at the step cap | median steps of the tuned | steps | PFLOPs |"
    if rate:
        header += " estimated TTT worker-min |"
    if measured:
        header += " measured steps | measured TTT worker-min |"
    print(header + "\n|" + "---|" * (header.count("|") - 1))
    bands = [(name, [t for t in tasks if size_band(t) == name]) for name, _ in SIZE_BANDS] + [("all", list(tasks))]
    total_minutes = 0.0
    for name, members in bands:
        plans = [budgets[t.id] for t in members]
        tuned = [p.steps for p in plans if p.steps]
        row = (f"| {name} | {len(members)} | {len(tuned)} | {sum(s == cfg.ttt.steps for s in tuned)} | "
               f"{statistics.median(tuned) if tuned else 0:.0f} | {sum(tuned)} | "
               f"{sum(p.steps * p.step_flops for p in plans) / 1e15:.2f} |")
        if rate:
            minutes = sum(p.steps * (rate[0] + rate[1] * p.step_flops) for p in plans) / 60
            total_minutes = minutes if name == "all" else total_minutes
            row += f" {minutes:.1f} |"
        if measured:
            done = [measured[t.id] for t in members if t.id in measured]
            row += f" {sum(s for s, _ in done)} | {sum(sec for _, sec in done) / 60:.1f} |" if done else " - | - |"
        print(row)
    if rate:
        print(f"\nseconds a step = {rate[0]:.4f} + {rate[1] * 1e9:.3g} x GFLOPs ({source}); "
              f"TTT alone, at most: {total_minutes / workers:.1f} min with {workers} workers "
              "(answering the test inputs comes on top)")


if __name__ == "__main__":
    sys.exit(main())
