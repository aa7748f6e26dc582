"""Training losses: pure functions of model outputs and targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sage.encoding import PAD, VOCAB_SIZE


LOSS_NORMALIZATIONS = ("cell", "example")


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
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(MSE, mean cosine similarity, number of slots) between the distillation head's output and standardised
    teacher features, over the grid slots where mask is True; both mean-reduced (MSE over slots
    and dimensions, so its scale does not grow with the teacher's width).

    predicted, target [B, G, D]; mask [B, G] bool. With no valid slot, both are 0 (and carry no
    gradient) rather than NaN; the caller sees count 0 and can leave the term out.
    """
    predicted, target = predicted.float(), target.float()
    weights = mask.float()
    count = int(mask.sum())
    if count == 0:
        zero = predicted.sum() * 0.0
        return zero, zero, 0
    mse = (((predicted - target) ** 2).mean(-1) * weights).sum() / count
    cosine = (F.cosine_similarity(predicted, target, dim=-1, eps=1e-6) * weights).sum() / count
    return mse, cosine, count
