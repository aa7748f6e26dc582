"""Which inference canvas decodes the right output size most often: a checkpoint's attempt 1 on a
split, with the answer canvas sized by each rule in turn (never from the answer).

    python -m benchmarks.canvas_rule --checkpoint checkpoints/arc_cpu/best
    python -m benchmarks.canvas_rule --checkpoint checkpoints/arc_cpu/best --split holdout --views 1

Rules: "margin K" = the tallest and widest grid the context shows (demonstration outputs and the
test input) + the EOS border + K cells (sage.encoding.answer_shape; training uses CANVAS_MARGIN);
margin 30 = the whole grid_size x grid_size canvas (what model.answer_canvas: fixed decodes on).
Printed per rule: output size accuracy of attempt 1 and the ARC Prize score.
"""

from __future__ import annotations

import argparse
import sys

import sage.encoding as encoding
from sage.evaluation import EvalSettings, evaluate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--split", default="arc-agi-1/evaluation")
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--margins", default="0,1,2,3,30")
    args = parser.parse_args(argv)
    settings = EvalSettings(split=args.split, views=args.views, speed_tasks=0)
    trained_margin = encoding.CANVAS_MARGIN
    rows = []
    try:
        for margin in [int(m) for m in args.margins.split(",")]:
            encoding.CANVAS_MARGIN = margin  # answer_shape reads it at call time
            result = evaluate(args.checkpoint, settings, progress=False, log=lambda _: None)
            rows.append((f"margin {margin}" if margin < 30 else "whole canvas", result))
    finally:
        encoding.CANVAS_MARGIN = trained_margin
    print(f"inference canvas rules: {args.checkpoint} on {args.split}, {args.views} views "
          f"(trained with margin {trained_margin})")
    for name, result in rows:
        s = result.systems["student"].summary
        print(f"  {name:<12} output size {s['size_accuracy']:7.2%}   exact (pass@2) {s['arc_prize_score']:7.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
