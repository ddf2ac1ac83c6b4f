"""Search your own images by text with a trained model: a gallery index, ranked queries, contact sheets.

    tipr index --model outputs/synthetic/.../pretrained --images photos/ --out photos.gallery
    tipr search --model outputs/synthetic/.../pretrained --gallery photos.gallery \\
        --query "a woman in a red coat" --top_k 5 --out hits.png

``--model`` is a pretrained folder, a Hugging Face hub id or a ``TIPRModule``
checkpoint (``.ckpt``); none of this imports Lightning. In a notebook::

    from tipr.pretrained import load_pretrained
    from tipr.search import GalleryIndex, build_index, contact_sheet, search

    model, processor = load_pretrained("outputs/synthetic/.../pretrained")  # a TIPRModel (SENModel, IRRAModel...), TIPRProcessor
    gallery, report = build_index(model, processor, "photos/", out="photos.gallery")  # later: GalleryIndex.load(...)
    print(report.summary())  # counts, and every file that could not be read
    hits = search(model, processor, gallery, ["a woman in a red coat"], top_k=5)  # [[SearchHit(path, score, rank)]]
    contact_sheet(gallery, ["a woman in a red coat"], hits).save("hits.png")

Modules: :mod:`~tipr.search.gallery` (the gallery file format, the model
fingerprint), :mod:`~tipr.search.indexing` (scanning and incremental encoding),
:mod:`~tipr.search.query` (ranking), :mod:`~tipr.search.sheet` (contact sheets,
drawn by :func:`tipr.render.image_grid`) and :mod:`~tipr.search.commands` (the
two commands and their exit codes).
"""

from tipr.search.gallery import (
    GALLERY_FORMAT,
    GALLERY_VERSION,
    GalleryError,
    GalleryIndex,
    model_fingerprint,
    model_identity,
)
from tipr.search.indexing import IMAGE_EXTENSIONS, ImageFiles, IndexReport, build_index, scan_images
from tipr.search.query import SearchHit, read_queries, search
from tipr.search.sheet import contact_sheet

__all__ = [
    "GALLERY_FORMAT",
    "GALLERY_VERSION",
    "IMAGE_EXTENSIONS",
    "GalleryError",
    "GalleryIndex",
    "ImageFiles",
    "IndexReport",
    "SearchHit",
    "build_index",
    "contact_sheet",
    "model_fingerprint",
    "model_identity",
    "read_queries",
    "scan_images",
    "search",
]
