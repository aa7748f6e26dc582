"""Grid <-> token encoding, context packing, cap policy and batching."""

import numpy as np
import pytest
import torch

from sage.arc import Pair, Task
from sage.config import ExperimentConfig
from sage.datasets import load_dataset
from sage.encoding import (
    CANVAS_MARGIN,
    EOS,
    PAD,
    ARCExamples,
    DemonstrationCuts,
    LengthBucketSampler,
    answer_shape,
    canvas_to_grid,
    collate,
    context_grid_tokens,
    edge_distance,
    evaluation_examples,
    fit_demos,
    grid_to_canvas,
    min_context_tokens,
    training_examples,
)


@pytest.mark.parametrize("dataset", ["arc-agi-1/training", "arc-agi-1/evaluation", "arc-agi-2/training", "arc-agi-2/evaluation"])
def test_round_trip_is_exact_for_every_grid(dataset):
    grids = [g for task in load_dataset(dataset) for g in task.grids()]
    assert len(grids) > 1000
    for grid in grids:
        canvas = grid_to_canvas(grid)
        assert canvas.shape == (30, 30)
        decoded = canvas_to_grid(canvas)
        assert decoded.shape == grid.shape and np.array_equal(decoded, grid)


def test_canvas_layout_marks_size_with_eos_border():
    grid = np.array([[0, 1, 2], [3, 4, 5]], dtype=np.uint8)
    canvas = grid_to_canvas(grid, size=5)
    assert canvas[:2, :3].tolist() == [[2, 3, 4], [5, 6, 7]]
    assert (canvas[2, :3] == EOS).all() and (canvas[:2, 3] == EOS).all()
    assert canvas[2, 3] == PAD and (canvas[3:, :] == PAD).all() and (canvas[:, 4:] == PAD).all()
    full = grid_to_canvas(np.ones((5, 5), np.uint8), size=5)  # a full-size grid has no border
    assert (full == 3).all() and canvas_to_grid(full).shape == (5, 5)
    with pytest.raises(ValueError, match="does not fit"):
        grid_to_canvas(np.ones((6, 2), np.uint8), size=5)


def test_decoding_takes_the_largest_top_left_colour_rectangle():
    canvas = np.full((5, 5), PAD)
    canvas[:3, :4] = 3
    canvas[1, 2] = EOS  # a stray EOS inside cuts the rectangle
    assert canvas_to_grid(canvas).shape == (3, 2)
    assert canvas_to_grid(np.full((5, 5), EOS)).shape == (0, 0)


def test_context_tokens_cover_grid_plus_border_with_positions():
    grid = np.arange(6, dtype=np.uint8).reshape(2, 3)
    parts = context_grid_tokens(grid)
    tokens, rows, cols = parts["tokens"], parts["rows"], parts["cols"]
    assert len(tokens) == (2 + 1) * (3 + 1)
    assert rows.max() == 2 and cols.max() == 3
    assert tokens[rows * 4 + cols].tolist() == tokens.tolist()
    assert np.array_equal(canvas_to_grid(tokens.reshape(3, 4)), grid)
    # distance from the far edge: last column 2, border 1; mirrors "c" onto "w - 1 - c"
    assert parts["cols_from_end"].reshape(3, 4)[0].tolist() == [4, 3, 2, 1]
    assert parts["rows_from_end"].reshape(3, 4)[:, 0].tolist() == [3, 2, 1]
    assert edge_distance(np.arange(6), 3).tolist() == [4, 3, 2, 1, 0, 0]


def test_cap_policy_drops_trailing_demos_and_keeps_one():
    big, small = np.zeros((30, 30), np.uint8), np.zeros((2, 2), np.uint8)
    pairs = [Pair(big, big)] * 4 + [Pair(small, small)]
    kept = fit_demos(pairs, demos=(0, 1, 2, 3), query=4, max_demos=10, max_context_tokens=min_context_tokens(30))
    assert kept == (0,)
    kept = fit_demos(pairs, demos=(0, 1, 2, 3), query=4, max_demos=2, max_context_tokens=100_000)
    assert kept == (0, 1)


def test_dropped_demonstrations_are_counted():
    """ARC-AGI-1 evaluation under the old 4,096-token cap lost demonstrations silently; now they are
    counted, and the shipped cap (8,704) fits every task with all its demonstrations."""
    tasks = load_dataset("arc-agi-1/evaluation")
    refs = evaluation_examples(tasks)
    cuts = ARCExamples(tasks, refs, 30, 10, 4096).demonstration_cuts()
    assert (cuts.examples, cuts.by_context_cap, cuts.demos_by_context_cap, cuts.left_with_one) == (419, 32, 51, 15)
    assert cuts.by_max_demos == 0 and "32 of 419 examples lose 51 demonstration(s)" in cuts.describe()
    assert ARCExamples(tasks, refs, 30, 10, ExperimentConfig().data.max_context_tokens).demonstration_cuts() == \
        DemonstrationCuts(examples=419)
    capped = ARCExamples(tasks, refs, 30, 2, 100_000).demonstration_cuts()
    assert capped.by_context_cap == 0 and capped.demos_by_max_demos == sum(max(len(t.train) - 2, 0) * len(t.test)
                                                                            for t in tasks)


def test_examples_and_batches_on_real_tasks():
    tasks = load_dataset("arc-agi-1/training")[:20]
    train_refs, eval_refs = training_examples(tasks), evaluation_examples(tasks)
    assert len(train_refs) == sum(len(t.train) + len(t.test) for t in tasks)
    assert len(eval_refs) == sum(len(t.test) for t in tasks)
    assert all(r.query not in r.demos for r in train_refs)
    data = ARCExamples(tasks, eval_refs, grid_size=30, max_demos=10, max_context_tokens=4096)
    item = data[0]
    task = tasks[eval_refs[0].task_index]
    assert len(item["tokens"]) == data.lengths[0]
    assert np.array_equal(canvas_to_grid(item["target"].reshape(30, 30)), task.test[0].output)
    assert np.array_equal(canvas_to_grid(item["query"].reshape(30, 30)), task.test[0].input)
    assert item["segments"].max() == 20 and item["segments"][-1] == 20  # the test input comes last
    batch = collate([data[i] for i in range(4)])
    lengths = batch["context_mask"].sum(1)
    assert lengths.tolist() == data.lengths[:4].tolist()
    assert batch["tokens"].shape[1] % 8 == 0 and batch["target"].shape == (4, 900)
    assert (batch["tokens"][~batch["context_mask"]] == PAD).all()


def test_augmented_items_depend_only_on_seed_epoch_index():
    tasks = load_dataset("arc-agi-1/training")[:5]
    refs = training_examples(tasks)
    a = ARCExamples(tasks, refs, 30, 10, 4096, augment=True, seed=1)
    b = ARCExamples(tasks, refs, 30, 10, 4096, augment=True, seed=1)
    b.set_epoch(0)
    assert all(np.array_equal(a[i]["tokens"], b[i]["tokens"]) for i in range(len(refs)))
    b.set_epoch(1)
    assert not all(np.array_equal(a[i]["target"], b[i]["target"]) for i in range(len(refs)))


def test_length_bucket_sampler_covers_everything_once_and_resumes_mid_epoch():
    lengths = np.random.default_rng(0).integers(10, 1000, size=103)
    sampler = LengthBucketSampler(lengths, batch_size=8, shuffle=True, seed=5, bucket_batches=4)
    sampler.set_epoch(2)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(103))
    assert len(batches) == len(sampler) == 13
    sampler.set_epoch(2, skip_batches=5)
    assert list(sampler) == batches[5:] and len(sampler) == 8
    sampler.set_epoch(3)
    assert list(sampler) != batches
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    assert spread < np.ptp(lengths) / 2  # bucketing keeps similar lengths together
    ordered = LengthBucketSampler(lengths, batch_size=8, shuffle=False)
    assert [i for b in ordered for i in b] == np.argsort(lengths, kind="stable").tolist()


def test_answer_canvas_is_sized_from_the_context_never_the_answer():
    """Validation and evaluation size an example's canvas from its demonstration outputs and query
    input; training may enlarge it to hold the answer. A target too large for the canvas is kept
    whole for scoring and can never be scored right."""
    from sage.step import score_batch

    g = lambda h, w, c=1: np.full((h, w), c, dtype=np.uint8)  # noqa: E731
    shown = (Pair(g(2, 2), g(3, 4)), Pair(g(2, 2), g(3, 4)))
    task = Task("t", shown, (Pair(g(2, 2), g(9, 7, 4)),), "test")  # the test output is larger than any grid shown
    ref = evaluation_examples([task])
    blind = ARCExamples([task], ref, 30, 10, 8704, answer_canvas="batch")
    m = 1 + CANVAS_MARGIN  # the EOS border and the margin
    assert blind.shapes.tolist() == [[3 + m, 4 + m]]  # the tallest and the widest grid shown
    trained = ARCExamples([task], ref, 30, 10, 8704, answer_canvas="batch", fit_answer=True)
    assert trained.shapes.tolist() == [[9 + m, 7 + m]]
    batch = collate([blind[0]])
    assert batch["target"].shape == (1, (3 + m) * (4 + m)) and batch["target_full"].shape == (1, 900)
    # A prediction that reproduces the cropped target exactly is still wrong: the answer is 9x7.
    logits = torch.nn.functional.one_hot(batch["target"], 12).float()
    score = score_batch(logits, batch, 30)[0]
    assert not score.exact and not score.size_correct and score.pixels_total == 63
    # A batch is as large as its largest example in each direction; the smaller one's extra cells
    # carry no target and are masked.
    both = collate([blind[0], trained[0]])
    R, C = 9 + m, 7 + m
    assert both["target"].shape == (2, R * C)
    own = both["answer_mask"][0].view(R, C)
    assert own[: 3 + m, : 4 + m].all() and own.sum() == (3 + m) * (4 + m)
    assert (both["target"][0][~both["answer_mask"][0]] == PAD).all()
    assert both["answer_rows"][0].view(R, C)[:, 0].tolist() == list(range(R))
    # Right answers decode right from a rectangular canvas.
    exact = score_batch(torch.nn.functional.one_hot(both["target"], 12).float(), both, 30)
    assert [s.exact for s in exact] == [False, True]


class SlotTeacher:
    """The smallest ExampleTargets: every slot's feature is its slot number (no cache needed)."""

    field = "teacher_features"

    def key(self, task, demos, query, augmented_view=0):
        return f"{task.id}/{augmented_view}/{query}"

    def require(self, keys):
        pass

    def for_example(self, task, demos, query, max_demos, augmented_view=0):
        slots = 2 * max_demos + 1
        return np.arange(slots, dtype=np.float32)[:, None].repeat(4, 1), np.ones(slots, dtype=bool)

    def empty(self):
        return np.zeros((21, 4), dtype=np.float32), np.zeros(21, dtype=bool)


def test_shuffled_demonstrations_keep_their_pairs_and_the_teacher_order():
    """data.shuffle_demos: each item shows its demonstrations in an order fixed by (seed, epoch, index),
    every pair whole; items that carry teacher targets keep the order the teacher saw."""
    task = next(t for t in load_dataset("arc-agi-1/training")
                if len(t.train) >= 4 and len({g.tobytes() for g in (p.input for p in t.train)}) == len(t.train))
    refs = evaluation_examples([task])
    n = len(task.train)

    def order(item: dict) -> tuple[int, ...]:
        shown = []
        for k in range(n):
            at = item["segments"] == 2 * k
            found = [d for d in range(n) if np.array_equal(item["tokens"][at], context_grid_tokens(task.train[d].input)["tokens"])]
            out = item["tokens"][item["segments"] == 2 * k + 1]
            assert len(found) == 1 and np.array_equal(out, context_grid_tokens(task.train[found[0]].output)["tokens"])
            shown.append(found[0])
        return tuple(shown)

    shuffled = ARCExamples([task], refs, 30, 10, 8704, shuffle_demos=True, seed=3)
    orders = []
    for epoch in range(8):
        shuffled.set_epoch(epoch)
        orders.append(order(shuffled[0]))
        assert order(shuffled[0]) == orders[-1]  # deterministic
    assert all(sorted(o) == list(range(n)) for o in orders) and len(set(orders)) > 1
    plain = ARCExamples([task], refs, 30, 10, 8704, seed=3)
    taught = ARCExamples([task], refs, 30, 10, 8704, shuffle_demos=True, seed=3, teacher=SlotTeacher())
    for epoch in range(8):
        plain.set_epoch(epoch)
        taught.set_epoch(epoch)
        assert order(plain[0]) == order(taught[0]) == tuple(range(n))


def test_resampled_demonstrations_change_per_epoch_within_the_caps():
    """data.resample_demos: an example with more demonstrations than model.max_demos keeps shows another
    subset each epoch (whole pairs, as many as the cap keeps, fixed by seed, epoch and index, the answer
    canvas sized from what it shows); without it, always the first ones."""
    task = next(t for t in load_dataset("arc-agi-1/training")
                if len(t.train) >= 6 and len({g.tobytes() for g in (p.input for p in t.train)}) == len(t.train))
    refs = evaluation_examples([task])
    max_demos = 3

    def shown(item: dict) -> frozenset[int]:
        found = set()
        for k in range(max_demos):
            grid = item["tokens"][item["segments"] == 2 * k]
            found |= {d for d in range(len(task.train))
                      if np.array_equal(grid, context_grid_tokens(task.train[d].input)["tokens"])}
        return frozenset(found)

    first = frozenset(range(max_demos))
    plain = ARCExamples([task], refs, 30, max_demos, 8704, seed=1, answer_canvas="batch")
    resampled = ARCExamples([task], refs, 30, max_demos, 8704, seed=1, answer_canvas="batch", resample_demos=True)
    subsets = []
    for epoch in range(8):
        plain.set_epoch(epoch)
        resampled.set_epoch(epoch)
        assert shown(plain[0]) == first
        item = resampled[0]
        subsets.append(shown(item))
        assert len(subsets[-1]) == max_demos and subsets[-1] == frozenset(resampled.demos_in_epoch(0, epoch))
        assert shown(resampled[0]) == subsets[-1]  # deterministic
        pairs = task.train + task.test
        assert tuple(item["answer_shape"]) == answer_shape(pairs, sorted(subsets[-1]), refs[0].query, 30)
    assert len(set(subsets)) > 2
    # An example the caps do not cut is untouched.
    whole = ARCExamples([task], refs, 30, 10, 8704, seed=1, resample_demos=True)
    assert all(whole.demos_in_epoch(0, e) == tuple(range(len(task.train))) for e in range(4))


def test_max_grid_side_keeps_only_small_tasks(tmp_path):
    from sage.config import load_config
    from sage.distill import prompts_for_dataset
    from sage.splits import load_splits

    cfg = load_config(None, ["data.max_grid_side=10", f"run.checkpoint_dir={tmp_path}"])
    splits = load_splits(cfg)
    assert len(splits.train) + len(splits.val) + len(splits.shared) == 178  # of ARC-AGI-1 training's 400
    assert all(max(g.shape) <= 10 for t in splits.train + splits.val for g in t.grids())
    # The teacher's prompts are made for the same split.
    prompts = prompts_for_dataset(cfg, cfg.data.train, splits.train_dataset)
    assert {p.task_id for p in prompts} == {t.id for t in splits.train + splits.val}


def test_persistent_workers_serve_each_epochs_augmentations():
    """DataLoader workers that persist across epochs keep their own copy of the dataset; the epoch
    travels with each index (EpochTaggedBatches), so epoch 2 is augmented anew, exactly as without
    workers."""
    from sage.encoding import EpochTaggedBatches

    tasks = load_dataset("arc-agi-1/training")[:12]
    data = ARCExamples(tasks, training_examples(tasks), grid_size=30, max_demos=3, max_context_tokens=4096,
                       augment=True, seed=0, shuffle_demos=True)
    sampler = LengthBucketSampler(data.lengths, 4, shuffle=True, seed=0, sides=data.sides)

    def two_epochs(workers: int) -> list[list[torch.Tensor]]:
        loader = torch.utils.data.DataLoader(data, batch_sampler=EpochTaggedBatches(sampler), collate_fn=collate,
                                             num_workers=workers, persistent_workers=workers > 0)
        epochs = []
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            epochs.append([batch["tokens"] for batch in loader])
        return epochs

    persistent, plain = two_epochs(2), two_epochs(0)
    for a, b in zip(persistent, plain):
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    first, second = (torch.cat([t.flatten() for t in epoch]) for epoch in persistent)
    assert not torch.equal(first, second)  # other order, other augmentations
