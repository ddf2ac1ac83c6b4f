"""Masked-patch restoration loss of text-guided image restoration (TIR).

From SEN ("Text-guided Image Restoration and Semantic Enhancement for
Text-to-Image Person Retrieval", Liu et al., Neural Networks 2025), which takes
the per-patch MSE on masked patches from MAE ("Masked Autoencoders Are Scalable
Vision Learners", He et al., CVPR 2022).
"""

from __future__ import annotations

import torch


def masked_patch_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error per patch, averaged over the masked patches only.

        ``L = sum_{b,n} mask_bn * mean_k (pred_bnk - target_bnk)^2 / sum_{b,n} mask_bn``

    Args:
        prediction: ``(B, N, K)`` predicted pixels per patch (K = p * p * 3).
        target: ``(B, N, K)`` the colour image, patchified the same way.
        mask: ``(B, N)``, 1 where the patch was hidden from the encoder, 0 where visible.
    """
    if prediction.shape != target.shape or mask.shape != prediction.shape[:2]:
        raise ValueError(
            f"shapes do not match: prediction {tuple(prediction.shape)}, target {tuple(target.shape)}, "
            f"mask {tuple(mask.shape)}"
        )
    per_patch = (prediction.float() - target.float()).pow(2).mean(dim=-1)  # (B, N)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum()
