"""Train the SAGE student on ARC tasks: `python train_sage.py --config configs/quickstart.yaml`.

Everything about the run is in the YAML config (schema: sage/config.py); `--set a.b=value`
overrides single keys. Writes checkpoints/<run>/{best,last,epoch_N} and logs/<run>/ (train.log to
tail, metrics.jsonl, curves.png, the resolved config.yaml).
"""

from __future__ import annotations

import argparse
import os
import sys

from sage.config import load_config
from sage.errors import INPUT_ERRORS, TrainingError
from sage.recovery import FaultInjection
from sage.training import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="experiment YAML, e.g. configs/quickstart.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set train.epochs=5 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue the run from checkpoints/<run>/last")
    parser.add_argument("--stop-after-steps", type=int, default=None, metavar="N",
                        help="save and exit after optimiser step N (continue later with --resume)")
    parser.add_argument("--inject-fault", action="append", default=[], metavar="KIND:PHASE:N[@R]",
                        help="testing: simulate oom:train:N, oom:val:N (out of memory on the Nth forward pass of "
                             "the phase) or nan:train:N (NaN loss); @R: on the process of rank R only (torchrun); "
                             "repeatable")
    args = parser.parse_args(argv)
    try:
        faults = FaultInjection.parse(args.inject_fault)
    except ValueError as e:
        parser.error(str(e))
    try:
        cfg = load_config(args.config, args.overrides)
        summary = train(cfg, resume=args.resume, stop_after_steps=args.stop_after_steps, faults=faults)
    except INPUT_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is intact; continue with --resume", file=sys.stderr)
        return 130
    if not summary["stopped_early"] and os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks
        print(f"best validation by {summary['best_by']}: epoch {summary['best_epoch']}, exact match "
              f"{summary['best_exact_match']:.4f}, loss {summary['best_loss']:.4f}; "
              f"baselines: " + ", ".join(f"{k} {v['exact_match']:.4f}" for k, v in summary["baselines"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
