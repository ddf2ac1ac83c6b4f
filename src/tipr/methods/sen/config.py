"""``SENConfig``: SEN's heads, loss weights and recipe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from tipr.model.config import EncoderConfig, MethodConfig

#: Modules trained at ``lr * lr_factor`` in the reference: the ID classifier and
#: the TIR cross-attention and transformer (prefixes of ``SENModel`` parameter names).
REFERENCE_BOOSTED_MODULES = ("classifier", "restoration.cross_attn", "restoration.transformer")
#: Boosted modules whose biases also take ``lr * lr_factor`` (no weight decay) in the reference:
#: its classifier rule runs after its bias rule, the cross-modal rule before it.
REFERENCE_BOOSTED_BIAS_MODULES = ("classifier",)


@dataclass
class SENConfig(MethodConfig):
    """SEN (Liu et al., Neural Networks 2025): SDM, ID, hardest-negative triplet and
    text-guided image restoration (TIR); the defaults are the reference run's.

    Args:
        sdm_weight, id_weight, triplet_weight, restoration_weight, itc_weight: loss
            weights (reference 1, 1, 10, 10, 0); 0 skips the term (the heads stay).
        temperature: tau of SDM and ITC (logits = cosine / tau).
        margin: margin of the triplet loss.
        mask_ratio: share of patches hidden from the encoder in TIR, in (0, 1).
        restoration_depth: transformer blocks of the TIR decoder (reference 4).
        restoration_heads: heads of the TIR decoder (default: width / 64, as the reference).
        restoration_residual: add the TIR cross-attention's output to the decoder tokens.
            A departure: the reference replaces them (no residual).
        restoration_text_padding_mask: TIR ignores caption positions after the end-of-text
            token. A departure: the reference attends to all of them.
        boosted_modules: parameter-name prefixes at ``lr * lr_factor`` (reference: ID
            classifier, TIR cross-attention and transformer).
        boosted_bias_modules: prefixes whose biases take ``lr * lr_factor`` with no decay
            (reference ``[classifier]``; ``[]``, a departure, gives them the bias rate).
    """

    name: ClassVar[str] = "sen"
    display_name: ClassVar[str] = "SEN"

    sdm_weight: float = 1.0
    id_weight: float = 1.0
    triplet_weight: float = 10.0
    restoration_weight: float = 10.0
    itc_weight: float = 0.0
    temperature: float = 0.02
    margin: float = 0.05
    mask_ratio: float = 0.7
    restoration_depth: int = 4
    restoration_heads: int | None = None
    restoration_residual: bool = False
    restoration_text_padding_mask: bool = False
    boosted_modules: tuple[str, ...] = REFERENCE_BOOSTED_MODULES
    boosted_bias_modules: tuple[str, ...] = REFERENCE_BOOSTED_BIAS_MODULES

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"sen mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.restoration_depth < 1:
            raise ValueError(f"sen restoration_depth must be >= 1, got {self.restoration_depth}")


#: tipr 0.2's flat SEN config (``"format": "tipr-sen"``): encoder fields beside SEN's.
LEGACY_FORMAT = "tipr-sen"
_ENCODER_FIELDS = ("clip", "num_classes", "image_size", "text_length", "position_interpolation",
                   "reference_fp16_weights")


def read_legacy_config(values: dict[str, Any], source: str) -> tuple[EncoderConfig, SENConfig]:
    """``(EncoderConfig, SENConfig)`` of a tipr 0.2 ``config.json`` (flat, with a ``loss_weights`` dict)."""
    values = {k: v for k, v in values.items() if k != "format"}
    encoder = EncoderConfig.from_dict({k: values.pop(k) for k in _ENCODER_FIELDS if k in values}, source)
    weights = values.pop("loss_weights", {}) or {}
    values.update({f"{name}_weight": float(weight) for name, weight in weights.items()})
    return encoder, SENConfig.from_dict(values, source)
