"""The losses: which answer cells count, the two ways of averaging them (train.loss_normalization), and the distilled slots."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sage.encoding import PAD, grid_to_canvas
from sage.losses import answer_cross_entropy, distillation_slot_count, distillation_slots, loss_units


def targets() -> torch.Tensor:
    """A 1x1 answer (3 scored cells: the colour and its two EOS cells), a 5x5 one (35) and an example
    with nothing to score, on 6x6 canvases."""
    grids = [np.array([[3]]), np.arange(25).reshape(5, 5) % 10]
    rows = [grid_to_canvas(g, 6).reshape(-1) for g in grids] + [np.full(36, PAD)]
    return torch.from_numpy(np.stack(rows))


def test_cell_and_example_normalization_match_their_definitions():
    target = targets()
    logits = torch.randn(3, 36, 12, generator=torch.Generator().manual_seed(0))
    per_cell = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    scored = target != PAD
    assert scored.sum(1).tolist() == [3, 35, 0]
    by_hand_cell = per_cell[scored].mean()
    by_hand_example = (per_cell[0][scored[0]].mean() + per_cell[1][scored[1]].mean()) / 2
    assert answer_cross_entropy(logits, target, "cell") == pytest.approx(by_hand_cell.item(), rel=1e-6)
    assert answer_cross_entropy(logits, target, "example") == pytest.approx(by_hand_example.item(), rel=1e-6)
    assert loss_units(target, "cell") == 38 and loss_units(target, "example") == 2
    with pytest.raises(ValueError, match="normalization"):
        answer_cross_entropy(logits, target, "grid")


def test_per_example_loss_weighs_a_small_answer_like_a_large_one():
    """Getting the 1x1 answer wrong costs as much as getting the 5x5 one wrong per example, not 3/35 of it."""
    target = targets()[:2]
    right = F.one_hot(target, 12).float() * 20.0  # confident and right everywhere
    small_wrong, large_wrong = right.clone(), right.clone()
    small_wrong[0] = right[0].roll(1, dims=-1)  # every cell of the 1x1 answer wrong
    large_wrong[1] = right[1].roll(1, dims=-1)  # every cell of the 5x5 answer wrong
    example = [answer_cross_entropy(x, target, "example").item() for x in (small_wrong, large_wrong)]
    cell = [answer_cross_entropy(x, target, "cell").item() for x in (small_wrong, large_wrong)]
    assert example[0] == pytest.approx(example[1], rel=1e-5)
    assert cell[1] / cell[0] == pytest.approx(35 / 3, rel=1e-4)


def test_task_slot_target_is_the_mean_of_the_examples_grid_targets():
    g = torch.Generator().manual_seed(0)
    grid_pred, grid_target = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    task_pred = torch.randn(3, 5, generator=g)
    mask = torch.tensor([[True, True, False, False], [False, False, False, False], [True, True, True, True]])
    pred, target, m = distillation_slots(grid_pred, grid_target, mask, task_pred, "task")
    assert pred.shape == target.shape == (3, 1, 5) and m.squeeze(1).tolist() == [True, False, True]
    torch.testing.assert_close(target[0, 0], grid_target[0, :2].mean(0))
    torch.testing.assert_close(target[2, 0], grid_target[2].mean(0))
    pred, target, m = distillation_slots(grid_pred, grid_target, mask, task_pred, "both")
    assert pred.shape == (3, 5, 5) and torch.equal(pred[:, 4], task_pred) and torch.equal(target[:, :4], grid_target)
    assert int(m.sum()) == distillation_slot_count(mask, "both", task_slot=True) == 6 + 2
    assert distillation_slot_count(mask, "task", task_slot=True) == 2
    assert distillation_slots(grid_pred, grid_target, mask, None, "both")[0] is grid_pred  # no task token
    assert distillation_slot_count(mask, "grids", task_slot=True) == distillation_slot_count(mask, "both", False) == 6
