"""``SENConfig``: everything needed to rebuild a SEN network, as plain JSON.

A pretrained folder's ``config.json`` is :meth:`SENConfig.to_dict`; the CLIP
dual encoder is stored as its full ``CLIPConfig`` dict, so rebuilding never
needs the original backbone weights or the network.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tipr.model.backbone import POSITION_INTERPOLATIONS

#: Loss names and their weights in the SEN reference run (``itc`` is off).
REFERENCE_LOSS_WEIGHTS: dict[str, float] = {"sdm": 1.0, "id": 1.0, "triplet": 10.0, "restoration": 10.0, "itc": 0.0}
LOSS_NAMES = tuple(REFERENCE_LOSS_WEIGHTS)
#: The ``format`` entry of a config written by tipr.
CONFIG_FORMAT = "tipr-sen"


@dataclass
class SENConfig:
    """The shape and loss settings of a SEN network.

    Args:
        clip: the CLIP dual encoder's ``CLIPConfig`` as a dict (``config.to_dict()``).
        num_classes: training identities (size of the ID classifier).
        image_size: input ``(H, W)``; the position table is resized to its grid.
        text_length: token positions per caption (<= the text encoder's context).
        loss_weights: ``{name: weight}`` over :data:`LOSS_NAMES`; missing names get
            weight 0; a 0 weight turns a loss off (and the ID classifier / TIR head
            are then not built).
        temperature: tau of SDM and ITC (logits = cosine / tau).
        margin: margin of the triplet loss.
        mask_ratio: share of patches hidden from the encoder in TIR, in (0, 1).
        restoration_depth, restoration_heads, restoration_residual,
        restoration_text_padding_mask: the TIR head, see
            :class:`tipr.model.restoration.TextGuidedRestoration`.
        position_interpolation: ``"bilinear"`` (the reference) or ``"bicubic"``.
        reference_fp16_weights: the reference's fp16 weights (see :class:`tipr.model.SENModel`).
    """

    clip: dict[str, Any]
    num_classes: int
    image_size: tuple[int, int] = (384, 128)
    text_length: int = 77
    loss_weights: dict[str, float] = field(default_factory=lambda: dict(REFERENCE_LOSS_WEIGHTS))
    temperature: float = 0.02
    margin: float = 0.05
    mask_ratio: float = 0.7
    restoration_depth: int = 4
    restoration_heads: int | None = None
    restoration_residual: bool = False
    restoration_text_padding_mask: bool = False
    position_interpolation: str = "bilinear"
    reference_fp16_weights: bool = False

    def __post_init__(self) -> None:
        self.image_size = tuple(int(s) for s in self.image_size)
        if len(self.image_size) != 2 or min(self.image_size) <= 0:
            raise ValueError(f"image_size must be a positive (H, W), got {self.image_size}")
        unknown = sorted(set(self.loss_weights) - set(LOSS_NAMES))
        if unknown:
            raise ValueError(f"unknown loss name(s) {unknown}; expected some of {list(LOSS_NAMES)}")
        for name, weight in self.loss_weights.items():
            if not weight >= 0:
                raise ValueError(f"loss weight {name}={weight!r} must be >= 0")
        self.loss_weights = {name: float(self.loss_weights.get(name, 0.0)) for name in LOSS_NAMES}
        if not any(self.loss_weights.values()):
            raise ValueError(f"every loss weight is 0: {self.loss_weights}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.loss_weights["restoration"] > 0 and not 0 < self.mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.position_interpolation not in POSITION_INTERPOLATIONS:
            raise ValueError(
                f"position_interpolation must be one of {POSITION_INTERPOLATIONS}, got {self.position_interpolation!r}"
            )
        if self.loss_weights["id"] > 0 and self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 with the ID loss on, got {self.num_classes}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (with a ``format`` entry) that :meth:`from_dict` reads back."""
        return {"format": CONFIG_FORMAT, **asdict(self), "image_size": list(self.image_size)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "the config") -> SENConfig:
        """The config a :meth:`to_dict` wrote; ``source`` names the file in errors."""
        values = dict(values)
        fmt = values.pop("format", CONFIG_FORMAT)
        if fmt != CONFIG_FORMAT:
            raise ValueError(f"{source}: format {fmt!r} is not a SEN config (expected {CONFIG_FORMAT!r})")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        missing = sorted(n for n in ("clip", "num_classes") if n not in values)
        if unknown or missing:
            raise ValueError(
                f"{source}: unknown SEN config key(s) {unknown} and missing key(s) {missing}; "
                f"expected the keys {sorted(names)}"
            )
        return cls(**values)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> SENConfig:
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read the SEN config {path}: {e}") from e
        return cls.from_dict(values, source=str(path))
