"""Contact sheets of search results: a row per query, its text on top, its hits with rank and score."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from tipr.data.datasets import read_image
from tipr.render import display_size, image_grid
from tipr.search.gallery import GalleryIndex
from tipr.search.query import SearchHit

__all__ = ["MIN_TILE_HEIGHT", "contact_sheet"]

#: Contact sheet tiles are the model's input size, scaled up by a whole factor to at least this height.
MIN_TILE_HEIGHT = 128
#: The tile of a hit whose file cannot be read any more.
MISSING_GREY = 200


def contact_sheet(
    gallery: GalleryIndex,
    queries: Sequence[str],
    hits: Sequence[Sequence[SearchHit]],
    *,
    images_root: str | os.PathLike | None = None,
    tile_size: Sequence[int] | None = None,
    font_size: int = 12,
) -> Image.Image:
    """One row per query: ``"<n>. <query>"`` wrapped on top, its hits left to right with ``#rank score`` under each.

    Images are read from ``images_root`` (default: the gallery's folder) and
    shown at ``tile_size`` (H, W); the default is the model's input size, scaled
    up by a whole factor to at least ``MIN_TILE_HEIGHT`` pixels. A hit whose
    file cannot be read any more is a grey tile, with a warning naming it.
    Drawn by :func:`tipr.render.image_grid`.
    """
    if len(queries) != len(hits) or not all(hits):
        raise ValueError(
            f"{len(queries)} queries need as many non-empty rows of hits, got rows of {[len(row) for row in hits]}"
        )
    tile_h, tile_w = display_size(gallery.model["image_size"], MIN_TILE_HEIGHT) if tile_size is None else tile_size
    root = Path(images_root) if images_root is not None else Path(gallery.root)
    missing = torch.full((3, int(tile_h), int(tile_w)), MISSING_GREY, dtype=torch.uint8)

    def tile(path: str) -> torch.Tensor:
        try:
            return read_image(root / path)
        except RuntimeError as e:
            warnings.warn(f"contact sheet: {e}; drawn as a grey tile", stacklevel=3)
            return missing

    return image_grid(
        [[tile(hit.path) for hit in row] for row in hits],
        captions=[[f"#{hit.rank} {hit.score:.3f}" for hit in row] for row in hits],
        row_titles=[f"{q}. {text}" for q, text in enumerate(queries, start=1)],
        tile_size=(int(tile_h), int(tile_w)),
        font_size=font_size,
    )
