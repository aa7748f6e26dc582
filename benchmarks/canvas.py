"""Answer canvas benchmark: training throughput with the fixed 30x30 answer canvas against canvases
sized per example (model.answer_canvas: fixed vs batch), in one run on this machine.

    python -m benchmarks.canvas                                      # sage-44m (configs/sage_44m.yaml)
    python -m benchmarks.canvas --config configs/quickstart.yaml --steps 20

Both arms run benchmarks.bench's training section (sage.training.train_step on real ARC-AGI-1
training batches, epoch 0's order, random init) with the same config but the canvas; each draws its
own batches, since "batch" groups examples by canvas side. Printed: examples/s of each arm and their
ratio, and the useful-cell fraction (answer cells that carry a loss / answer cells computed).
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/sage_44m.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per arm")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up steps per arm (>= 1)")
    parser.add_argument("--json", default=None, help="output JSON (default benchmarks/results/canvas-<config>.json)")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", file=sys.stderr, flush=True)

    arms = {}
    for canvas in ("fixed", "batch"):
        cfg = load_config(args.config, [*args.overrides, f"model.answer_canvas={canvas}"])
        log(f"{canvas} canvas: {args.warmup} warm-up + {args.steps} timed steps of {args.config}")
        arms[canvas] = train_section(cfg, resolve_device(cfg.run.device), build_data(cfg), args.steps,
                                     args.warmup, log)
    fixed, batch = arms["fixed"], arms["batch"]
    ratio = batch["examples_per_second"] / fixed["examples_per_second"]
    print(f"answer canvas benchmark: {args.config} {' '.join(args.overrides)} ({args.steps} timed steps per arm)")
    for name, arm in arms.items():
        print(f"  {name:<6} {arm['examples_per_second']:8.2f} examples/s   useful cells "
              f"{arm['answer_cells_with_loss_share']:6.1%}   step {arm['step_seconds_mean']:.2f} s")
    print(f"  batch / fixed: {ratio:.2f}x examples/s")
    path = Path(args.json) if args.json else REPO / "benchmarks" / "results" / f"canvas-{Path(args.config).stem}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": args.config, "overrides": args.overrides, "ratio": ratio, "arms": arms},
                               indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
