"""Ranking a gallery by text queries (or by features): exact top-k in bounded chunks, or an ANN index re-scored exactly.

Every score returned is the true cosine of the query and the stored feature:

- **exact** (:func:`tipr.search.ann.exact_search`): matrix products over the
  memory-mapped shards, a chunk at a time, each chunk's ``torch.topk`` merged
  into a running top-k; never a full sort, never the whole ``(Q, N)`` matrix;
- **approximate** (:func:`tipr.search.ann.ann_search`), used when the gallery has
  an ANN index (``tipr index --ann``) and at least :data:`ANN_MIN_ROWS` rows:
  FAISS proposes candidates, which are re-scored from the stored features (rows
  added since the index was built are searched exactly and merged).

A sub-folder ``prefix`` (a camera, a day: ``"cam1/"``) restricts the ranking to
the rows under it; it always searches exactly, so a narrow prefix loses nothing
to the index's candidate list.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from tipr.search.gallery import GalleryError, GalleryIndex, model_identity

if TYPE_CHECKING:
    from tipr.model import TIPRModel
    from tipr.processing import TIPRProcessor

__all__ = ["ANN_MIN_ROWS", "SearchHit", "read_queries", "search", "search_features"]

#: Below this many rows a gallery is always searched exactly: a chunked scan is then a few ms per query.
ANN_MIN_ROWS = 100_000


@dataclass(frozen=True)
class SearchHit:
    """One ranked gallery image: ``path`` relative to the gallery root, cosine ``score``, ``rank`` from 1,
    ``row`` its global id in the gallery."""

    path: str
    score: float
    rank: int
    row: int


def _ann_index(gallery: GalleryIndex):
    from tipr.search.ann import load_ann

    cached = getattr(gallery, "_ann_cache", None)
    if cached is None or cached[0] != gallery.ann["file"]:
        cached = (gallery.ann["file"], load_ann(Path(gallery.file) / gallery.ann["file"]))
        gallery._ann_cache = cached
    return cached[1]


def search_features(
    gallery: GalleryIndex, features, top_k: int = 10, *, prefix: str | None = None, exact: bool | None = None,
    candidates: int | None = None,
) -> list[list[SearchHit]]:
    """The ``top_k`` best rows of ``gallery`` for each query feature (``(Q, D)``, normalised here), best first.

    ``prefix``: only rows whose path starts with it. ``exact``: None uses the ANN
    index when there is one and the gallery has :data:`ANN_MIN_ROWS` rows or more,
    True never, False always (an error when the gallery has none). ``candidates``:
    ANN candidates per query before re-scoring (default: :func:`~tipr.search.ann.ann_search`'s).
    """
    from tipr.search import ann

    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    queries = torch.nn.functional.normalize(torch.as_tensor(np.asarray(features), dtype=torch.float32), dim=-1)
    if queries.dim() != 2 or queries.shape[1] != gallery.dim:
        raise ValueError(f"query features must have shape (Q, {gallery.dim}), got {tuple(queries.shape)}")
    if len(gallery) == 0:
        raise GalleryError(f"gallery {gallery.name} holds no images")
    if exact is False and not gallery.ann:
        raise GalleryError(f"gallery {gallery.name} has no ANN index: build one with 'tipr index --ann true'")
    queries = queries.numpy()
    if prefix:
        skipped = gallery.outside(prefix)
        if len(skipped) == gallery.rows:
            raise GalleryError(f"gallery {gallery.name} holds no image under {prefix!r}")
        scores, ids = ann.exact_search(queries, gallery.blocks, top_k, deleted=skipped)
    elif gallery.ann and exact is not True and (exact is False or len(gallery) >= ANN_MIN_ROWS):
        scores, ids = ann.ann_search(_ann_index(gallery), queries, top_k, blocks=gallery.blocks,
                                     deleted=gallery.deleted, candidates=candidates,
                                     nprobe=gallery.ann.get("nprobe"))
    else:
        scores, ids = ann.exact_search(queries, gallery.blocks, top_k, deleted=gallery.deleted)
    return [
        [SearchHit(gallery.path(row), float(s), rank, int(row)) for rank, (s, row) in enumerate(zip(r_s, r_i), 1)]
        for r_s, r_i in zip(np.asarray(scores).tolist(), np.asarray(ids).tolist())
    ]


def encode_queries(model: TIPRModel, processor: TIPRProcessor, queries: Sequence[str],
                   batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text features ``(Q, D)`` float32 on CPU: one tokenizer call, ``batch_size`` at a time."""
    device = next(model.parameters()).device
    tokens = processor.tokenize(list(queries))  # (Q, L)
    out = []
    with torch.inference_mode():
        for start in range(0, len(tokens), batch_size):
            text = model.encode_text(tokens[start:start + batch_size].to(device)).float()  # (q, D)
            out.append(torch.nn.functional.normalize(text, dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, int(model.embed_dim))


def search(
    model: TIPRModel,
    processor: TIPRProcessor,
    gallery: GalleryIndex,
    queries: str | Sequence[str],
    top_k: int = 10,
    *,
    prefix: str | None = None,
    exact: bool | None = None,
    batch_size: int = 256,
) -> list[list[SearchHit]]:
    """The ``top_k`` best gallery images of each text query, best first (``prefix``, ``exact``: see
    :func:`search_features`). ``top_k`` larger than the gallery is clamped to its size. The model
    must be the one that encoded the gallery (:meth:`GalleryIndex.check_model`)."""
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
    blank = [i for i, text in enumerate(queries, start=1) if not str(text).strip()]
    if blank:
        raise ValueError(f"query {blank[0]} is blank: describe the person to find")
    return search_features(gallery, encode_queries(model, processor, queries, batch_size), top_k,
                           prefix=prefix, exact=exact)


def read_queries(path: str | os.PathLike) -> list[str]:
    """Queries from a UTF-8 text file, one per line; blank lines are ignored."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read queries from {path}: {type(e).__name__}: {e}") from e
    return [line.strip() for line in text.splitlines() if line.strip()]
