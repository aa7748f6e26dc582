"""Training throughput of two or more variants of one config, in one run on this machine: by default
the fixed 30x30 answer canvas against canvases sized per example (model.answer_canvas: fixed vs batch).

    python -m benchmarks.compare                                      # sage-44m (configs/sage_44m.yaml)
    python -m benchmarks.compare --config configs/quickstart.yaml --steps 20
    python -m benchmarks.compare --config configs/quickstart.yaml --arm train.compile=false --arm train.compile=true

Every arm runs benchmarks.bench's training section (sage.training.train_step on real ARC-AGI-1
training batches, epoch 0's order as training draws it, random init) with the same config plus its
override; each draws its own batches, since "batch" groups examples by canvas side. Printed:
examples/s of each arm and its ratio to the first, and the useful-cell fraction (answer cells that
carry a loss / answer cells computed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.bench import REPO, build_data, train_section
from sage.config import load_config
from sage.device import resolve_device

DEFAULT_ARMS = ["model.answer_canvas=fixed", "model.answer_canvas=batch"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/sage_44m.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="applied to every arm")
    parser.add_argument("--arm", dest="arms", action="append", default=None, metavar="KEY=VALUE",
                        help="one variant (repeat for each; default: " + " vs ".join(DEFAULT_ARMS) + ")")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per arm")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up steps per arm (>= 1; more for train.compile)")
    parser.add_argument("--json", default=None, help="output JSON (default benchmarks/results/compare-<config>.json)")
    args = parser.parse_args(argv)
    arm_overrides = args.arms or DEFAULT_ARMS
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", file=sys.stderr, flush=True)

    arms = {}
    for arm in arm_overrides:
        cfg = load_config(args.config, [*args.overrides, arm])
        log(f"{arm}: {args.warmup} warm-up + {args.steps} timed steps of {args.config}")
        arms[arm] = train_section(cfg, resolve_device(cfg.run.device), build_data(cfg), args.steps, args.warmup, log)
    first = arms[arm_overrides[0]]
    print(f"training throughput: {args.config} {' '.join(args.overrides)} ({args.steps} timed steps per arm)")
    for name, arm in arms.items():
        arm["ratio_to_first"] = arm["examples_per_second"] / first["examples_per_second"]
        print(f"  {name:<32} {arm['examples_per_second']:8.2f} examples/s ({arm['ratio_to_first']:.2f}x)   "
              f"useful cells {arm['answer_cells_with_loss_share']:6.1%}   step {arm['step_seconds_mean']:.2f} s")
    path = Path(args.json) if args.json else REPO / "benchmarks" / "results" / f"compare-{Path(args.config).stem}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": args.config, "overrides": args.overrides, "arms": arms},
                               indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
