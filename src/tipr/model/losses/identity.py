"""Identity (ID) loss: one classifier over the training identities for both modalities.

From "Dual-Path Convolutional Image-Text Embeddings with Instance Loss" (Zheng
et al., ACM TOMM 2020, arXiv:1711.05535), as used by IRRA and SEN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def identity_loss(image_logits: torch.Tensor, text_logits: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
    """``L = (CE(image_logits, pids) + CE(text_logits, pids)) / 2``.

    Args:
        image_logits: ``(B, num_classes)`` classifier output for the global image features.
        text_logits: ``(B, num_classes)`` the same classifier on the global text features.
        pids: ``(B,)`` identity labels in ``0 .. num_classes - 1``.
    """
    return (F.cross_entropy(image_logits.float(), pids) + F.cross_entropy(text_logits.float(), pids)) / 2


def identity_classifier(dim: int, num_classes: int) -> nn.Linear:
    """The shared classifier ``D -> num_classes``: weights N(0, 0.001^2), zero bias (IRRA/SEN)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 for the identity loss, got {num_classes}")
    classifier = nn.Linear(dim, num_classes)
    nn.init.normal_(classifier.weight, std=0.001)
    nn.init.zeros_(classifier.bias)
    return classifier

