"""Validation during training: the task loss and exact match, output size and pixel accuracy on
held-out tasks' test outputs, and, with teacher features, how close the distillation head is to
them (feature fidelity). Metrics are sums over examples, so batch and piece sizes do not change
them, and under torchrun each process scores its own tasks and the sums are added up."""

from __future__ import annotations

import sys

import torch

from sage.distributed import DistributedContext
from sage.encoding import PAD
from sage.losses import answer_cross_entropy, distillation_losses, distillation_slots
from sage.metrics import GridScore, summarize
from sage.model import SageStudent
from sage.recovery import FaultInjection, MicroBatch, free_memory
from sage.step import Autocast, score_batch, to_device


@torch.inference_mode()
def validate(
    model: SageStudent, loader: torch.utils.data.DataLoader, device: torch.device, autocast: Autocast,
    grid_size: int, micro: MicroBatch | None = None, faults: FaultInjection | None = None,
    ctx: DistributedContext = DistributedContext(), distill_slots: str = "grids",
) -> dict[str, float]:
    """Task loss and exact match / output size / pixel accuracy (target cells only) on held-out
    tasks; with teacher features, also the distillation head's cosine to them (feature fidelity).
    Out of memory halves `micro.size` and retries the batch (metrics are sums: unchanged)."""
    model.eval()
    faults = faults or FaultInjection()
    micro = micro or MicroBatch("validation", loader.batch_sampler.batch_size, None,
                                lambda message: print(message, file=sys.stderr))

    def measure(piece: dict[str, torch.Tensor]) -> tuple[float, int, list[GridScore], float, int]:
        faults.forward_pass("val")
        with autocast():
            out = model(piece)
        # Sums over target cells, like the training loss's mean, so that piece sizes do not matter.
        n_cells = (piece["target"] != PAD).sum().item()
        loss = answer_cross_entropy(out.logits, piece["target"]).item() * n_cells
        cosine, count = 0.0, 0
        if out.grid_features is not None and "teacher_features" in piece:
            _, mean_cosine, count = distillation_losses(*distillation_slots(
                out.grid_features, model.standardise(piece["teacher_features"]), piece["teacher_mask"] & out.grid_mask,
                out.task_features, distill_slots))
            count = int(count)
            cosine = mean_cosine.item() * count
        return loss, n_cells, score_batch(out.logits, piece, grid_size), cosine, count

    loss_sum, cells, scores, cosine_sum, slots = 0.0, 0, [], 0.0, 0
    for batch in loader:
        batch = to_device(batch, device)
        while True:  # a batch counts only once all its pieces went through
            try:
                results = [measure(piece) for piece in micro.pieces(batch)]
            except torch.OutOfMemoryError:
                results = None
            if results is not None:
                break
            free_memory(device)  # outside the except block, whose traceback holds the activations
            micro.halve("a validation batch")
        for loss, n_cells, piece_scores, cosine, count in results:
            loss_sum, cells, scores = loss_sum + loss, cells + n_cells, scores + piece_scores
            cosine_sum, slots = cosine_sum + cosine, slots + count
    loss_sum, cells, cosine_sum, slots = ctx.sum([loss_sum, cells, cosine_sum, slots])  # over ranks' tasks
    scores = ctx.gather(scores)
    model.train()
    metrics = {"loss": loss_sum / max(cells, 1), **summarize(scores)}
    if slots:
        metrics["feature_cosine"] = cosine_sum / slots
    return metrics
