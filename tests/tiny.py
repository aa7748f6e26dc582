"""What several test files share: the tiny run configs, task and report helpers, the independent
cross-checks (ARC Prize scoring, overlap), and `run_main`, which runs an entry script's main(argv)
in this process. The tiny runs trained once for the whole session are in tests/conftest.py."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file

from sage.arc import Augmentation, Pair, Task
from sage.config import load_config
from sage.overlap import DEMONSTRATIONS, TEST_INPUT, WHOLE_TASK
from sage.runlog import read_metrics
from sage.synthetic import generate_tasks

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"

# ----------------------------------------------------------------------------- tiny runs of configs/smoke.yaml

TINY = [
    "data.train=synthetic", "data.synthetic.num_tasks=60", "data.val_fraction=0.2",
    "data.max_context_tokens=108", "model.grid_size=5", "model.max_demos=3", "model.d_model=32",
    "model.encoder_layers=1", "model.decoder_layers=1", "model.teacher_dim=16", "model.distill_hidden=16",
    "train.epochs=2", "train.batch_size=8", "train.warmup_steps=3", "train.log_every=2", "train.lr=1e-3",
    "val.batch_size=16", "checkpoint.every_epochs=1", "run.device=cpu",
]

# TINY distilling the tiny GR00T teacher (64-d features); shards of 64 entries make a cache of several shards.
DISTIL = ["distill.weight=0.5", "model.teacher_dim=64", "teacher.shard_entries=64", "teacher.batch_size=8"]
DISTILLED = "distilled"  # the run name of conftest.py's `distilled_run`
PROBE = ["model.kind=probe", "distill.weight=0", "data.augment=false"]  # a probe on the same tasks and cache


def tiny_overrides(tmp_path, name, *extra):
    """TINY for run `name`, writing checkpoints and logs under tmp_path; `extra` overrides win."""
    return TINY + [f"run.checkpoint_dir={tmp_path / 'checkpoints'}", f"run.log_dir={tmp_path / 'logs'}",
                   f"run.name={name}", *extra]


def tiny_config(tmp_path, name, *extra):
    return load_config(SMOKE, tiny_overrides(tmp_path, name, *extra))


def tiny_command(tmp_path, name, *extra):
    """The same run as train_sage.py's command line: [python, train_sage.py, --config, ..., --set, ...]."""
    return [sys.executable, str(REPO / "train_sage.py"), *tiny_argv(tmp_path, name, *extra)]


def tiny_argv(tmp_path, name, *extra):
    """tiny_command's arguments after the script: what train_sage.main takes."""
    return ["--config", str(SMOKE), *[a for o in tiny_overrides(tmp_path, name, *extra) for a in ("--set", o)]]


def distilled_overrides(root, name=DISTILLED, *extra):
    """conftest.py's `distilled_run` under `root` (one epoch of TINY + DISTIL, its teacher cache in
    root/features): resuming it, or a copy of it, takes exactly these."""
    return tiny_overrides(root, name, *DISTIL, "train.epochs=1", f"teacher.cache_dir={root / 'features'}", *extra)


def adam_steps(checkpoint: Path) -> set[int]:
    """The optimiser's step count of every parameter in a checkpoint: the updates actually applied."""
    state = torch.load(checkpoint / "training_state.pt", weights_only=True)["optimizer"]["state"]
    return {int(s["step"]) for s in state.values()}


def epoch_records(log_dir):
    return [{k: v for k, v in r.items() if k not in ("time", "seconds")}
            for r in read_metrics(Path(log_dir) / "metrics.jsonl") if r["event"] == "epoch"]


def check_best_and_epoch_checkpoints(run: Path, logs: Path, summary: dict, best_by: str = "exact_match") -> None:
    """Each checkpoint holds what metrics.jsonl says of its epoch: epoch_N's meta the validation
    metrics and step of epoch N; best/ the epoch with the highest validation exact match (ties: the
    lower validation loss, then the earlier epoch), or by best_by "loss" the lowest validation loss
    (ties: the higher exact match, then the earlier epoch), with that epoch's weights; the summary
    names it."""
    records = epoch_records(logs)
    assert [r["epoch"] for r in records] == list(range(1, len(records) + 1)) and records[-1]["step"] == summary["step"]
    assert records == sorted(records, key=lambda r: r["step"]) and len({r["step"] for r in records}) == len(records)
    for r in records:
        meta = json.loads((run / f"epoch_{r['epoch']}" / "meta.json").read_text())
        assert meta["train_state"]["step"] == r["step"] and meta["train_state"]["epoch"] == r["epoch"]
        assert meta["val_metrics"] == {k[len("val_"):]: v for k, v in r.items() if k.startswith("val_")}, r["epoch"]
    def rank(r: dict) -> tuple[float, float]:
        return (-r["val_loss"], r["val_exact_match"]) if best_by == "loss" else (r["val_exact_match"], -r["val_loss"])

    best = records[0]
    for r in records[1:]:
        if rank(r) > rank(best):
            best = r
    assert (summary["best_epoch"], summary["best_exact_match"]) == (best["epoch"], best["val_exact_match"])
    assert summary["best_by"] == best_by and summary["best_loss"] == best["val_loss"]
    meta = json.loads((run / "best" / "meta.json").read_text())
    assert meta["train_state"]["epoch"] == meta["train_state"]["best_epoch"] == best["epoch"]
    assert meta["train_state"]["best_exact"] == meta["val_metrics"]["exact_match"] == best["val_exact_match"]
    assert meta["val_metrics"]["loss"] == best["val_loss"]
    weights = load_file(run / "best" / "model.safetensors")
    same_epoch = load_file(run / f"epoch_{best['epoch']}" / "model.safetensors")
    assert weights.keys() == same_epoch.keys() and all(torch.equal(weights[k], same_epoch[k]) for k in weights)


# ----------------------------------------------------------------------------- tiny runs of configs/kd_oracle.yaml

ORACLE_TINY = [
    "data.synthetic.num_tasks=60", "data.synthetic.seed=3", "data.synthetic.min_side=2", "data.val_fraction=0.25",
    "model.d_model=32", "model.encoder_layers=1", "model.decoder_layers=1", "model.distill_hidden=32",
    "train.epochs=1", "train.batch_size=16", "train.warmup_steps=2", "val.batch_size=32", "run.device=cpu",
]

# ----------------------------------------------------------------------------- tasks and files


def unseen_tasks() -> list[Task]:
    """6 synthetic tasks no tiny run trained on (3 up to 4x4, 3 of 4x4 to 5x5): what test-time
    training tunes on in tests/test_ttt.py and tests/test_task_batched_ttt.py."""
    return [t for seed, side in ((7, 4), (8, 5)) for t in generate_tasks(
        num_tasks=3, seed=seed, transforms=["recolour", "flip_lr"], min_side=side - 1, max_side=side, demos=3)]


def write_tasks(tasks: Sequence[Task], directory: Path) -> Path:
    """The tasks as a directory of ARC JSON files (the official format): what data.train or --split may name."""
    directory.mkdir(parents=True)
    for t in tasks:
        obj = {part: [{"input": p.input.tolist(), "output": p.output.tolist()} for p in getattr(t, part)]
               for part in ("train", "test")}
        (directory / f"{t.id}.json").write_text(json.dumps(obj))
    return directory


def tree_fingerprint(root: Path) -> dict[str, str]:
    """Content hash of every file under root."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- independent cross-checks


def independent_arc_prize_score(submission: dict, solutions: dict) -> float:
    """ARC Prize scoring written from the rules, sharing no code with sage.metrics: per test output,
    solved if attempt_1 or attempt_2 equals the target list exactly; task = fraction solved;
    score = mean over the tasks of `solutions`."""
    total = 0.0
    for task_id, targets in solutions.items():
        answers = submission.get(task_id, [])
        solved = 0
        for i, target in enumerate(targets):
            if i < len(answers) and target in (answers[i].get("attempt_1"), answers[i].get("attempt_2")):
                solved += 1
        total += solved / len(targets)
    return total / len(solutions)


def transformed(pair: Pair, dihedral: int) -> Pair:
    aug = Augmentation(dihedral)
    return Pair(aug.apply(pair.input), aug.apply(pair.output))


def repackaged(task: Task, dihedral: int = 0) -> Task:
    """HRM/TRM style: the task's demonstrations (transformed) as a training task of their own."""
    pairs = tuple(transformed(p, dihedral) for p in task.train)
    return Task(f"trm-{task.id}", pairs[:-1], pairs[-1:], "repackaged")


def naive_overlap(training: list[Task], evaluated: list[Task]) -> dict[str, str]:
    """{task: kind} by comparing arrays directly (no hashing): the cross-check of find_overlap."""
    pairs = [p for t in training for p in t.train + t.test]
    inputs = [p.input for p in pairs]

    def seen(pair: Pair) -> bool:
        return any(np.array_equal(transformed(pair, d).input, q.input)
                   and np.array_equal(transformed(pair, d).output, q.output) for q in pairs for d in range(8))

    def seen_input(grid: np.ndarray) -> bool:
        return any(np.array_equal(Augmentation(d).apply(grid), g) for g in inputs for d in range(8))

    ids, kinds = {t.id for t in training}, {}
    for t in evaluated:
        if t.id in ids or any(seen(p) for p in t.test):
            kinds[t.id] = WHOLE_TASK
        elif any(seen(p) for p in t.train):
            kinds[t.id] = DEMONSTRATIONS
        elif any(seen_input(p.input) for p in t.test):
            kinds[t.id] = TEST_INPUT
    return kinds


# ----------------------------------------------------------------------------- entry scripts in this process


def run_main(main: Callable[[list[str]], int | None], argv: Sequence[object]) -> int:
    """An entry script's `main(argv)` (train_sage, evaluate, sage.ablate, ...) run in this process
    instead of `python script.py argv`: the exit status its `sys.exit(main())` would give (argparse's
    SystemExit included). What a run may change in the process is put back afterwards: the global
    random generators, torch's thread count, the working directory and the root logger's handlers.
    Read its output with capsys. Keep one real command line per script in a subprocess."""
    state = (torch.get_rng_state(), np.random.get_state(), random.getstate(), torch.get_num_threads(),
             os.getcwd(), logging.root.handlers[:], logging.root.level)
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    finally:
        torch.set_rng_state(state[0])
        np.random.set_state(state[1])
        random.setstate(state[2])
        if torch.get_num_threads() != state[3]:
            torch.set_num_threads(state[3])
        os.chdir(state[4])
        logging.root.handlers[:] = state[5]
        logging.root.setLevel(state[6])
    if code is None:
        return 0
    return code if isinstance(code, int) else 1  # sys.exit("message"): status 1, as the interpreter gives
