"""Cross-modal triplet loss with the hardest in-batch negative of another identity (SEN)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _hardest_negative_direction(similarity: torch.Tensor, negatives: torch.Tensor, margin: float) -> torch.Tensor:
    # similarity: (B, B), row = anchor, column = candidates of the other modality, diagonal = positive.
    positive = similarity.diagonal()  # (B,)
    hardest = similarity.masked_fill(~negatives, float("-inf")).amax(dim=1)  # (B,)
    has_negative = negatives.any(dim=1)
    # d = 1 - cos, so d(a, p) - d(a, n) + m = cos(a, n) - cos(a, p) + m.
    losses = F.relu(hardest - positive + margin)[has_negative]
    if losses.numel() == 0:
        return similarity.sum() * 0.0  # no anchor has a negative: zero, graph kept
    return losses.mean()


def hardest_negative_triplet_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, pids: torch.Tensor, margin: float = 0.05
) -> torch.Tensor:
    """Triplet loss on cosine distance, negatives mined in the batch, both directions summed.

    For each caption ``t_i`` (anchor): positive = its image ``v_i``, negative = the
    image ``v_j`` most similar to ``t_i`` among those with ``pid_j != pid_i``;
    ``d = 1 - cos``; ``L_t2i = mean_i relu(d(t_i, v_i) - d(t_i, v_j) + margin)``.
    ``L_i2t`` swaps the roles; ``L = L_t2i + L_i2t``. Anchors whose batch holds no
    other identity are left out of the mean (a same-identity item is never used
    as a negative); if no anchor has a negative the loss is 0.

    Args:
        image_features: ``(B, D)`` global image features, row i paired with caption i.
        text_features: ``(B, D)`` global text features.
        pids: ``(B,)`` person ids.
        margin: m (SEN: 0.05).
    """
    image = F.normalize(image_features.float(), dim=-1)
    text = F.normalize(text_features.float(), dim=-1)
    t2i = text @ image.t()  # (B, B)
    negatives = pids[:, None] != pids[None, :]  # (B, B), symmetric
    return _hardest_negative_direction(t2i, negatives, margin) + _hardest_negative_direction(
        t2i.t(), negatives, margin
    )

