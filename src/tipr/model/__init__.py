"""Shared building blocks of every method: the CLIP backbone, the base model, heads' blocks, losses.

Nothing here knows a method: methods live in :mod:`tipr.methods` and build on
:class:`TIPRModel`; training lives in :mod:`tipr.training`. Names are imported
lazily, so ``import tipr.model.distributed`` does not pull in transformers.
"""

from tipr.lazy import lazy_exports

_EXPORTS = {
    "BACKBONE_PRESETS": "backbone",
    "build_clip": "backbone",
    "resize_position_embedding": "backbone",
    "EncoderConfig": "config",
    "MethodConfig": "config",
    "TIPRModel": "base",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
