"""Training losses: pure functions of model outputs and targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sage.encoding import PAD, VOCAB_SIZE


def answer_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the answer cells that matter: the grid's own cells and its EOS
    border (which teaches the output size). PAD cells beyond the border are ignored.

    logits [B, S*S, 12], target [B, S*S] tokens.
    """
    return F.cross_entropy(logits.reshape(-1, VOCAB_SIZE).float(), target.reshape(-1), ignore_index=PAD)
