"""Configs of a model: the dual encoder every method shares, and a method's own settings.

A model is built from two objects:

- :class:`EncoderConfig`: the CLIP dual encoder and its inputs (the full
  ``CLIPConfig`` dict, the number of training identities, image size, text
  length, position-table interpolation, the reference's fp16 weights), the
  same for every method;
- a :class:`MethodConfig` subclass (``SENConfig``, ``IRRAConfig``...): the
  method's heads, loss weights and recipe (which modules train at the boosted
  learning rate). Each method folder under :mod:`tipr.methods` defines one.

A pretrained folder's ``config.json`` holds both, with the method's registered
name as ``model_type`` (as in transformers), so one loader returns the right
model for any saved folder (:meth:`tipr.model.TIPRModel.from_pretrained`)::

    {"format": "tipr", "model_type": "irra", "encoder": {...}, "method": {...}}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from tipr.model.backbone import POSITION_INTERPOLATIONS

#: The ``format`` entry of a config written by tipr 0.3 and later.
CONFIG_FORMAT = "tipr"


def _from_fields(cls, values: Mapping[str, Any], source: str, what: str):
    """``cls(**values)`` where unknown keys are an error naming ``source`` and the expected keys."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{source}: unknown {what} key(s) {unknown}; expected some of {sorted(names)}")
    try:
        return cls(**values)
    except TypeError as e:  # a required key is missing
        raise ValueError(f"{source}: {what}: {e}") from e


@dataclass
class EncoderConfig:
    """The CLIP dual encoder and its inputs, shared by every method.

    Args:
        clip: the CLIP dual encoder's ``CLIPConfig`` as a dict (``config.to_dict()``).
        num_classes: training identities (the ID classifier's size; 0 builds no classifier).
        image_size: input ``(H, W)``; the position table is resized to its grid once.
        text_length: token positions per caption (<= the text encoder's context).
        position_interpolation: how the position table is resized: ``"bilinear"``
            (the reference) or ``"bicubic"``.
        reference_fp16_weights: the reference's precision: linear, convolution and
            attention weights in fp16 (layer norms and embeddings fp32) under fp16
            autocast, as OpenAI CLIP's ``convert_weights``.
    """

    clip: dict[str, Any]
    num_classes: int
    image_size: tuple[int, int] = (384, 128)
    text_length: int = 77
    position_interpolation: str = "bilinear"
    reference_fp16_weights: bool = False

    def __post_init__(self) -> None:
        self.image_size = tuple(int(s) for s in self.image_size)
        if len(self.image_size) != 2 or min(self.image_size) <= 0:
            raise ValueError(f"image_size must be a positive (H, W), got {self.image_size}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
        if self.position_interpolation not in POSITION_INTERPOLATIONS:
            raise ValueError(
                f"position_interpolation must be one of {POSITION_INTERPOLATIONS}, got {self.position_interpolation!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "image_size": list(self.image_size)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "the config") -> EncoderConfig:
        return _from_fields(cls, dict(values), source, "encoder config")


@dataclass
class MethodConfig:
    """Base of a method's settings: its heads, loss weights and recipe.

    A subclass is a dataclass with a registered ``name`` (``"sen"``, ``"irra"``),
    one ``<loss>_weight`` field per loss term (0 skips the term; heads exist
    because the method has them, never because a weight is above 0), and the
    recipe's parameter-name prefixes trained at ``lr * lr_factor``:

    - ``boosted_modules``: those modules' weights (and biases unless below);
    - ``boosted_bias_modules``: those modules' biases, at ``lr * lr_factor`` with no
      weight decay; every other bias takes ``lr * bias_lr_factor``, no decay.

    LightningCLI shows a method config as the nested option ``--model.method``
    (``--model.method=irra``, then ``--model.method.mlm_weight=0.5``).
    """

    name: ClassVar[str] = ""
    #: What tables and logs call the method.
    display_name: ClassVar[str] = ""

    @property
    def loss_weights(self) -> dict[str, float]:
        """``{term: weight}`` of every ``<term>_weight`` field, in field order."""
        return {f.name.removesuffix("_weight"): float(getattr(self, f.name)) for f in fields(self)
                if f.name.endswith("_weight")}

    def __post_init__(self) -> None:
        weights = self.loss_weights
        for term, weight in weights.items():
            if not weight >= 0:
                raise ValueError(f"{self.name} {term}_weight={weight!r} must be >= 0")
        if weights and not any(weights.values()):
            raise ValueError(f"{self.name}: every loss weight is 0 ({weights}); expected at least one above 0")
        for option in ("boosted_modules", "boosted_bias_modules"):
            value = getattr(self, option, ())
            setattr(self, option, (value,) if isinstance(value, str) else tuple(value))
        temperature = getattr(self, "temperature", 1.0)
        if not temperature > 0:
            raise ValueError(f"{self.name} temperature must be > 0, got {temperature}")

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        for option in ("boosted_modules", "boosted_bias_modules"):
            if option in values:
                values[option] = list(values[option])
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "the config") -> MethodConfig:
        return _from_fields(cls, dict(values), source, f"{cls.name} config")


def config_dict(encoder: EncoderConfig, method: MethodConfig) -> dict[str, Any]:
    """The JSON-ready dict of ``config.json`` (and of a Lightning checkpoint's ``tipr_config``)."""
    return {"format": CONFIG_FORMAT, "model_type": method.name, "encoder": encoder.to_dict(),
            "method": method.to_dict()}


def parse_config(values: Mapping[str, Any], source: str) -> tuple[EncoderConfig, MethodConfig]:
    """The ``(EncoderConfig, MethodConfig)`` of a :func:`config_dict`; ``source`` names the file in errors.

    A config of tipr 0.2 (``"format": "tipr-sen"``, one flat dict) is read by the
    method that claims that format (:attr:`tipr.methods.MethodSpec.legacy_format`).
    """
    from tipr.methods import method_spec, spec_for_legacy_format

    if not isinstance(values, Mapping):
        raise ValueError(f"{source}: expected a JSON object, got {type(values).__name__}")
    fmt = values.get("format")
    if fmt != CONFIG_FORMAT:
        spec = spec_for_legacy_format(fmt)
        if spec is None:
            raise ValueError(f"{source}: format {fmt!r} is not a tipr model config (expected {CONFIG_FORMAT!r})")
        return spec.read_legacy_config(dict(values), source)
    missing = [key for key in ("model_type", "encoder", "method") if key not in values]
    if missing:
        raise ValueError(f"{source}: lacks {missing}; expected the keys format, model_type, encoder, method")
    spec = method_spec(values["model_type"], source=f"{source}: model_type")
    return EncoderConfig.from_dict(values["encoder"], source), spec.config_class.from_dict(values["method"], source)


def save_config(path: str | Path, encoder: EncoderConfig, method: MethodConfig) -> None:
    Path(path).write_text(json.dumps(config_dict(encoder, method), indent=2, sort_keys=True) + "\n")


def load_config(path: str | Path) -> tuple[EncoderConfig, MethodConfig]:
    path = Path(path)
    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the model config {path}: {e}") from e
    return parse_config(values, str(path))
