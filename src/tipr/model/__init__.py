"""Shared building blocks of every method: the CLIP backbone, the base model, heads' blocks, losses.

Nothing here knows a method: methods live in :mod:`tipr.methods` and build on
:class:`TIPRModel`; training lives in :mod:`tipr.training`. Names are imported
lazily, so ``import tipr.model.distributed`` does not pull in transformers.
"""

from importlib import import_module

_EXPORTS = {
    "BACKBONE_PRESETS": "backbone",
    "build_clip": "backbone",
    "resize_position_embedding": "backbone",
    "EncoderConfig": "config",
    "MethodConfig": "config",
    "TIPRModel": "base",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
