"""Which model encoded a gallery: its fingerprint (a hash of the dual encoder) and identity record.

A gallery only makes sense with the model that encoded it, so it records the
model's fingerprint (:func:`model_fingerprint`) and refuses another model, naming
both (:meth:`tipr.search.GalleryIndex.check_model`). The identity's ``"checkpoint"``
is where the model came from (a pretrained folder or ``.ckpt`` file, made
absolute, or a hub id); it is only for messages: the fingerprint decides.

Fingerprint version 2 (:data:`FINGERPRINT_VERSION`, recorded as the identity's
``"fingerprint_version"``) hashes the architecture (:func:`model_architecture`:
the ``config.json`` fields that decide the features, head counts included) with
the weights: the same weights run with another head count encode other features,
and get another fingerprint. Galleries written before (an identity without
``"fingerprint_version"``: version 1, weights, image size and text length only,
:func:`legacy_fingerprint`) cannot tell such models apart, so they are refused,
with a message saying whether the weights are the same and to index again.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tipr.model import TIPRModel

__all__ = [
    "FINGERPRINT_VERSION", "describe_model", "legacy_fingerprint", "model_architecture", "model_fingerprint",
    "model_identity",
]

#: The version of :func:`model_fingerprint` (version 1: weights only, tipr before issue 21).
FINGERPRINT_VERSION = 2
#: ``CLIPConfig`` fields of each tower that change what it computes from the same weights
#: (``_name_or_path``, ``transformers_version``, dropout, initialisers and labels do not).
_TOWER_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act",
                 "layer_norm_eps")
_VISION_FIELDS = (*_TOWER_FIELDS, "patch_size", "num_channels")
_TEXT_FIELDS = (*_TOWER_FIELDS, "vocab_size", "max_position_embeddings")

_weights_hashes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_architecture(model: TIPRModel) -> dict[str, Any]:
    """What, besides the weights, decides the model's features: JSON-ready, part of the fingerprint.

    The towers' ``CLIPConfig`` fields as ``config.json`` saves them (widths, MLP
    sizes, layers, attention heads, activation, LayerNorm eps, patch, channels,
    vocabulary, context), the embedding width, the end-of-text id text features
    are pooled at, and the encoder's input size, text length and precision.
    """
    clip = model.clip.config
    vision, text = clip.vision_config, clip.text_config
    return {
        "vision": {name: getattr(vision, name) for name in _VISION_FIELDS},
        "text": {name: getattr(text, name) for name in _TEXT_FIELDS},
        "projection_dim": int(clip.projection_dim),
        "eot_token_id": int(model.eot_token_id),
        "image_size": [int(s) for s in model.encoder_config.image_size],
        "text_length": int(model.encoder_config.text_length),
        "reference_fp16_weights": bool(model.encoder_config.reference_fp16_weights),
    }


def legacy_fingerprint(model: TIPRModel) -> str:
    """Fingerprint version 1 (galleries of tipr before issue 21): SHA-256 (hex) over the dual encoder's
    weights (names, dtypes, shapes, bytes), image size and text length, no architecture.

    Only ``model.clip`` counts: the ID classifier and the method's heads change no
    feature. Hashing runs at about 1.7 GB/s (0.4 s for ViT-B/16); the result is
    kept per model until a weight is replaced or changed in place (tensor
    version counters), so searching query after query does not hash again.
    """
    state = model.clip.state_dict()
    size = [int(s) for s in model.encoder_config.image_size]
    header = f"tipr-model image_size={size} text_length={int(model.encoder_config.text_length)}\n"
    key = (header, tuple((name, t.data_ptr(), t._version, t.dtype) for name, t in state.items()))
    cached = _weights_hashes.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    h = hashlib.sha256(header.encode())
    for name, tensor in state.items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name} {t.dtype} {tuple(tensor.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy())
    fingerprint = h.hexdigest()
    _weights_hashes[model] = (key, fingerprint)
    return fingerprint


def model_fingerprint(model: TIPRModel) -> str:
    """SHA-256 (hex) over the architecture (:func:`model_architecture`) and the dual encoder's weights.

    Version :data:`FINGERPRINT_VERSION`: the hash of the canonical JSON of the
    architecture and :func:`legacy_fingerprint` (the weights' hash, kept per model:
    the weights are hashed once, the architecture every call, in microseconds).
    """
    architecture = json.dumps(model_architecture(model), sort_keys=True, separators=(",", ":"))
    h = hashlib.sha256(f"tipr-model-fingerprint {FINGERPRINT_VERSION}\n{architecture}\n".encode())
    h.update(legacy_fingerprint(model).encode())
    return h.hexdigest()


def model_identity(model: TIPRModel, checkpoint: str | os.PathLike | None = None) -> dict[str, Any]:
    """What a gallery records about the model that encoded it (see the module docstring).

    ``checkpoint``: where the model came from; a local path is made absolute, a hub id kept as it is.
    ``"weights_fingerprint"`` (:func:`legacy_fingerprint`) and ``"architecture"`` (:func:`model_architecture`)
    are for messages (the same weights with another architecture; an older gallery's model); the
    fingerprint covers both and decides.
    """
    if checkpoint is not None:
        checkpoint = str(Path(checkpoint).resolve()) if Path(checkpoint).expanduser().exists() else str(checkpoint)
    return {
        "fingerprint": model_fingerprint(model),
        "fingerprint_version": FINGERPRINT_VERSION,
        "weights_fingerprint": legacy_fingerprint(model),
        "checkpoint": checkpoint,
        "image_size": [int(s) for s in model.encoder_config.image_size],
        "text_length": int(model.encoder_config.text_length),
        "embed_dim": int(model.embed_dim),
        "architecture": model_architecture(model),
    }


def describe_model(identity: dict[str, Any]) -> str:
    """A model identity for people: where it came from, fingerprint prefix, input size, text length, towers."""
    name = identity.get("checkpoint") or "an unnamed model"
    if not identity.get("fingerprint"):
        return f"{name} (no fingerprint: features given as they are)"
    h, w = identity["image_size"]
    towers = ""
    architecture = identity.get("architecture")
    if isinstance(architecture, dict) and {"vision", "text"} <= set(architecture):
        towers = "; " + ", ".join(
            f"{label} {t.get('hidden_size')} wide x {t.get('num_hidden_layers')} layers, "
            f"heads {t.get('num_attention_heads')}"
            for label, t in (("vision", architecture["vision"]), ("text", architecture["text"])))
    return (f"{name} (fingerprint {identity['fingerprint'][:12]}, image {h}x{w}, "
            f"text length {identity['text_length']}{towers})")
