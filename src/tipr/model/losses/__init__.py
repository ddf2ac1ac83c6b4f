"""The losses of the methods, one per module: SDM, ID, hardest-negative triplet, ITC, masked-patch MSE, MLM.

Each is a pure function. Inputs are cast to
float32 inside, so they are safe to call under autocast (bf16/fp16 features).
"""

from tipr.model.losses.identity import identity_classifier, identity_loss
from tipr.model.losses.itc import itc_loss
from tipr.model.losses.mlm import masked_token_loss
from tipr.model.losses.restoration import masked_patch_mse
from tipr.model.losses.sdm import sdm_loss
from tipr.model.losses.triplet import hardest_negative_triplet_loss

__all__ = [
    "hardest_negative_triplet_loss",
    "identity_classifier",
    "identity_loss",
    "itc_loss",
    "masked_patch_mse",
    "masked_token_loss",
    "sdm_loss",
]
