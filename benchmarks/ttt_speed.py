"""Test-time training speed: supervised examples per second of TTT settings, same tasks, one run.

    python -m benchmarks.ttt_speed --checkpoint checkpoints/arc_cpu/best
    python -m benchmarks.ttt_speed --config configs/arc_cpu.yaml          # random weights: speed only

An arm may tune several tasks at once (ttt.tasks_in_flight=K). Every arm fine-tunes the same
checkpoint on the same tasks (ARC-AGI-1 evaluation tasks up to
--max-grid-side, spread by size) for the same number of steps, one after the other in this process,
and is timed whole: encoding batches and every step.
A supervised example is one leave-one-out example in one step's batch (steps x ttt.batch_size).
Speed is a measurement, not a result: compare the arms' ratio within one run, never figures across
machines. Writes benchmarks/results/ttt_speed-<name>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sage.arc import Task, tasks_up_to_side  # noqa: E402
from sage.config import ExperimentConfig, load_config, with_overrides  # noqa: E402
from sage.datasets import load_dataset  # noqa: E402
from sage.model import build_model  # noqa: E402
from sage.predict import blind, load_model  # noqa: E402
from sage.speed import machine_description, speed_sample  # noqa: E402
from sage.task_batched_ttt import TaskBatchedTrainer, plan_jobs  # noqa: E402
from sage.ttt import TestTimeTrainer, Tuning  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a trained checkpoint (its config's ttt section)")
    source.add_argument("--config", help="a config: its model with random weights (speed does not depend on them)")
    parser.add_argument("--split", default="arc-agi-1/evaluation")
    parser.add_argument("--max-grid-side", type=int, default=10)
    parser.add_argument("--tasks", type=int, default=6, help="tasks, spread over the split by size (default 6)")
    parser.add_argument("--steps", type=int, default=40, help="TTT steps per task and arm (default 40)")
    parser.add_argument("--arm", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="ttt settings of one arm (repeatable); default: whole contexts "
                             "(ttt.context_demos=null) and one demonstration per context (ttt.context_demos=1)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", default=None, help="where to write the figures")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="also profile STEPS steps of each arm on the largest task: where a step's time goes")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    if args.checkpoint:
        loaded = load_model(args.checkpoint, device)
        model, cfg, name = loaded.model, loaded.cfg, Path(args.checkpoint).parent.name
    else:
        cfg = load_config(args.config)
        model, name = build_model(cfg.model).to(device), Path(args.config).stem
    tasks = speed_sample(tasks_up_to_side(load_dataset(args.split), args.max_grid_side), args.tasks)
    arms = args.arm or ["ttt.context_demos=null", "ttt.context_demos=1"]
    results = {}
    for arm in arms:
        overrides = [f"ttt.steps={args.steps}", "ttt.flops=0", "ttt.min_steps=0", *arm.split(",")]
        arm_cfg = with_overrides(cfg, overrides, sections=("ttt",))
        results[arm] = time_arm(model, arm_cfg, tasks, device)
        if args.profile:
            results[arm]["profile"] = profile_arm(model, arm_cfg, max(tasks, key=task_cells), device, args.profile)
            print(results[arm]["profile"]["table"])
        r = results[arm]
        print(f"{arm:<32} {r['examples_per_second']:8.2f} supervised examples/s  "
              f"({r['examples']} examples in {r['seconds']:.1f} s; median final loss {r['median_last_loss']:.3f})")
    first = results[arms[0]]["examples_per_second"]
    for arm in arms[1:]:
        print(f"{arm} / {arms[0]}: {results[arm]['examples_per_second'] / first:.2f}x")
    record = {"source": args.checkpoint or args.config, "split": args.split, "max_grid_side": args.max_grid_side,
              "tasks": [t.id for t in tasks], "steps": args.steps, "arms": results,
              "machine": machine_description(device)}
    path = Path(args.json) if args.json else REPO / "benchmarks" / "results" / f"ttt_speed-{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    print(f"figures: {path}")
    return 0


def time_arm(model: torch.nn.Module, cfg: ExperimentConfig, tasks: Sequence[Task], device: torch.device) -> dict:
    """Fine-tune on every task (the original weights back after each), one at a time or, with
    ttt.tasks_in_flight > 1, that many at once (sage/task_batched_ttt.py); time it all."""
    tuning = Tuning.of(cfg)
    started = time.perf_counter()
    if cfg.ttt.tasks_in_flight > 1:
        trainer = TaskBatchedTrainer(model, tuning, device)
        stats = [s for _, s in trainer.tune(plan_jobs([blind(t) for t in tasks], tuning))]
    else:
        trainer, stats = TestTimeTrainer(model, tuning, device), []
        for task in tasks:
            with trainer.tuned(blind(task)) as task_stats:
                stats.append(task_stats)
    seconds = time.perf_counter() - started
    examples = sum(s.steps for s in stats) * cfg.ttt.batch_size
    last = [s.last_loss for s in stats]
    settings = {k: getattr(cfg.ttt, k) for k in ("batch_size", "context_demos", "lr", "tasks_in_flight")}
    return {"seconds": seconds, "examples": examples, "examples_per_second": examples / seconds,
            "median_last_loss": statistics.median(last), "ttt": settings}


def task_cells(task: Task) -> int:
    return sum(p.input.size + (p.output.size if p.output is not None else 0) for p in task.train + task.test)


def profile_arm(model: torch.nn.Module, cfg: ExperimentConfig, task: Task, device: torch.device, steps: int) -> dict:
    """torch.profiler over `steps` TTT steps of one task (after 2 unprofiled ones): the operators
    that take the CPU time, and the share of the optimiser step and of the backward pass."""
    from torch.profiler import ProfilerActivity, profile

    warm = with_overrides(cfg, ["ttt.steps=2"], sections=("ttt",))
    with TestTimeTrainer(model, Tuning.of(warm), device).tuned(blind(task)):
        pass
    timed = with_overrides(cfg, [f"ttt.steps={steps}"], sections=("ttt",))
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with TestTimeTrainer(model, Tuning.of(timed), device).tuned(blind(task)):
            pass
    wall = time.perf_counter() - started
    averages = prof.key_averages()
    total = {e.key: e.cpu_time_total / 1e6 for e in averages}
    backward = sum(v for k, v in total.items() if k.startswith("autograd::engine::evaluate_function"))
    optimiser = sum(v for k, v in total.items() if k.startswith("Optimizer.step"))
    return {"task": task.id, "steps": steps, "wall_seconds": wall, "seconds_per_step": wall / steps,
            "backward_share": backward / wall, "optimizer_step_share": optimiser / wall,
            "table": averages.table(sort_by="self_cpu_time_total", row_limit=12)}


if __name__ == "__main__":
    sys.exit(main())
