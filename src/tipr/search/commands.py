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
from typing import TYPE_CHECKING, Literal

import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt

from tipr.search.gallery import GalleryIndex, model_identity
from tipr.search.indexing import IMAGE_EXTENSIONS, build_index, maybe_build_ann
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
    dtype: Literal["float32", "float16"] = "float32",
    shard_rows: PositiveInt = 1024,
    devices: int | str | None = None,
    num_nodes: PositiveInt = 1,
    accelerator: str = "auto",
    backend: Literal["torch", "onnx"] = "torch",
    onnx_precision: Literal["fp32", "int8"] = "fp32",
    ann: bool | None = None,
    compact: bool = False,
) -> int:
    """Encode every image under a folder (recursively) into a gallery folder for 'tipr search'.

    Run again on the same --out to encode only new and changed files (into new
    shards; untouched shards are not rewritten); rows of deleted files are marked
    deleted. A run killed at any moment leaves a readable gallery: the same command
    run again takes over what it had encoded and does the rest. Files that cannot
    be read are listed with their reason (exit 0 all the same; 1 when no image at
    all could be indexed).

    Args:
        model: the trained model: a pretrained folder ('tipr fit' writes <log_dir>/pretrained;
            'tipr convert'), a Hugging Face hub id, or a TIPRModule checkpoint (.ckpt).
        images: folder of images (.jpg, .jpeg, .png, .webp, any case), searched recursively.
        out: gallery folder to write (updated in place if it holds a gallery).
        batch_size: images per encoder batch.
        num_workers: image decoding processes per encoding process (default: min(4, CPUs)).
        device: where the model runs, in one process (default: cuda if available, else cpu).
        dtype: how features are stored: float32, or float16 (half the disk and memory; scores change by about 1e-3).
        shard_rows: rows per shard written while encoding: at most what a killed run loses.
        devices: encode on this many processes through Lightning's Trainer.predict (GPUs, or CPU
            processes with --accelerator cpu; -1: every GPU); with --num_nodes, on many machines
            (torchrun, or srun under SLURM). Default: one process, no Lightning.
        num_nodes: machines, with --devices (the gallery folder must be on a shared file system).
        accelerator: with --devices: auto, gpu or cpu.
        backend: torch, or onnx: the image encoder through ONNX Runtime on CPU (export it first
            with 'tipr export-onnx --model <folder>'; one process).
        onnx_precision: with --backend onnx: fp32, or int8 (faster; min cosine to torch printed by tipr export-onnx).
        ann: build an approximate (FAISS) index for fast search of a large gallery: true builds
            (or rebuilds) it, false never; default: when the gallery has 100,000 rows or more and
            the index is missing or misses more than a fifth of them. Scores stay exact (re-scored).
        compact: rewrite every shard without the deleted rows (done anyway when over a quarter of rows are deleted).
    """
    if backend == "onnx" and devices is not None:
        raise ValueError("--backend onnx runs in one process: drop --devices (or use --backend torch)")
    if ann:  # --ann true without FAISS: say so before encoding, not after
        from tipr.search.ann import _faiss

        _faiss()
    network, processor = load_model(model, "cpu" if devices is not None or backend == "onnx" else device)
    options = dict(checkpoint=model, batch_size=batch_size, num_workers=num_workers, dtype=dtype,
                   shard_rows=shard_rows)
    if devices is not None:
        from tipr.training.predict import index_on_devices

        result = index_on_devices(network, processor, images, out, devices=devices, num_nodes=num_nodes,
                                  accelerator=accelerator, **options)
        if result is None:  # another rank than 0: rank 0 reports
            return 0
        gallery, report = result
    else:
        encoder = None
        if backend == "onnx":
            encoder = onnx_encoder(model, network, onnx_precision)
        gallery, report = build_index(network, processor, images, out, encoder=encoder,
                                      compact=True if compact else None, **options)
    print(report.summary())
    if len(gallery) == 0:
        print(f"tipr index: error: no readable image ({', '.join(IMAGE_EXTENSIONS)}) under {images}; "
              f"{out} holds none", file=sys.stderr)
        return 1
    built = maybe_build_ann(out, ann)
    if built is not None:
        print(f"ANN index {built['factory']} over {built['rows']} rows built in {built['build_seconds']:.1f} s")
    print(f"wrote {out}: {len(gallery)} images in {len(gallery.shards)} shards")
    return 0


def onnx_encoder(model: str, network: TIPRModel, precision: str):
    """``--backend onnx``: the export in the pretrained folder ``model``, checked against the model."""
    from tipr.search.gallery import model_fingerprint
    from tipr.search.onnx import OnnxImageEncoder

    if not Path(model).expanduser().is_dir():
        raise ValueError(f"--backend onnx reads the ONNX export in the model's pretrained folder; --model {model} "
                         f"is not a folder (export one with: tipr export-onnx --model {model} --out <folder>)")
    return OnnxImageEncoder.from_folder(Path(model).expanduser(), model_fingerprint(network), precision)


def search(
    model: str,
    gallery: str,
    query: list[str] | None = None,
    queries: str | None = None,
    top_k: PositiveInt = 10,
    out: str | None = None,
    images_root: str | None = None,
    device: str | None = None,
    prefix: str | None = None,
    exact: bool | None = None,
) -> int:
    """Rank the images of a gallery (from 'tipr index') by text queries, by cosine similarity.

    Prints rank, score and path of the top_k images of each query; --out also
    saves a contact sheet, one row per query.

    Args:
        model: the model that indexed the gallery: a pretrained folder, a hub id or a TIPRModule
            checkpoint (.ckpt). Another model is refused, naming both.
        gallery: gallery folder written by 'tipr index' (or a format-1 gallery file of tipr 0.2).
        query: a text query; repeat --query for several (or a list in a --config file).
        queries: text file of queries, UTF-8, one per line (blank lines ignored); added after --query.
        top_k: images per query (at most the gallery size).
        out: save a contact sheet image here (.png, .jpg, ...): a row per query, its hits with rank and score.
        images_root: read the contact sheet's images from this folder (default: the indexed folder).
        device: where the model runs (default: cuda if available, else cpu).
        prefix: rank only the images under this sub-folder of the indexed folder (a camera, a day: cam1/).
        exact: true: never use the gallery's ANN index; false: always; default: for 100,000 rows or more.
            Printed scores are exact cosines either way.
    """
    from PIL import Image

    blank = [i for i, text in enumerate(query or [], start=1) if not text.strip()]
    if blank:
        print(f"tipr search: error: --query {blank[0]} of {len(query)} is blank: describe the person to find",
              file=sys.stderr)
        return 2
    texts = [text.strip() for text in query or []] + (read_queries(queries) if queries else [])
    if not texts:
        print("tipr search: error: give at least one query: --query TEXT or --queries FILE "
              "(a file with no non-blank line holds none)", file=sys.stderr)
        return 2
    if out is not None and Path(out).suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--out {out}: expected an image file name that says its format (.png, .jpg, ...)")
    loaded = GalleryIndex.load(gallery)
    network, processor = load_model(model, device)
    loaded.check_model(model_identity(network, model))
    hits = rank_gallery(network, processor, loaded, texts, top_k, prefix=prefix, exact=exact)
    shown = len(hits[0])
    if top_k > shown:
        where = f"under {prefix!r}" if prefix else "of the gallery"
        print(f"note: --top_k {top_k} is more than the {shown} images {where}: showing all of them", file=sys.stderr)
    print(f"gallery {gallery}: {len(loaded)} images under {loaded.root}" + (f", searching {prefix}" if prefix else ""))
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
