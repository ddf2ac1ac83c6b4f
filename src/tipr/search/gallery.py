"""The gallery file: image features of a folder, with what incremental indexing and the model check need.

Gallery file format (version 1): one ``torch.save`` file, a dict that
``torch.load(path, weights_only=True)`` reads:

- ``"format"``: ``"tipr-gallery"``; ``"version"``: ``1``;
- ``"root"``: the indexed folder, absolute;
- ``"paths"``: ``list[str]``, POSIX paths relative to ``root``, sorted;
- ``"features"``: float32 ``(N, D)``, L2-normalised image features, row ``i`` of ``paths[i]``;
- ``"sizes"``, ``"mtimes"``: int64 ``(N,)``, file size and ``st_mtime_ns`` when
  encoded (taken before reading, so a file changed while indexing is encoded again next time);
- ``"model"``: ``{"fingerprint": hex str, "checkpoint": str or None, "image_size": [H, W],
  "text_length": int, "embed_dim": D}``;
- ``"failed"``: ``dict[str, str]``, files under ``root`` that could not be read
  at the last run (relative path -> reason); they are not in ``paths``.

It is written to a temporary file next to the target and renamed into place
(:func:`tipr.files.atomic_write`), so an interrupted run leaves the previous gallery intact.

A gallery only makes sense with the model that encoded it, so it records the
model's fingerprint (:func:`model_fingerprint`) and :meth:`GalleryIndex.check_model`
refuses another model, naming both. ``"checkpoint"`` is where the model came
from (a pretrained folder or ``.ckpt`` file, made absolute, or a hub id); it is
only for messages: the fingerprint decides.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tipr.files import atomic_write

if TYPE_CHECKING:
    from tipr.model import TIPRModel

__all__ = ["GALLERY_FORMAT", "GALLERY_VERSION", "GalleryError", "GalleryIndex", "model_fingerprint", "model_identity"]

GALLERY_FORMAT = "tipr-gallery"
GALLERY_VERSION = 1


class GalleryError(ValueError):
    """A gallery file that is not one, is damaged, or belongs to another model."""


_fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_fingerprint(model: TIPRModel) -> str:
    """SHA-256 (hex) over the dual encoder's weights (names, dtypes, shapes, bytes), image size and text length.

    Only ``model.clip`` counts: the ID classifier and the method's heads change no
    feature. Hashing runs at about 1.7 GB/s (0.4 s for ViT-B/16); the result is
    kept per model until a weight is replaced or changed in place (tensor
    version counters), so searching query after query does not hash again.
    """
    state = model.clip.state_dict()
    key = tuple((name, t.data_ptr(), t._version, t.dtype) for name, t in state.items())
    cached = _fingerprints.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    size = [int(s) for s in model.encoder_config.image_size]
    h = hashlib.sha256(f"tipr-model image_size={size} text_length={int(model.encoder_config.text_length)}\n".encode())
    for name, tensor in state.items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name} {t.dtype} {tuple(tensor.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy())
    fingerprint = h.hexdigest()
    _fingerprints[model] = (key, fingerprint)
    return fingerprint


def model_identity(model: TIPRModel, checkpoint: str | os.PathLike | None = None) -> dict[str, Any]:
    """What a gallery records about the model that encoded it (see the module docstring).

    ``checkpoint``: where the model came from; a local path is made absolute, a hub id kept as it is.
    """
    if checkpoint is not None:
        checkpoint = str(Path(checkpoint).resolve()) if Path(checkpoint).expanduser().exists() else str(checkpoint)
    return {
        "fingerprint": model_fingerprint(model),
        "checkpoint": checkpoint,
        "image_size": [int(s) for s in model.encoder_config.image_size],
        "text_length": int(model.encoder_config.text_length),
        "embed_dim": int(model.embed_dim),
    }


def describe_model(identity: dict[str, Any]) -> str:
    """A model identity for people: where it came from, fingerprint prefix, input size, text length."""
    h, w = identity["image_size"]
    name = identity["checkpoint"] or "an unnamed model"
    return f"{name} (fingerprint {identity['fingerprint'][:12]}, image {h}x{w}, text length {identity['text_length']})"


@dataclass
class GalleryIndex:
    """L2-normalised features of the images under ``root``, with what incremental indexing needs.

    ``features`` ``(N, D)`` float32, row ``i`` for ``paths[i]`` (relative, POSIX).
    ``file`` is where it was loaded from or saved to (for messages; not saved).
    What one indexing run did is not part of the gallery: :func:`~tipr.search.build_index`
    returns it beside the gallery, as an :class:`~tipr.search.IndexReport`.
    """

    root: str
    paths: list[str]
    features: torch.Tensor
    sizes: torch.Tensor  # int64 (N,)
    mtimes: torch.Tensor  # int64 (N,), st_mtime_ns
    model: dict[str, Any]
    failed: dict[str, str] = field(default_factory=dict)
    file: str | None = None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def name(self) -> str:
        """The gallery file, or a description of an unsaved gallery, for messages."""
        return self.file or f"the unsaved gallery of {self.root}"

    def to(self, device: str | torch.device) -> GalleryIndex:
        """The same gallery with its features on ``device`` (keep them there for repeated searches)."""
        return replace(self, features=self.features.to(device))

    def save(self, path: str | os.PathLike) -> None:
        """Write the gallery file (format in the module docstring) atomically (:func:`tipr.files.atomic_write`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": GALLERY_FORMAT,
            "version": GALLERY_VERSION,
            "root": self.root,
            "paths": list(self.paths),
            "features": self.features.detach().float().cpu().contiguous(),
            "sizes": self.sizes.cpu(),
            "mtimes": self.mtimes.cpu(),
            "model": dict(self.model),
            "failed": dict(self.failed),
        }
        with atomic_write(path) as f:
            torch.save(payload, f)
        self.file = str(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> GalleryIndex:
        """Read a gallery file; anything else (a checkpoint, a text file...) is a :class:`GalleryError` naming it."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"gallery file {path} does not exist (build one with 'tipr index')")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors, zip errors, disallowed globals of other torch files, ...
            raise GalleryError(f"{path} is not a tipr gallery file (cannot be read as one: {type(e).__name__})") from e
        if not isinstance(data, dict) or data.get("format") != GALLERY_FORMAT:
            raise GalleryError(
                f"{path} is not a tipr gallery file (expected a dict with 'format': {GALLERY_FORMAT!r}; "
                f"build one with 'tipr index')"
            )
        if data.get("version") != GALLERY_VERSION:
            raise GalleryError(
                f"{path} is gallery format version {data.get('version')!r}; this tipr reads version {GALLERY_VERSION}"
            )
        try:
            gallery = cls(
                root=str(data["root"]),
                paths=list(data["paths"]),
                features=data["features"],
                sizes=data["sizes"],
                mtimes=data["mtimes"],
                model=dict(data["model"]),
                failed=dict(data["failed"]),
                file=str(path),
            )
        except KeyError as e:
            raise GalleryError(f"gallery file {path} is damaged: no {e.args[0]!r} entry") from e
        n = len(gallery.paths)
        tensors = (gallery.features, gallery.sizes, gallery.mtimes)
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in tensors]
        if shapes[1:] != [(n,), (n,)] or len(shapes[0]) != 2 or shapes[0][0] != n:
            raise GalleryError(f"gallery file {path} is damaged: {n} paths but features/sizes/mtimes of shapes {shapes}")
        return gallery

    def check_model(self, identity: dict[str, Any]) -> None:
        """Raise :class:`GalleryError` naming both models if ``identity`` (:func:`model_identity`) is not the gallery's."""
        if identity["fingerprint"] != self.model.get("fingerprint"):
            given = identity["checkpoint"] or "the model given"
            raise GalleryError(
                f"gallery {self.name} was indexed with another model: {describe_model(self.model)}; "
                f"the model given is {describe_model(identity)}. Use the gallery's model, "
                f"or index the images again with {given} into another gallery file"
            )
