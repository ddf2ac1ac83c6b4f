"""``tipr index`` and ``tipr search``: plain functions whose signatures and docstrings are the options.

:mod:`tipr.commands` parses them with jsonargparse (``--batch_size 32``,
``--config search.yaml``) and runs them; a raised ``OSError`` / ``ValueError``
becomes ``tipr <command>: error: <message>`` and exit code 1. The model is loaded
with :func:`tipr.pretrained.load_pretrained`, so Lightning is never imported.

Exit codes: 0 on success (``tipr index`` also when some files could not be read:
the index is valid for every other image; they are listed); 1 on an error, or
when the index holds no image at all (the empty gallery is still written); 2 on
a usage error (a bad option, ``--top_k 0``, no query at all).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt

from tipr.search.gallery import GalleryIndex, model_identity
from tipr.search.indexing import IMAGE_EXTENSIONS, build_index
from tipr.search.query import read_queries
from tipr.search.query import search as rank_gallery

if TYPE_CHECKING:
    from tipr.model import TIPRModel
    from tipr.processing import TIPRProcessor

__all__ = ["index", "load_model", "resolve_device", "search"]


def resolve_device(value: str | None) -> torch.device:
    """``--device``: a torch device that exists here; None is ``cuda`` if available, else ``cpu``."""
    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except RuntimeError as e:
        raise ValueError(f"--device {value!r} is not a torch device (expected cpu, cuda, cuda:1, ...): {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {value}: no CUDA device is available here; use --device cpu")
    return device


def load_model(source: str, device: str | None = None) -> tuple[TIPRModel, TIPRProcessor]:
    """``--model``: ``(model, processor)`` in eval mode on ``--device``; errors name the option and the source."""
    from tipr.pretrained import load_pretrained

    target = resolve_device(device)
    if str(source).endswith(".ckpt") and not Path(source).expanduser().is_file():
        raise FileNotFoundError(f"--model {source}: no such checkpoint file")
    try:
        return load_pretrained(source, map_location=target)
    except (OSError, ValueError) as e:  # these name the folder, file or hub id at fault
        raise (OSError if isinstance(e, OSError) else ValueError)(f"--model: {e}") from e
    except Exception as e:  # a damaged weights file, ...
        raise ValueError(f"--model {source} cannot be loaded as a tipr model: {type(e).__name__}: {e}") from e


def index(
    model: str,
    images: str,
    out: str,
    batch_size: PositiveInt = 64,
    num_workers: NonNegativeInt | None = None,
    device: str | None = None,
) -> int:
    """Encode every image under a folder (recursively) into a gallery file for 'tipr search'.

    Run again on the same --out to encode only new and changed files; entries of
    deleted files are dropped. Files that cannot be read are listed with their
    reason (exit 0 all the same; 1 when no image at all could be indexed).

    Args:
        model: the trained model: a pretrained folder ('tipr fit' writes <log_dir>/pretrained;
            'tipr convert'), a Hugging Face hub id, or a TIPRModule checkpoint (.ckpt).
        images: folder of images (.jpg, .jpeg, .png, .webp, any case), searched recursively.
        out: gallery file to write (updated in place if it exists).
        batch_size: images per encoder batch.
        num_workers: image decoding processes (default: min(4, CPUs)).
        device: where the model runs (default: cuda if available, else cpu).
    """
    network, processor = load_model(model, device)
    gallery, report = build_index(
        network, processor, images, out, checkpoint=model, batch_size=batch_size, num_workers=num_workers
    )
    print(report.summary())
    if len(gallery) == 0:
        print(f"tipr index: error: no readable image ({', '.join(IMAGE_EXTENSIONS)}) under {images}; "
              f"{out} holds none", file=sys.stderr)
        return 1
    print(f"wrote {out}: {len(gallery)} images")
    return 0


def search(
    model: str,
    gallery: str,
    query: list[str] | None = None,
    queries: str | None = None,
    top_k: PositiveInt = 10,
    out: str | None = None,
    images_root: str | None = None,
    device: str | None = None,
) -> int:
    """Rank the images of a gallery file (from 'tipr index') by text queries, by cosine similarity.

    Prints rank, score and path of the top_k images of each query; --out also
    saves a contact sheet, one row per query.

    Args:
        model: the model that indexed the gallery: a pretrained folder, a hub id or a TIPRModule
            checkpoint (.ckpt). Another model is refused, naming both.
        gallery: gallery file written by 'tipr index'.
        query: a text query; repeat --query for several (or a list in a --config file).
        queries: text file of queries, UTF-8, one per line (blank lines ignored); added after --query.
        top_k: images per query (at most the gallery size).
        out: save a contact sheet image here (.png, .jpg, ...): a row per query, its hits with rank and score.
        images_root: read the contact sheet's images from this folder (default: the indexed folder).
        device: where the model runs (default: cuda if available, else cpu).
    """
    from PIL import Image

    texts = list(query or []) + (read_queries(queries) if queries else [])
    if not texts:
        print("tipr search: error: give at least one query: --query TEXT or --queries FILE "
              "(a file with no non-blank line holds none)", file=sys.stderr)
        return 2
    if out is not None and Path(out).suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--out {out}: expected an image file name that says its format (.png, .jpg, ...)")
    loaded = GalleryIndex.load(gallery)
    network, processor = load_model(model, device)
    loaded.check_model(model_identity(network, model))
    hits = rank_gallery(network, processor, loaded.to(next(network.parameters()).device), texts, top_k)
    if top_k > len(loaded):
        print(f"note: --top_k {top_k} is more than the {len(loaded)} images of the gallery: showing all of them",
              file=sys.stderr)
    print(f"gallery {gallery}: {len(loaded)} images under {loaded.root}")
    for q, (text, row) in enumerate(zip(texts, hits), start=1):
        print(f"\nquery {q}: {text}")
        for hit in row:
            print(f"{hit.rank:4d}  {hit.score:.4f}  {hit.path}")
    if out is not None:
        from tipr.search.sheet import contact_sheet

        sheet = contact_sheet(loaded, texts, hits, images_root=images_root)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        sheet.save(out)
        print(f"\ncontact sheet: {out}")
    return 0
