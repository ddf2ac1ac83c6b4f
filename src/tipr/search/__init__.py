"""Search your own images by text with a trained model: a gallery index, ranked queries, contact sheets.

    tipr index --model outputs/synthetic/.../pretrained --images photos/ --out photos.gallery  # a folder
    tipr search --model outputs/synthetic/.../pretrained --gallery photos.gallery \\
        --query "a woman in a red coat" --top_k 5 --out hits.png

``--model`` is a pretrained folder, a Hugging Face hub id or a ``TIPRModule``
checkpoint (``.ckpt``); none of this imports Lightning. In a notebook::

    from tipr.pretrained import load_pretrained
    from tipr.search import GalleryIndex, build_index, contact_sheet, search

    model, processor = load_pretrained("outputs/synthetic/.../pretrained")  # a TIPRModel (SENModel, IRRAModel...), TIPRProcessor
    gallery, report = build_index(model, processor, "photos/", out="photos.gallery")
    print(report.summary())  # counts, and every file that could not be read
    gallery = GalleryIndex.load("photos.gallery")  # later, in another session: memory-mapped, nothing unpickled
    hits = search(model, processor, gallery, ["a woman in a red coat", "a man with a backpack"], top_k=5,
                  prefix="cam1/")  # [[SearchHit(path, score, rank, row)]], only images under photos/cam1/
    contact_sheet(gallery, ["a woman in a red coat"], hits[:1]).save("hits.png")

    # features you already have (N, D), e.g. from another encoder: no images encoded
    gallery = write_gallery("precomputed.gallery", paths, features)
    hits = search_features(gallery, query_features, top_k=10)

Modules: :mod:`~tipr.search.gallery` (the gallery folder format, reading it),
:mod:`~tipr.search.writer` (shards, journals, atomic commits, compaction),
:mod:`~tipr.search.identity` (the model fingerprint), :mod:`~tipr.search.indexing`
(scanning, incremental and resumable encoding), :mod:`~tipr.search.query`
(ranking, exact or through :mod:`~tipr.search.ann`, the FAISS index re-scored
exactly), :mod:`~tipr.search.onnx` (the image encoder through ONNX Runtime),
:mod:`~tipr.search.sheet` (contact sheets) and :mod:`~tipr.search.commands` (the
commands and their exit codes). Indexing on many devices is
:mod:`tipr.training.predict` (Lightning); nothing here imports it.
"""

from tipr.search.gallery import GALLERY_FORMAT, GALLERY_VERSION, GalleryError, GalleryIndex
from tipr.search.identity import model_fingerprint, model_identity
from tipr.search.indexing import IMAGE_EXTENSIONS, ImageFiles, IndexReport, build_index, scan_images
from tipr.search.query import SearchHit, read_queries, search, search_features
from tipr.search.sheet import contact_sheet
from tipr.search.writer import write_gallery

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
    "search_features",
    "write_gallery",
]
