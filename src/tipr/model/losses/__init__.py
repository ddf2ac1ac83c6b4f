"""The losses of SEN, one per module: SDM, ID, hardest-negative triplet, ITC, masked-patch MSE.

Each is a pure function plus a small ``nn.Module`` form. Inputs are cast to
float32 inside, so they are safe to call under autocast (bf16/fp16 features).
"""

from tipr.model.losses.identity import IdentityLoss, identity_classifier, identity_loss
from tipr.model.losses.itc import ITCLoss, itc_loss
from tipr.model.losses.restoration import masked_patch_mse
from tipr.model.losses.sdm import SDMLoss, sdm_loss
from tipr.model.losses.triplet import HardestNegativeTripletLoss, hardest_negative_triplet_loss

__all__ = [
    "HardestNegativeTripletLoss",
    "ITCLoss",
    "IdentityLoss",
    "SDMLoss",
    "hardest_negative_triplet_loss",
    "identity_classifier",
    "identity_loss",
    "itc_loss",
    "masked_patch_mse",
    "sdm_loss",
]
