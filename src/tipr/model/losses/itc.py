"""Image-text contrastive (ITC) loss, symmetric InfoNCE as in CLIP.

From "Learning Transferable Visual Models From Natural Language Supervision"
(Radford et al., ICML 2021). Optional in SEN (weight 0 in the reference run).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def itc_loss(image_features: torch.Tensor, text_features: torch.Tensor, temperature: float = 0.02) -> torch.Tensor:
    """``L = (CE(S, I) + CE(S^T, I)) / 2`` with ``S_ij = cos(image_i, text_j) / temperature``.

    The positive of row i is column i (its own pair); identities are ignored.

    Args:
        image_features: ``(B, D)``; text_features: ``(B, D)``, row i paired with row i.
    """
    image = F.normalize(image_features.float(), dim=-1)
    text = F.normalize(text_features.float(), dim=-1)
    logits = image @ text.t() / temperature  # (B, B)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2

