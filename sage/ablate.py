"""Ablations: train every arm of an experiment for every seed, then put the arms side by side.

    python -m sage.ablate --config configs/kd_oracle.yaml \\
        --arm distill.weight=0 --arm distill.weight=1 --seeds 0,1,2

An arm is one or more `key=value` overrides of the config, separated by spaces (quote them:
--arm "distill.weight=1 teacher.noise=0.5"); `--set` overrides apply to every arm. Each arm and
seed is a normal training run (sage/training.py) named `<name>-<arm>-s<seed>`, with its own
checkpoints and logs; `run.seed` is the seed, so it sets the held-out split, the initial weights
and the data order, which the arms of one seed share. A run that finished is reused and one that
stopped is resumed, so rerunning the same command after a crash only trains what is missing; a
run of that name trained with other settings (other --set values) is refused, never mixed in.

Then it writes, under reports/ablations/<name>/:

    ablation.md     one row per arm: held-out exact match, output size, pixels and feature cosine of
                    the last validation, mean and spread (std, min..max) over seeds; the paired
                    difference in exact match from the first arm; the baselines of the same tasks
    ablation.json   the same, and every run's figures
    exact_match.png held-out exact match against steps, one line per arm (mean) with its min..max band
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from sage.checkpoint import CHECKPOINT_META
from sage.config import ExperimentConfig, load_config
from sage.errors import INPUT_ERRORS, CheckpointError, ConfigError, TrainingError
from sage.files import read_json
from sage.runlog import read_metrics

METRICS = {  # column -> key of the epoch record in metrics.jsonl
    "exact": "val_exact_match",
    "size": "val_size_accuracy",
    "pixel": "val_pixel_accuracy",
    "feature cosine": "val_feature_cosine",
}


@dataclass
class Arm:
    label: str  # as given on the command line
    overrides: list[str]

    @property
    def slug(self) -> str:
        """The arm in a run name: its overrides joined by '+', no path separators."""
        return "+".join(self.overrides).replace("/", "_").replace(" ", "_") or "base"


def parse_arm(text: str) -> Arm:
    overrides = shlex.split(text)
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"--arm {text!r}: {bad[0]!r} is not key.path=value (e.g. --arm distill.weight=0)")
    return Arm(text, overrides)


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: expected integers separated by commas, e.g. 0,1,2")
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: expected distinct integers, e.g. 0,1,2")
    return seeds


def run_config(config: str, name: str, arm: Arm, seed: int, common: Sequence[str]) -> ExperimentConfig:
    return load_config(config, [*common, *arm.overrides, f"run.seed={seed}", f"run.name={name}-{arm.slug}-s{seed}"])


def finished_epochs(cfg: ExperimentConfig) -> int | None:
    """Epochs the run's `last` checkpoint has completed (None: no checkpoint yet). A run of that name
    trained with another config (e.g. other --set values) is refused: reusing it would mix experiments."""
    meta_path = Path(cfg.run.checkpoint_dir) / cfg.run.name / "last" / "meta.json"
    if not meta_path.is_file():
        return None
    meta = read_json(meta_path, CHECKPOINT_META, keys=("config", "train_state"))
    saved, wanted = meta.get("config", {}), cfg.to_dict()
    differ = [f"{section}.{key}" for section, values in wanted.items() for key, value in values.items()
              if saved.get(section, {}).get(key) != value]
    if differ:
        raise CheckpointError(f"{meta_path.parent}: run '{cfg.run.name}' exists but was trained with other settings "
                              f"({', '.join(differ[:4])}); give this ablation another --name, or delete that run")
    return int(meta["train_state"]["epoch"])


def train_or_reuse(cfg: ExperimentConfig, log: Any = print) -> str:
    """Train the run, resume it, or reuse it when it has finished; returns which it did."""
    from sage.training import train  # torch: only once arguments are checked

    done = finished_epochs(cfg)
    if done is not None and done >= cfg.train.epochs:
        return "reused"
    started = time.time()
    train(cfg, resume=done is not None, echo=False)
    took = time.time() - started
    log(f"  {cfg.run.name}: {'resumed and finished' if done is not None else 'trained'} in {took:.0f}s")
    return "resumed" if done is not None else "trained"


def run_figures(cfg: ExperimentConfig) -> dict[str, Any]:
    """A finished run's validation curve, last validation and baselines, from its metrics.jsonl."""
    path = Path(cfg.run.log_dir) / cfg.run.name / "metrics.jsonl"
    records = read_metrics(path)
    epochs = [r for r in records if r.get("event") == "epoch" and "val_exact_match" in r]
    starts = [r for r in records if r.get("event") == "start"]
    if not epochs or not starts:
        raise CheckpointError(f"{path}: no validation was recorded; delete the run's directories and rerun")
    last = epochs[-1]
    return {
        "run": cfg.run.name,
        "seed": cfg.run.seed,
        "steps": last["step"],
        "seconds": sum(r.get("seconds", 0.0) for r in epochs),
        "last": {column: last.get(key) for column, key in METRICS.items()},
        "curve": [[r["step"], r["val_exact_match"]] for r in epochs],
        "baselines": {name: b["exact_match"] for name, b in starts[0]["baselines"].items()},
    }


def spread(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def summarise(arms: Sequence[Arm], runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per arm: mean and spread over seeds of each metric, and the paired exact-match difference
    from the first arm (same seeds, so the same held-out tasks and initial weights)."""
    first = {r["seed"]: r["last"]["exact"] for r in runs[arms[0].label]}
    rows = []
    for arm in arms:
        arm_runs = runs[arm.label]
        row = {"arm": arm.label, "seeds": [r["seed"] for r in arm_runs], "steps": arm_runs[0]["steps"]}
        for column in METRICS:
            row[column] = spread([r["last"][column] for r in arm_runs if r["last"][column] is not None])
        row["exact_gain"] = spread([r["last"]["exact"] - first[r["seed"]] for r in arm_runs if r["seed"] in first])
        best_baseline = [max(r["baselines"].values()) for r in arm_runs]
        row["best_baseline_exact"] = spread(best_baseline)
        rows.append(row)
    return rows


def _cell(s: dict[str, float] | None, signed: bool = False) -> str:
    if s is None:
        return "-"
    mean = f"{s['mean']:+.3f}" if signed else f"{s['mean']:.3f}"
    if s["n"] == 1:
        return mean
    low, high = (f"{s['min']:+.3f}", f"{s['max']:+.3f}") if signed else (f"{s['min']:.3f}", f"{s['max']:.3f}")
    return f"{mean} ± {s['std']:.3f} ({low}..{high})"


def markdown(name: str, config: str, common: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        f"# Ablation {name}",
        "",
        f"Config `{config}`" + (f" with `--set {' '.join(common)}`" if common else "") + ". Held-out tasks "
        "(validation split by task), last validation of each run; mean ± std (min..max) over seeds. "
        f"Gain: exact match minus the first arm's ({rows[0]['arm']}), same seed.",
        "",
        "| arm | seeds | steps | exact | gain | size | pixel | feature cosine | best baseline exact |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| `{r['arm']}` | {len(r['seeds'])} | {r['steps']} | {_cell(r['exact'])} | "
                     f"{_cell(r['exact_gain'], signed=True)} | {_cell(r['size'])} | {_cell(r['pixel'])} | "
                     f"{_cell(r['feature cosine'])} | {_cell(r['best_baseline_exact'])} |")
    return "\n".join(lines) + "\n"


def plot(arms: Sequence[Arm], runs: dict[str, list[dict[str, Any]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm in arms:
        curves = [dict(map(tuple, r["curve"])) for r in runs[arm.label]]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        values = [[c[s] for c in curves] for s in steps]
        means = [statistics.fmean(v) for v in values]
        line, = ax.plot(steps, means, marker="o", label=f"{arm.label} (n={len(curves)})")
        if len(curves) > 1:  # the spread over seeds
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=line.get_color(),
                            alpha=0.2)
    baseline = max(max(r["baselines"].values()) for rs in runs.values() for r in rs)
    ax.axhline(baseline, color="grey", linestyle="--", linewidth=1, label=f"best baseline (up to {baseline:.3f})")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("held-out exact match")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ablate(config: str, arms: Sequence[Arm], seeds: Sequence[int], common: Sequence[str] = (),
           name: str | None = None, out_dir: str | Path = "reports/ablations", log: Any = print) -> dict[str, Any]:
    """Train (or reuse) every arm x seed, then write the table, JSON and plot; returns the JSON record."""
    name = name or Path(config).stem
    labels = [a.label for a in arms]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--arm: the same arm is given twice ({labels})")
    # Every config first: a bad key fails before minutes of training.
    configs = {(arm.label, seed): run_config(config, name, arm, seed, common) for arm in arms for seed in seeds}
    total = len(configs)
    started = time.time()
    for i, ((label, seed), cfg) in enumerate(configs.items(), 1):
        log(f"[{i}/{total}] arm {label}, seed {seed}: run {cfg.run.name}")
        train_or_reuse(cfg, log)
    runs = {arm.label: [run_figures(configs[arm.label, seed]) for seed in seeds] for arm in arms}
    rows = summarise(arms, runs)
    out = Path(out_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    record = {"name": name, "config": config, "set": list(common), "seeds": list(seeds), "arms": rows,
              "runs": runs, "seconds": round(time.time() - started, 1)}
    (out / "ablation.json").write_text(json.dumps(record, indent=1))
    (out / "ablation.md").write_text(markdown(name, config, common, rows))
    plot(arms, runs, out / "exact_match.png", f"{name}: held-out exact match")
    log(markdown(name, config, common, rows))
    log(f"wrote {out / 'ablation.md'}, {out / 'ablation.json'} and {out / 'exact_match.png'} "
        f"({record['seconds']:.0f}s)")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", required=True, help="experiment YAML every arm starts from")
    parser.add_argument("--arm", action="append", required=True, metavar="OVERRIDES",
                        help='one arm: key=value overrides separated by spaces (repeat for each arm; at least one)')
    parser.add_argument("--seeds", type=parse_seeds, default=[0], help="comma-separated run seeds (default 0)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override applied to every arm (repeatable)")
    parser.add_argument("--name", help="ablation name: run-name prefix and report directory (default: config stem)")
    parser.add_argument("--out", default="reports/ablations", help="where the report directory goes")
    args = parser.parse_args(argv)
    try:
        arms = [parse_arm(a) for a in args.arm]
        ablate(args.config, arms, args.seeds, args.set, args.name, args.out)
    except (*INPUT_ERRORS, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
