"""The SEN model: ``SENModel`` (plain PyTorch, ``from_pretrained``) and ``TIPRModule`` (Lightning).

``TIPRModule`` is imported lazily so that ``import tipr.model`` for the network
alone does not import Lightning.
"""

from tipr.model.backbone import BACKBONE_PRESETS, build_clip, resize_position_embedding
from tipr.model.config import LOSS_NAMES, REFERENCE_LOSS_WEIGHTS, SENConfig
from tipr.model.restoration import TextGuidedRestoration
from tipr.model.sen import SENModel, SENOutput

__all__ = [
    "BACKBONE_PRESETS",
    "LOSS_NAMES",
    "REFERENCE_LOSS_WEIGHTS",
    "SENConfig",
    "SENModel",
    "SENOutput",
    "TIPRModule",
    "TextGuidedRestoration",
    "build_clip",
    "resize_position_embedding",
]


def __getattr__(name):
    if name == "TIPRModule":
        from tipr.model.lightning_module import TIPRModule

        return TIPRModule
    raise AttributeError(f"module 'tipr.model' has no attribute {name!r}")
