"""Similarity distribution matching (SDM) loss.

From "Cross-Modal Implicit Relation Reasoning and Aligning for Text-to-Image
Person Retrieval" (IRRA, Jiang and Ye, CVPR 2023), used unchanged by SEN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sdm_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    pids: torch.Tensor,
    temperature: float = 0.02,
    eps: float = 1e-8,
) -> torch.Tensor:
    """KL divergence between the softmax of cross-modal similarities and the identity distribution.

    With ``s_ij = cos(image_i, text_j) / temperature`` and ``q_ij = 1[pid_i = pid_j] /
    sum_k 1[pid_i = pid_k]`` (uniform over the batch items of the same person):

        ``L = mean_i KL(softmax(s_i.) || q_i.) + mean_j KL(softmax(s_.j) || q_.j)``

    where ``KL(p || q) = sum p (log p - log(q + eps))`` (image-to-text plus text-to-image).

    Args:
        image_features: ``(B, D)`` global image features (not necessarily normalised).
        text_features: ``(B, D)`` global text features of the paired captions.
        pids: ``(B,)`` person ids.
        temperature: tau; the logits are cosines divided by it (IRRA/SEN: 0.02).
        eps: added to the target inside the log (the target has zeros).

    Returns:
        0-dim tensor.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    image = F.normalize(image_features.float(), dim=-1)
    text = F.normalize(text_features.float(), dim=-1)
    i2t = image @ text.t() / temperature  # (B, B): row i = image i against every caption
    same = (pids[:, None] == pids[None, :]).float()  # (B, B), symmetric
    log_target = torch.log(same / same.sum(dim=1, keepdim=True) + eps)

    def kl_rows(logits: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits, dim=1)
        return (log_p.exp() * (log_p - log_target)).sum(dim=1).mean()

    return kl_rows(i2t) + kl_rows(i2t.t())

