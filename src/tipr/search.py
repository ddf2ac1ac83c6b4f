"""Search your own images by text with a trained model: a gallery index, ranked queries, contact sheets.

    tipr index --ckpt best.ckpt --images photos/ --out photos.gallery
    tipr search --ckpt best.ckpt --gallery photos.gallery --query "a woman in a red coat" --top-k 5 --out hits.png

Notebook use::

    from tipr.model import TIPRModule
    from tipr.search import GalleryIndex, build_index, contact_sheet, search

    module = TIPRModule.load_from_checkpoint("best.ckpt", map_location="cpu")
    gallery = build_index(module, "photos/", out="photos.gallery")  # later: GalleryIndex.load("photos.gallery")
    hits = search(module, gallery, ["a woman in a red coat"], top_k=5)  # [[SearchHit(path, score, rank), ...]]
    contact_sheet(gallery, ["a woman in a red coat"], hits).save("hits.png")

Indexing encodes every ``.jpg`` / ``.jpeg`` / ``.png`` / ``.webp`` file under the
folder (recursively, extension case ignored) once, with the model's evaluation
transform, in a ``DataLoader`` with worker processes. Run again on the same
``--out``, it encodes only files that are new or whose size or modification
time changed, and drops the entries of files that are gone (saying how many).
A file that cannot be read (corrupt, truncated, not an image, unreadable
folder) is left out of the index and listed with its reason at the end; it is
tried again on the next run. ``tipr index`` then still exits 0, because the
index is valid for every other image; it exits 1 when the index holds no image
at all (nothing found or nothing readable; the empty gallery is still written)
or on an error, 2 on a usage error.

Searching encodes the queries, scores them against every gallery image
(cosine similarity: both sides are L2-normalised) and keeps the ``top_k`` best
with ``torch.topk``. A ``top_k`` larger than the gallery is clamped to its
size (the command says so). A gallery only makes sense with the model that
encoded it, so the gallery records the model's fingerprint (a SHA-256 over the
dual encoder's weights, with the image size and text length) and a search or
re-index with another model fails, naming both checkpoints. Queries come from
``--query`` (repeatable) and ``--queries FILE`` (UTF-8, one per line, blank
lines ignored). ``--out sheet.png`` saves one contact sheet for all of them:
a row per query, its text on top and its hits left to right with rank and
score, read from ``--images-root`` (default: the indexed folder).

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

It is written to a temporary file next to the target and renamed into place,
so an interrupted run leaves the previous gallery intact.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import textwrap
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

from tipr.data.datasets import read_image

if TYPE_CHECKING:
    from tipr.model import TIPRModule

__all__ = [
    "GALLERY_FORMAT",
    "GALLERY_VERSION",
    "IMAGE_EXTENSIONS",
    "GalleryError",
    "GalleryIndex",
    "IndexReport",
    "SearchHit",
    "build_index",
    "contact_sheet",
    "index_main",
    "model_fingerprint",
    "model_identity",
    "read_queries",
    "scan_images",
    "search",
    "search_main",
]

GALLERY_FORMAT = "tipr-gallery"
GALLERY_VERSION = 1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
#: Contact sheet tiles are the model's input size, scaled up by a whole factor to at least this height.
MIN_TILE_HEIGHT = 128
_PAD = 4


class GalleryError(ValueError):
    """A gallery file that is not one, is damaged, or belongs to another model."""


# ------------------------------------------------------------------ model identity

_fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_fingerprint(module: TIPRModule) -> str:
    """SHA-256 (hex) over the dual encoder's weights (names, dtypes, shapes, bytes), image size and text length.

    Only ``network.clip`` counts: the ID classifier and the TIR head change no
    feature. Hashing runs at about 1.7 GB/s (0.4 s for ViT-B/16); the result is
    kept per module until a weight is replaced or changed in place (tensor
    version counters), so searching query after query does not hash again.
    """
    state = module.network.clip.state_dict()
    key = tuple((name, t.data_ptr(), t._version, t.dtype) for name, t in state.items())
    cached = _fingerprints.get(module)
    if cached is not None and cached[0] == key:
        return cached[1]
    hp = module.hparams
    size = [int(s) for s in hp.image_size]
    h = hashlib.sha256(f"tipr-model image_size={size} text_length={int(hp.text_length)}\n".encode())
    for name, tensor in state.items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name} {t.dtype} {tuple(tensor.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy())
    fingerprint = h.hexdigest()
    _fingerprints[module] = (key, fingerprint)
    return fingerprint


def model_identity(module: TIPRModule, checkpoint: str | os.PathLike | None = None) -> dict[str, Any]:
    """What a gallery records about the model that encoded it (see the module docstring)."""
    hp = module.hparams
    return {
        "fingerprint": model_fingerprint(module),
        "checkpoint": str(Path(checkpoint).resolve()) if checkpoint is not None else None,
        "image_size": [int(s) for s in hp.image_size],
        "text_length": int(hp.text_length),
        "embed_dim": int(module.network.embed_dim),
    }


def _describe_model(identity: dict[str, Any]) -> str:
    h, w = identity["image_size"]
    name = identity["checkpoint"] or "an unnamed model"
    return f"{name} (fingerprint {identity['fingerprint'][:12]}, image {h}x{w}, text length {identity['text_length']})"


# ------------------------------------------------------------------ the index


def _count(n: int, singular: str, plural: str | None = None) -> str:
    return f"{n} {singular if n == 1 else plural or singular + 's'}"


@dataclass
class IndexReport:
    """What one :func:`build_index` run did."""

    folder: str
    found: int  # image files found under the folder
    encoded: list[str]  # files encoded in this run (new or changed), relative paths
    reencoded: int  # of those, files already indexed whose size or mtime changed
    kept: int  # unchanged entries taken over from the existing gallery
    dropped: list[str]  # entries of the existing gallery whose file is gone
    failed: dict[str, str]  # files that could not be read (relative path -> reason); not in the index
    previous_root: str | None = None  # the folder the existing gallery indexed, when it was another one

    def summary(self) -> str:
        """A few lines for people: counts, then every unreadable file with its reason."""
        lines = []
        if self.previous_root is not None:
            lines.append(f"the gallery indexed {self.previous_root} before; entries are matched by relative path")
        new = len(self.encoded) - self.reencoded
        lines.append(
            f"{self.folder}: {_count(self.found, 'image file')}; encoded {len(self.encoded)} "
            f"({new} new, {self.reencoded} changed), kept {self.kept} unchanged"
        )
        if self.dropped:
            lines.append(f"dropped {_count(len(self.dropped), 'entry', 'entries')} whose file is gone")
        if self.failed:
            lines.append(f"{_count(len(self.failed), 'file')} could not be read and {'is' if len(self.failed) == 1 else 'are'} "
                         f"not in the index:")
            lines += [f"  {path}: {reason}" for path, reason in sorted(self.failed.items())]
        return "\n".join(lines)


@dataclass
class GalleryIndex:
    """L2-normalised features of the images under ``root``, with what incremental indexing needs.

    ``features`` ``(N, D)`` float32, row ``i`` for ``paths[i]`` (relative, POSIX).
    ``file`` is where it was loaded from or saved to (for messages), ``report``
    what the :func:`build_index` call that returned it did; neither is saved.
    """

    root: str
    paths: list[str]
    features: torch.Tensor
    sizes: torch.Tensor  # int64 (N,)
    mtimes: torch.Tensor  # int64 (N,), st_mtime_ns
    model: dict[str, Any]
    failed: dict[str, str] = field(default_factory=dict)
    file: str | None = None
    report: IndexReport | None = None

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
        """Write the gallery file (format in the module docstring) atomically: temp file + rename."""
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
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            torch.save(payload, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
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
                f"gallery {self.name} was indexed with another model: {_describe_model(self.model)}; "
                f"the model given is {_describe_model(identity)}. Use the gallery's checkpoint, "
                f"or index the images again with {given} into another gallery file"
            )


def scan_images(folder: str | os.PathLike) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
    """Image files under ``folder``, recursively: ``({relative POSIX path: (size, mtime_ns)}, {path: reason})``.

    The second dict holds what could not even be looked at (a broken link, an
    unreadable sub-folder), so nothing under the folder goes unmentioned.
    """
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"image folder {folder} does not exist or is not a folder")
    found: dict[str, tuple[int, int]] = {}
    failed: dict[str, str] = {}

    def unreadable_folder(error: OSError) -> None:
        failed[Path(error.filename).relative_to(root).as_posix() + "/"] = f"{type(error).__name__}: {error.strerror}"

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable_folder):
        dirnames.sort()
        for name in filenames:
            if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            full = os.path.join(dirpath, name)
            relative = Path(full).relative_to(root).as_posix()
            try:
                stat = os.stat(full)
            except OSError as e:
                failed[relative] = f"{type(e).__name__}: {e.strerror}"
                continue
            found[relative] = (stat.st_size, stat.st_mtime_ns)
    return dict(sorted(found.items())), failed


class ImageFiles(Dataset):
    """Images to index: ``{"images": float32 (3, H, W), "error": str, "index": int}``.

    A file that cannot be read gives a zero image and the reason in ``error``
    (empty when read), so one bad file neither stops the loader nor gets lost.
    """

    def __init__(self, root: str, paths: Sequence[str], image_size: Sequence[int]):
        from tipr.data.transforms import build_eval_transform

        self.root = root
        self.paths = np.asarray(paths, dtype=np.str_)  # no per-object pages for forked workers to copy
        self.image_size = tuple(int(s) for s in image_size)
        self.transform = build_eval_transform(self.image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        try:
            image, error = self.transform(read_image(os.path.join(self.root, str(self.paths[i])))), ""
        except Exception as e:  # read_image wraps decoder errors and names the file; the reason is its cause
            cause = e.__cause__ or e
            image, error = torch.zeros(3, *self.image_size), f"{type(cause).__name__}: {cause}"
        return {"images": image, "error": error, "index": i}


def build_index(
    module: TIPRModule,
    folder: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    checkpoint: str | os.PathLike | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = True,
) -> GalleryIndex:
    """Encode the images under ``folder`` into a gallery, saved to ``out`` when given.

    If ``out`` already holds a gallery of the same model, only new and changed
    files are encoded and entries of vanished files dropped; a gallery of
    another model, or a file that is not a gallery, is an error (nothing is
    overwritten). ``checkpoint`` names the model in the gallery and in errors.
    Images are encoded on ``module.device``; ``num_workers`` loader processes
    decode them (default ``min(4, CPUs)``). The returned gallery's ``report``
    says what was done, including every file that could not be read.
    """
    if batch_size < 1 or (num_workers is not None and num_workers < 0):
        raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
    from tqdm import tqdm

    root = str(Path(folder).resolve())
    files, failed = scan_images(folder)
    identity = model_identity(module, checkpoint)
    previous = None
    if out is not None and Path(out).is_dir():
        raise IsADirectoryError(f"gallery output {out} is a folder; expected a file path")
    if out is not None and Path(out).exists():
        try:
            previous = GalleryIndex.load(out)
        except GalleryError as e:
            raise GalleryError(f"{e}; not overwriting it: choose another output file") from e
        previous.check_model(identity)
    old_rows = {path: i for i, path in enumerate(previous.paths)} if previous is not None else {}
    old_stats = list(zip(previous.sizes.tolist(), previous.mtimes.tolist())) if previous is not None else []

    def unchanged(path: str) -> bool:
        return files[path] == old_stats[old_rows[path]]

    kept = [path for path in files if path in old_rows and unchanged(path)]
    todo = [path for path in files if path not in old_rows or not unchanged(path)]
    dropped = [path for path in old_rows if path not in files]

    dim = identity["embed_dim"]
    features = torch.zeros(len(todo), dim)
    read = torch.zeros(len(todo), dtype=torch.bool)
    if todo:
        workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers
        device = module.device
        loader = DataLoader(
            ImageFiles(root, todo, module.hparams.image_size),
            batch_size=batch_size,
            num_workers=workers,
            pin_memory=device.type == "cuda",
        )
        with tqdm(total=len(todo), unit="img", desc="indexing", disable=not progress, file=sys.stderr) as bar:
            for batch in loader:
                ok = torch.tensor([not error for error in batch["error"]])  # (B,)
                for i, error in zip(batch["index"].tolist(), batch["error"]):
                    if error:
                        failed[todo[i]] = error
                if ok.any():
                    images = batch["images"][ok].to(device, non_blocking=True)  # (b, 3, H, W)
                    features[batch["index"][ok]] = module.encode_images(images, batch_size=batch_size).cpu()
                    read[batch["index"][ok]] = True
                bar.update(len(ok))

    encoded = [path for path, ok in zip(todo, read.tolist()) if ok]
    reused = previous.features[[old_rows[path] for path in kept]] if kept else torch.zeros(0, dim)
    unsorted = kept + encoded
    order = sorted(range(len(unsorted)), key=unsorted.__getitem__)
    paths = [unsorted[i] for i in order]
    stats = torch.tensor([files[path] for path in paths], dtype=torch.int64).reshape(-1, 2)  # (N, 2): size, mtime
    gallery = GalleryIndex(
        root=root,
        paths=paths,
        features=torch.cat([reused, features[read]])[order],  # (N, D), rows in path order
        sizes=stats[:, 0].clone(),
        mtimes=stats[:, 1].clone(),
        model=identity,
        failed=dict(sorted(failed.items())),
        report=IndexReport(
            folder=root,
            found=len(files),
            encoded=encoded,
            reencoded=sum(path in old_rows for path in encoded),
            kept=len(kept),
            dropped=dropped,
            failed=dict(sorted(failed.items())),
            previous_root=previous.root if previous is not None and previous.root != root else None,
        ),
    )
    if out is not None:
        gallery.save(out)
    return gallery


# ------------------------------------------------------------------ search


@dataclass(frozen=True)
class SearchHit:
    """One ranked gallery image: ``path`` relative to the gallery root, cosine ``score``, ``rank`` from 1."""

    path: str
    score: float
    rank: int


def search(
    module: TIPRModule, gallery: GalleryIndex, queries: str | Sequence[str], top_k: int = 10
) -> list[list[SearchHit]]:
    """The ``top_k`` best gallery images of each query, best first (``torch.topk``, no full sort).

    ``top_k`` larger than the gallery is clamped to its size. The module must
    be the one that encoded the gallery (:meth:`GalleryIndex.check_model`).
    """
    if isinstance(queries, str):
        queries = [queries]
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    gallery.check_model(model_identity(module))
    if len(gallery) == 0:
        raise GalleryError(f"gallery {gallery.name} holds no images")
    if len(queries) == 0:
        return []
    text = module.encode_captions(list(queries))  # (Q, D), normalised
    images = gallery.features.to(text.device, torch.float32, non_blocking=True)  # (N, D), normalised
    scores, top = torch.topk(text @ images.T, min(top_k, len(gallery)), dim=1)  # (Q, k), best first
    return [
        [SearchHit(gallery.paths[j], s, rank) for rank, (s, j) in enumerate(zip(row_scores, row_top), start=1)]
        for row_scores, row_top in zip(scores.tolist(), top.tolist())
    ]


def read_queries(path: str | os.PathLike) -> list[str]:
    """Queries from a UTF-8 text file, one per line; blank lines are ignored."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read queries from {path}: {type(e).__name__}: {e}") from e
    return [line.strip() for line in text.splitlines() if line.strip()]


def contact_sheet(
    gallery: GalleryIndex,
    queries: Sequence[str],
    hits: Sequence[Sequence[SearchHit]],
    *,
    images_root: str | os.PathLike | None = None,
    tile_size: Sequence[int] | None = None,
) -> Image.Image:
    """One row per query: the query text, then its hits left to right with ``#rank score`` under each.

    Images are read from ``images_root`` (default: the gallery's folder) and
    shown at ``tile_size`` (H, W); the default is the model's input size, scaled
    up by a whole factor to at least ``MIN_TILE_HEIGHT`` pixels. A hit whose
    file cannot be read any more is a grey tile, with a warning naming it.
    """
    from tipr.data.transforms import build_eval_transform
    from tipr.visualization import image_grid, to_pil

    if len(queries) != len(hits) or not all(hits):
        raise ValueError(f"{len(queries)} queries need as many non-empty rows of hits, got {[len(row) for row in hits]}")
    if tile_size is None:
        h, w = gallery.model["image_size"]
        factor = max(1, math.ceil(MIN_TILE_HEIGHT / h))
        tile_size = (h * factor, w * factor)
    tile_h, tile_w = (int(s) for s in tile_size)
    transform = build_eval_transform((tile_h, tile_w))
    root = Path(images_root) if images_root is not None else Path(gallery.root)
    blank = Image.new("RGB", (tile_w, tile_h), (200, 200, 200))

    def tile(path: str) -> Image.Image:
        try:
            return to_pil(transform(read_image(root / path)))
        except RuntimeError as e:
            warnings.warn(f"contact sheet: {e}; drawn as a grey tile")
            return blank

    strips = [
        image_grid([[tile(hit.path) for hit in row]], [[f"#{hit.rank} {hit.score:.3f}" for hit in row]], pad=_PAD)
        for row in hits
    ]
    columns = max(24, max(strip.width for strip in strips) // 6)  # about 6 pixels a character in the default font
    texts = ["\n".join(textwrap.wrap(f"{q}. {text}", columns)) or f"{q}." for q, text in enumerate(queries, start=1)]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [measure.multiline_textbbox((_PAD, _PAD), text, spacing=_PAD) for text in texts]  # (left, top, right, bottom)
    width = max([strip.width for strip in strips] + [box[2] + _PAD for box in boxes])
    sheet = Image.new("RGB", (width, sum(box[3] + _PAD + strip.height for box, strip in zip(boxes, strips))), "white")
    draw = ImageDraw.Draw(sheet)
    y = 0
    for text, box, strip in zip(texts, boxes, strips):
        draw.multiline_text((_PAD, y + _PAD), text, fill="black", spacing=_PAD)
        y += box[3] + _PAD
        sheet.paste(strip, (0, y))
        y += strip.height
    return sheet


# ------------------------------------------------------------------ command line


def _device(value: str) -> torch.device:
    try:
        return torch.device(value)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"not a torch device: {value!r} ({e})") from e


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="trained tipr checkpoint (.ckpt)")
    parser.add_argument(
        "--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the model runs (default: cuda if available, else cpu)",
    )


def _load_module(checkpoint: str, device: torch.device) -> TIPRModule:
    from tipr.model import TIPRModule

    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"--ckpt {checkpoint}: no such file")
    try:
        module = TIPRModule.load_from_checkpoint(checkpoint, map_location="cpu")
    except Exception as e:  # not a checkpoint, not a tipr one, damaged
        raise ValueError(f"--ckpt {checkpoint} is not a loadable tipr checkpoint ({type(e).__name__}: {e})") from e
    return module.eval().to(device)


def index_main(argv: Sequence[str] | None = None) -> int:
    """``tipr index``: encode a folder of images into a gallery file (exit codes in the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="tipr index",
        description="Encode every image under a folder (recursively) into a gallery file for 'tipr search'. "
        "Run again on the same --out to encode only new and changed files.",
    )
    _model_arguments(parser)
    parser.add_argument("--images", required=True, help=f"folder of images ({', '.join(IMAGE_EXTENSIONS)}, any case)")
    parser.add_argument("--out", required=True, help="gallery file to write (updated in place if it exists)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per encoder batch (default 64)")
    parser.add_argument("--num-workers", type=int, default=None, help="image decoding processes (default min(4, CPUs))")
    args = parser.parse_args(argv)
    try:
        module = _load_module(args.ckpt, args.device)
        gallery = build_index(
            module, args.images, args.out, checkpoint=args.ckpt, batch_size=args.batch_size, num_workers=args.num_workers
        )
    except (GalleryError, OSError, ValueError) as e:
        print(f"tipr index: error: {e}", file=sys.stderr)
        return 1
    print(gallery.report.summary())
    if len(gallery) == 0:
        print(f"tipr index: error: no readable image under {args.images}; {args.out} holds none", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {len(gallery)} images")
    return 0


def search_main(argv: Sequence[str] | None = None) -> int:
    """``tipr search``: print the best gallery images of each query, and optionally save a contact sheet."""
    parser = argparse.ArgumentParser(
        prog="tipr search",
        description="Rank the images of a gallery file (from 'tipr index') by text queries, by cosine similarity.",
    )
    _model_arguments(parser)
    parser.add_argument("--gallery", required=True, help="gallery file written by 'tipr index' with the same model")
    parser.add_argument("--query", action="append", default=[], help="a text query (repeat for several)")
    parser.add_argument("--queries", help="text file of queries, one per line (blank lines ignored)")
    parser.add_argument("--top-k", type=int, default=10, help="images per query (default 10; at most the gallery size)")
    parser.add_argument("--out", help="save a contact sheet PNG here: one row per query")
    parser.add_argument("--images-root", help="read the sheet's images from this folder (default: the indexed folder)")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"--top-k must be >= 1, got {args.top_k}")
    try:
        queries = list(args.query) + (read_queries(args.queries) if args.queries else [])
        if not queries:
            parser.error("give at least one query: --query TEXT or --queries FILE (a file with no non-blank line holds none)")
        gallery = GalleryIndex.load(args.gallery)
        module = _load_module(args.ckpt, args.device)
        gallery.check_model(model_identity(module, args.ckpt))
        hits = search(module, gallery.to(module.device), queries, args.top_k)
    except (GalleryError, OSError, ValueError) as e:
        print(f"tipr search: error: {e}", file=sys.stderr)
        return 1
    if args.top_k > len(gallery):
        print(f"note: --top-k {args.top_k} is more than the {len(gallery)} images of the gallery: showing all of them",
              file=sys.stderr)
    print(f"gallery {args.gallery}: {len(gallery)} images under {gallery.root}")
    for q, (query, row) in enumerate(zip(queries, hits), start=1):
        print(f"\nquery {q}: {query}")
        for hit in row:
            print(f"{hit.rank:4d}  {hit.score:.4f}  {hit.path}")
    if args.out:
        sheet = contact_sheet(gallery, queries, hits, images_root=args.images_root)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        sheet.save(args.out)
        print(f"\ncontact sheet: {args.out}")
    return 0
