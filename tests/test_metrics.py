"""ARC Prize scoring and augmentation voting on hand-made cases (pure functions, no model)."""

import numpy as np
import pytest

from sage.arc import Pair, Task
from sage.metrics import (
    baseline_attempts,
    score_attempts,
    score_baselines,
    score_grid,
    summarize_tasks,
    task_score,
)
from sage.voting import PLACEHOLDER, attempts, views, vote


def g(rows):
    return np.array(rows, dtype=np.uint8)


TARGET = g([[1, 2, 3], [4, 5, 6]])


def test_wrong_size_is_wrong_and_pixels_count_only_the_overlap():
    guess = g([[1, 2], [4, 5]])  # right cells, but a 2x2 grid for a 2x3 target
    s = score_attempts([guess], TARGET)
    assert not s.pass_at_1 and not s.pass_at_2 and not s.size_correct
    assert (s.pixels_correct, s.pixels_total) == (4, 6)
    bigger = g([[1, 2, 3, 0], [4, 5, 6, 0], [0, 0, 0, 0]])  # contains the target, still wrong
    s = score_attempts([bigger], TARGET)
    assert not s.pass_at_2 and not s.size_correct and s.pixels_correct == 6
    empty = np.zeros((0, 0), dtype=np.uint8)
    s = score_attempts([empty], TARGET)
    assert not s.pass_at_2 and s.pixels_correct == 0


def test_one_wrong_cell_is_not_solved():
    guess = TARGET.copy()
    guess[1, 2] = 0
    s = score_attempts([guess], TARGET)
    assert not s.pass_at_1 and not s.pass_at_2 and s.size_correct
    assert (s.pixels_correct, s.pixels_total) == (5, 6)
    assert score_attempts([TARGET.copy()], TARGET).pass_at_1


def test_attempt_two_correct_counts_for_pass_at_2_only():
    wrong = np.zeros_like(TARGET)
    s = score_attempts([wrong, TARGET.copy()], TARGET)
    assert s.pass_at_2 and not s.pass_at_1
    # size and pixels describe attempt 1
    assert s.size_correct and s.pixels_correct == 0
    assert task_score([s], attempts=2) == 1.0 and task_score([s], attempts=1) == 0.0
    # attempt 1 right and attempt 2 wrong is solved too: either attempt counts, not only the last
    s = score_attempts([TARGET.copy(), wrong], TARGET)
    assert s.pass_at_1 and s.pass_at_2 and task_score([s], attempts=2) == 1.0
    assert not score_attempts([wrong, wrong], TARGET).pass_at_2


def test_two_test_outputs_with_one_solved_score_half_for_the_task():
    solved = score_attempts([TARGET.copy(), TARGET.copy()], TARGET)
    missed = score_attempts([g([[7]]), g([[8]])], g([[9]]))
    assert task_score([solved, missed]) == 0.5


def test_dataset_score_is_the_mean_over_tasks_not_over_outputs():
    half = [score_attempts([TARGET], TARGET), score_attempts([g([[0]])], g([[1]]))]  # 1 of 2 solved
    second_try = [score_attempts([g([[0]]), g([[1]])], g([[1]]))]  # attempt 2 right
    none = [score_attempts([g([[0]])], g([[1]]))]
    m = summarize_tasks([half, second_try, none])
    assert m["arc_prize_score"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert m["pass_at_1"] == pytest.approx((0.5 + 0.0 + 0.0) / 3)
    assert m["tasks_solved"] == pytest.approx(1 / 3) and m["tasks_solved_count"] == 1
    assert m["outputs_solved"] == pytest.approx(2 / 4) and m["outputs_solved_count"] == 2
    assert m["size_accuracy"] == 1.0  # every attempt 1 had the target's shape
    assert m["pixel_accuracy"] == pytest.approx((6 + 0 + 0 + 0) / (6 + 1 + 1 + 1))
    assert (m["tasks"], m["test_outputs"]) == (3, 4)


def test_attempt_counts_are_checked():
    with pytest.raises(ValueError, match="1 or 2 attempts"):
        score_attempts([], TARGET)
    with pytest.raises(ValueError, match="1 or 2 attempts"):
        score_attempts([TARGET] * 3, TARGET)
    with pytest.raises(ValueError, match="attempts must be 1 or 2"):
        task_score([score_attempts([TARGET], TARGET)], attempts=3)


def test_existing_grid_scores_keep_their_behaviour():
    s = score_grid(g([[1, 2, 3], [4, 5, 0]]), TARGET)
    assert (s.exact, s.size_correct, s.pixels_correct, s.pixels_total) == (False, True, 5, 6)


def test_baselines_make_one_guess_each_and_agree_with_the_grid_scores():
    task = Task("t", (Pair(g([[1, 1], [0, 0]]), g([[3, 3], [3, 0]])),),
                (Pair(g([[0, 5], [5, 0]]), g([[0, 5], [5, 0]])),), "hand-made")
    guesses = baseline_attempts([task])
    assert [len(a) for a in guesses["copy_input"]["t"]] == [1]
    assert np.array_equal(guesses["most_frequent_colour"]["t"][0][0], g([[3, 3], [3, 3]]))
    assert np.array_equal(guesses["all_zeros"]["t"][0][0], g([[0, 0], [0, 0]]))
    exact = {name: score_attempts(guesses[name]["t"][0], task.test[0].output).pass_at_2 for name in guesses}
    assert exact == {"copy_input": True, "most_frequent_colour": False, "all_zeros": False}
    assert {k: v["exact_match"] for k, v in score_baselines([task]).items()} == {
        k: float(v) for k, v in exact.items()}


# ----------------------------------------------------------------------------- voting


def test_voting_ranks_by_votes_and_pools_identical_grids():
    a, b, c = g([[1]]), g([[2]]), g([[1, 1]])
    ranked = vote([(b, -0.1), (a, -0.9), (a.copy(), -0.8), (c, 0.0), (a.copy(), -0.7)])
    assert [r.votes for r in ranked] == [3, 1, 1]
    assert np.array_equal(ranked[0].grid, a) and ranked[0].confidence == pytest.approx(-0.8)
    first, second = attempts(ranked)
    assert np.array_equal(first, a) and np.array_equal(second, c)  # tie of 1 vote: higher confidence (c: 0.0)


def test_voting_ties_go_to_confidence_then_to_the_earlier_view():
    a, b = g([[1]]), g([[2]])
    ranked = vote([(a, -0.5), (b, -0.2), (a, -0.5), (b, -0.2)])  # 2 votes each: b is surer
    assert np.array_equal(ranked[0].grid, b)
    ranked = vote([(b, -0.3), (a, -0.3)])  # same votes and confidence: view 0 first
    assert np.array_equal(ranked[0].grid, b) and ranked[0].first_view == 0
    ranked = vote([(a, -0.3), (b, -0.3)])
    assert np.array_equal(ranked[0].grid, a)


def test_same_cells_different_shape_are_different_grids():
    ranked = vote([(g([[1, 1]]), 0.0), (g([[1], [1]]), 0.0)])
    assert len(ranked) == 2


def test_empty_predictions_get_no_votes_and_missing_attempts_are_filled():
    empty = np.zeros((0, 0), dtype=np.uint8)
    assert vote([(empty, 0.0), (empty, 0.0)]) == []
    assert [x.tolist() for x in attempts([])] == [PLACEHOLDER.tolist()] * 2
    one = vote([(empty, 0.0), (g([[4]]), -1.0)])
    first, second = attempts(one)
    assert first.tolist() == [[4]] and second.tolist() == [[4]]  # a repeat: cannot add a solve


def test_views_start_with_the_task_as_given_and_invert_exactly():
    vs = views("task-a", 8, seed=0)
    assert vs[0].is_identity and len({v.dihedral for v in vs}) == 8
    assert all(v.colours[0] == 0 for v in vs)
    assert views("task-a", 8, seed=0) == vs and views("task-b", 8, seed=0) != vs
    grid = np.arange(12, dtype=np.uint8).reshape(3, 4) % 10
    for v in vs:
        assert np.array_equal(v.invert(v.apply(grid)), grid)
    with pytest.raises(ValueError):
        views("t", 0)


def test_size_bands_partition_the_evaluation_tasks_as_max_grid_side_counts_them():
    """Every task falls in exactly one band of its largest grid side; band "<=10" is exactly the 77
    tasks `--max-grid-side 10` scores, and the bands' per-band summaries add up to the whole."""
    from sage.arc import tasks_up_to_side
    from sage.datasets import load_dataset
    from sage.metrics import SIZE_BANDS, size_band, summarize_by_size_band

    tasks = load_dataset("arc-agi-1/evaluation")
    bands = {t.id: size_band(t) for t in tasks}
    for (name, top), (_, below) in zip(SIZE_BANDS, ((None, 0), *SIZE_BANDS)):
        assert {t.id for t in tasks if bands[t.id] == name} == (
            {t.id for t in tasks_up_to_side(tasks, top)} - {t.id for t in tasks_up_to_side(tasks, below)})
    assert sum(b == "<=10" for b in bands.values()) == 77
    # Solve exactly the band-"<=10" tasks by their first test output: only that band scores.
    scores = {t.id: [score_attempts([p.output if bands[t.id] == "<=10" else p.input], p.output) for p in t.test]
              for t in tasks}
    by_band = summarize_by_size_band(scores, tasks)
    assert list(by_band) == [name for name, _ in SIZE_BANDS]
    assert sum(b["tasks"] for b in by_band.values()) == 400
    assert by_band["<=10"]["arc_prize_score"] == 1.0 and by_band["<=10"]["tasks_solved_count"] == 77
    assert all(b["tasks_solved_count"] == 0 for name, b in by_band.items() if name != "<=10")


def test_the_candidate_ceiling_counts_the_right_grid_among_every_candidate_not_only_the_top_two():
    """candidate_ceiling: a right grid ranked third still counts (the ceiling of any ranking); tasks
    weigh alike, a test output of two counting half."""
    from sage.evaluation import candidate_ceiling
    from sage.predict import OutputPrediction, TaskPrediction

    right = np.array([[1, 2], [3, 4]], dtype=np.uint8)
    wrong = [np.full((2, 2), k, dtype=np.uint8) for k in range(3)]
    one = Task("one", (Pair(right, right),), (Pair(right, right),), "test")
    two = Task("two", (Pair(right, right),), (Pair(right, right), Pair(right, right)), "test")

    def predicted(task_id, *grid_lists):
        tests = [OutputPrediction(vote([(g, 0.5) for g in grids]), [grids[0]], True, len(grids))
                 for grids in grid_lists]
        return TaskPrediction(task_id, tests, 0.0)

    third = [wrong[0], wrong[0], wrong[1], wrong[1], right]  # two grids outvote it
    predictions = {"one": predicted("one", third), "two": predicted("two", wrong, [right])}
    assert candidate_ceiling([one, two], predictions) == {"score": 0.75, "outputs_found": 2, "test_outputs": 3}
    assert candidate_ceiling([one], {"one": predicted("one", wrong)})["score"] == 0.0
