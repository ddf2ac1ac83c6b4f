"""``IRRAConfig``: IRRA's heads, loss weights and recipe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tipr.model.config import MethodConfig

#: The reference's learning-rate rules by parameter name, in its order: a name with ``cross``
#: gets 5x; every bias 2x and no decay (overriding); then ``classifier`` and ``mlm_head``, weights
#: and biases, 5x (their biases keep no decay). As prefixes of ``IRRAModel`` parameter names:
REFERENCE_BOOSTED_MODULES = ("cross_attn", "cross_modal_transformer", "classifier", "mlm_head")
REFERENCE_BOOSTED_BIAS_MODULES = ("classifier", "mlm_head")


@dataclass
class IRRAConfig(MethodConfig):
    """IRRA (Jiang and Ye, CVPR 2023): SDM, ID and implicit relation reasoning (a masked
    language model that reads the image); the defaults are the authors' run.

    Args:
        sdm_weight, id_weight, mlm_weight, itc_weight: loss weights (reference 1, 1, 1, 0);
            0 skips the term (the heads stay).
        temperature: tau of SDM and ITC (logits = cosine / tau).
        cross_modal_depth: residual blocks of the cross-modal transformer (reference 4).
        mlm_probability: share of caption tokens chosen for masking (reference 0.15); a
            chosen token becomes the mask id (80 %), a random word (10 %) or stays (10 %).
        mask_token_id: the ``<|mask|>`` id; default ``vocab_size - 3`` as the reference's
            tokenizer (49405 for CLIP's 49,408 ids).
        unmasked_retrieval_captions: SDM, ID (and ITC) read the original caption, as the
            paper describes. A departure: the reference's dataset masks the caption's
            array in place (shared memory; the authors confirm it in IRRA issues #13 and
            #21), so its retrieval losses read the masked caption too, and its published
            numbers come from that; off reproduces it.
        boosted_modules, boosted_bias_modules: the reference's rules above (see
            :class:`~tipr.model.MethodConfig`).
    """

    name: ClassVar[str] = "irra"
    display_name: ClassVar[str] = "IRRA"

    sdm_weight: float = 1.0
    id_weight: float = 1.0
    mlm_weight: float = 1.0
    itc_weight: float = 0.0
    temperature: float = 0.02
    cross_modal_depth: int = 4
    mlm_probability: float = 0.15
    mask_token_id: int | None = None
    unmasked_retrieval_captions: bool = False
    boosted_modules: tuple[str, ...] = REFERENCE_BOOSTED_MODULES
    boosted_bias_modules: tuple[str, ...] = REFERENCE_BOOSTED_BIAS_MODULES

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cross_modal_depth < 1:
            raise ValueError(f"irra cross_modal_depth must be >= 1, got {self.cross_modal_depth}")
        if not 0 < self.mlm_probability < 1:
            raise ValueError(f"irra mlm_probability must be in (0, 1), got {self.mlm_probability}")
