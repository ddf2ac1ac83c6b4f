"""Masked language modelling loss of IRRA's implicit relation reasoning.

From "Cross-Modal Implicit Relation Reasoning and Aligning for Text-to-Image
Person Retrieval" (IRRA, Jiang and Ye, CVPR 2023): the masked caption, read
through a cross-attention over the image, must predict its masked tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 0, num_labels: torch.Tensor | None = None
) -> torch.Tensor:
    """``L = (sum over positions with labels != ignore_index of CE(logits, labels)) / num_labels``.

    Args:
        logits: ``(..., V)`` scores over the vocabulary: ``(B, L, V)`` at every caption position,
            or ``(M, V)`` at chosen positions only.
        labels: ``logits.shape[:-1]``: the original id at masked positions, ``ignore_index``
            (IRRA: 0) elsewhere.
        num_labels: what the sum is divided by; the labelled positions of this batch when None
            (the mean, as ``F.cross_entropy``). Under data parallelism, the mean count per rank
            makes DDP's average of the ranks' losses the mean over the global batch's labels.

    Returns:
        0-dim tensor (NaN when no position is labelled).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ in their leading dims")
    labels = labels.reshape(-1)
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels, ignore_index=ignore_index,
                            reduction="sum")
    if num_labels is None:
        num_labels = (labels != ignore_index).sum()
    return total / num_labels
