"""One image-grid renderer for every picture tipr draws: search contact sheets, W&B panels, sample grids.

::

    from tipr.render import image_grid

    sheet = image_grid(
        [[hit1, hit2, hit3], [hit4, hit5]],          # rows of tiles: PIL images or (C, H, W) tensors
        captions=[["#1 0.61", "#2 0.58", "#3 0.55"],  # wrapped under each tile (optional)
                  ["#1 0.40", "#2 0.38"]],
        row_titles=["a woman in a red coat", "a man with a black backpack"],  # wrapped above each row (optional)
        tile_size=(128, 64),                          # (H, W); default: the first tile's size
    )
    sheet.save("grid.png")

Layout: every cell is ``[title band][tile][caption band]``, the bands as high
as the most wrapped lines any row title / caption needs, and the cells go
through one ``torchvision.utils.make_grid`` call (``pad`` white pixels around
and between them); rows shorter than the longest are filled with white cells.
Text is drawn afterwards: a row's title from the left edge of its row across
the whole grid width, each caption under its tile within the tile's width.

Text uses Pillow's scalable default font (``ImageFont.load_default(size=...)``,
Pillow >= 10.1 with FreeType) and is wrapped at spaces by pixel width
(:func:`wrap_text`), so spaces keep their width and words are never glued
together; only a single word wider than the line is broken between characters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = ["display_size", "image_grid", "line_height", "load_font", "to_tile", "wrap_text"]

#: Pixels between lines of text, and between a tile and its caption.
LINE_SPACING = 2


@lru_cache(maxsize=8)
def load_font(size: int = 12) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's default font at ``size`` pixels; the fixed-size bitmap default where ``size`` is not supported."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError, ImportError):  # Pillow < 10.1, or no FreeType
        return ImageFont.load_default()


def line_height(font: Any) -> int:
    """Pixels from one line of text to the next in ``font``."""
    if hasattr(font, "getmetrics"):
        ascent, descent = font.getmetrics()
        return ascent + descent + LINE_SPACING
    return font.getbbox("Ag|")[3] + LINE_SPACING


def wrap_text(text: str, font: Any, max_width: float) -> list[str]:
    """``text`` as lines no wider than ``max_width`` pixels in ``font``, broken at spaces.

    Words stay whole and keep one space between them ("skirt and" is never
    "skirtand"); newlines in ``text`` start new lines. A single word wider than
    ``max_width`` is the only thing broken elsewhere: between characters, as
    few times as it takes. Empty text gives ``[]``.
    """
    if max_width <= 0:
        raise ValueError(f"max_width must be > 0 pixels, got {max_width}")
    lines: list[str] = []
    for paragraph in text.splitlines():
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= max_width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while len(word) > 1 and font.getlength(word) > max_width:  # too wide on its own: cut between characters
                cut = 1
                while cut < len(word) and font.getlength(word[:cut + 1]) <= max_width:
                    cut += 1
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    while lines and not lines[-1]:
        lines.pop()
    return lines


def display_size(image_size: Sequence[int], min_height: int = 128) -> tuple[int, int]:
    """``(H, W)`` scaled up by the smallest whole factor that makes it at least ``min_height`` high."""
    h, w = (int(s) for s in image_size)
    factor = max(1, math.ceil(min_height / h))
    return h * factor, w * factor


def to_tile(image: Any, size: Sequence[int] | None = None, resample: int = Image.Resampling.BILINEAR) -> torch.Tensor:
    """A uint8 ``(3, H, W)`` tensor of a PIL image or a ``(C, H, W)`` tensor (C = 1 or 3), resized to ``size``.

    Tensors are uint8 (0..255) or floating point in [0, 1] (clamped), as in
    torchvision; a CLIP-normalised tensor must be un-normalised first
    (:func:`tipr.training.panels.to_pil`).
    """
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"a tile tensor must be (C, H, W) with C = 1 or 3, got shape {tuple(image.shape)}")
        pixels = image.detach().cpu()
        if pixels.is_floating_point():
            pixels = pixels.clamp(0, 1).mul(255).round()
        elif pixels.dtype != torch.uint8:
            raise ValueError(f"a tile tensor must be uint8 or floating point, got {pixels.dtype}")
        array = pixels.to(torch.uint8).expand(3, -1, -1).permute(1, 2, 0).numpy()
        image = Image.fromarray(np.ascontiguousarray(array))
    elif not isinstance(image, Image.Image):
        raise TypeError(f"a tile must be a PIL image or a (C, H, W) tensor, got {type(image).__name__}")
    image = image.convert("RGB")
    if size is not None and image.size != (int(size[1]), int(size[0])):
        image = image.resize((int(size[1]), int(size[0])), resample)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def image_grid(
    rows: Sequence[Sequence[Any]],
    captions: Sequence[Sequence[str]] | None = None,
    row_titles: Sequence[str] | None = None,
    *,
    tile_size: Sequence[int] | None = None,
    font_size: int = 12,
    pad: int = 4,
    resample: int = Image.Resampling.BILINEAR,
) -> Image.Image:
    """Tiles in rows on white, with wrapped captions under them and a wrapped title above each row.

    Args:
        rows: rows of tiles (PIL images, uint8 or [0, 1] float ``(C, H, W)``
            tensors); rows may differ in length.
        captions: per tile (same shape as ``rows``), wrapped to the tile width.
        row_titles: one per row, wrapped to the grid width.
        tile_size: ``(H, W)`` every tile is resized to (``resample``); default
            the first tile's size.
        font_size: text height in pixels (see :func:`load_font`).
        pad: white pixels around and between the cells.

    The layout is in the module docstring; the result's size is
    ``(pad + columns * (W + pad), pad + len(rows) * (title band + H + caption band + pad))``.
    """
    from torchvision.utils import make_grid

    if not rows or not all(len(row) for row in rows):
        raise ValueError(f"image_grid needs at least one tile in every row, got rows of {[len(r) for r in rows]} tiles")
    if captions is not None and [len(c) for c in captions] != [len(r) for r in rows]:
        raise ValueError(f"captions must match the tiles row by row: {[len(r) for r in rows]} tiles, "
                         f"captions {[len(c) for c in captions]}")
    if row_titles is not None and len(row_titles) != len(rows):
        raise ValueError(f"{len(rows)} rows need as many row_titles, got {len(row_titles)}")
    tile_h, tile_w = (int(s) for s in (tile_size or to_tile(rows[0][0]).shape[1:]))
    columns = max(len(row) for row in rows)
    width = pad + columns * (tile_w + pad)
    font = load_font(font_size)
    step = line_height(font)
    title_lines = [wrap_text(title, font, width - 2 * pad) for title in row_titles] if row_titles is not None else []
    caption_lines = [[wrap_text(c, font, tile_w) for c in row] for row in captions] if captions is not None else []
    title_h = max((len(lines) for lines in title_lines), default=0) * step
    title_h += pad if row_titles is not None else 0
    caption_h = max((len(lines) for row in caption_lines for lines in row), default=0) * step
    caption_h += LINE_SPACING if captions is not None else 0

    cell_h = title_h + tile_h + caption_h
    cells = torch.full((len(rows) * columns, 3, cell_h, tile_w), 255, dtype=torch.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            cells[r * columns + c, :, title_h:title_h + tile_h] = to_tile(image, (tile_h, tile_w), resample)
    if len(cells) == 1:  # make_grid returns a single image unpadded
        grid = torch.full((3, cell_h + 2 * pad, tile_w + 2 * pad), 255, dtype=torch.uint8)
        grid[:, pad:pad + cell_h, pad:pad + tile_w] = cells[0]
    else:
        grid = make_grid(cells, nrow=columns, padding=pad, pad_value=255)
    sheet = Image.fromarray(grid.permute(1, 2, 0).numpy())

    draw = ImageDraw.Draw(sheet)
    for r in range(len(rows)):
        top = pad + r * (cell_h + pad)
        for i, line in enumerate(title_lines[r] if title_lines else []):
            draw.text((pad, top + i * step), line, fill="black", font=font)
        for c, lines in enumerate(caption_lines[r] if caption_lines else []):
            x, y = pad + c * (tile_w + pad), top + title_h + tile_h + LINE_SPACING
            for i, line in enumerate(lines):
                draw.text((x, y + i * step), line, fill="black", font=font)
    return sheet
