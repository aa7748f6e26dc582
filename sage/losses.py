"""Training losses: pure functions of model outputs and targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sage.encoding import PAD, VOCAB_SIZE

LOSS_NORMALIZATIONS = ("cell", "example")
# Which student states the feature loss compares with the teacher's: each context grid's pooled
# state with that grid's feature, the task token's (model.task_slot) with the mean of the
# example's grid features, or both.
DISTILL_SLOTS = ("grids", "task", "both")


def answer_cross_entropy(logits: torch.Tensor, target: torch.Tensor, normalization: str = "cell") -> torch.Tensor:
    """Cross-entropy over the answer cells that matter: the grid's own cells and its EOS border
    (which teaches the output size). PAD cells beyond the border are ignored.

    normalization "cell": the mean over every such cell of the batch; "example": each example's mean
    over its own cells, then the mean over the examples that have any.
    logits [B, cells, 12], target [B, cells] tokens.
    """
    if normalization == "cell":
        return F.cross_entropy(logits.reshape(-1, VOCAB_SIZE).float(), target.reshape(-1), ignore_index=PAD)
    if normalization != "example":
        raise ValueError(f"normalization must be one of {LOSS_NORMALIZATIONS}, got {normalization!r}")
    per_cell = F.cross_entropy(logits.float().transpose(1, 2), target, ignore_index=PAD, reduction="none")
    cells = (target != PAD).sum(1)
    scored = cells > 0
    per_example = per_cell.sum(1)[scored] / cells[scored]
    return per_example.mean() if len(per_example) else per_cell.sum() * 0.0


def loss_units(target: torch.Tensor, normalization: str) -> torch.Tensor:
    """What answer_cross_entropy averages over in `target` [B, cells]: scored cells ("cell") or
    examples with a scored cell ("example"). Pieces of a batch weigh their means by these counts."""
    scored = target != PAD
    return scored.sum() if normalization == "cell" else scored.any(1).sum()


def distillation_losses(
    predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(MSE, mean cosine similarity, number of slots) between the distillation head's output and standardised
    teacher features, over the grid slots where mask is True; both mean-reduced (MSE over slots
    and dimensions, so its scale does not grow with the teacher's width). All three stay on the
    device (no host sync).

    predicted, target [B, G, D]; mask [B, G] bool. With no valid slot, both are 0 (and carry no
    gradient) rather than NaN; the caller sees count 0 and can leave the term out.
    """
    predicted, target = predicted.float(), target.float()
    weights = mask.float()
    count = mask.sum()
    mse = (((predicted - target) ** 2).mean(-1) * weights).sum() / count.clamp(min=1)
    cosine = (F.cosine_similarity(predicted, target, dim=-1, eps=1e-6) * weights).sum() / count.clamp(min=1)
    return mse, cosine, count


def task_feature_target(grid_target: torch.Tensor, grid_mask: torch.Tensor) -> torch.Tensor:
    """The teacher's task-level feature of each example [B, D]: the mean of its grids' features
    [B, G, D] where grid_mask [B, G]; zero for an example without any."""
    weights = grid_mask.unsqueeze(-1).to(grid_target.dtype)
    return (grid_target * weights).sum(1) / weights.sum(1).clamp(min=1)


def distillation_slots(
    grid_predicted: torch.Tensor, grid_target: torch.Tensor, grid_mask: torch.Tensor,
    task_predicted: torch.Tensor | None, slots: str = "grids",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(predicted, target, mask) of the slots the feature loss compares (DISTILL_SLOTS): grid slots
    [B, G, D], the task slot [B, 1, D] (target: the mean of the example's masked grid targets), or
    both [B, G + 1, D]. Without a task token (task_predicted None) only grids exist."""
    if slots == "grids" or task_predicted is None:
        return grid_predicted, grid_target, grid_mask
    if slots not in DISTILL_SLOTS:
        raise ValueError(f"slots must be one of {DISTILL_SLOTS}, got {slots!r}")
    task_target = task_feature_target(grid_target, grid_mask).unsqueeze(1)
    task_mask = grid_mask.any(1, keepdim=True)
    task = task_predicted.unsqueeze(1)
    if slots == "task":
        return task, task_target, task_mask
    return (torch.cat([grid_predicted, task], 1), torch.cat([grid_target, task_target], 1),
            torch.cat([grid_mask, task_mask], 1))


def distillation_slot_count(teacher_mask: torch.Tensor, slots: str, task_slot: bool) -> torch.Tensor:
    """How many slots `distillation_slots` compares for a batch's teacher_mask [B, G]: what the
    feature loss averages over (pieces of a batch weigh their means by it)."""
    grids, tasks = teacher_mask.sum(), teacher_mask.any(1).sum()
    if not task_slot or slots == "grids":
        return grids
    return tasks if slots == "task" else grids + tasks
