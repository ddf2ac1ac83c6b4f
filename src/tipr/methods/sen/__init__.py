"""SEN (Liu, Li, Zhao, Dong; Neural Networks 2025): text-guided image restoration and semantic enhancement.

- :mod:`~tipr.methods.sen.config`: :class:`SENConfig` (heads, loss weights, recipe);
- :mod:`~tipr.methods.sen.model`: :class:`SENModel`, the network and objective;
- :mod:`~tipr.methods.sen.restoration`: the TIR head and its helpers;
- :mod:`~tipr.methods.sen.convert`: the authors' checkpoint layout of the TIR head.
"""

from tipr.methods import MethodSpec
from tipr.methods.sen import convert
from tipr.methods.sen.config import LEGACY_FORMAT, SENConfig, read_legacy_config
from tipr.methods.sen.model import SENModel, SENOutput
from tipr.methods.sen.restoration import TextGuidedRestoration

SPEC = MethodSpec(
    name=SENConfig.name,
    model_class=SENModel,
    config_class=SENConfig,
    reference_markers=("cross_modal_transformer_mae.", "decoder_pred."),
    extends=("irra",),  # SEN's files also carry IRRA's MLM modules (unused)
    convert_heads=convert.convert_heads,
    reference_settings=convert.reference_settings,
    legacy_format=LEGACY_FORMAT,
    read_legacy_config=read_legacy_config,
)

__all__ = ["SPEC", "SENConfig", "SENModel", "SENOutput", "TextGuidedRestoration"]
