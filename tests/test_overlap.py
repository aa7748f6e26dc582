"""Overlap between training data and a scored split, pair by pair (sage/overlap.py), on real ARC data:
demonstrations repackaged under new ids (HRM/TRM), reordered pairs, rotated test pairs, refusals."""

import time

import numpy as np
import pytest
from tiny import REPO, naive_overlap, repackaged, transformed, write_tasks

from sage.arc import Pair, Task
from sage.config import load_config
from sage.datasets import load_dataset
from sage.errors import ARCDataError
from sage.overlap import DEMONSTRATIONS, TEST_INPUT, WHOLE_TASK, drop_trained_tasks, find_overlap
from sage.splits import load_splits, make_datasets, scored_tasks

EVAL = "arc-agi-1/evaluation"
JOINED = REPO / "configs" / "arc_joined_fp32.yaml"  # no teacher


@pytest.fixture(scope="module")
def arc1():
    return load_dataset("arc-agi-1/training"), load_dataset(EVAL)


def unshared(evaluation: list[Task]) -> list[Task]:
    """The evaluation tasks besides 070dd51e (= training task 40853293)."""
    return [t for t in evaluation if t.id != "070dd51e"]


def test_arc_agi_1_training_vs_evaluation_shares_one_task_and_is_fast(arc1):
    train, evaluation = arc1
    started = time.perf_counter()
    overlap = find_overlap(train, evaluation)
    assert time.perf_counter() - started < 3.0  # 0.3 s measured on a 2-core CPU
    assert [(o.task, o.kinds, o.training_tasks, o.pairs) for o in overlap] == [
        ("070dd51e", (WHOLE_TASK,), ("40853293",), ("train 0", "train 1", "test 0"))]
    kept, left_out, shared = drop_trained_tasks(train, evaluation, "evaluation")  # the default protocol runs
    assert len(kept) == 399 and [o.task for o in left_out] == ["070dd51e"] and shared == []
    # The other way round, one test input is a training input with another output: named, not left out.
    reverse = {o.task: o for o in find_overlap(evaluation, train)}
    assert reverse["91413438"].kinds == (TEST_INPUT,) and reverse["91413438"].training_tasks == ("6ea4a07e",)
    assert len(drop_trained_tasks(evaluation, train, "evaluation")[0]) == 399


def test_repackaged_demonstrations_are_scored_and_stated(arc1, tmp_path):
    """(a) TRM: evaluation demonstrations as new tasks under new ids, some rotated or transposed."""
    train, evaluation = arc1
    chosen = unshared(evaluation)[:20]
    extra = [repackaged(t, dihedral=i % 8) for i, t in enumerate(chosen)]
    overlap = find_overlap(train + extra, evaluation)
    kept, left_out, shared = drop_trained_tasks(train + extra, evaluation, "evaluation")
    assert [o.task for o in left_out] == ["070dd51e"] and len(kept) == 399
    assert {o.task: o.kind for o in shared} == {t.id: DEMONSTRATIONS for t in chosen}
    assert all(o.training_tasks == (f"trm-{o.task}",) for o in shared)
    assert {o.task: o.kind for o in overlap} == naive_overlap(train[:20] + extra, chosen) | {"070dd51e": WHOLE_TASK}

    # The same through training's splits and evaluation's protocol record.
    directory = write_tasks(train[:20] + extra, tmp_path / "trm")
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [f"data.train={directory}", f"data.val={EVAL}"])
    splits = load_splits(cfg)
    assert len(splits.val) == 400 and splits.shared == {} and {o.task for o in splits.overlap} == {t.id for t in chosen}
    tasks, protocol = scored_tasks(cfg, {}, EVAL)
    assert len(tasks) == protocol["tasks_scored"] == 400
    assert protocol["evaluation_tasks_trained_on"] == 20 and protocol["evaluation_demonstrations_trained_on"]
    assert {x["task"] for x in protocol["evaluation_overlap"]} == {t.id for t in chosen}
    assert protocol["evaluation_overlap"][0]["kind"] == DEMONSTRATIONS


def test_reordered_pairs_under_another_id_are_left_out(arc1):
    """(b) the same task, pairs in another order (a test pair now a demonstration), another id."""
    train, evaluation = arc1
    task = unshared(evaluation)[5]
    pairs = (task.train + task.test)[::-1]
    copy = Task("copy", pairs[1:], pairs[:1], "reordered")
    overlap = find_overlap(train + [copy], evaluation)
    assert {o.task: (o.kind, o.training_tasks) for o in overlap}[task.id] == (WHOLE_TASK, ("copy",))
    kept, left_out, _ = drop_trained_tasks(train + [copy], evaluation, "evaluation")
    assert {o.task for o in left_out} == {"070dd51e", task.id} and task.id not in {t.id for t in kept}


def test_a_rotated_test_pair_inside_another_task_is_left_out(arc1):
    """(c) one test pair, rotated by 90 degrees, added to the demonstrations of a training task."""
    train, evaluation = arc1
    task, host = unshared(evaluation)[7], train[3]
    rotated = transformed(task.test[0], 1)
    assert not np.array_equal(rotated.input, task.test[0].input)  # 08573cc6: no rotational symmetry
    assert not np.array_equal(rotated.output, task.test[0].output)
    hosted = Task(host.id, host.train + (rotated,), host.test, host.source)
    overlap = {o.task: o for o in find_overlap(train[:3] + [hosted] + train[4:], evaluation)}
    assert overlap[task.id].kinds == (WHOLE_TASK,) and overlap[task.id].pairs == ("test 0",)
    assert overlap[task.id].training_tasks == (host.id,)
    # Input and output rotated differently is another pair: at most the test input is seen.
    odd = Task(host.id, host.train + (Pair(rotated.input, task.test[0].output),), host.test, host.source)
    assert {o.task: o.kind for o in find_overlap([odd], [task])} == {task.id: TEST_INPUT}


def test_more_than_5_percent_trained_test_outputs_is_refused(arc1):
    """(d) evaluation tasks hidden in training under new ids: 20 of 400 (with 070dd51e) is 5%, 21 more."""
    train, evaluation = arc1
    hidden = [Task(f"hidden-{t.id}", t.test, t.train, "hidden") for t in unshared(evaluation)[:20]]
    assert len(drop_trained_tasks(train + hidden[:19], evaluation, "evaluation")[1]) == 20  # 5%: allowed
    with pytest.raises(ARCDataError, match=r"21 of the 400 evaluation tasks .*more than 5%; e\.g\. 00576224 "
                                           r"\(whole task: .*training hidden-00576224\)"):
        drop_trained_tasks(train + hidden[:20], evaluation, "evaluation")
    with pytest.raises(ARCDataError, match="376 of the 400 validation tasks .*'00576224' is also a training task"):
        drop_trained_tasks(load_dataset("arc-agi-2/training"), evaluation, "validation")


def test_several_training_datasets_join_and_drop_what_the_scored_split_shares(arc1, tmp_path):
    """data.train "a+b" takes a's tasks, then b's whose ids a lacks; data.exclude drops every training
    task that shares a pair (any dihedral transform) or a test input with the excluded split, so that
    ARC-AGI-2 training, which holds most ARC-AGI-1 evaluation tasks, can pretrain a student scored
    on them. Without data.exclude the same join would hold them."""
    from sage.config import DataConfig
    from sage.datasets import training_tasks

    train, evaluation = arc1
    joined = DataConfig(train="arc-agi-1/training+arc-agi-2/training")
    given = training_tasks(joined)
    assert [t.id for t in given.tasks[:400]] == [t.id for t in train]  # the first dataset first, whole
    assert len({t.id for t in given.tasks}) == len(given.tasks) and len(given.repeated) == 391
    with pytest.raises(ARCDataError, match="376 of the 400 evaluation tasks"):  # unexcluded, no held-out set
        drop_trained_tasks(given.tasks, evaluation, "evaluation")
    clean = training_tasks(DataConfig(train=joined.train, exclude=EVAL))
    assert find_overlap(clean.tasks, evaluation) == []
    assert "40853293" in clean.dropped and len(clean.dropped) == 377 and len(clean.tasks) == 632
    assert "377 tasks dropped that share a pair or a test input with 376 of its tasks" in clean.describe(
        DataConfig(train=joined.train, exclude=EVAL))
    # Directories join the same way: a repeated id keeps the first dataset's task.
    first, second = write_tasks(train[:3], tmp_path / "a"), write_tasks(train[2:5], tmp_path / "b")
    both = load_dataset(f"{first}+{second}")
    ids = [t.id for t in train[:5]]
    assert [t.id for t in both] == sorted(ids[:3]) + sorted(set(ids[3:]))
    assert next(t for t in both if t.id == ids[2]).source.startswith(str(first))


def test_demonstrations_of_pretrains_on_the_demonstrations_never_the_test_pairs(arc1):
    """data.demonstrations_of (the HRM/TRM protocol as an explicit option): each named task's
    demonstrations become a training task of their own, every demonstration a query in turn; the
    held-out tasks stay the same, none is dropped, and evaluation records the protocol. Without the
    option nothing of theirs is trained on."""
    from sage.datasets import DEMONSTRATIONS_SUFFIX
    from sage.encoding import training_examples

    base = ["data.train=arc-agi-1/training", "data.exclude=''", "data.max_grid_side=10"]
    plain = load_splits(load_config(JOINED, base))
    cfg = load_config(JOINED, [*base, "data.demonstrations_of=holdout"])
    splits = load_splits(cfg)
    assert [t.id for t in splits.val] == [t.id for t in plain.val] and splits.shared == {}
    added = {t.id: t for t in splits.train if t.id.endswith(DEMONSTRATIONS_SUFFIX)}
    assert sorted(added) == sorted(t.id + DEMONSTRATIONS_SUFFIX for t in splits.val)
    for held in splits.val:
        own = added[held.id + DEMONSTRATIONS_SUFFIX]
        assert own.train == held.train and own.test == ()
    # Every demonstration is a query once, with the others as context (no test pair: checked below).
    refs = training_examples(splits.train)
    index = {t.id: i for i, t in enumerate(splits.train)}
    for held in splits.val:
        queries = sorted(r.query for r in refs if r.task_index == index[held.id + DEMONSTRATIONS_SUFFIX])
        assert queries == list(range(len(held.train)))
    # A "*k" suffix counts those examples k times an epoch, the others once.
    once, thrice = (make_datasets(load_config(JOINED, [*base, f"data.demonstrations_of={named}"]), splits)[0]
                    for named in ("holdout", "holdout*3"))
    added_refs = sum(len(t.train) for t in splits.val)
    assert len(once) == len(refs) and len(thrice) == len(refs) + 2 * added_refs
    assert {o.task for o in splits.overlap} == {t.id for t in splits.val}
    assert all(WHOLE_TASK not in o.kinds and DEMONSTRATIONS in o.kinds for o in splits.overlap)
    assert not any(DEMONSTRATIONS in o.kinds for o in find_overlap(plain.train, plain.val))

    # Evaluation rebuilds the same training data and states the protocol; without it, it says no.
    meta = {"val_task_ids": [t.id for t in splits.val]}
    tasks, protocol = scored_tasks(cfg, meta, "holdout")
    assert len(tasks) == len(splits.val) and protocol["evaluation_demonstrations_trained_on"]
    assert protocol["evaluation_tasks_trained_on"] == len(splits.val) and "demonstration pairs of holdout" in \
        protocol["trained_on"]
    assert not scored_tasks(load_config(JOINED, base), meta, "holdout")[1][
        "evaluation_demonstrations_trained_on"]
    # A dataset name adds its tasks within data.max_grid_side; the evaluation split scores them all.
    on_eval = load_config(JOINED, [*base, f"data.demonstrations_of={EVAL}"])
    tasks, protocol = scored_tasks(on_eval, meta, EVAL)
    small = [t for t in arc1[1] if max(max(g.shape) for g in t.grids()) <= 10]
    assert protocol["evaluation_tasks_trained_on"] >= len(small) and len(tasks) == 400  # 070dd51e: over 10x10
    assert {o["task"] for o in protocol["evaluation_overlap"] if DEMONSTRATIONS in o["kinds"]} == {t.id for t in small}


def test_demonstrations_of_refuses_what_it_cannot_honour():
    from sage.errors import ConfigError

    with pytest.raises(ConfigError, match="data.demonstrations_of works without a teacher only"):
        load_config(JOINED, ["data.demonstrations_of=holdout", "distill.weight=0.5"])
    with pytest.raises(ConfigError, match="data.demonstrations_of=holdout needs data.val=holdout"):
        load_config(JOINED, ["data.demonstrations_of=holdout", f"data.val={EVAL}"])
