"""Loading, validation, task-level splits and augmentations on real ARC data."""

import json

import numpy as np
import pytest

from sage.arc import Augmentation, fixed_view, load_task_dir, random_augmentation, split_by_task
from sage.datasets import load_dataset
from sage.errors import ARCDataError

GOOD = {"train": [{"input": [[1, 2], [3, 4]], "output": [[4, 3], [2, 1]]}], "test": [{"input": [[0]], "output": [[5]]}]}


def write_task(directory, name, obj):
    path = directory / f"{name}.json"
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def with_grid(grid, part="train", field="input"):
    task = json.loads(json.dumps(GOOD))
    task[part][0][field] = grid
    return task


@pytest.mark.parametrize(
    "task, expected",
    [
        (with_grid([[1, 2], [3]]), r"bad\.json: task 'bad', train pair 0, input: row 1 has 1 cells but row 0 has 2"),
        (with_grid([[1, 10]]), r"train pair 0, input: cell \(0, 1\) is 10, colours must be 0\.\.9"),
        (with_grid([[-1]]), r"cell \(0, 0\) is -1"),
        (with_grid([[1.5]]), r"cell \(0, 0\) is 1\.5, expected an integer"),
        (with_grid([["3"]]), r"cell \(0, 0\) is \"3\", expected an integer"),
        (with_grid([[True]]), r"cell \(0, 0\) is true, expected an integer"),
        (with_grid([[0] * 31]), r"grid is 1x31, ARC grids are at most 30x30"),
        (with_grid([[0]] * 31, "test", "output"), r"test pair 0, output: grid is 31x1"),
        (with_grid([]), r"a grid must be a non-empty list of rows"),
        (with_grid([[]]), r"row 0 must be a non-empty list of cells"),
        (with_grid(7), r"a grid must be a non-empty list of rows, got 7"),
        ({"train": [], "test": GOOD["test"]}, r"'train' must be a non-empty list of pairs"),
        ({"train": GOOD["train"]}, r"'test' must be a non-empty list of pairs, got null"),
        ({"train": [{"input": [[1]]}], "test": GOOD["test"]}, r"train pair 0: demonstration pairs need an 'output'"),
        ([1, 2], r"expected a JSON object with 'train' and 'test', got list"),
        ("{not json", r"bad\.json: not valid JSON"),
    ],
)
def test_malformed_task_gives_one_clear_error(tmp_path, task, expected):
    write_task(tmp_path, "good", GOOD)
    write_task(tmp_path, "bad", task)
    with pytest.raises(ARCDataError, match=expected):
        load_task_dir(tmp_path)


def test_directory_loads_and_test_outputs_may_be_hidden(tmp_path):
    hidden = json.loads(json.dumps(GOOD))
    del hidden["test"][0]["output"]
    write_task(tmp_path, "a", GOOD)
    (tmp_path / "sub").mkdir()
    write_task(tmp_path / "sub", "b", hidden)
    tasks = load_task_dir(tmp_path)
    assert [t.id for t in tasks] == ["a", "b"]
    assert tasks[0].train[0].output.tolist() == [[4, 3], [2, 1]]
    assert tasks[0].train[0].input.dtype == np.uint8
    assert tasks[1].test[0].output is None


def test_missing_directory_and_empty_directory(tmp_path):
    with pytest.raises(ARCDataError, match="no such directory. Name one of arc-agi-1/training"):
        load_dataset(str(tmp_path / "nope"))
    with pytest.raises(ARCDataError, match="no \\*.json task files"):
        load_dataset(str(tmp_path))


def test_duplicate_task_ids_are_refused(tmp_path):
    write_task(tmp_path, "a", GOOD)
    (tmp_path / "sub").mkdir()
    write_task(tmp_path / "sub", "a", GOOD)
    with pytest.raises(ARCDataError, match="task id 'a' appears twice"):
        load_task_dir(tmp_path)


def test_official_datasets_have_documented_sizes():
    train, evaluation = load_dataset("arc-agi-1/training"), load_dataset("arc-agi-1/evaluation")
    assert len(train) == 400 and len(evaluation) == 400
    assert sum(len(t.train) for t in train) == 1302 and sum(len(t.test) for t in train) == 416
    assert sum(len(t.train) for t in evaluation) == 1363 and sum(len(t.test) for t in evaluation) == 419
    assert len(load_dataset("arc-agi-2/evaluation")) == 120
    with pytest.raises(ARCDataError, match="unknown dataset 'arc-agi-1/test'"):
        load_dataset("arc-agi-1/test")


def test_an_official_dataset_is_read_once_and_no_caller_changes_what_the_next_gets():
    first = load_dataset("arc-agi-1/evaluation")
    first.pop()  # a caller's own list
    grid = first[0].train[0].input
    with pytest.raises(ValueError, match="read-only"):
        grid[0, 0] = (int(grid[0, 0]) + 1) % 10
    again = load_dataset("arc-agi-1/evaluation")
    assert len(again) == 400 and again[0] is first[0]  # the same validated tasks, not read again


def test_split_is_by_task_and_deterministic():
    tasks = load_dataset("arc-agi-1/training")
    train, val = split_by_task(tasks, 0.1, seed=3)
    assert len(val) == 40 and len(train) == 360
    assert not {t.id for t in train} & {t.id for t in val}
    again_train, again_val = split_by_task(tasks, 0.1, seed=3)
    assert [t.id for t in again_val] == [t.id for t in val]
    assert [t.id for t in split_by_task(tasks, 0.1, seed=4)[1]] != [t.id for t in val]


def test_augmentations_invert_exactly_and_apply_to_the_whole_task():
    rng = np.random.default_rng(0)
    task = load_dataset("arc-agi-1/training")[1]
    grid = task.train[0].input
    seen = set()
    for d in range(8):
        aug = Augmentation(d, random_augmentation(rng).colours)
        out = aug.apply(grid)
        assert np.array_equal(aug.invert(out), grid)
        # grid above is square and symmetric under transposition, so it alone would miss a transform
        # that invert leaves out: a 2x3 grid with no symmetry does not.
        no_symmetry = np.arange(1, 7, dtype=np.uint8).reshape(2, 3)
        assert np.array_equal(aug.invert(aug.apply(no_symmetry)), no_symmetry), d
        assert out.shape in (grid.shape, grid.shape[::-1])
        asymmetric = Augmentation(d).apply(np.arange(6, dtype=np.uint8).reshape(2, 3))
        seen.add((asymmetric.shape, asymmetric.tobytes()))
        augmented = aug.apply_task(task)
        for original, new in zip(task.train + task.test, augmented.train + augmented.test):
            assert np.array_equal(new.input, aug.apply(original.input))
            assert np.array_equal(new.output, aug.apply(original.output))
    assert len(seen) == 8  # the 8 dihedral transforms are distinct
    assert (Augmentation(0, random_augmentation(rng).colours).apply(np.zeros((2, 2), np.uint8)) == 0).all()
    with pytest.raises(ValueError, match="keeping 0 fixed"):
        Augmentation(0, (1, 0, 2, 3, 4, 5, 6, 7, 8, 9))


def test_fixed_views_depend_only_on_task_and_number_and_never_change():
    # Cache keys name an augmented view by its number alone: this mapping is part of every cache's meaning.
    assert fixed_view("007bbfb7", 1) == Augmentation(6, (0, 2, 3, 6, 5, 9, 8, 7, 1, 4))
    assert fixed_view("007bbfb7", 2) == Augmentation(4, (0, 3, 5, 2, 7, 1, 4, 6, 8, 9))
    views = [fixed_view(f"task{i}", k) for i in range(50) for k in range(1, 9)]
    assert not any(v.is_identity for v in views)
    assert len({v.dihedral for v in views}) == 8 and len(set(views)) == len(views)
    with pytest.raises(ValueError, match="numbered from 1"):
        fixed_view("007bbfb7", 0)
