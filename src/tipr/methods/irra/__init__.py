"""IRRA (Jiang and Ye, CVPR 2023): cross-modal implicit relation reasoning and aligning.

SEN's base and the field's baseline: the dual encoder with SDM and ID losses,
plus a masked language model that must read the image to fill in the caption.

- :mod:`~tipr.methods.irra.config`: :class:`IRRAConfig`;
- :mod:`~tipr.methods.irra.model`: :class:`IRRAModel`, the network and objective;
- :mod:`~tipr.methods.irra.masking`: the per-sample caption masking, run in the loader;
- :mod:`~tipr.methods.irra.convert`: the authors' checkpoint layout of its heads.
"""

from tipr.methods import MethodSpec
from tipr.methods.irra import convert
from tipr.methods.irra.config import IRRAConfig
from tipr.methods.irra.masking import CaptionMasking, mask_caption
from tipr.methods.irra.model import IRRAModel, IRRAOutput

SPEC = MethodSpec(
    name=IRRAConfig.name,
    model_class=IRRAModel,
    config_class=IRRAConfig,
    reference_markers=("mlm_head.", "cross_modal_transformer."),
    convert_heads=convert.convert_heads,
    reference_settings=convert.reference_settings,
)

__all__ = ["SPEC", "CaptionMasking", "IRRAConfig", "IRRAModel", "IRRAOutput", "mask_caption"]
