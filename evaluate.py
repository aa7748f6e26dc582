"""Score a SAGE checkpoint on ARC tasks it never saw, beside trivial baselines and against GR00T N1.5.

    python evaluate.py --checkpoint checkpoints/<run>/best                  # ARC-AGI-1 evaluation
    python evaluate.py --checkpoint checkpoints/<run>/best --split holdout  # the run's held-out tasks
    python evaluate.py --checkpoint ... --views 1 --speed-tasks 0           # fastest: no voting, no timing
    python evaluate.py --checkpoint checkpoints/arc_cpu/best --ttt --max-grid-side 10  # + test-time training

Writes reports/<run>/<checkpoint>-<split>/ (or --out): submission.json (ARC Prize format),
report.json, report.md, per_task.csv, pictures/, training_curves.png. Scoring is the official ARC
Prize rule (pass@2 per test output, averaged per task, then over tasks); see sage/evaluation.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # sage is imported once the command line is parsed: --help stays quick
    from sage.evaluation import EvalSettings, EvaluationResult


def default_out(checkpoint: str, split: str) -> Path:
    ckpt = Path(checkpoint).resolve()
    path = Path(split).expanduser()
    slug = path.resolve().name if path.is_dir() else path.stem if path.is_file() else split.replace("/", "_")
    return Path("reports") / ckpt.parent.name / f"{ckpt.name}-{slug}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from sage.errors import INPUT_ERRORS, EvaluationError
    from sage.evaluation import evaluate
    from sage.report import check_out_dir, write_report

    settings = eval_settings(args)
    out = Path(args.out) if args.out else default_out(args.checkpoint, args.split)
    finished = out / "finished_tasks"
    try:
        if args.batch_size is not None and args.batch_size < 1:
            raise EvaluationError(f"--batch-size must be >= 1, got {args.batch_size}")
        check_out_dir(out)  # before any work: a folder it may not write to fails now, not at the end
        result = evaluate(args.checkpoint, settings, progress=not args.no_progress, finished_dir=finished,
                          resume=args.resume)
        files = write_report(result, out, pictures=args.pictures)  # replaces the folder, finished_tasks/ too
    except INPUT_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: the tasks finished so far are kept in {finished}; continue with the same command "
              "and --resume", file=sys.stderr)
        return 130
    print(score_line(result, args.split))
    print(f"report: {files['report_md']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory, e.g. checkpoints/quickstart/best")
    parser.add_argument("--split", default="arc-agi-1/evaluation",
                        help="arc-agi-{1,2}/{training,evaluation}, a directory of ARC JSON tasks, a Kaggle "
                             "*_challenges.json (its *_solutions.json beside it), or 'holdout' "
                             "(the run's held-out validation tasks); default arc-agi-1/evaluation")
    parser.add_argument("--views", type=int, default=8, help="augmented views voted over per test input (default 8)")
    parser.add_argument("--rank", default="votes", choices=["votes", "likelihood"],
                        help="attempts: the grids most views predicted (default), or those with the highest "
                             "log-likelihood summed over the views; the report scores both")
    parser.add_argument("--seed", type=int, default=0, help="seed of the views' colour permutations")
    parser.add_argument("--batch-size", type=int, default=None, help="examples per forward pass (default val.batch_size)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N tasks (a quick look)")
    parser.add_argument("--speed-tasks", type=int, default=None, metavar="N",
                        help="tasks timed for student vs teacher backbone (0: skip; default 3 on a GPU, 1 on a CPU, "
                             "where the full-size backbone takes minutes per task)")
    parser.add_argument("--speed-teacher", default="groot-n1.5", choices=["groot-n1.5", "groot-n1.5-tiny"],
                        help="teacher architecture timed (default the full-size GR00T N1.5 backbone)")
    parser.add_argument("--teacher-probe", default=None, metavar="CHECKPOINT",
                        help="a probe checkpoint (GR00T features + trained head) to score beside the student")
    parser.add_argument("--feature-cache-dir", default=None,
                        help="where the teacher feature cache lives (default: the run's teacher.cache_dir)")
    parser.add_argument("--extract-features", action="store_true",
                        help="extract the split's teacher features with the run's teacher when they are not cached "
                             "(needed for feature fidelity and the probe; the tiny teacher takes a few minutes on a CPU)")
    parser.add_argument("--ttt", action="store_true",
                        help="also score the checkpoint after test-time training on each task's demonstrations "
                             "(its config's ttt: section; the report shows both)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="ttt.KEY=VALUE",
                        help="override a ttt setting of the checkpoint's config (repeatable), e.g. --set ttt.steps=100")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="answer tasks in N processes, each with its share of the CPU threads (on a small "
                             "CPU model, 1-thread processes use the cores better than one multi-thread one); "
                             "default 1")
    parser.add_argument("--precision", default=None, choices=["auto", "bf16", "fp16", "fp32"],
                        help="autocast for prediction (student and probe) and test-time training (default: each "
                             "checkpoint's run.precision; fp32 on a CPU without bf16 hardware)")
    parser.add_argument("--max-grid-side", type=int, default=None, metavar="N",
                        help="only the tasks whose every grid is at most N x N (e.g. 10 on a CPU)")
    parser.add_argument("--pictures", type=int, default=12, help="tasks drawn as PNG (default 12)")
    parser.add_argument("--out", default=None, help="output folder (default reports/<run>/<checkpoint>-<split>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--resume", action="store_true",
                        help="continue an evaluation that was killed or crashed: the tasks it finished (kept in "
                             "<out>/finished_tasks/) are not answered again; the command must be the same")
    return parser


def eval_settings(args: argparse.Namespace) -> EvalSettings:
    from sage.evaluation import EvalSettings

    return EvalSettings(
        split=args.split, views=args.views, rank=args.rank, seed=args.seed, batch_size=args.batch_size, device=args.device,
        limit=args.limit, speed_tasks=args.speed_tasks, speed_teacher=args.speed_teacher,
        feature_cache_dir=args.feature_cache_dir, extract_features=args.extract_features,
        teacher_probe=args.teacher_probe, ttt=args.ttt, ttt_overrides=args.overrides,
        max_grid_side=args.max_grid_side, workers=args.workers, precision=args.precision,
    )


def score_line(result: EvaluationResult, split: str) -> str:
    """The student's ARC Prize score (and after test-time training, if run) beside the baselines'."""
    s = result.systems["student"].summary
    tuned = result.systems.get("student_ttt")
    return (f"ARC Prize score (pass@2) {s['arc_prize_score']:.4f} on {s['tasks']} tasks of {split} "
            f"({s['tasks_solved_count']} fully solved)"
            + (f"; with test-time training {tuned.summary['arc_prize_score']:.4f} "
               f"({tuned.summary['tasks_solved_count']} fully solved)" if tuned else "") + "; baselines: "
            + ", ".join(f"{k} {result.systems[k].summary['arc_prize_score']:.4f}"
                        for k in ("copy_input", "most_frequent_colour", "all_zeros")))


if __name__ == "__main__":
    sys.exit(main())
