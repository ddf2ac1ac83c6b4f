"""Images a server touches: uploads checked before they are decoded, and gallery files by row id only.

Uploads (:func:`decode_upload`): the bytes must be JPEG, PNG or WebP by their
signature, and the header's width x height at most ``max_pixels``; only then
are the pixels decoded, so a decompression bomb (a small PNG of 20,000 x 20,000
pixels) is refused from its header. A truncated file fails to decode and is refused.

Gallery files (:func:`gallery_file`): a client names a row id, never a path. The
row's stored relative path is joined to the gallery root and resolved
(symlinks followed); a file outside the root (a symlink pointing out, a stored
path with ``..``) is refused.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tipr.search.gallery import GalleryIndex

__all__ = ["ImageRefused", "check_row", "decode_upload", "gallery_file", "image_type", "thumbnail"]

#: Accepted uploads: signature -> format.
SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG"}
MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}


class ImageRefused(ValueError):
    """An image a server will not decode or serve; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def image_type(data: bytes) -> str | None:
    """``"JPEG"``, ``"PNG"`` or ``"WEBP"`` from the first bytes, None for anything else."""
    for signature, name in SIGNATURES.items():
        if data.startswith(signature):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _open_checked(source, max_pixels: int, what: str) -> Image.Image:
    """Open an image (header only) and refuse it when it is not JPEG/PNG/WebP or has too many pixels."""
    try:
        image = Image.open(source, formats=list(MEDIA_TYPES))
    except Image.DecompressionBombError as e:  # PIL's own check, from the header, at 2 x its MAX_IMAGE_PIXELS
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(found.group(1)):,} pixels" if found else "over PIL's safe pixel count"
        raise ImageRefused(413, f"{what} is {size}; the limit is {max_pixels:,} pixels (refused before decoding)") from e
    except Exception as e:  # UnidentifiedImageError, OSError
        raise ImageRefused(415, f"{what} is not a readable JPEG, PNG or WebP image: {type(e).__name__}: {e}") from e
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageRefused(413, f"{what} is {width:,} x {height:,} = {width * height:,} pixels; the limit is "
                                f"{max_pixels:,} pixels (refused before decoding)")
    return image


def decode_upload(data: bytes, *, max_bytes: int, max_pixels: int) -> torch.Tensor:
    """An uploaded image as a uint8 ``(3, H, W)`` RGB tensor, or :class:`ImageRefused` saying why not."""
    if len(data) == 0:
        raise ImageRefused(400, "the upload is empty: send a JPEG, PNG or WebP image")
    if len(data) > max_bytes:
        raise ImageRefused(413, f"the upload is {len(data):,} bytes; the limit is {max_bytes:,} bytes")
    if image_type(data) is None:
        raise ImageRefused(415, "the upload is not a JPEG, PNG or WebP image (by its first bytes)")
    image = _open_checked(io.BytesIO(data), max_pixels, "the upload")
    try:
        with image:
            array = np.array(image.convert("RGB"))
    except Exception as e:  # a truncated or corrupt file: "image file is truncated", ...
        raise ImageRefused(400, f"the upload cannot be decoded (truncated or damaged): {type(e).__name__}: {e}") from e
    return torch.from_numpy(array).permute(2, 0, 1)


def check_row(gallery: GalleryIndex, row: int) -> int:
    """``row`` if it is a live row id of ``gallery``, else :class:`ImageRefused` (404)."""
    at = int(np.searchsorted(gallery.deleted, row))  # deleted ids are sorted
    if not 0 <= row < gallery.rows or (at < len(gallery.deleted) and gallery.deleted[at] == row):
        raise ImageRefused(404, f"no image with row id {row} in the gallery (it holds rows 0 to {gallery.rows - 1}, "
                                f"{len(gallery)} live)")
    return row


def gallery_file(gallery: GalleryIndex, row: int) -> Path:
    """The file of live row ``row`` of ``gallery``, resolved and inside its root; else :class:`ImageRefused`."""
    check_row(gallery, row)
    root = Path(gallery.root).resolve()
    try:
        path = (root / gallery.path(row)).resolve(strict=True)
    except (OSError, RuntimeError) as e:  # gone since indexing, a symlink loop
        raise ImageRefused(404, f"the file of row {row} cannot be found any more: {type(e).__name__}") from e
    if not path.is_relative_to(root) or not path.is_file():
        raise ImageRefused(403, f"refused: the file of row {row} resolves outside the gallery folder "
                                f"(a symlink pointing out?)")
    return path


def thumbnail(path: Path, height: int, max_pixels: int) -> bytes:
    """A JPEG of the image at ``path`` at most ``height`` pixels high (and twice as wide)."""
    image = _open_checked(path, max_pixels, f"gallery file {path.name}")
    try:
        with image:
            image = image.convert("RGB")
            image.thumbnail((2 * height, height))
            out = io.BytesIO()
            image.save(out, "JPEG", quality=88)
    except ImageRefused:
        raise
    except Exception as e:
        raise ImageRefused(422, f"gallery file {path.name} cannot be decoded: {type(e).__name__}") from e
    return out.getvalue()
