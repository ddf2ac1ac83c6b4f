"""Ranking a gallery by text queries: cosine similarity and ``torch.topk``, never a full sort."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tipr.search.gallery import GalleryError, GalleryIndex, model_identity

if TYPE_CHECKING:
    from tipr.model import TIPRModel
    from tipr.processing import TIPRProcessor

__all__ = ["SearchHit", "read_queries", "search"]


@dataclass(frozen=True)
class SearchHit:
    """One ranked gallery image: ``path`` relative to the gallery root, cosine ``score``, ``rank`` from 1."""

    path: str
    score: float
    rank: int


def search(
    model: TIPRModel,
    processor: TIPRProcessor,
    gallery: GalleryIndex,
    queries: str | Sequence[str],
    top_k: int = 10,
    *,
    batch_size: int = 256,
) -> list[list[SearchHit]]:
    """The ``top_k`` best gallery images of each query, best first.

    The queries are tokenized in one call and encoded ``batch_size`` at a time
    on the model's device; scores are cosine similarities (both sides
    L2-normalised) and each row keeps its ``top_k`` with ``torch.topk``.
    ``top_k`` larger than the gallery is clamped to its size. The model must be
    the one that encoded the gallery (:meth:`GalleryIndex.check_model`).
    """
    if isinstance(queries, str):
        queries = [queries]
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    gallery.check_model(model_identity(model))
    if len(gallery) == 0:
        raise GalleryError(f"gallery {gallery.name} holds no images")
    if len(queries) == 0:
        return []
    device = next(model.parameters()).device
    tokens = processor.tokenize(list(queries))  # (Q, L), one tokenizer call
    images = gallery.features.to(device, torch.float32, non_blocking=True)  # (N, D), normalised
    k = min(top_k, len(gallery))
    scores, top = [], []
    with torch.inference_mode():
        for start in range(0, len(tokens), batch_size):
            text = model.encode_text(tokens[start:start + batch_size].to(device)).float()  # (q, D)
            text = torch.nn.functional.normalize(text, dim=-1)
            best = torch.topk(text @ images.T, k, dim=1)  # (q, k), best first
            scores.append(best.values.cpu())
            top.append(best.indices.cpu())
    return [
        [SearchHit(gallery.paths[j], s, rank) for rank, (s, j) in enumerate(zip(row_scores, row_top), start=1)]
        for row_scores, row_top in zip(torch.cat(scores).tolist(), torch.cat(top).tolist())
    ]


def read_queries(path: str | os.PathLike) -> list[str]:
    """Queries from a UTF-8 text file, one per line; blank lines are ignored."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read queries from {path}: {type(e).__name__}: {e}") from e
    return [line.strip() for line in text.splitlines() if line.strip()]
