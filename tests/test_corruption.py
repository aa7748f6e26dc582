"""Every file SAGE writes and reads back survives damage on disk (truncated, overwritten with other
bytes, stripped of what it must hold): the command that reads it exits with status 2 and one line
naming the file and what to do; the damaged file and everything else stay as they were; and doing
what the line says works. One tiny distilled run (checkpoints, logs, a teacher cache of several
shards) and an interrupted evaluation are made once; each test damages a copy."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import DISTILLED, REPO, distilled_overrides, run_main

import evaluate as evaluate_cli
import train_sage
from sage.evaluation import EvalSettings, evaluate

RUN = DISTILLED
EVAL_ARGS = ["--split", "holdout", "--views", "1", "--limit", "3", "--speed-tasks", "0", "--pictures", "0",
             "--no-progress"]


def run_overrides(root: Path) -> list[str]:
    return distilled_overrides(root)


@pytest.fixture(scope="module")
def original(tmp_path_factory, distilled_run) -> Path:
    """A copy of conftest.py's distilled_run, root/checkpoints/distilled/{best,last,epoch_1},
    root/logs/distilled, root/features (4 shards), with root/report/finished_tasks: an evaluation of
    3 held-out tasks killed before its report."""
    root = distilled_run.copy_to(tmp_path_factory.mktemp("original")).root
    settings = EvalSettings(split="holdout", views=1, limit=3, speed_tasks=0)
    evaluate(str(root / "checkpoints" / RUN / "last"), settings, progress=False, log=lambda _: None,
             finished_dir=root / "report" / "finished_tasks")
    assert len(list((root / "features").rglob("part-*.safetensors"))) > 1
    assert len(list((root / "report" / "finished_tasks").glob("*.pt"))) == 3
    return root


@pytest.fixture
def run(original, tmp_path) -> Path:
    """A copy of the original run, to damage."""
    shutil.copytree(original, tmp_path / "run")
    return tmp_path / "run"


def resume(root: Path, capsys, config: Path | None = None) -> tuple[int, str]:
    """train_sage.py --resume on the run under `root` (with `config`: that file as --config)."""
    argv = ["--config", str(config or REPO / "configs" / "smoke.yaml"),
            *[a for o in run_overrides(root) for a in ("--set", o)], "--resume"]
    code = run_main(train_sage.main, argv)
    return code, capsys.readouterr().err


def evaluate_again(checkpoint: Path, out: Path, capsys) -> tuple[int, str]:
    """evaluate.py --resume of the evaluation the fixture left unfinished (its report folder `out`)."""
    code = run_main(evaluate_cli.main, ["--checkpoint", checkpoint, *EVAL_ARGS, "--out", out, "--resume"])
    return code, capsys.readouterr().err


def fingerprint(root: Path) -> dict[str, str]:
    """Content hash of every file under root but train.log (a resumed run appends to it before it fails)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "train.log"}


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def scramble(path: Path) -> None:
    """Bytes of another file where this one was (a bad sector, a misdirected write)."""
    path.write_bytes(b"\xff\xfe\x00\x13damaged" * 40)


def assert_refused(code: int, err: str, path: Path, *says: str) -> None:
    """Exit 2 and one line "error: <path>: ..." that says each of `says`, no traceback."""
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: {path}: ") and all(s in lines[0] for s in says), lines[0]


def damage_then_resume(root: Path, path: Path, damage, capsys, *says: str) -> None:
    """Damage `path`, resume, and check the refusal left every file as it was, the damaged one too."""
    damage(path)
    before = fingerprint(root)
    assert_refused(*resume(root, capsys), path, *says)
    assert fingerprint(root) == before


@pytest.mark.parametrize("name, damage, says, evaluated", [
    ("model.safetensors", truncate, "cannot read weights: truncated or corrupted", True),
    ("meta.json", scramble, "cannot read the checkpoint's metadata: corrupted, not text", True),
    # Evaluation needs only 'config' and names that key alone (sage/predict.py).
    ("meta.json", lambda p: p.write_text('{"val_metrics": null}'), "lacks 'config', 'train_state'", False),
    ("training_state.pt", scramble, "cannot read training state: corrupted", False),  # not read by evaluation
    ("training_state.pt", lambda p: torch.save({"torch_rng": torch.get_rng_state()}, p), "lacks 'optimizer'", False),
], ids=["weights-truncated", "meta-scrambled", "meta-without-keys", "state-scrambled", "state-without-keys"])
def test_a_damaged_checkpoint_file_is_named_and_the_other_checkpoints_stay(run, capsys, name, damage, says, evaluated):
    checkpoints = run / "checkpoints" / RUN
    path = checkpoints / "last" / name
    damage_then_resume(run, path, damage, capsys, says, "evaluate or resume from another of the run")
    if evaluated:
        assert_refused(*evaluate_again(checkpoints / "last", run / "eval", capsys), path, says)
    # Doing as told: resume from another checkpoint of the run.
    shutil.rmtree(checkpoints / "last")
    shutil.copytree(checkpoints / "epoch_1", checkpoints / "last")
    assert resume(run, capsys)[0] == 0


def test_a_cache_manifest_that_is_not_json_is_named_and_rebuilt_from_the_shards(run, capsys):
    """The bug of issue 40: a traceback (JSONDecodeError), exit 1. The real command line, once (train_sage.py's
    one run as a process besides the kill -9 test's): its exit status 2 and its one line."""
    manifest = next((run / "features").rglob("manifest.json"))
    truncate(manifest)
    shards = {p: p.read_bytes() for p in manifest.parent.rglob("part-*.safetensors")}
    before = fingerprint(run)
    command = [sys.executable, str(REPO / "train_sage.py"), "--config", str(REPO / "configs" / "smoke.yaml"),
               *[a for o in run_overrides(run) for a in ("--set", o)], "--resume"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert_refused(done.returncode, done.stderr, manifest, "cannot read the feature cache's manifest: truncated",
                   "delete this manifest.json and rerun")
    assert fingerprint(run) == before
    manifest.unlink()  # as told: the shards are rescanned, nothing is extracted again
    code, err = resume(run, capsys)
    assert code == 0, err
    assert json.loads(manifest.read_text())["complete"]
    assert {p: p.read_bytes() for p in manifest.parent.rglob("part-*.safetensors")} == shards


def test_a_damaged_cache_shard_is_named_and_only_its_prompts_are_extracted_again(run, capsys):
    cache = next((run / "features").rglob("manifest.json")).parent
    damaged, *others = sorted(cache.rglob("part-*.safetensors"))
    kept = {p: p.read_bytes() for p in others}
    damage_then_resume(run, damaged, truncate, capsys, "truncated or corrupted",
                       "delete it and the cache's manifest.json, then rerun")
    damaged.unlink()  # as told
    (cache / "manifest.json").unlink()
    assert resume(run, capsys)[0] == 0
    assert all(p.read_bytes() == content for p, content in kept.items())
    assert len(list(cache.rglob("part-*.safetensors"))) == len(others) + 1  # the damaged shard's prompts, again


def test_a_damaged_metrics_record_is_named_not_dropped_on_resume(run, capsys):
    metrics = run / "logs" / RUN / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)

    def tear_third_record(path: Path) -> None:
        path.write_text("".join(lines[:2] + [lines[2][:15] + "\n"] + lines[3:]))

    damage_then_resume(run, metrics, tear_third_record, capsys, f"line 3 of {len(lines)} is not a JSON record")
    metrics.write_text("".join(lines[:2] + lines[3:]))  # as told: the damaged line goes
    assert resume(run, capsys)[0] == 0
    assert metrics.read_text() == "".join(lines[:2] + lines[3:])
    # A torn last line (a crash mid-write) is what resuming expects: dropped without a word.
    metrics.write_text("".join(lines) + lines[-1][:15])
    assert resume(run, capsys)[0] == 0 and metrics.read_text() == "".join(lines)


def test_a_damaged_run_config_is_named_when_resumed_from(run, capsys):
    """logs/<run>/config.yaml is the resolved config, a natural --config for --resume."""
    config = run / "logs" / RUN / "config.yaml"
    scramble(config)
    before = fingerprint(run)
    assert_refused(*resume(run, capsys, config=config), config, "cannot read the config: corrupted, not text")
    assert fingerprint(run) == before


def test_a_damaged_finished_task_is_named_and_only_it_is_answered_again(original, run, capsys):
    finished = run / "report" / "finished_tasks"
    damaged, *others = sorted(finished.glob("*.pt"))
    truncate(damaged)
    before = fingerprint(run)
    checkpoint = original / "checkpoints" / RUN / "last"  # the checkpoint the evaluation was made with
    assert_refused(*evaluate_again(checkpoint, run / "report", capsys), damaged, "cannot read a finished task's",
                   "delete this file and rerun with --resume")
    assert fingerprint(run) == before
    damaged.unlink()  # as told
    assert run_main(evaluate_cli.main, ["--checkpoint", checkpoint, *EVAL_ARGS, "--out", run / "report",
                                        "--resume"]) == 0
    assert f"resuming: {len(others)} of 3 tasks already answered" in capsys.readouterr().out


def test_damaged_settings_of_finished_tasks_are_named(original, run, capsys):
    identity = run / "report" / "finished_tasks" / "identity.json"
    truncate(identity)
    before = fingerprint(run)
    assert_refused(*evaluate_again(original / "checkpoints" / RUN / "last", run / "report", capsys), identity,
                   "truncated or corrupted, not valid JSON", "drop --resume")
    assert fingerprint(run) == before
