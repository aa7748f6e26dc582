"""Tiny trained runs shared by the whole session (configs in tests/tiny.py). Each is trained once,
when a test first asks for it, and must stay as it was: a test that writes into a run's folders
(resumes it, damages it, evaluates into them) works on a copy (`TrainedRun.copy_to`). At the end of
the session every shared run is compared byte for byte with what training left; a difference is
reported as an error of the test session naming the files."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from sage.config import load_config
from sage.training import train
from tiny import DISTILLED, PROBE, SMOKE, distilled_overrides, tiny_overrides, tree_fingerprint


@dataclass(frozen=True)
class TrainedRun:
    """A finished training run: root/checkpoints/<name>, root/logs/<name> and (with a teacher)
    root/features, and the summary `train` returned."""

    root: Path
    name: str
    summary: dict

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints" / self.name

    @property
    def logs(self) -> Path:
        return self.root / "logs" / self.name

    @property
    def features(self) -> Path:
        return self.root / "features"

    def copy_to(self, root: Path) -> TrainedRun:
        """The run copied under `root` (made if missing): the copy to resume, damage or write into.
        Its checkpoints' configs still name the original's folders, as a copied run's would."""
        shutil.copytree(self.root, root, dirs_exist_ok=True)
        return replace(self, root=Path(root))


def _shared_run(root: Path, name: str, overrides: list[str]):
    """Train the run, hand it out, and check at the end of the session that nothing changed it."""
    run = TrainedRun(root, name, train(load_config(SMOKE, overrides), echo=False))
    trained = tree_fingerprint(root)
    yield run
    now = tree_fingerprint(root)
    changed = sorted(k for k in trained.keys() | now.keys() if trained.get(k) != now.get(k))
    assert not changed, (f"a test changed the shared run {name!r} ({root}): {changed[:10]}; copy it to "
                         "tmp_path first (TrainedRun.copy_to)")


@pytest.fixture(autouse=True)
def _restore_threads_and_cwd():
    """A test that runs an entry script in this process may leave torch's thread count (e.g.
    benchmarks/ttt_budget.py sets 1, as in evaluate.py's workers) or the working directory changed:
    put back after every test, so the tests after it compute and take the time they would alone."""
    threads, cwd = torch.get_num_threads(), os.getcwd()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if os.getcwd() != cwd:
        os.chdir(cwd)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One epoch of tests/tiny.py's TINY, no teacher: checkpoints/tiny/{best,last,epoch_1}.
    test_recovery (the reference a recovered run must match; a truncated copy), test_ttt (the
    student tuned at test time), test_uncertainty (the evaluation behind its reports)."""
    root = tmp_path_factory.mktemp("tiny_run")
    yield from _shared_run(root, "tiny", tiny_overrides(root, "tiny", "train.epochs=1"))


@pytest.fixture(scope="session")
def two_epoch_run(tmp_path_factory):
    """TINY as it is (two epochs, a checkpoint each): checkpoints/tiny2/{best,last,epoch_1,epoch_2}.
    test_training (artefacts, the straight run an interrupted one must resume to), test_pictures
    (its curves)."""
    root = tmp_path_factory.mktemp("two_epoch_run")
    yield from _shared_run(root, "tiny2", tiny_overrides(root, "tiny2"))


@pytest.fixture(scope="session")
def distilled_run(tmp_path_factory):
    """One epoch of TINY distilling the tiny GR00T teacher (tiny.DISTIL): checkpoints/distilled/
    {best,last,epoch_1} and the teacher's cache of its tasks in features/ (several shards).
    test_evaluate (feature fidelity, the probe's tasks), test_corruption (damaged copies),
    test_recovery (bad input beside a good run and cache)."""
    root = tmp_path_factory.mktemp("distilled_run")
    yield from _shared_run(root, DISTILLED, distilled_overrides(root))


@pytest.fixture(scope="session")
def probe_run(tmp_path_factory, distilled_run):
    """One epoch of a probe (tiny.PROBE) on distilled_run's tasks, reading distilled_run's teacher
    cache: checkpoints/probe/{best,last,epoch_1}. test_evaluate (the teacher probe scored beside the
    student)."""
    root = tmp_path_factory.mktemp("probe_run")
    yield from _shared_run(root, "probe", distilled_overrides(root, "probe", *PROBE,
                                                              f"teacher.cache_dir={distilled_run.features}"))
